"""Faults and bad input end a DistributedPipeline job within a bound, naming what went wrong: a rank raising on a
micro-batch, a rank killed, a world that does not match the plan, too many stages, ranks started with different
plans or weights, a rendezvous nobody serves."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

from mplib.distributed import DistributedPipeline, LaunchError, launch


class Fault(nn.Module):
    """A block that fails on its `at`-th micro-batch once armed (after the stages were built): raises or dies."""

    def __init__(self, inner, how):
        super().__init__()
        self.inner, self.how, self.at, self.calls = inner, how, None, 0

    def forward(self, x):
        out = self.inner(x)
        if self.at is not None:
            if self.calls == self.at:
                if self.how == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                if self.how == "raise":
                    raise RuntimeError(f"block gives up on purpose at call {self.calls}")
                out.register_hook(_give_up)  # "backward": raises when autograd reaches this block
            self.calls += 1
        return out


def _give_up(grad):
    raise RuntimeError("block's backward gives up on purpose")


def mlp(how="raise", seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), Fault(nn.Linear(8, 8), how), nn.Linear(8, 2))


def mse(output, targets):
    return ((output - targets) ** 2).mean()


def _write_pid(where, rank):
    (where / f"{rank}.pid").write_text(str(os.getpid()))


def _assert_all_exited(where, n):
    for r in range(n):
        with pytest.raises(ProcessLookupError):  # reaped, not even a zombie
            os.kill(int((where / f"{r}.pid").read_text()), 0)


def _fails_on(rank, world, where, how, at, schedule):
    _write_pid(where, rank)
    x, y = torch.randn(8, 4), torch.randn(8, 2)
    model = mlp(how)
    pipe = DistributedPipeline(model, [2, 2], loss_fn=mse, chunks=4, schedule=schedule, example=x[:2], timeout=60)
    if rank == 1:
        model[2].at = at  # block 2 is on stage 1, rank 1
    pipe.step(x, y)
    return rank


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_a_rank_raising_on_micro_batch_m_ends_the_job_within_seconds_naming_rank_stage_and_micro_batch(
        tmp_path, schedule):
    start = time.monotonic()
    with pytest.raises(LaunchError, match=r"rank 1 of 2 raised StageError: stage 1 on rank 1 failed on micro-batch 2 "
                                          r"during its forward: RuntimeError: block gives up on purpose") as exc:
        launch(_fails_on, 2, tmp_path, "raise", 2, schedule, timeout=60, grace=1.0)
    assert exc.value.rank == 1 and time.monotonic() - start < 30  # well inside the 60 s timeout
    _assert_all_exited(tmp_path, 2)


def test_a_rank_raising_in_the_backward_of_micro_batch_m_is_named_too(tmp_path):
    with pytest.raises(LaunchError, match=r"rank 1 of 2 raised StageError: stage 1 on rank 1 failed on micro-batch 1 "
                                          r"during its backward: RuntimeError: block's backward gives up on purpose"):
        launch(_fails_on, 2, tmp_path, "backward", 1, "1f1b", timeout=60, grace=1.0)
    _assert_all_exited(tmp_path, 2)


def test_a_rank_killed_on_micro_batch_m_ends_the_job_naming_the_rank(tmp_path):
    start = time.monotonic()
    with pytest.raises(LaunchError, match=r"rank 1 of 2 died \(process 1 terminated with signal SIGKILL\)") as exc:
        launch(_fails_on, 2, tmp_path, "kill", 1, "1f1b", timeout=60, grace=1.0)
    assert exc.value.rank == 1 and time.monotonic() - start < 30
    _assert_all_exited(tmp_path, 2)


def _build(rank, world, balance, schedule, chunks_by_rank, seed_by_rank):
    DistributedPipeline(mlp(seed=seed_by_rank[rank]), balance, loss_fn=mse, chunks=chunks_by_rank[rank],
                        schedule=schedule, timeout=30)
    return rank


def test_a_world_that_does_not_match_the_plan_is_refused_at_once():
    start = time.monotonic()
    with pytest.raises(LaunchError, match=r"the plan has 4 stages, 1 per rank: 4 pipeline ranks x dp=1 x tp=1 = 4 "
                                          r"processes, but this job has 2; start 4"):
        launch(_build, 2, [1, 1, 1, 1], "1f1b", [4, 4], [0, 0], timeout=60)
    assert time.monotonic() - start < 30


def test_more_stages_than_blocks_is_refused_before_any_process_group():
    with pytest.raises(ValueError, match=r"a plan of 5 stages needs at least 5 blocks, but the model has 4"):
        DistributedPipeline(mlp(), [1, 1, 1, 1, 1], loss_fn=mse, chunks=4)
    with pytest.raises(ValueError, match=r"must be positive and sum to the model's 4 blocks"):
        DistributedPipeline(mlp(), [3, 2], loss_fn=mse, chunks=4)


def test_ranks_started_with_different_plans_or_weights_are_told_apart_by_the_fingerprint():
    start = time.monotonic()
    with pytest.raises(LaunchError, match=r"different plans or models \(detected at start by comparing a "
                                          r"fingerprint\): rank 1 has chunks 2 where rank 0 has 4"):
        launch(_build, 2, [2, 2], "gpipe", [4, 2], [0, 0], timeout=60)
    with pytest.raises(LaunchError, match=r"rank 1's parameters of block '0' differ from rank 0's: the processes "
                                          r"built their models from different seeds"):
        launch(_build, 2, [2, 2], "gpipe", [4, 4], [0, 1], timeout=60)
    assert time.monotonic() - start < 45


def test_an_unreachable_rendezvous_fails_within_its_timeout_naming_the_address():
    with socket.socket() as s:  # a port that was free a moment ago: nobody serves it
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    start = time.monotonic()
    run = subprocess.run([sys.executable, "-c", "import mplib.distributed as d; d.init(backend='gloo', timeout=3)"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode != 0 and time.monotonic() - start < 45
    assert f"rank 1 of 2 could not join the rendezvous at 127.0.0.1:{port} within 3 s" in run.stderr, run.stderr[-2000:]
