"""Overhead of SplitModel over the plain model: one forward+backward step of a small GPT-2.

The plain model and split copies of it (one stage; three CPU stand-in stages) take turns,
step by step, so both see the same machine load; the median of the per-round ratios is
printed. Target: overhead <= 3 %. On a busy machine that ratio wanders by several percent, so
the fixed cost of the split (on blocks that do almost nothing) is printed too, in microseconds.

On a GPU it also times `mplib.transfer.to_device(..., non_blocking=True)` of a pinned activation
against the raw pinned copy of `mplib.hardware.measure_bandwidth`, round by round. Target: >= 90 %.

    .venv/bin/python benchmarks/bench_split.py            # ~1 min on 2 busy CPU cores
    .venv/bin/python benchmarks/bench_split.py --device cuda:0 --repeats 100
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

import mplib.env  # noqa: E402
import mplib.hardware  # noqa: E402
from mplib.split import split  # noqa: E402
from mplib.transfer import to_device  # noqa: E402


def step_time(model, ids: torch.Tensor, device: torch.device) -> float:
    """Seconds for one forward + backward (gradients cleared first, outside the clock)."""
    model.zero_grad(set_to_none=True)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    out = model(ids)
    logits = out.logits if hasattr(out, "logits") else out
    logits.float().square().mean().backward()
    sync()
    return time.perf_counter() - t0


def fixed_overhead(device: torch.device, stages: int, repeats: int) -> float:
    """Median seconds a SplitModel adds to one forward+backward, on blocks that do almost nothing.

    Noise-robust where the ratio is not: what the split costs does not grow with the model.
    """
    plain = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(6)]).to(device)
    split_model = split(copy.deepcopy(plain), [device] * stages)
    x = torch.randn(1, 4, device=device)
    diffs = []
    for r in range(repeats + 10):  # 10 warm-up rounds
        diff = step_time(split_model, x, device) - step_time(plain, x, device)
        if r >= 10:
            diffs.append(diff)
    return statistics.median(diffs)


def transfer_ratios(device: torch.device, nbytes: int, repeats: int) -> list[float]:
    """Per round: (rate of to_device on a pinned activation) / (raw pinned copy rate), side by side."""
    act = torch.ones(nbytes // 4, dtype=torch.float32).pin_memory()
    to_device(act, device, non_blocking=True)  # warm-up: copy stream, allocator
    ratios = []
    for _ in range(repeats):
        raw = mplib.hardware.measure_bandwidth("cpu", device, nbytes=nbytes, pinned=True, repeats=1)
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        to_device(act, device, non_blocking=True)
        torch.cuda.synchronize(device)
        ratios.append(nbytes / (time.perf_counter() - t0) / raw)
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=30, help="rounds; each times every variant once")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--embd", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--transfer-mib", type=int, default=64, help="activation size for the GPU copy check")
    args = parser.parse_args()

    mplib.env.seed_everything(0)
    device = mplib.env.check_device(args.device)
    config = GPT2Config(vocab_size=512, n_positions=args.seq, n_embd=args.embd, n_layer=args.layers, n_head=4,
                        bos_token_id=0, eos_token_id=0, use_cache=False)  # no KV cache: the blocks keep none
    plain = GPT2LMHeadModel(config).to(device)
    variants = {"plain": plain,
                "split, 1 stage": split(copy.deepcopy(plain), [device]),
                "split, 3 stages": split(copy.deepcopy(plain), [device] * 3)}
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), device=device)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(args.warmup + args.repeats):
        for name, model in variants.items():  # interleaved: every round times each variant once
            t = step_time(model, ids, device)
            if r >= args.warmup:
                times[name].append(t)

    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads; GPT-2 "
          f"{args.layers} layers x {args.embd}, batch {args.batch} x {args.seq} tokens, {args.repeats} rounds")
    base = times["plain"]
    print(f"{'variant':<18}{'median step':>14}{'median ratio':>15}")
    for name, ts in times.items():
        ratio = statistics.median(t / b for t, b in zip(ts, base))
        print(f"{name:<18}{statistics.median(ts) * 1e3:>11.2f} ms{ratio:>15.3f}")
    plain_step = statistics.median(base)
    for stages in (1, 3):
        extra = fixed_overhead(device, stages, repeats=20 * args.repeats)
        print(f"fixed cost of a {stages}-stage split: {extra * 1e6:.0f} us per step "
              f"= {extra / plain_step:.2%} of the plain step above")

    if device.type == "cuda":
        ratios = transfer_ratios(device, args.transfer_mib * 2**20, args.repeats)
        print(f"\npinned host->device activation of {args.transfer_mib} MiB, to_device(non_blocking=True) "
              f"vs raw pinned copy: median ratio {statistics.median(ratios):.3f} "
              f"(min {min(ratios):.3f}, max {max(ratios):.3f})")


if __name__ == "__main__":
    main()
