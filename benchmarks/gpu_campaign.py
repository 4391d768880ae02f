"""The GPU campaign: `pytest -m cuda`, then every GPU figure of mplib, into ONE markdown report.

Sets up from the repository alone (an interpreter with torch: this one, else `make setup`'s venv;
mplib from this checkout), then runs each part in its own process with its own time cap, so a
crash or a hang loses that part only. `--cpu-dry-run` takes the same paths on the CPU, tiny.

    python3 benchmarks/gpu_campaign.py --out "$OUT/gpu-campaign.md"     # on a GPU machine, < 8 min
    .venv/bin/python benchmarks/gpu_campaign.py --cpu-dry-run --out /tmp/dry.md   # here, ~1 min
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# part -> (time cap in seconds, what it measures, the target)
PARTS = {
    "pytest": (150, "`pytest -m cuda`: every CUDA branch against its CPU reference", "all pass"),
    "h2d_copy": (40, "pinned host-to-device copy through `mplib.transfer` vs the raw pinned copy", ">= 90%"),
    "overlap": (40, "share of an activation copy hidden behind compute (side stream + events)", ">= 90%"),
    "memory": (90, "`memory.estimate` vs `torch.cuda.max_memory_allocated`, GPT-2 small and BERT-base",
               "within 5%"),
    "split": (60, "`SplitModel` overhead, two stages on one GPU", "<= 3%"),
    "pipeline": (75, "`Pipeline`, two stages sharing the GPU, GPipe and 1F1B", "none set"),
    "mfu": (100, "model FLOPs utilisation of our GPT training in bf16, GPT-2 medium and XL", ">= 45%"),
    "mfu_compiled": (150, "the same under torch.compile (GPT-2 medium)", ">= 45%"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-dry-run", action="store_true", help="the same paths on the CPU, tiny sizes")
    ap.add_argument("--out", help="report path (default benchmarks/results/gpu-<date>-<commit>.md)")
    ap.add_argument("--budget", type=float, default=420, help="seconds for all parts together")
    ap.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset, in this order")
    ap.add_argument("--commit", default=None, help="the commit measured, when the tree has no .git")
    ap.add_argument("--part", help=argparse.SUPPRESS)  # internal: run one part in this process
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--cap", type=float, default=60, help=argparse.SUPPRESS)
    args = ap.parse_args()
    unknown = [p for p in args.parts.split(",") if p and p not in PARTS]
    if unknown:
        sys.exit(f"unknown part {unknown[0]!r}; the parts are {', '.join(PARTS)}")
    env = setup()
    if args.part:
        return run_part(args)
    started = time.perf_counter()
    commit = args.commit or git_commit()
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"gpu-{date}-{commit[:10]}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".log").write_text("")  # this run's log only: each part appends its output
    facts = machine_facts(commit, args.cpu_dry_run)
    if not args.cpu_dry_run and not facts.get("_cuda"):
        sys.exit("no CUDA GPU visible to this torch: run on a GPU machine, or pass --cpu-dry-run")
    results = {}
    for name in [p for p in args.parts.split(",") if p]:
        left = args.budget - (time.perf_counter() - started)
        if left < 10:
            results[name] = {"status": "skipped: campaign budget spent", "rows": [], "notes": [], "seconds": 0,
                             "cpu_seconds": 0}
            continue
        results[name] = run_child(name, min(PARTS[name][0], left), args, env, out)
        r = results[name]
        print(f"[campaign] {name}: {r['status']} in {r['seconds']:.0f} s ({r['cpu_seconds']:.0f} CPU s)", flush=True)
    write_report(out, facts, results, args, time.perf_counter() - started)
    print(f"[campaign] report: {out}")


# -- set-up -------------------------------------------------------------------------------------

def setup() -> dict:
    """An interpreter with torch (else `make setup` and this script again under its venv); mplib importable.

    A GPU machine brings its own CUDA build of torch, so nothing is installed there: mplib is read
    from this checkout through PYTHONPATH, as an editable install would.
    """
    try:
        import torch  # noqa: F401
    except ImportError:
        venv = ROOT / ".venv" / "bin" / "python"
        if not venv.exists():
            subprocess.run(["make", "setup"], cwd=ROOT, check=True)
        os.execv(str(venv), [str(venv), __file__, *sys.argv[1:]])
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               MPLBACKEND="Agg", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "MPLBACKEND"):
        os.environ.setdefault(key, env[key])
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return env


def git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "mplib", "tests", "benchmarks"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10)
        if head.returncode == 0:
            return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def machine_facts(commit: str, dry: bool) -> dict:
    import torch
    import transformers

    facts = {"commit": commit, "date (UTC)": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
             "mode": "CPU DRY RUN: the figures are of tiny models on the CPU and mean nothing" if dry else "GPU",
             "python": platform.python_version(), "torch": torch.__version__,
             "CUDA (torch built with)": str(torch.version.cuda), "transformers": transformers.__version__,
             "CPU cores": str(os.cpu_count()), "kernel": platform.release()}
    facts["_cuda"] = torch.cuda.is_available()
    if facts["_cuda"]:
        p = torch.cuda.get_device_properties(0)
        facts["GPU"] = f"{p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, " \
                       f"compute capability {p.major}.{p.minor} ({torch.cuda.device_count()} visible)"
        facts["cuDNN"] = str(torch.backends.cudnn.version())
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        if smi.returncode == 0:
            facts["nvidia-smi (name, driver, memory, max SM clock)"] = smi.stdout.strip().replace("\n", "; ")
    except (OSError, subprocess.SubprocessError):
        facts["nvidia-smi"] = "not found"
    return facts


# -- running the parts ----------------------------------------------------------------------------

def run_child(name: str, cap: float, args: argparse.Namespace, env: dict, out: Path) -> dict:
    """Run one part in a fresh process under `cap` seconds; its rows survive a crash or the cap."""
    result = out.with_name(f".{out.stem}.{name}.json")
    result.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--part", name, "--result", str(result), "--cap", str(cap)]
    if args.cpu_dry_run:
        cmd.append("--cpu-dry-run")
    t0, cpu0 = time.perf_counter(), _children_cpu()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=cap + 15)
        rc, log = proc.returncode, proc.stdout + proc.stderr
        status = "ok" if rc == 0 else f"FAILED (exit {rc})"
    except subprocess.TimeoutExpired as e:
        log = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        log += (e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        status = f"TIMED OUT after {cap:.0f} s (rows so far kept)"
    data = json.loads(result.read_text()) if result.exists() else {}
    result.unlink(missing_ok=True)
    with open(out.with_suffix(".log"), "a") as f:
        f.write(f"==== {name}: {status}\n{log}\n")
    return {"status": status, "rows": data.get("rows", []), "notes": data.get("notes", []),
            "error": data.get("error"), "log_tail": log[-3000:] if status != "ok" else "",
            "seconds": time.perf_counter() - t0, "cpu_seconds": _children_cpu() - cpu0}


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_part(args: argparse.Namespace) -> None:
    """Inside the child: one part, its rows written as they come; an exception is recorded, then re-raised."""
    deadline = time.perf_counter() + 0.75 * args.cap  # loops stop early and keep the rows they have
    path = Path(args.result)
    if args.part == "pytest":
        return pytest_part(path, args.cap, args.cpu_dry_run)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import gpu_campaign_parts as parts
    import torch

    import mplib.env

    mplib.env.seed_everything(0)
    dev = torch.device("cpu") if args.cpu_dry_run else torch.device("cuda", 0)
    result = parts.Result(path)
    result.save()
    try:
        parts.PARTS[args.part](dev, parts.TINY if args.cpu_dry_run else parts.Sizes(), deadline, result)
    except BaseException:
        data = {"rows": result.rows, "notes": result.notes, "error": traceback.format_exc()}
        path.write_text(json.dumps(data))
        raise


def pytest_part(path: Path, cap: float, dry: bool) -> None:
    """`pytest -m cuda` over every test file (the dry run: this campaign's own CUDA tests only)."""
    junit = path.with_suffix(".xml")
    target = ["tests/test_cuda_paths.py"] if dry else ["tests"]
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", *target, "-q", "-rfE", "-p", "no:cacheprovider",
           "--continue-on-collection-errors", f"--junitxml={junit}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=cap - 5)
    print(proc.stdout[-20000:], proc.stderr[-5000:])
    rows, notes = [], [f"command: {' '.join(cmd[1:])}"]
    if junit.exists():
        suite = ET.parse(junit).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
        rows.append(["cuda tests passed", f"{passed} of {n['tests'] - n['skipped']} run ({n['skipped']} skipped)",
                     "all pass", n["failures"] + n["errors"] == 0 and n["tests"] > 0])
        for case in suite.iter("testcase"):
            for bad in list(case.findall("failure")) + list(case.findall("error")):
                notes.append(f"{bad.tag.upper()} {case.get('classname')}::{case.get('name')}: "
                             f"{(bad.get('message') or '')[:400]}")
        junit.unlink()
    notes.append("summary: " + (proc.stdout.strip().splitlines() or ["(no output)"])[-1])
    path.write_text(json.dumps({"rows": rows, "notes": notes}))
    if proc.returncode not in (0, 1):  # 1: some test failed (recorded above); other codes: pytest broke
        sys.exit(proc.returncode)


# -- the report -------------------------------------------------------------------------------------

def write_report(out: Path, facts: dict, results: dict, args: argparse.Namespace, seconds: float) -> None:
    lines = [f"# GPU campaign{' (CPU dry run)' if args.cpu_dry_run else ''}: {facts['date (UTC)']} UTC, "
             f"commit {facts['commit'][:12]}", "",
             "Written by `benchmarks/gpu_campaign.py`" + (" --cpu-dry-run" if args.cpu_dry_run else "")
             + f"; {len(results)} parts in {seconds:.0f} s. Each part ran in its own process under its own cap.", "",
             f"Command: `{' '.join(['python3', 'benchmarks/gpu_campaign.py', *sys.argv[1:]])}`", "",
             "## Machine", "", "| fact | value |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in facts.items() if not k.startswith("_")]
    lines += ["", "## Figures", "", "| part | figure | measured | target | met |", "| --- | --- | --- | --- | --- |"]
    for name, r in results.items():
        for fig, value, target, met in r["rows"]:
            mark = {True: "yes", False: "**no**", None: ""}[met]
            lines.append(f"| {name} | {fig} | {value} | {target} | {mark} |")
    lines += ["", "## Parts", ""]
    for name, r in results.items():
        cap, what, target = PARTS[name]
        lines += [f"### {name}: {r['status']}", "",
                  f"{what}. Target: {target}. Cap {cap} s (less if the budget ran low), took {r['seconds']:.0f} s.", ""]
        lines += [f"- {n}" for n in r["notes"] if n]
        if r.get("error"):
            lines += ["", "```", r["error"].strip()[-3000:], "```"]
        elif r.get("log_tail"):
            lines += ["", "```", r["log_tail"].strip(), "```"]
        lines.append("")
    out.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
