"""The CUDA branches of mplib against plain copies and the CPU model; skipped where no GPU is present.

Covers: side-stream copies ordered by events, pinned staging, non_blocking and blocking copies,
'cuda' naming the current GPU, the memory reference, bf16 autocast, SplitModel and Pipeline on
["cuda:0", "cuda:0"] (and from the host), and every synchronised CUDA timing (split, pipeline, profile).
"""

import copy

import pytest
import torch
from torch import nn

import mplib.profile
from mplib.memory import estimate
from mplib.models.gpt import GPT, GPT_TINY, GPTConfig
from mplib.pipeline import Pipeline
from mplib.split import split
from mplib.train import lm_loss
from mplib.transfer import copy_stream, to_device

pytestmark = pytest.mark.cuda
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
CUDA0 = torch.device("cuda", 0)


# -- helpers: GPU work of a known length --------------------------------------------------------

def sleep_cycles(ms: float) -> int:
    """Clock cycles `torch.cuda._sleep` spins for about `ms`, timed with CUDA events after a warm-up."""
    a = torch.randn(2048, 2048, device=CUDA0)
    for _ in range(20):  # raise the clocks: an idle GPU runs far slower than a busy one
        a @ a
    n = 20_000_000
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(n)
    end.record()
    end.synchronize()
    return int(n * ms / start.elapsed_time(end))


# A synchronised clock sees a ~50 ms kernel; an unsynchronised one sees its launch (~10 us). Clocks
# may rise up to ~6x between calibration and use (345 -> 1980 MHz on an H200), so a span must exceed
# 5 ms, a tenth of the calibrated length: far from both.
SLEEP_MS, AT_LEAST_S = 50, 5e-3


class _Sleep(torch.autograd.Function):
    """Identity that spins the GPU for `cycles` in forward and again in backward."""

    @staticmethod
    def forward(ctx, x, cycles):
        ctx.cycles = cycles
        with torch.cuda.device(x.device):  # _sleep runs on the current GPU
            torch.cuda._sleep(cycles)
        return x * 1.0

    @staticmethod
    def backward(ctx, grad):
        with torch.cuda.device(grad.device):
            torch.cuda._sleep(ctx.cycles)
        return grad * 1.0, None


class Sleep(nn.Module):
    def __init__(self, cycles: int) -> None:
        super().__init__()
        self.cycles, self.scale = cycles, nn.Parameter(torch.ones(()))

    def forward(self, x):
        return _Sleep.apply(x * self.scale, self.cycles)  # on the weight's path: its backward sleeps too


def busy(stream: torch.cuda.Stream, cycles: int) -> None:
    with torch.cuda.stream(stream):
        torch.cuda._sleep(cycles)


def grads(model: nn.Module) -> dict:
    return {k: v.grad for k, v in model.state_dict(keep_vars=True).items() if v.grad is not None}


def lm_batch(batch: int = 4, seq: int = 16, vocab: int = GPT_TINY.vocab_size):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(vocab, (batch, seq + 1), generator=g)
    return ids[:, :-1], ids[:, 1:]


# -- mplib.transfer -------------------------------------------------------------------------------

def test_side_stream_copy_of_nested_activations_equals_a_plain_copy():
    x = {"h": torch.randn(1024, 1024).pin_memory(), "pair": (torch.randn(8, 3), None), "n": 3}
    y = to_device(x, "cuda:0", non_blocking=True)
    assert y["h"].device == CUDA0 and y["pair"][0].device == CUDA0
    assert torch.equal(y["h"], x["h"].to("cuda:0")) and torch.equal(y["pair"][0], x["pair"][0].to("cuda:0"))
    assert y["pair"][1] is None and y["n"] == 3


def test_the_host_does_not_wait_for_the_copy_and_the_compute_stream_does():
    side, cycles = copy_stream("cuda:0"), sleep_cycles(SLEEP_MS)
    x = torch.randn(4096, 1024).pin_memory()  # 16 MiB
    busy(side, cycles)  # the copy queues behind ~50 ms of work on the copy stream
    y = to_device(x, "cuda:0", non_blocking=True)
    assert not side.query(), "to_device waited for its copy: the host should only have queued it"
    z = y * 2  # on the compute stream: reads y only after the copy's event, else uninitialised memory
    assert torch.equal(z.cpu(), x * 2)


