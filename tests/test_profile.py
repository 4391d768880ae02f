"""mplib.profile: measured and counted per-block costs, byte counts exact, bad input refused."""

import threading

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

import mplib.memory
from mplib.memory import OPTIMIZER_STATES
from mplib.models.gpt import GPT, GPTConfig
from mplib.profile import BlockCosts, analytic, measure
from mplib.train import lm_loss

TINY = GPTConfig(vocab_size=256, block_size=16, n_layer=2, n_head=2, n_embd=16)


def two_linears():
    return nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4)), torch.randn(3, 8)


def test_tiny_gpt_blocks_have_positive_times_and_their_parameter_bytes():
    model = GPT(TINY)
    costs = measure(model, torch.randint(0, 256, (2, 16)), repeats=2)
    assert costs.names == ["embed", "h.0", "h.1", "head"] and costs.source == "measured"
    assert all(t > 0 for t in costs.forward + costs.backward)
    blocks = model.blocks()
    want = [sum(p.numel() * 4 for p in b.parameters()) for b in blocks[:3]] + [2 * 16 * 4]  # head: ln_f only
    assert costs.param_bytes == want and costs.optimizer_bytes == [2 * b for b in want]  # Adam: two moments
    assert costs.boundary_bytes[:3] == [2 * 16 * 16 * 4] * 3  # (B, T, C) float32 hidden states
    assert costs.boundary_bytes[3] == 2 * 16 * 256 * 4  # logits (B, T, vocab)


def test_linear_stack_bytes_are_counted_exactly():
    model, x = two_linears()
    costs = measure(model, x, repeats=1, optimizer="sgd")
    assert costs.param_bytes == [(8 * 16 + 16) * 4, (16 * 4 + 4) * 4]
    assert costs.optimizer_bytes == costs.param_bytes  # SGD with momentum: one buffer per parameter
    assert costs.grad_bytes == costs.param_bytes
    # a Linear saves its input for the weight's gradient (its own weight is not an activation)
    assert costs.activation_bytes == [3 * 8 * 4, 3 * 16 * 4]
    assert costs.boundary_bytes == [3 * 16 * 4, 3 * 4 * 4]


@pytest.mark.parametrize("devices", ["cpu", ["cpu", "cpu"]])
def test_profiling_leaves_existing_gradients_untouched(devices):
    model, x = two_linears()
    model[0].weight.grad = torch.full_like(model[0].weight, 7.0)
    measure(model, x, devices, repeats=1)
    assert model[1].weight.grad is None
    torch.testing.assert_close(model[0].weight.grad, torch.full_like(model[0].weight, 7.0))


def test_analytic_costs_count_linear_flops_and_time_them_at_the_given_rate():
    model, x = two_linears()
    costs = analytic(model, x, flops_per_second=1e9)
    # forward 2*B*in*out; backward twice that (input gradient and weight gradient)
    assert costs.flops == [3 * 2 * 3 * 8 * 16, 3 * 2 * 3 * 16 * 4]
    assert costs.forward == pytest.approx([2 * 3 * 8 * 16 / 1e9, 2 * 3 * 16 * 4 / 1e9])
    assert costs.backward == pytest.approx([4 * 3 * 8 * 16 / 1e9, 4 * 3 * 16 * 4 / 1e9])
    assert costs.source == "analytic" and model[0].weight.grad is None


