"""mplib.distributed.launch: results in rank order, failures end the job naming the rank, nothing left running;
and tensor parallelism over 2 gloo processes equals the single-process model."""

import os
import signal
import time
from collections import Counter

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import mplib.tensor_parallel as tp
from mplib.distributed import LaunchError, launch

# Rank functions live at module level: a spawned process imports them by name.


def _write_pid(where, rank):
    (where / f"{rank}.pid").write_text(str(os.getpid()))


def _sum_of_ranks(rank, world, where):
    _write_pid(where, rank)
    x = torch.tensor([float(rank + 1)])
    dist.all_reduce(x)  # a real gloo collective: every rank ends with 1 + 2 + ... + world
    return {"rank": rank, "world": world, "sum": x.item()}


def _rank_one_raises(rank, world, where):
    _write_pid(where, rank)
    if rank == 1:
        raise ValueError("rank 1 gives up on purpose")
    dist.all_reduce(torch.ones(1))  # rank 0 blocks here: rank 1 never comes
    return rank


def _rank_one_is_killed(rank, world, where):
    _write_pid(where, rank)
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    dist.all_reduce(torch.ones(1))
    return rank


def _sleeps(rank, world, where):
    _write_pid(where, rank)
    time.sleep(600)


def _assert_all_exited(where, n):
    pids = [int((where / f"{r}.pid").read_text()) for r in range(n)]
    for pid in pids:
        with pytest.raises(ProcessLookupError):  # reaped, not even a zombie
            os.kill(pid, 0)


def test_launch_returns_every_ranks_result_in_rank_order(tmp_path):
    assert launch(_sum_of_ranks, 2, tmp_path, timeout=60) == [{"rank": r, "world": 2, "sum": 3.0} for r in range(2)]
    _assert_all_exited(tmp_path, 2)


def test_a_raising_rank_ends_the_job_within_seconds_naming_the_rank_and_its_exception(tmp_path):
    start = time.monotonic()
    with pytest.raises(LaunchError, match=r"rank 1 of 2 raised ValueError: rank 1 gives up on purpose") as exc:
        launch(_rank_one_raises, 2, tmp_path, timeout=60, grace=1.0)
    assert exc.value.rank == 1 and time.monotonic() - start < 30  # not the 60 s timeout: stopped at once
    _assert_all_exited(tmp_path, 2)


def test_a_killed_rank_ends_the_job_naming_the_rank_and_the_signal(tmp_path):
    start = time.monotonic()
    with pytest.raises(LaunchError, match=r"rank 1 of 2 died \(process 1 terminated with signal SIGKILL\)") as exc:
        launch(_rank_one_is_killed, 2, tmp_path, timeout=60, grace=1.0)
    assert exc.value.rank == 1 and time.monotonic() - start < 30
    _assert_all_exited(tmp_path, 2)


@pytest.mark.slow
def test_a_job_past_its_timeout_is_stopped_and_reported(tmp_path):
    start = time.monotonic()
    with pytest.raises(LaunchError, match=r"ran past its timeout of 10 s; ranks \[0, 1\] were still running"):
        launch(_sleeps, 2, tmp_path, timeout=10, grace=1.0)
    assert time.monotonic() - start < 10 + 10
    _assert_all_exited(tmp_path, 2)


def test_launch_refuses_a_function_a_fresh_process_cannot_import():
    with pytest.raises(ValueError, match="lambda/local function.*top level of a .py module"):
        launch(lambda rank, world: rank, 2)
    with pytest.raises(ValueError, match="nprocs must be a positive int"):
        launch(_sum_of_ranks, 0)


# --- tensor parallelism over 2 gloo processes ---------------------------------------------------

def _model(name):
    torch.manual_seed(0)
    if name == "gpt":
        from mplib.models.gpt import GPT, GPTConfig

        return GPT(GPTConfig(vocab_size=65, block_size=16, n_layer=2, n_head=4, n_embd=32))  # 65: padded to 66
    if name == "hf-gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_layer=2, n_head=4, n_embd=32,
                                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16))


def _logits(model, ids):
    out = model(ids, use_cache=False) if hasattr(model, "config") and hasattr(model.config, "use_cache") else \
        model(ids)
    return out.logits if hasattr(out, "logits") else out


def _tp_step(rank, world, names, ids, targets):
    """On each rank: parallelize over the gloo group, one forward and backward, everything gathered back."""
    import warnings

    out = {}
    for name in names:
        for sp in (False, True):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the padded vocabulary is announced; tested elsewhere
                par = tp.parallelize(_model(name), dist.group.WORLD, sequence_parallel=sp)
            with tp.trace(par) as tr:
                logits = _logits(par, ids)
                F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)).backward()
            out[name, sp] = {"logits": logits.detach(), "grads": tp.unsplit_grads(par),
                             "state": tp.unsplit_state_dict(par), "layers": tr.by_layer()}
    return out


PER_LAYER = {False: Counter({("forward", "all_reduce"): 2, ("backward", "all_reduce"): 2}),
             True: Counter({("forward", "all_gather"): 2, ("forward", "reduce_scatter"): 2,
                            ("backward", "all_gather"): 2, ("backward", "reduce_scatter"): 2,
                            ("backward", "all_reduce"): 1})}


def _assert_two_processes_equal_one(names):
    ids, targets = torch.randint(0, 64, (2, 2, 8))
    results = launch(_tp_step, 2, names, ids, targets, timeout=120)
    for name in names:
        ref = _model(name)
        logits = _logits(ref, ids)
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)).backward()
        for sp in (False, True):
            for rank, res in enumerate(results):
                mine = res[name, sp]
                # fp32: the row-parallel sums and gloo's all-reduce add in another order than one matmul
                torch.testing.assert_close(mine["logits"], logits, rtol=1e-5, atol=1e-5)
                for pname, p in ref.named_parameters():
                    assert p.grad.abs().sum() > 0, pname
                    torch.testing.assert_close(mine["grads"][pname], p.grad, rtol=1e-5, atol=1e-5,
                                               msg=lambda m: f"{name} sp={sp} rank {rank} {pname}: {m}")
                for k, v in ref.state_dict().items():
                    assert torch.equal(mine["state"][k], v), k  # gathered back exactly, padding cut
                layers = {k: c for k, c in mine["layers"].items() if k[-1].isdigit()}
                assert len(layers) == 2 and all(c == PER_LAYER[sp] for c in layers.values()), layers


def test_tensor_parallel_gpt_over_two_gloo_processes_equals_the_single_process_model():
    _assert_two_processes_equal_one(["gpt"])


@pytest.mark.slow
def test_tensor_parallel_hf_gpt2_and_llama_over_two_gloo_processes_equal_the_single_process_models():
    _assert_two_processes_equal_one(["hf-gpt2", "hf-llama"])
