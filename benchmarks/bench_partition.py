"""Predicted vs measured pipeline step of uniform, by-parameter, library and optimal splits of a
GPT-2-small-shaped stack (12 layers, the 50257-token head), side by side in one run.

1. predicted only, full width (768, 12 heads, 1024 tokens), K = 2, 4, 8: costs counted from FLOPs
   under FakeTensorMode (`mplib.profile.analytic`, nothing runs);
2. predicted and measured, width reduced (default 512) so that CPU stand-ins can run it, for each
   K of `--ks` (default: as many stand-ins as there are cores, one core each):
   - costs: `mplib.profile.measure` as the pipeline runs the blocks: on a worker thread with one
     intra-op thread, beside K - 1 workers training the model, the head timed with its loss
     (`--profile alone`: each block alone, the way it was profiled before, to compare);
   - predicted step: `mplib.simulate` over the plan's per-stage forward/backward/transfer, 1F1B;
   - measured step: the plan run through `mplib.pipeline.Pipeline` (1F1B, one thread per worker),
     the plans taking turns round by round; ratios are medians of per-round ratios;
   - measured/predicted twice: against the step predicted from the profile the plans were chosen
     with, and against the step predicted from a fresh profile taken just before each round (the
     same plans). A shared machine drifts by several percent over a minute; the second compares
     the schedule model with a measurement made at the same moment, the first adds the drift.

accelerate's `infer_auto_device_map(..., "balanced")` and torchgpipe's `balance_by_time` are
compared when they are installed (`pip install -e .[bench]`, which `make bench` does); otherwise
the script says so and skips them.

    .venv/bin/python benchmarks/bench_partition.py              # about 2 min on 2 CPU cores
    .venv/bin/python benchmarks/bench_partition.py --ks 2 4 8 --rounds 9   # also oversubscribed K
    .venv/bin/python benchmarks/bench_partition.py --profile alone         # the costs as profiled before
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import mplib.env  # noqa: E402
from mplib.models.gpt import GPT, GPTConfig  # noqa: E402
from mplib.partition import by_params, evaluate, optimal, uniform  # noqa: E402
from mplib.pipeline import Pipeline  # noqa: E402
from mplib.profile import analytic, measure  # noqa: E402
from mplib.schedule import build  # noqa: E402
from mplib.simulate import simulate  # noqa: E402
from mplib.split import split  # noqa: E402
from mplib.train import lm_loss  # noqa: E402

FULL_KS = (2, 4, 8)
SCHEDULE = "1f1b"


def plans(costs, k: int, chunks: int, others: dict | None = None) -> dict:
    """The balances compared: uniform block counts, by parameter bytes, the libraries' (`others`:
    name -> balance), and `optimal`'s."""
    opts = dict(schedule=SCHEDULE, chunks=chunks)
    found = {"uniform": evaluate(costs, uniform(len(costs), k), k, **opts),
             "by_params": evaluate(costs, by_params(costs, k), k, **opts)}
    found.update({name: evaluate(costs, balance, k, **opts) for name, balance in (others or {}).items()})
    found["optimal"] = optimal(costs, k, **opts)
    return found


def predicted(plan, chunks: int) -> float:
    """The plan's step as `mplib.simulate` runs the schedule over its per-stage costs (seconds)."""
    schedule = build(SCHEDULE, len(plan.balance), chunks)
    return simulate(schedule, plan.forward, plan.backward, plan.transfer).duration


