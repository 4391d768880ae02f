"""Pipelined vs naive split on 2 CPU stand-in devices, simulated vs measured step time, and our
in-process pipeline vs `torch.distributed.pipelining` over two gloo processes (same M, schedule).

Every worker computes with one intra-op thread (a stand-in device is one core). One step is the
forward and backward of one batch (gradients only, no optimizer). The three contenders run
interleaved, repeat after repeat, side by side in one run; the gloo workers wait blocked on a
queue (no CPU) while the in-process contenders run. Ratios are medians of per-repeat ratios.

    .venv/bin/python benchmarks/bench_pipeline.py              # about 25 s on a quiet 2-core machine
    .venv/bin/python benchmarks/bench_pipeline.py --repeats 3 --layers 4   # a quick look

On a machine with a GPU it also measures how much of an activation copy (`mplib.transfer`,
pinned memory and a side stream) hides behind compute on that GPU, in percent of the copy.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mplib.models.gpt import GPT, GPTConfig  # noqa: E402
from mplib.pipeline import Pipeline  # noqa: E402
from mplib.schedule import build  # noqa: E402
from mplib.simulate import simulate  # noqa: E402
from mplib.split import split  # noqa: E402
from mplib.train import lm_loss  # noqa: E402


def config(args: argparse.Namespace) -> GPTConfig:
    return GPTConfig(vocab_size=256, block_size=args.seq, n_layer=args.layers, n_head=4, n_embd=args.width)


def data(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return (torch.randint(256, (args.batch, args.seq), generator=g),
            torch.randint(256, (args.batch, args.seq), generator=g))


def balance(args: argparse.Namespace) -> list[int]:
    n = args.layers + 2  # embedding, layers, head
    return [n // 2, n - n // 2]


# -- torch.distributed.pipelining: one process per stage, gloo ----------------------------------

def dist_worker(rank: int, args: argparse.Namespace, commands, results) -> None:
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    blocks = GPT(config(args)).blocks()
    cut = balance(args)[0]
    # Each process builds its stage from the same blocks as ours; the tied head weight becomes a
    # copy on rank 1 (torch.distributed.pipelining has no cross-stage tying), same compute.
    mine = torch.nn.Sequential(*(blocks[:cut] if rank == 0 else blocks[cut:]))
    stage = PipelineStage(mine, rank, 2, torch.device("cpu"))
    kind = ScheduleGPipe if args.schedule == "gpipe" else Schedule1F1B
    sched = kind(stage, n_microbatches=args.chunks, loss_fn=lm_loss)
    x, y = data(args)
    while commands[rank].get() == "step":
        mine.zero_grad(set_to_none=True)
        dist.barrier()
        t0 = time.perf_counter()
        if rank == 0:
            sched.step(x)
        else:
            sched.step(target=y)
        dist.barrier()  # the step is over when both stages are done
        results.put((rank, time.perf_counter() - t0))
    dist.destroy_process_group()


class DistPipeline:
    """Two gloo processes that run one timed step each time `.step()` is called."""

    def __init__(self, args: argparse.Namespace) -> None:
        ctx = torch.multiprocessing.get_context("spawn")
        self.commands, self.results = [ctx.Queue(), ctx.Queue()], ctx.Queue()
        self.procs = [ctx.Process(target=dist_worker, args=(r, args, self.commands, self.results), daemon=True)
                      for r in range(2)]
        for p in self.procs:
            p.start()

    def step(self) -> float:
        for q in self.commands:
            q.put("step")
        return max(self.results.get(timeout=300)[1] for _ in range(2))  # the slower rank's view

    def close(self) -> None:
        for q in self.commands:
            q.put("stop")
        for p in self.procs:
            p.join(30)


# -- in-process contenders ----------------------------------------------------------------------

def timed(fn, faults: list[int]) -> float:
    """Seconds `fn` takes; appends the minor page faults it caused (fresh memory touched) to `faults`."""
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0 = time.perf_counter()
    fn()
    elapsed = time.perf_counter() - t0
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--schedule", default="gpipe", choices=["gpipe", "1f1b"])
    ap.add_argument("--no-dist", action="store_true", help="skip torch.distributed.pipelining")
    ap.add_argument("--port", type=int, default=29517)
    args = ap.parse_args()
    torch.set_num_threads(1)  # the naive split computes on one stand-in device at a time: one core
    print(f"torch {torch.__version__}, {os.cpu_count()} CPU cores; GPT {args.layers} layers x {args.width} wide, "
          f"batch {args.batch} x {args.seq} tokens, M={args.chunks}, schedule {args.schedule}, balance {balance(args)}; "
          f"load average {os.getloadavg()[0]:.1f}")

    torch.manual_seed(0)
    naive = split(GPT(config(args)), ["cpu", "cpu"], balance=balance(args))
    torch.manual_seed(0)
    ours = Pipeline(split(GPT(config(args)), ["cpu", "cpu"], balance=balance(args)), chunks=args.chunks,
                    schedule=args.schedule, loss_fn=lm_loss, threads_per_worker=1)
    x, y = data(args)

    def naive_step() -> None:
        naive.zero_grad(set_to_none=True)
        lm_loss(naive(x), y).backward()

    def our_step() -> None:
        ours.zero_grad(set_to_none=True)
        ours.step(x, y)

    theirs = None if args.no_dist else DistPipeline(args)
    rows: dict[str, list[float]] = {"naive": [], "ours": [], "theirs": [], "simulated": [], "replayed": []}
    faults: dict[str, list[int]] = {"naive": [], "ours": []}
    try:
        for _ in range(2):  # warm-up: allocators, thread pools, the gloo connection and shape inference
            naive_step(), our_step()
            if theirs:
                theirs.step()
        for r in range(args.repeats):
            rows["naive"].append(timed(naive_step, faults["naive"]))
            rows["ours"].append(timed(our_step, faults["ours"]))
            rows["simulated"].append(simulated_step(args))
            rows["replayed"].append(replayed_step(ours, args))
            if theirs:
                rows["theirs"].append(theirs.step())
            print(f"repeat {r}: " + ", ".join(f"{k} {v[-1] * 1e3:.0f} ms" for k, v in rows.items() if v))
    finally:
        if theirs:
            theirs.close()
    report(rows)
    print("minor page faults per step (fresh memory touched), median: "
          + ", ".join(f"{k} {statistics.median(v):.0f}" for k, v in faults.items()))
    load = os.getloadavg()[0]
    print(f"load average (1 min) at the end: {load:.1f} on {os.cpu_count()} cores"
          + (": other processes shared the cores, so these ratios understate a quiet machine"
             if load > 2.5 else ""))
    if torch.cuda.is_available():
        copy_overlap(torch.device("cuda", torch.cuda.current_device()), args.repeats)
    else:
        print("no GPU here: the overlap of activation copies with compute is measured on a machine with one")


def simulated_step(args: argparse.Namespace) -> float:
    """The step time `simulate` predicts from per-block costs profiled one micro-batch at a time.

    The reader's path: mplib.profile.measure -> mplib.partition.evaluate (per-stage sums) ->
    mplib.simulate. The loss is not a block, so its cost is left out (small next to the head).
    """
    import mplib.partition
    import mplib.profile

    torch.manual_seed(0)
    x, _ = data(args)
    costs = mplib.profile.measure(GPT(config(args)), x[: args.batch // args.chunks], repeats=5)
    plan = mplib.partition.evaluate(costs, balance(args), 2, schedule=args.schedule, chunks=args.chunks)
    return simulate(build(args.schedule, 2, args.chunks), plan.forward, plan.backward, plan.transfer).duration


def replayed_step(pipe: Pipeline, args: argparse.Namespace) -> float:
    """The step time `simulate` gives for the schedule with each stage's median forward/backward
    time taken from the last measured run (what two stages slow each other down by included):
    checks the schedule model alone, with the cost model out of the way.
    """
    tl = pipe.timeline
    med = [[statistics.median(e.duration for e in tl.events if e.lane == s and e.kind == kind) for s in range(2)]
           for kind in ("forward", "backward")]
    return simulate(build(args.schedule, 2, args.chunks), med[0], med[1]).duration


def copy_overlap(device: torch.device, repeats: int) -> None:
    """On a GPU: the share of a host-to-device activation copy that hides behind compute.

    The copy is the pipeline's (`mplib.transfer.to_device(..., non_blocking=True)`: pinned memory,
    a side stream); the compute is matrix products queued on the device's stream just before it,
    as a stage's earlier work still runs when the next activation arrives. Hidden share =
    (compute + copy - both) / the shorter of the two: 100% when the copy costs nothing extra.
    """
    from mplib.transfer import to_device

    act = torch.randn(16, 1024, 1024).pin_memory()  # a 64 MiB activation, staged in pinned memory
    a = torch.randn(4096, 4096, device=device)

    def clock(fn) -> float:
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    def copy() -> None:
        to_device(act, device, non_blocking=True)

    def compute(n: int) -> None:
        for _ in range(n):
            a @ a

    clock(copy), clock(lambda: compute(1))  # warm-up: copy stream, cuBLAS handles
    n = max(1, round(statistics.median(clock(copy) for _ in range(5))
                     / statistics.median(clock(lambda: compute(1)) for _ in range(5))))  # compute ~ copy
    hidden, times = [], []
    for _ in range(max(repeats, 5)):
        tc, tx, tb = clock(lambda: compute(n)), clock(copy), clock(lambda: (compute(n), copy()))
        hidden.append(min(1.0, max(0.0, (tc + tx - tb) / min(tc, tx))))
        times.append((tc, tx, tb))
    tc, tx, tb = (statistics.median(t[i] for t in times) for i in range(3))
    print(f"\n{torch.cuda.get_device_name(device)}: a 64 MiB activation copied host-to-device while {n} "
          f"4096x4096 products run: compute {tc * 1e3:.2f} ms, copy {tx * 1e3:.2f} ms, both {tb * 1e3:.2f} ms; "
          f"copy time hidden, median: {statistics.median(hidden):.0%}")


def report(rows: dict[str, list[float]]) -> None:
    def ratios(a: str, b: str) -> list[float]:
        return [x / y for x, y in zip(rows[a], rows[b])]

    med = {k: statistics.median(v) for k, v in rows.items() if v}
    print("\nmedian step time: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in med.items()))
    speedup = statistics.median(ratios("naive", "ours"))
    print(f"pipelined over naive split (naive / ours), median of ratios: {speedup:.2f}x  "
          f"(target >= 1.25x, bound 1.6x for M=4 on 2 devices)")
    err = statistics.median([abs(s - m) / m for s, m in zip(rows["simulated"], rows["ours"])])
    print(f"simulated (profiled costs) vs measured step time, median |error|: {err:.1%}  (target <= 15%)")
    err = statistics.median([abs(s - m) / m for s, m in zip(rows["replayed"], rows["ours"])])
    print(f"simulated (the run's own median stage times) vs measured, median |error|: {err:.1%}")
    if rows["theirs"]:
        print(f"ours over torch.distributed.pipelining (theirs / ours), median of ratios: "
              f"{statistics.median(ratios('theirs', 'ours')):.2f}x  (target >= 1.0x)")


if __name__ == "__main__":
    main()