def test_a_pageable_source_is_staged_at_once_so_changing_it_afterwards_changes_nothing():
    side, cycles = copy_stream("cuda:0"), sleep_cycles(SLEEP_MS)
    x = torch.randn(4096, 1024)
    want = x.clone()
    busy(side, cycles)
    y = to_device(x, "cuda:0", non_blocking=True)
    x.zero_()  # while the copy still waits: it reads the pinned staging copy, not x
    assert not side.query()
    assert torch.equal(y.cpu(), want)


def test_a_staging_buffer_is_not_reused_while_its_copy_is_pending():
    side, cycles = copy_stream("cuda:0"), sleep_cycles(SLEEP_MS)
    a, b = torch.randn(1 << 20), torch.randn(1 << 20)
    busy(side, cycles)
    ya = to_device(a, "cuda:0", non_blocking=True)  # a's staging block is released on return...
    yb = to_device(b, "cuda:0", non_blocking=True)  # ...and must not hold b before a's copy has run
    assert torch.equal(ya.cpu(), a) and torch.equal(yb.cpu(), b)


def test_non_blocking_picks_the_stream_copy_and_blocking_the_plain_one():
    x = torch.randn(64, 64, requires_grad=True)
    fast, plain = to_device(x, "cuda:0", non_blocking=True), to_device(x, "cuda:0")
    assert type(fast.grad_fn).__name__ == "_StreamCopyBackward"
    assert type(plain.grad_fn).__name__ == "ToCopyBackward0"
    assert torch.equal(fast, plain)
    w = torch.randn(64, 64, device="cuda:0")
    ((fast + plain) * w).sum().backward()  # both gradients come home to the CPU
    assert x.grad.device.type == "cpu"
    assert torch.equal(x.grad, 2 * w.cpu())


def test_cuda_names_the_current_gpu_so_no_copy_is_made_and_one_copy_stream_serves_it():
    torch.cuda.set_device(0)
    t = torch.randn(3, device="cuda:0")
    assert to_device(t, "cuda", non_blocking=True) is t
    assert copy_stream("cuda") is copy_stream("cuda:0")
    assert copy_stream("cuda:0") != torch.cuda.current_stream(0)


@two_gpus
def test_a_gpu_to_gpu_copy_waits_for_its_producer_and_sends_the_gradient_back():
    cycles = sleep_cycles(SLEEP_MS)
    base = torch.randn(1024, 1024, device="cuda:0", requires_grad=True)
    with torch.cuda.device(0):
        torch.cuda._sleep(cycles)  # the producer below is queued behind this on cuda:0's compute stream
    src = base * 3
    y = to_device(src, "cuda:1", non_blocking=True)
    assert torch.equal(y.cpu(), (base * 3).detach().cpu())
    y.sum().backward()
    assert base.grad.device == CUDA0 and torch.equal(base.grad, torch.full_like(base, 3.0))


# -- memory: the GPU's allocator as the reference -----------------------------------------------------

def test_parameters_on_the_gpu_take_the_bytes_the_estimate_counts():
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated(0)
    model = GPT(GPT_TINY).cuda()
    held = torch.cuda.memory_allocated(0) - before
    est = estimate(model, batch=2, seq=16)
    tensors = len(list(model.parameters())) + len(list(model.buffers()))
    assert est.params > 0
    assert est.params <= held <= est.params + 512 * tensors  # the caching allocator rounds blocks up to 512 B


def test_a_training_step_holds_at_least_the_weights_states_and_activations_the_estimate_counts():
    model = GPT(GPT_TINY).cuda()
    est = estimate(model, batch=4, seq=32)  # fake twins on cuda: what the CUDA kernels save
    assert est.activations > 0 and est.optimizer == 2 * est.params
    work = copy.deepcopy(model).cpu()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(0)
    base = torch.cuda.memory_allocated(0)
    work = work.cuda()
    ids = torch.randint(GPT_TINY.vocab_size, (4, 32), device="cuda:0")  # after base: embeddings save them
    opt = torch.optim.Adam(work.parameters())
    for _ in range(2):  # the second forward holds weights, Adam's states and every saved activation at once
        logits = work(ids)
        nn.functional.cross_entropy(logits.flatten(0, -2), torch.zeros(ids.numel(), dtype=torch.long,
                                                                       device="cuda:0")).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated(0) - base
    assert peak >= est.params + est.optimizer + est.activations


# -- bf16 on the GPU ------------------------------------------------------------------------------------

