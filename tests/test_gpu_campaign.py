"""The GPU campaign's CPU dry run: every part runs, none fails, and the one report holds every section."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_campaign  # noqa: E402


@pytest.mark.slow
def test_the_cpu_dry_run_runs_every_part_and_writes_one_report(tmp_path):
    out = tmp_path / "report.md"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_campaign.py"), "--cpu-dry-run",
                           "--out", str(out), "--commit", "0123456789abcdef"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)  # ~45 CPU s
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = out.read_text()
    for heading in ("## Machine", "## Figures", "## Parts"):
        assert heading in text
    assert "commit 0123456789ab" in text and "CPU DRY RUN" in text
    for part in gpu_campaign.PARTS:
        assert re.search(rf"^### {part}: ok$", text, re.M), f"part {part} did not end ok:\n{text}"
        rows = re.findall(rf"^\| {part} \| .+ \| (.+?) \| .* \| .* \|$", text, re.M)
        assert rows, f"part {part} reported no figure"
    assert "Traceback" not in text and "FAILED" not in text and "TIMED OUT" not in text
    # the dry run's pytest part collects this campaign's CUDA tests and, with no GPU, skips every one
    n_cuda = len(re.findall(r"^def test_", (ROOT / "tests" / "test_cuda_paths.py").read_text(), re.M))
    assert re.search(rf"\| pytest \| cuda tests passed \| 0 of 0 run \((\d+) skipped\)", text)
    skipped = int(re.search(r"0 of 0 run \((\d+) skipped\)", text).group(1))
    assert skipped >= n_cuda  # parametrised tests count once per case
    assert not list(tmp_path.glob(".*.json"))  # the parts' scratch files are gone


def test_an_unknown_part_is_refused_by_name(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_campaign.py"), "--cpu-dry-run",
                           "--out", str(tmp_path / "r.md"), "--parts", "memroy"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "unknown part 'memroy'" in proc.stderr