def test_analytic_bytes_equal_measured_bytes_on_a_tiny_gpt_and_halve_in_bfloat16():
    model, ids = GPT(TINY), torch.randint(0, 256, (2, 16))
    measured, counted = measure(model, ids, repeats=1), analytic(model, ids, flops_per_second=1e12)
    for field in ("param_bytes", "activation_bytes", "boundary_bytes"):
        assert getattr(counted, field) == getattr(measured, field), field
    assert counted.flops[1] > 0 and counted.flops[3] > counted.flops[1] / 2  # the head's matmul is big
    half = analytic(model, ids, flops_per_second=1e12, dtype=torch.bfloat16)
    assert half.param_bytes == [b // 2 for b in counted.param_bytes]
    assert all(p.grad is None for p in model.parameters())


def test_given_costs_fill_defaults_and_sum_state():
    costs = BlockCosts(forward=[1.0, 2.0], backward=[2.0, 4.0], param_bytes=[10, 20], optimizer_bytes=[20, 40])
    assert costs.time == [3.0, 6.0] and costs.state_bytes == [40, 80] and costs.names == ["0", "1"]
    assert costs.activation_bytes == [0, 0] and len(costs) == 2
    assert "fwd ms" in str(costs) and "params MiB" in str(costs) and "MB" not in str(costs)  # 2**20 bytes


def test_bad_profiling_options_are_rejected():
    model, x = two_linears()
    with pytest.raises(ValueError, match="repeats must be at least 1"):
        measure(model, x, repeats=0)
    with pytest.raises(ValueError, match="optimizer 'lion' is not one of"):
        measure(model, x, optimizer="lion")
    with pytest.raises(ValueError, match="flops_per_second must be > 0"):
        analytic(model, x, flops_per_second=0)
    with pytest.raises(ValueError, match="needs at least one block"):
        BlockCosts(forward=[], backward=[])
    with pytest.raises(ValueError, match="names has 1 entries but forward has 2 blocks"):
        BlockCosts(forward=[1.0, 1.0], backward=[1.0, 1.0], names=["a"])
    with pytest.raises(ValueError, match=r"param_bytes\[0\] = -5"):
        BlockCosts(forward=[1.0], backward=[1.0], param_bytes=[-5])


def test_a_loss_makes_the_last_block_cost_more_and_save_the_loss_activations():
    model, ids = GPT(TINY), torch.randint(0, 256, (2, 17))
    plain = measure(model, ids[:, :-1], repeats=1)
    with_loss = measure(model, ids[:, :-1], repeats=1, loss_fn=lm_loss, targets=ids[:, 1:])
    assert with_loss.activation_bytes[:-1] == plain.activation_bytes[:-1]
    # cross entropy saves its log-softmax: one float per logit, (B, T, vocab)
    assert with_loss.activation_bytes[-1] - plain.activation_bytes[-1] >= 2 * 16 * 256 * 4
    assert with_loss.boundary_bytes == plain.boundary_bytes
    with pytest.raises(ValueError, match="loss_fn and targets go together"):
        measure(model, ids[:, :-1], loss_fn=lm_loss)


# --- as the pipeline runs them: worker threads, intra-op threads, a load beside each block ----------

class Probe(nn.Module):
    """A Linear that notes, on each forward and backward, its tag, whether it is the profiled block or the
    load's copy of it (a copy has another id), the thread it runs on and that thread's intra-op threads."""

    def __init__(self, runs: list, tag: str = "") -> None:
        super().__init__()
        self.lin, self.origin, self.runs, self.tag = nn.Linear(8, 8), id(self), runs, tag  # copies share `runs`

    def note(self, kind: str) -> None:
        self.runs.append((kind + self.tag, self.origin == id(self), threading.current_thread(),
                          torch.get_num_threads()))

    def forward(self, x):
        self.note("F")
        y = self.lin(x)
        y.register_hook(lambda grad: self.note("B"))
        return y

    def __deepcopy__(self, memo):
        twin = type(self)(self.runs, self.tag)
        twin.lin.load_state_dict(self.lin.state_dict())
        twin.origin = self.origin  # a copy of the profiled block, not it
        return twin


def test_every_block_is_timed_on_a_worker_with_threads_per_worker_intra_op_threads():
    runs: list = []
    model, caller = nn.Sequential(Probe(runs), Probe(runs)), torch.get_num_threads()
    want = 1 if caller > 1 else 2  # unlike the caller's, so a worker that kept the caller's count shows
    measure(model, torch.randn(3, 8), ["cpu", "cpu"], repeats=2, threads_per_worker=want)
    timed = [r for r in runs if r[1]]
    assert sorted(k for k, *_ in timed) == ["B"] * 6 + ["F"] * 6  # 2 blocks x (warm-up + 2 runs)
    assert {r[3] for r in runs} == {want} and torch.get_num_threads() == caller
    workers = {r[2] for r in runs}
    assert len({r[2] for r in timed}) == 1 and len(workers) == 2 and threading.current_thread() not in workers
    for thread in workers:  # the workers do not outlive the call
        thread.join(timeout=10)
        assert not thread.is_alive()


_LOAD_CALLS: dict = {}  # thread -> forwards the load ran there
_LOAD_RAN = threading.Condition()


class LoadWitness(Probe):
    """A Probe whose profiled forward returns only once every load worker has begun a forward since it began."""

    def forward(self, x):
        me = threading.current_thread()
        with _LOAD_RAN:
            if self.origin != id(self):  # the load's copy
                _LOAD_CALLS[me] = _LOAD_CALLS.get(me, 0) + 1
                _LOAD_RAN.notify_all()
            else:
                start = {t: n for t, n in _LOAD_CALLS.items() if t is not me}
                ran = _LOAD_RAN.wait_for(lambda: len(_LOAD_CALLS) == 2 and all(
                    _LOAD_CALLS[t] > start.get(t, 0) for t in _LOAD_CALLS), timeout=10)
                self.runs.append(ran)
        return self.lin(x)

def test_the_other_workers_run_the_model_while_each_block_is_timed():
    _LOAD_CALLS.clear()
    seen: list = []
    model = nn.Sequential(LoadWitness(seen), LoadWitness(seen))
    measure(model, torch.randn(3, 8), ["cpu", "cpu", "cpu"], repeats=2, threads_per_worker=1)
    assert seen == [True] * 6  # every timed forward of both blocks had both load workers running beside it


def test_the_loss_runs_inside_the_last_block_on_the_timed_worker():
    runs: list = []
    model = nn.Sequential(Probe(runs, "0"), Probe(runs, "1"))

    def loss(output, targets):
        runs.append(("L", None, threading.current_thread(), None))
        return (output - targets).pow(2).mean()

    measure(model, torch.randn(3, 8), ["cpu", "cpu"], repeats=2, loss_fn=loss, targets=torch.zeros(3, 8))
    timed = next(r[2] for r in runs if r[1])
    # passes over all blocks (a warm-up pass + 2 timed ones), not one block's runs in a row; the loss
    # between the last block's forward and its backward
    assert [r[0] for r in runs if r[2] is timed] == ["F0", "B0", "F1", "L", "B1"] * 3
    assert any(r[0] == "L" and r[2] is not timed for r in runs)  # the load trains with the loss too


def test_the_load_beside_a_block_is_not_counted_in_its_bytes():
    model, ids = GPT(TINY), torch.randint(0, 256, (2, 17))
    alone = measure(model, ids[:, :-1], repeats=1, loss_fn=lm_loss, targets=ids[:, 1:])
    beside = measure(model, ids[:, :-1], ["cpu", "cpu"], repeats=1, loss_fn=lm_loss, targets=ids[:, 1:])
    assert beside.activation_bytes[1] > 0 and beside.device == "cpu"
    for field in ("param_bytes", "activation_bytes", "boundary_bytes", "optimizer_bytes"):
        assert getattr(beside, field) == getattr(alone, field), field


# --- tied weights: one owner, the first block that uses it -------------------------------------

def test_our_gpt_charges_its_tied_embedding_to_the_embedding_block_only():
    model, ids = GPT(TINY), torch.randint(0, 256, (2, 16))
    unique = sum(p.numel() * 4 for p in model.parameters())  # parameters() names the tied weight once
    assert unique == (256 * 16 + 16 * 16 + 2 * 3280 + 2 * 16) * 4  # wte, wpe, 2 layers, ln_f: 43,776 bytes
    est = mplib.memory.estimate(model, batch=2, seq=16)
    for costs in (measure(model, ids, repeats=1), analytic(model, ids, flops_per_second=1e12)):
        assert sum(costs.param_bytes) == unique and sum(costs.grad_bytes) == unique
        assert costs.param_bytes[0] == (256 * 16 + 16 * 16) * 4  # wte and wpe
        assert costs.param_bytes[-1] == 2 * 16 * 4  # the head's ln_f; its lm_head.weight is wte
        assert costs.optimizer_bytes[-1] == 2 * costs.param_bytes[-1]
        assert costs.param_bytes == [b.params for b in est.per_block]  # the rule of mplib.memory


def test_hf_gpt2_charges_its_tied_embedding_to_the_embedding_block_only():
    config = GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2, bos_token_id=0,
                        eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model, ids = GPT2LMHeadModel(config), torch.randint(0, 64, (2, 16))
    assert model.lm_head.weight is model.transformer.wte.weight
    unique = sum(p.numel() * 4 for p in model.parameters())
    for costs in (measure(model, ids, repeats=1), analytic(model, ids, flops_per_second=1e12)):
        assert costs.names[-1] == "head" and sum(costs.param_bytes) == unique
        assert costs.param_bytes[0] == (64 * 16 + 16 * 16) * 4  # wte and wpe
        assert costs.param_bytes[-1] == 2 * 16 * 4  # ln_f; lm_head.weight is wte


# --- one optimizer-state table ----------------------------------------------------------------

def test_optimizer_state_bytes_follow_mplib_memory_table():
    model, x = two_linears()
    assert OPTIMIZER_STATES["sgd"] == 1  # SGD with momentum: one buffer per parameter
    for name, states in [*OPTIMIZER_STATES.items(), (None, 0)]:
        for costs in (measure(model, x, repeats=1, optimizer=name), analytic(model, x, 1e9, optimizer=name)):
            assert costs.optimizer_bytes == [states * b for b in costs.param_bytes], name
    assert measure(model, x, repeats=1, optimizer="adam").optimizer_bytes[0] == 2 * (8 * 16 + 16) * 4
    for call in (lambda: measure(model, x, optimizer="lion"), lambda: analytic(model, x, 1e9, optimizer="lion")):
        with pytest.raises(ValueError, match=r"optimizer 'lion' is not one of \['adam', 'adamw', 'none', 'sgd'\]"):
            call()