def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_bf16_autocast_forward_and_backward_stay_within_bf16_rounding_of_fp32():
    model = GPT(GPT_TINY).cuda()
    ref = copy.deepcopy(model)
    x, y = (t.cuda() for t in lm_batch(4, 32))
    ref_logits = ref(x)
    lm_loss(ref_logits, y).backward()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(x)
        loss = lm_loss(logits, y)
    loss.backward()
    assert logits.dtype == torch.bfloat16  # the products ran in bf16...
    assert rel(logits, ref_logits) > 0  # ...and so differ from fp32
    # bf16 keeps 8 significant bits (relative rounding 2**-9); products accumulate in fp32, so the
    # logits land ~0.3% from fp32 (a CPU autocast run of this model: 0.3% logits, <1% any gradient)
    assert rel(logits, ref_logits) < 3e-2
    mine, theirs = grads(model), grads(ref)
    assert set(mine) == set(theirs)
    for name in theirs:
        assert mine[name].dtype == torch.float32  # autocast keeps fp32 weights and so fp32 gradients
        assert rel(mine[name], theirs[name]) < 6e-2, name


def test_pipeline_workers_run_under_the_callers_autocast():
    dtypes = []
    sm = split(GPT(GPT_TINY), ["cuda:0", "cuda:0"])
    sm.stages[1].blocks[-1].lm_head.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    pipe = Pipeline(sm, chunks=2, loss_fn=lm_loss)
    x, y = lm_batch(4, 16)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        pipe.step(x, y)
    pipe.close()
    assert dtypes == [torch.bfloat16, torch.bfloat16]  # one per micro-batch, on a worker thread


# -- SplitModel and Pipeline on one GPU, equal to the CPU model -------------------------------------------

# GPU and CPU kernels sum in different orders: fp32 agreement to ~1e-6 relative, not bit for bit
TOL = dict(rtol=1e-4, atol=1e-5)


