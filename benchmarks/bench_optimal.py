"""How long `mplib.partition.optimal` takes on 1,000 blocks over 64 devices, and whether it proves its plan.

Random blocks (forward 0.5-1.5 ms, backward 1-3x forward), memory limits on, for GPipe and 1F1B
at several micro-batch counts, without transfers and over a link whose per-cut transfer either is
the same at every cut (a transformer's hidden state) or varies cut to cut (random activation
sizes: the hard case for 1F1B's bounds). Prints the median wall time of `--repeats` calls, the
search nodes expanded and the certified gap (0: proven optimal), and the same for the uniform
split's simulated step, for scale.

    .venv/bin/python benchmarks/bench_optimal.py             # about a minute on 2 CPU cores
    .venv/bin/python benchmarks/bench_optimal.py --blocks 200 --devices 16
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
import warnings

from mplib.partition import evaluate, optimal, uniform
from mplib.profile import BlockCosts


def instance(n: int, seed: int, same_cuts: bool) -> BlockCosts:
    rng = random.Random(seed)
    forward = [rng.uniform(0.5e-3, 1.5e-3) for _ in range(n)]
    return BlockCosts(forward=forward, backward=[f * rng.uniform(1, 3) for f in forward],
                      param_bytes=[rng.randint(1, 1000) for _ in range(n)],
                      activation_bytes=[rng.randint(1, 1000) for _ in range(n)],
                      boundary_bytes=[2**20 if same_cuts else rng.randint(1, 2**21) for _ in range(n)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=1000)
    ap.add_argument("--devices", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    n, k = args.blocks, args.devices
    cases = [("gpipe", 8), ("gpipe", k), ("1f1b", k), ("1f1b", 2 * k), ("1f1b", 4 * k)]
    links = {"free": None, "same cuts": (2**20 / 1e-4, 0.0), "varied cuts": (2**20 / 1e-4, 0.0)}
    print(f"{n} blocks over {k} devices, memory-limited; median of {args.repeats} calls")
    print(f"{'schedule':<9}{'M':>5}  {'transfers':<12}{'seconds':>9}{'nodes':>8}{'gap':>8}{'vs uniform':>12}")
    for schedule, m in cases:
        for label, link in links.items():
            costs = instance(n, 0, same_cuts=label != "varied cuts")
            in_flight = m if schedule == "gpipe" else min(m, k)  # micro-batches device 0 holds at its peak
            memory = 3 * (sum(costs.state_bytes) + in_flight * sum(costs.activation_bytes)) // k
            seconds, plan = [], None
            for _ in range(args.repeats):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # a search that stops early says so in .gap
                    start = time.perf_counter()
                    plan = optimal(costs, k, schedule=schedule, chunks=m, memory=memory, links=link)
                    seconds.append(time.perf_counter() - start)
            even = evaluate(costs, uniform(n, k), k, schedule=schedule, chunks=m, memory=memory, links=link)
            print(f"{schedule:<9}{m:>5}  {label:<12}{statistics.median(seconds):>9.2f}{plan.searched:>8}"
                  f"{plan.gap:>8.2%}{even.step_time / plan.step_time:>11.3f}x")


if __name__ == "__main__":
    main()