def library_balances(config: GPTConfig, k: int, sample: torch.Tensor | None) -> dict:
    """Balances that accelerate ("balanced" device map) and torchgpipe (`balance_by_time`) choose
    for the same blocks, where they are installed (`pip install -e .[bench]`) and their answer is
    a pipeline split (contiguous blocks, every device used); otherwise say what they did."""
    found = {}
    if importlib.util.find_spec("accelerate") is not None:
        import logging

        from accelerate import infer_auto_device_map
        from accelerate.utils import get_balanced_memory

        logging.getLogger("accelerate").setLevel(logging.ERROR)  # "device i is not available" on CPU
        with torch.device("meta"):
            model = GPT(config)
        whole = {i: sum(p.numel() * p.element_size() for p in model.parameters()) for i in range(k)}
        kinds = ["Embedding", "Block", "Head"]
        balanced = get_balanced_memory(model, max_memory=whole, no_split_module_classes=kinds)
        device_map = infer_auto_device_map(model, max_memory=balanced, no_split_module_classes=kinds)
        names = ["embed"] + [f"h.{i}" for i in range(config.n_layer)] + ["head"]
        placed = [next(d for key, d in device_map.items() if key == "" or n == key or n.startswith(key + "."))
                  for n in names]
        if placed == sorted(placed) and set(placed) == set(range(k)):
            found["accelerate"] = [placed.count(d) for d in range(k)]
        else:
            print(f"  K={k}: accelerate's balanced map is not a {k}-stage pipeline split, so it is not timed: "
                  f"devices per block {placed} (it keeps the tied head with the embedding)")
    if importlib.util.find_spec("torchgpipe") is not None and sample is not None:
        from torch import nn
        from torchgpipe.balance import balance_by_time

        found["torchgpipe"] = balance_by_time(k, nn.Sequential(*GPT(config).blocks()), sample, timeout=2.0,
                                              device=torch.device("cpu"))
    return found


def skipped_libraries() -> None:
    for lib, what in (("accelerate", "infer_auto_device_map(..., 'balanced')"), ("torchgpipe", "balance_by_time")):
        if importlib.util.find_spec(lib) is None:
            print(f"skipped {lib}'s {what}: {lib} is not installed (pip install -e .[bench])")


def print_predicted(costs, chunks: int, others: dict) -> None:
    print(f"{'K':>3}  {'plan':<11}{'balance':<34}{'predicted':>12}{'predicted / optimal':>21}")
    for k in FULL_KS:
        found = plans(costs, k, chunks, others[k])
        best = predicted(found["optimal"], chunks)
        for name, plan in found.items():
            step = predicted(plan, chunks)
            print(f"{k:>3}  {name:<11}{str(plan.balance):<34}{step * 1e3:>9.1f} ms{step / best:>20.2f}x")


def measure_steps(base: GPT, found: dict, k: int, chunks: int, batch: torch.Tensor, rounds: int,
                  reprofile) -> tuple[dict, dict]:
    """Per plan, the measured step of each timed round and the step predicted from that round's own
    profile (`reprofile()`, taken just before the round; seconds), the plans taking turns."""
    pipes = {name: Pipeline(split(copy.deepcopy(base), ["cpu"] * k, plan), chunks=chunks, schedule=SCHEDULE,
                            loss_fn=lm_loss, threads_per_worker=1) for name, plan in found.items()}
    x, y = batch[:, :-1], batch[:, 1:]
    times: dict[str, list[float]] = {name: [] for name in pipes}
    now: dict[str, list[float]] = {name: [] for name in pipes}
    for r in range(rounds + 1):
        if r > 0:  # round 0 warms up
            costs = reprofile()
            for name, plan in found.items():
                now[name].append(predicted(evaluate(costs, plan.balance, k, schedule=SCHEDULE, chunks=chunks), chunks))
        for name, pipe in pipes.items():  # interleaved: each round times every plan once
            pipe.zero_grad(set_to_none=True)
            start = time.perf_counter()
            pipe.step(x, y)
            if r > 0:
                times[name].append(time.perf_counter() - start)
    return times, now


