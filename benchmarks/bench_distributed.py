"""Two gloo processes, the same model, micro-batches and schedule: mplib's stages (`DistributedPipeline`, cut from
the blocks without the tracer) against torch's tracer-built `torch.distributed.pipelining` pipeline, and against the
in-process `mplib.Pipeline` (two CPU stand-in devices, one worker thread each).

Reports the median step time of each and the medians of per-round ratios (mplib's stages and the tracer's alternate
round after round in the same two processes; the in-process Pipeline runs in this process after them), and how far
each one's gradient of the tied embedding / head weight is from the single-device model's: the tracer copies the
tied weight into both stages and gives each only its own share of the gradient (pytorch#51931); mplib sums them.

    .venv/bin/python benchmarks/bench_distributed.py                        # GPT, 1F1B and GPipe, ~2 minutes
    .venv/bin/python benchmarks/bench_distributed.py --models gpt hf-gpt2 --rounds 5

Each step: forward and backward of one batch (no optimizer), both ranks between barriers, one intra-op thread per
process. Timings on 2 shared CPU cores vary run to run: compare the ratios, rerun for another sample.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mplib.distributed as md  # noqa: E402
from mplib.pipeline import Pipeline  # noqa: E402
from mplib.split import split  # noqa: E402

B, T, M, V = 16, 64, 4, 2048
BALANCE = [3, 3]  # embed, h.0, h.1 | h.2, h.3, head


def model(name: str):
    torch.manual_seed(0)
    if name == "gpt":
        from mplib.models.gpt import GPT, GPTConfig

        return GPT(GPTConfig(vocab_size=V, block_size=T, n_layer=4, n_head=4, n_embd=128))
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=T, n_layer=4, n_head=4, n_embd=128, bos_token_id=0,
                                      eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                      use_cache=False))


def lm_loss(output, targets):
    logits = output.logits if hasattr(output, "logits") else output
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


TIED = {"gpt": ("embed.wte.weight", "head.lm_head.weight"), "hf-gpt2": ("transformer.wte.weight", "lm_head.weight")}
CUT = {"gpt": "h.2", "hf-gpt2": "transformer.h.2"}  # the tracer's split point: stage 1 begins there


def _tracer(name, rank, x, schedule):
    """torch's own way: torch.export traces the model, split at CUT; None and the error if it fails."""
    from torch.distributed import pipelining as pp

    m = model(name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pipe = pp.pipeline(m, mb_args=(x[: B // M],), split_spec={CUT[name]: pp.SplitPoint.BEGINNING})
        stage = pipe.build_stage(rank, torch.device("cpu"))
    except Exception as exc:  # noqa: BLE001 - reported: "where the tracer works"
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    cls = pp.Schedule1F1B if schedule == "1f1b" else pp.ScheduleGPipe
    return (stage, cls(stage, n_microbatches=M, loss_fn=lm_loss)), None  # scale_grads: the mean, as ours


def _ranks(rank, world, name, schedule, rounds, x, y):
    m = model(name)
    ours = md.DistributedPipeline(m, BALANCE, loss_fn=lm_loss, chunks=M, schedule=schedule, example=x[: B // M])
    theirs, why = _tracer(name, rank, x, schedule)
    ok = torch.tensor([theirs is not None], dtype=torch.int32)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)  # both ranks use the tracer or neither
    theirs = theirs if ok.item() else None

    def run_ours():
        ours.zero_grad(set_to_none=True)
        ours.step(x, y)

    def run_theirs():
        stage, sched = theirs
        stage.submod.zero_grad(set_to_none=True)
        sched.step(x) if rank == 0 else sched.step(target=y, losses=[])

    runs = {"mplib": run_ours, **({"tracer": run_theirs} if theirs else {})}
    times = {k: [] for k in runs}
    for r in range(rounds + 1):  # round 0 warms up (gloo's connections, allocations)
        for k in (list(runs) if r % 2 else list(reversed(runs))):  # alternate who goes first
            dist.barrier()
            start = time.perf_counter()
            runs[k]()
            dist.barrier()
            if r:
                times[k].append(time.perf_counter() - start)
    held = {id(p) for p in ours.parameters()}
    tied = {"mplib": {n: p.grad for n, p in m.named_parameters()  # one name for the one tied tensor
                      if n in TIED[name] and id(p) in held and p.grad is not None}}
    if theirs:
        tied["tracer"] = {n: p.grad for n, p in theirs[0].submod.named_parameters(remove_duplicate=False)
                          if n in TIED[name] and p.grad is not None}
    return {"times": times, "tied": tied, "tracer_error": why}


def _in_process(name, schedule, rounds, x, y):
    pipe = Pipeline(split(model(name), ["cpu", "cpu"], BALANCE), chunks=M, schedule=schedule, loss_fn=lm_loss,
                    threads_per_worker=1)
    times = []
    try:
        for r in range(rounds + 1):
            pipe.zero_grad(set_to_none=True)
            start = time.perf_counter()
            pipe.step(x, y)
            if r:
                times.append(time.perf_counter() - start)
        grad = next(p.grad for n, p in pipe.named_parameters() if n.endswith("wte.weight"))
    finally:
        pipe.close()
    return times, grad


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["gpt"], choices=["gpt", "hf-gpt2"])
    ap.add_argument("--schedules", nargs="+", default=["1f1b", "gpipe"], choices=["1f1b", "gpipe"])
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}; 2 gloo processes x 1 thread; B={B}, T={T}, M={M}, balance {BALANCE}")
    for name in args.models:
        g = torch.Generator().manual_seed(0)
        x, y = torch.randint(0, V, (2, B, T), generator=g)
        ref = model(name)
        lm_loss(ref(x), y).backward()
        ref_tied = dict(ref.named_parameters())[TIED[name][0]].grad
        for schedule in args.schedules:
            res = md.launch(_ranks, 2, name, schedule, args.rounds, x, y, timeout=600)
            inproc, inproc_grad = _in_process(name, schedule, args.rounds, x, y)
            times = res[0]["times"]
            line = [f"{name} {schedule}: mplib stages {statistics.median(times['mplib']) * 1e3:7.1f} ms"]
            if "tracer" in times:
                ratio = statistics.median(t / o for t, o in zip(times["tracer"], times["mplib"]))
                line.append(f"tracer {statistics.median(times['tracer']) * 1e3:7.1f} ms ({ratio:.2f}x mplib's)")
            else:
                line.append(f"tracer: fails ({res[0]['tracer_error']})")
            line.append(f"in-process Pipeline {statistics.median(inproc) * 1e3:7.1f} ms "
                        f"({statistics.median(inproc) / statistics.median(times['mplib']):.2f}x)")
            print("; ".join(line))
            for kind in ("mplib", "tracer"):
                held = [(r, n, g) for r, out in enumerate(res) for n, g in out["tied"].get(kind, {}).items()]
                diffs = ", ".join(f"rank {r} {n} {(g - ref_tied).abs().max().item():.1e}" for r, n, g in held)
                if held:
                    print(f"    tied gradient vs one device, {kind}: max |diff| {diffs}")
            print(f"    tied gradient vs one device, in-process Pipeline: max |diff| "
                  f"{(inproc_grad - ref_tied).abs().max().item():.1e} (|grad| max {ref_tied.abs().max().item():.1e})")


if __name__ == "__main__":
    main()
