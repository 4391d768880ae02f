"""Every benchmark runs to the end on tiny arguments, so `make bench` does not break unseen.

The figures they print are not checked here (timing is for a quiet machine); only that each script
runs its whole path, including the predictions and the side-by-side timing, and exits 0.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

TINY = {
    "bench_distributed.py": ["--rounds", "1", "--schedules", "1f1b"],
    "bench_hf.py": ["--rounds", "1", "--batch", "4", "--seq", "8"],
    "bench_memory.py": ["--batch", "1"],
    "bench_optimal.py": ["--blocks", "30", "--devices", "4", "--repeats", "1"],
    "bench_partition.py": ["--skip-full", "--rounds", "1", "--embd", "64", "--seq", "4", "--chunks", "2", "--ks", "2"],
    "bench_pipeline.py": ["--repeats", "1", "--layers", "2", "--width", "32", "--seq", "8", "--batch", "4",
                          "--chunks", "2", "--no-dist"],
    "bench_speedups.py": ["--repeats", "1", "--no-quality", "--layers", "1", "--batch", "1", "--seq", "8",
                          "--pipe-layers", "2", "--pipe-width", "32", "--pipe-batch", "4"],
    "bench_split.py": ["--repeats", "1", "--warmup", "1", "--layers", "2", "--embd", "32", "--batch", "2",
                       "--seq", "8", "--transfer-mib", "1"],
    "bench_tensor_parallel.py": ["--repeats", "1", "--layers", "1", "--width", "32", "--seq", "8", "--batch", "2",
                                 "--vocab", "64"],
    "bench_wavefront.py": ["--repeats", "1", "--width", "32", "--batch", "4", "--seq", "8", "--time-chunks", "2"],
}


def test_every_benchmark_has_tiny_arguments():
    assert sorted(TINY) == sorted(p.name for p in (ROOT / "benchmarks").glob("bench_*.py"))


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(TINY))
def test_benchmark_runs_on_tiny_arguments(script):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *TINY[script]], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"{script} failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