def profile(config: GPTConfig, batch: torch.Tensor, k: int, how: str, micro: int):
    """Per-block costs of the measured model, as the K-stage pipeline runs them (or each block alone)."""
    devices = ["cpu"] * (k if how == "pipeline" else 1)
    return measure(GPT(config), batch[:micro, :-1], devices, repeats=5, loss_fn=lm_loss,
                   targets=batch[:micro, 1:], threads_per_worker=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--embd", type=int, default=512, help="width of the measured model (GPT-2 small: 768)")
    parser.add_argument("--seq", type=int, default=16, help="tokens per sequence of the measured model")
    parser.add_argument("--micro", type=int, default=1, help="sequences per micro-batch")
    parser.add_argument("--chunks", type=int, default=8, help="micro-batches per step (>= the largest K)")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds per K; each times every plan once")
    parser.add_argument("--ks", type=int, nargs="+", default=[max(1, min(8, os.cpu_count() or 1))],
                        help="stand-in counts to measure (default: one per core)")
    parser.add_argument("--profile", choices=("pipeline", "alone"), default="pipeline",
                        help="profile blocks beside the other workers' load (pipeline) or each alone")
    parser.add_argument("--skip-full", action="store_true", help="skip part 1 (predicted at full width)")
    args = parser.parse_args()
    mplib.env.seed_everything(0)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPU cores, schedule {SCHEDULE}, "
          f"{args.chunks} micro-batches per step")
    skipped_libraries()

    if not args.skip_full:
        full = GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768)
        with torch.device("meta"):
            shapes = GPT(full)  # analytic() needs shapes only: no 500 MB of weights
        ids = torch.zeros(args.micro, 1024, dtype=torch.long, device="meta")
        flop_costs = analytic(shapes, ids, flops_per_second=100e12)
        print(f"\n1. predicted, GPT-2 small at full width (768), 1024 tokens, {args.micro} sequence(s) per "
              "micro-batch, FLOP-counted costs at 100 TFLOP/s (library plans: accelerate only)")
        print_predicted(flop_costs, args.chunks, {k: library_balances(full, k, None) for k in FULL_KS})

    config = GPTConfig(vocab_size=50257, block_size=args.seq, n_layer=12, n_head=max(1, args.embd // 64),
                       n_embd=args.embd)
    batch = torch.randint(0, config.vocab_size, (args.chunks * args.micro, args.seq + 1))
    base = GPT(config)
    print(f"\n2. width {args.embd}, {args.seq} tokens, {args.micro} sequence(s) per micro-batch, blocks profiled "
          f"{'beside K - 1 workers training the model' if args.profile == 'pipeline' else 'each alone'}, "
          f"one thread per worker; medians of {args.rounds} rounds (per-round ratios)")
    print(f"{'K':>3}  {'plan':<11}{'balance':<22}{'predicted':>12}{'measured':>12}{'measured/predicted':>20}"
          f"{'.../per round':>17}{'measured/optimal':>18}")
    for k in args.ks:
        costs = profile(config, batch, k, args.profile, args.micro)
        found = plans(costs, k, args.chunks, library_balances(config, k, batch[:args.micro, :-1]))
        times, now = measure_steps(base, found, k, args.chunks, batch, args.rounds,
                                   lambda: profile(config, batch, k, args.profile, args.micro))
        for name, plan in found.items():
            step = predicted(plan, args.chunks)
            over_predicted = statistics.median(t / step for t in times[name])
            over_now = statistics.median(t / p for t, p in zip(times[name], now[name]))
            over_optimal = statistics.median(t / o for t, o in zip(times[name], times["optimal"]))
            print(f"{k:>3}  {name:<11}{str(plan.balance):<22}{step * 1e3:>9.1f} ms"
                  f"{statistics.median(times[name]) * 1e3:>9.1f} ms{over_predicted:>19.2f}x{over_now:>17.2f}x"
                  f"{over_optimal:>17.2f}x")
        layer = statistics.median(costs.time[1:-1])
        print(f"     (K={k}: the head with its loss costs {costs.time[-1] / layer:.1f} layers, the embedding "
              f"{costs.time[0] / layer:.1f}; {k} stand-ins on {os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
