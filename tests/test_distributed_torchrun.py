"""Two "nodes" on this machine: two torchrun launches (--nnodes 2, c10d rendezvous on the loopback address) run
scripts/distributed_step.py as one job, and its pipelined step equals the unsplit model's on one device."""

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "distributed_step.py"


def _script():
    spec = importlib.util.spec_from_file_location("distributed_step", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_torchrun_nodes_on_loopback_run_one_job_equal_to_the_single_device_model(tmp_path):
    port = _free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-conf", "timeout=60",
           "--max-restarts", "0", str(SCRIPT), "--out", str(tmp_path), "--timeout", "60"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True) for _ in range(2)]  # its own group: stopped whole below
    logs, deadline = [], time.monotonic() + 150
    try:
        for node in nodes:
            logs.append(node.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
                node.wait()
    assert [node.returncode for node in nodes] == [0, 0], "\n\n".join(logs)[-4000:]
    step = _script()
    m = step.model()
    ids, targets = step.batch()
    loss = step.lm_loss(m(ids), targets)
    loss.backward()
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert sorted(g["lane"] for g in got) == ["rank 0: stage 0", "rank 1: stage 1"]
    seen = set()
    for g in got:
        # fp32: micro-batch losses summed and a tied gradient all-reduced add in another order than one batch
        torch.testing.assert_close(g["loss"], loss.detach(), rtol=1e-5, atol=1e-6)
        for name, grad in g["grads"].items():
            ref = dict(m.named_parameters())[name].grad
            assert ref.abs().sum() > 0, name
            torch.testing.assert_close(grad, ref, rtol=1e-5, atol=1e-7, msg=lambda s: f"{name}: {s}")
            seen.add(name)
    assert seen == {name for name, _ in m.named_parameters()}