def test_split_on_one_gpu_twice_matches_the_cpu_model_in_outputs_and_grads():
    ref = GPT(GPT_TINY)
    sm = split(copy.deepcopy(ref), ["cuda:0", "cuda:0"])
    x, y = lm_batch()
    out = sm(x)
    assert out.device == CUDA0
    torch.testing.assert_close(out.cpu(), ref(x), **TOL)
    lm_loss(out, y.cuda()).backward()
    lm_loss(ref(x), y).backward()
    mine, theirs = sm.state_dict(keep_vars=True), dict(ref.named_parameters())
    for name, p in theirs.items():
        assert mine[name].grad is not None and mine[name].grad.device == CUDA0, name
        torch.testing.assert_close(mine[name].grad.cpu(), p.grad, **TOL, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("devices", [["cuda:0", "cuda:0"], ["cpu", "cuda:0"]])
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_pipeline_on_the_gpu_matches_the_cpu_model_in_loss_and_grads(devices, schedule):
    ref = GPT(GPT_TINY)
    pipe = Pipeline(split(copy.deepcopy(ref), devices), chunks=4, schedule=schedule, loss_fn=lm_loss)
    x, y = lm_batch(8, 16)
    loss = pipe.step(x, y)  # ["cpu", "cuda:0"]: the cut crosses host -> GPU on the side stream
    pipe.close()
    want = lm_loss(ref(x), y)
    want.backward()
    torch.testing.assert_close(loss.cpu(), want.detach(), **TOL)
    mine = pipe.model.state_dict(keep_vars=True)
    for name, p in ref.named_parameters():
        torch.testing.assert_close(mine[name].grad.cpu(), p.grad, **TOL, msg=lambda m: f"{name}: {m}")


def test_pipeline_dropout_on_the_gpu_is_the_same_with_and_without_recompute():
    cfg = GPTConfig(vocab_size=512, block_size=64, n_layer=2, n_head=2, n_embd=32, dropout=0.1)
    base = GPT(cfg)
    x, y = lm_batch(8, 16)
    got = {}
    for mode in ("never", "always"):
        pipe = Pipeline(split(copy.deepcopy(base), ["cuda:0", "cuda:0"]), chunks=4, loss_fn=lm_loss,
                        checkpoint=mode, seed=7)  # each (stage, micro-batch) draws from its own seed
        pipe.step(x, y)
        pipe.close()
        got[mode] = grads(pipe.model)
    for name, g in got["never"].items():
        torch.testing.assert_close(got["always"][name], g, msg=lambda m: f"{name}: {m}")
    assert any(g.abs().sum() > 0 for g in got["never"].values())


# -- synchronised CUDA timing -----------------------------------------------------------------------------

def test_a_recorded_split_times_the_gpu_work_of_each_stage_not_its_launch():
    cycles = sleep_cycles(SLEEP_MS)
    sm = split(nn.Sequential(Sleep(cycles), Sleep(cycles)), ["cuda:0", "cuda:0"], record=True)
    sm(torch.randn(4, device="cuda:0", requires_grad=True)).sum().backward()
    events = [e for e in sm.last_timeline.events if e.kind in ("forward", "backward")]
    assert sorted((e.lane, e.kind) for e in events) == [(0, "backward"), (0, "forward"),
                                                        (1, "backward"), (1, "forward")]
    for e in events:
        assert e.duration > AT_LEAST_S, (e.lane, e.kind, e.duration)


def test_pipeline_timeline_times_the_gpu_work_of_every_action():
    cycles = sleep_cycles(SLEEP_MS)
    pipe = Pipeline(split(nn.Sequential(Sleep(cycles), Sleep(cycles)), ["cuda:0", "cuda:0"]), chunks=2,
                    loss_fn=lambda out, t: ((out - t) ** 2).mean())
    pipe.step(torch.randn(4, 3), torch.zeros(4, 3))
    pipe.close()
    events = [e for e in pipe.timeline.events if e.kind in ("forward", "backward")]
    assert len(events) == 2 * 2 * 2  # stages x micro-batches x (forward, backward)
    for e in events:
        assert e.duration > AT_LEAST_S, (e.lane, e.kind, e.duration)


def test_profile_measure_on_the_gpu_times_the_kernels_of_each_block():
    cycles = sleep_cycles(SLEEP_MS)
    model = nn.Sequential(Sleep(cycles), nn.Linear(3, 3), Sleep(cycles))
    # worker 1 trains a copy of the model on the same GPU meanwhile (its kernels share the device)
    costs = mplib.profile.measure(model, torch.randn(4, 3), ["cuda:0", "cuda:0"], repeats=2)
    assert costs.device == "cuda:0" and costs.source == "measured"
    for b in (0, 2):
        assert costs.forward[b] > AT_LEAST_S and costs.backward[b] > AT_LEAST_S, b


@two_gpus
def test_pipeline_workers_compute_on_their_own_gpu():
    seen = []

    class Where(nn.Linear):
        def forward(self, x):
            seen.append((x.device.index, torch.cuda.current_device()))
            return super().forward(x)

    pipe = Pipeline(split(nn.Sequential(Where(3, 3), Where(3, 3)), ["cuda:0", "cuda:1"]), chunks=2,
                    loss_fn=lambda out, t: out.sum())
    pipe.step(torch.randn(4, 3), torch.zeros(4, 3))
    pipe.close()
    assert sorted(set(seen)) == [(0, 0), (1, 1)]


@two_gpus
def test_a_recorded_split_over_two_gpus_times_the_second_gpus_work():
    cycles = sleep_cycles(SLEEP_MS)
    sm = split(nn.Sequential(nn.Linear(4, 4), Sleep(cycles)), ["cuda:0", "cuda:1"], record=True)
    sm(torch.randn(2, 4))
    fwd = [e for e in sm.last_timeline.events if e.kind == "forward" and e.lane == 1]
    assert fwd and fwd[0].duration > AT_LEAST_S


# -- tensor parallel: a rank thread per device --------------------------------------------------------

def test_tensor_parallel_ranks_on_the_host_and_a_gpu_reduce_to_one_sum_on_their_own_devices():
    from mplib.tensor_parallel import LocalGroup

    def fn(g, x):
        assert g.device.type != "cuda" or torch.cuda.current_device() == g.device.index  # the rank's GPU is current
        return g.all_reduce(x * (g.rank + 1))

    out = LocalGroup(["cpu", "cuda:0"]).run(fn, torch.ones(2), replicated=False)
    assert out[0].device.type == "cpu" and out[1].device == CUDA0
    for o in out:
        assert torch.equal(o.cpu(), torch.full((2,), 3.0))


def test_tensor_parallel_refuses_two_ranks_on_one_gpu():
    from mplib.tensor_parallel import LocalGroup

    with pytest.raises(ValueError, match="repeat a GPU"):
        LocalGroup(["cuda:0", "cuda:0"])
