"""Optimal balancing vs uniform and by-parameter splits of a GPT-2-small-shaped stack, K = 2, 4, 8.

Two parts, both with GPT-2 small's 12 layers and its 50257-token head:

1. predicted, full width (768, 12 heads, 1024 tokens): costs counted from FLOPs under
   FakeTensorMode (`mplib.profile.analytic`, nothing runs), step times from the cost model;
2. predicted and measured, width reduced (default 512) so that CPU stand-in devices can run it:
   costs measured with `mplib.profile.measure` (one thread, as each stand-in worker gets; the
   head timed with its loss),
   each plan run through `mplib.pipeline.Pipeline` (1F1B), plans taking turns round by round;
   ratios are medians of per-round ratios.

accelerate's `infer_auto_device_map(..., "balanced")` and torchgpipe's `balance_by_time` are
compared when they are installed (`pip install -e .[bench]`, which `make bench` does); otherwise
the script says so and skips them.

    .venv/bin/python benchmarks/bench_partition.py            # ~2 min on 2 CPU cores
    .venv/bin/python benchmarks/bench_partition.py --embd 768 --rounds 5   # the real width; slow on CPU
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import mplib.env  # noqa: E402
from mplib.models.gpt import GPT, GPTConfig  # noqa: E402
from mplib.partition import by_params, evaluate, optimal, uniform  # noqa: E402
from mplib.pipeline import Pipeline  # noqa: E402
from mplib.profile import analytic, measure  # noqa: E402
from mplib.split import split  # noqa: E402
from mplib.train import lm_loss  # noqa: E402

KS = (2, 4, 8)
SCHEDULE = "1f1b"


def plans(costs, k: int, chunks: int, others: dict | None = None) -> dict:
    """The balances compared: uniform block counts, by parameter bytes, the libraries' (`others`:
    name -> balance), optimal under the cost model."""
    opts = dict(schedule=SCHEDULE, chunks=chunks)
    found = {"uniform": evaluate(costs, uniform(len(costs), k), k, **opts),
             "by_params": evaluate(costs, by_params(costs, k), k, **opts)}
    found.update({name: evaluate(costs, balance, k, **opts) for name, balance in (others or {}).items()})
    found["optimal"] = optimal(costs, k, **opts)
    return found


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


def print_predicted(title: str, costs, chunks: int, others: dict) -> None:
    print(f"\n{title}\n{'K':>3}  {'plan':<11}{'balance':<34}{'predicted step':>16}{'optimal faster by':>19}")
    for k in KS:
        found = plans(costs, k, chunks, others[k])
        for name, plan in found.items():
            ratio = plan.step_time / found["optimal"].step_time
            print(f"{k:>3}  {name:<11}{str(plan.balance):<34}{plan.step_time * 1e3:>13.1f} ms{ratio:>18.2f}x")


def skipped_libraries() -> None:
    for lib, what in (("accelerate", "infer_auto_device_map(..., 'balanced')"), ("torchgpipe", "balance_by_time")):
        if importlib.util.find_spec(lib) is None:
            print(f"skipped {lib}'s {what}: {lib} is not installed (pip install -e .[bench])")


def measure(config: GPTConfig, found: dict, k: int, chunks: int, batch: torch.Tensor, rounds: int) -> dict:
    """Median seconds per step of each plan, and median per-round ratios over the optimal plan."""
    base = GPT(config)
    pipes = {name: Pipeline(split(copy.deepcopy(base), ["cpu"] * k, plan), chunks=chunks, schedule=SCHEDULE,
                            loss_fn=lm_loss, threads_per_worker=1) for name, plan in found.items()}
    x, y = batch[:, :-1], batch[:, 1:]
    times: dict[str, list[float]] = {name: [] for name in pipes}
    for r in range(rounds + 1):
        for name, pipe in pipes.items():  # interleaved: each round times every plan once
            pipe.zero_grad(set_to_none=True)
            start = time.perf_counter()
            pipe.step(x, y)
            if r > 0:  # round 0 warms up
                times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(ts), statistics.median(t / o for t, o in zip(ts, times["optimal"])))
            for name, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--embd", type=int, default=512, help="width of the measured model (GPT-2 small: 768)")
    parser.add_argument("--seq", type=int, default=16, help="tokens per sequence of the measured model")
    parser.add_argument("--micro", type=int, default=1, help="sequences per micro-batch")
    parser.add_argument("--chunks", type=int, default=8, help="micro-batches per step (>= the largest K)")
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds per K; each times every plan once")
    args = parser.parse_args()
    mplib.env.seed_everything(0)
    torch.set_num_threads(1)  # a CPU stand-in device computes on one core; profile it the same way
    print(f"torch {torch.__version__}, {os.cpu_count()} CPU cores, schedule {SCHEDULE}, "
          f"{args.chunks} micro-batches per step")
    skipped_libraries()

    full = GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768)
    with torch.device("meta"):
        shapes = GPT(full)  # analytic() needs shapes only: no 500 MB of weights
    ids = torch.zeros(args.micro, 1024, dtype=torch.long, device="meta")
    flop_costs = analytic(shapes, ids, flops_per_second=100e12)
    print("\nlibrary plans for part 1 (accelerate only: torchgpipe times real runs)")
    full_others = {k: library_balances(full, k, None) for k in KS}
    print_predicted(f"1. predicted, GPT-2 small at full width (768), 1024 tokens, {args.micro} sequence(s) per "
                    "micro-batch, FLOP-counted costs at 100 TFLOP/s", flop_costs, args.chunks, full_others)

    config = GPTConfig(vocab_size=50257, block_size=args.seq, n_layer=12, n_head=max(1, args.embd // 64),
                       n_embd=args.embd)
    batch = torch.randint(0, config.vocab_size, (args.chunks * args.micro, args.seq + 1))
    costs = measure(GPT(config), batch[:args.micro, :-1], repeats=5, loss_fn=lm_loss, targets=batch[:args.micro, 1:])
    head = costs.time[-1] / statistics.median(costs.time[1:-1])
    print("\nlibrary plans for part 2")
    others = {k: library_balances(config, k, batch[:args.micro, :-1]) for k in KS}
    print_predicted(f"2. predicted, width reduced to {args.embd} (CPU time), {args.seq} tokens: measured costs, "
                    f"the head with its loss costs {head:.1f} layers", costs, args.chunks, others)
    print(f"\n2. measured on CPU stand-ins (K workers share {os.cpu_count()} cores: above K = cores the "
          f"measured step tracks total work, not the bottleneck), median of {args.rounds} rounds")
    print(f"{'K':>3}  {'plan':<11}{'predicted':>12}{'measured':>12}{'measured / optimal':>20}")
    for k in KS:
        found = plans(costs, k, args.chunks, others[k])
        result = measure(config, found, k, args.chunks, batch, args.rounds)
        for name, plan in found.items():
            seconds, ratio = result[name]
            print(f"{k:>3}  {name:<11}{plan.step_time * 1e3:>9.1f} ms{seconds * 1e3:>9.1f} ms{ratio:>19.2f}x")


if __name__ == "__main__":
    main()
