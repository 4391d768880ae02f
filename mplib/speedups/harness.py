"""One harness for every technique on the same model: time, counted memory and held-out quality, against a baseline.

Times are medians over rounds in which every technique runs once, side by side, so a slow
moment of a shared machine slows them all; a speed-up is the median of per-round ratios.
Memory is counted, never read from `torch.cuda.memory_allocated` (0 on a CPU build): a trained
step's parameters, gradients, optimizer state and saved activations (`mplib.memory.measure`),
or, for inference, the bytes the model stores (`model_bytes`).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from mplib.speedups.precision import model_bytes


@dataclass
class Result:
    """One technique measured: seconds per call, bytes, quality, and the same relative to its baseline.

    Example:
        r = Result("int8", "inference", 0.004, 12_000, 0.90, "fp32", speedup=2.5, memory_ratio=0.3)
        r.speedup                      # 2.5
        # 2.5 times as fast as "fp32", in 0.3 of its bytes (Harness.run() fills these in)
    """

    name: str
    kind: str  # "inference" or "training"
    seconds: float
    memory: int
    quality: float
    baseline: str
    speedup: float = 1.0  # baseline seconds / these seconds, median of per-round ratios
    memory_ratio: float = 1.0  # these bytes / the baseline's


class Harness:
    """Register techniques, `run()` them side by side, then `table()` and `plot()`.

    Example:
        h = Harness(repeats=3)
        # quality: each model's test accuracy, measured beforehand
        h.inference("fp32", model, (ids, mask), quality=0.91)
        h.inference("int8", mplib.speedups.quantize_dynamic(model), (ids, mask), quality=0.90, baseline="fp32")
        print(table(h.run()))
    """

    def __init__(self, repeats: int = 5, warmup: int = 1) -> None:
        if repeats < 1 or warmup < 0:
            raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats}, {warmup}")
        self.repeats, self.warmup = repeats, warmup
        self.rows: dict[str, dict[str, Any]] = {}

    def inference(self, name: str, model: nn.Module, inputs: Sequence[Any], quality: float,
                  baseline: str | None = None, memory: int | None = None) -> None:
        """A model timed on `inputs` without a graph; memory: the bytes it stores (or `memory`)."""
        model.eval()

        def call() -> None:
            with torch.no_grad():
                model(*inputs)

        self._add(name, "inference", call, model_bytes(model) if memory is None else memory, quality, baseline)

    def training(self, name: str, step: Callable[[], Any], memory: int, quality: float,
                 baseline: str | None = None) -> None:
        """`step()` runs one training step; `memory` its counted bytes; `quality` after training with it."""
        self._add(name, "training", step, memory, quality, baseline)

    def _add(self, name: str, kind: str, call: Callable[[], Any], memory: int, quality: float,
             baseline: str | None) -> None:
        if name in self.rows:
            raise ValueError(f"a technique named {name!r} is registered already; give each a distinct name")
        if baseline is not None and baseline not in self.rows:
            raise ValueError(f"baseline {baseline!r} is not registered; register it first (known: {list(self.rows)})")
        if int(memory) <= 0:
            raise ValueError(f"{name}: memory {memory} bytes must be a positive count (measured, not assumed)")
        self.rows[name] = dict(kind=kind, call=call, memory=int(memory), quality=float(quality),
                               baseline=baseline or name)

    def run(self) -> list[Result]:
        """Time every registered call side by side; the Results, in registration order."""
        names = list(self.rows)
        for _ in range(self.warmup):
            for n in names:
                self.rows[n]["call"]()
        times: dict[str, list[float]] = {n: [] for n in names}
        for _ in range(self.repeats):
            for n in names:
                t0 = time.perf_counter()
                self.rows[n]["call"]()
                times[n].append(time.perf_counter() - t0)
        out = []
        for n in names:
            row, base = self.rows[n], self.rows[n]["baseline"]
            ratios = [b / t for b, t in zip(times[base], times[n])]
            out.append(Result(n, row["kind"], statistics.median(times[n]), row["memory"], row["quality"], base,
                              statistics.median(ratios), row["memory"] / self.rows[base]["memory"]))
        return out


def table(results: Sequence[Result], quality: str = "accuracy") -> str:
    """A text table: time, speed-up, memory, memory ratio and quality (and its change) per technique.

    A quality that was not measured (NaN) shows as "-".

    Example:
        results = [Result("fp32", "inference", 0.010, 40_000, 0.91, "fp32"),
                   Result("int8", "inference", 0.004, 12_000, 0.90, "fp32", speedup=2.5, memory_ratio=0.3)]
        print(table(results))
    """
    by_name = {r.name: r for r in results}
    head = (f"{'technique':<26}{'kind':<10}{'ms':>9}{'speed-up':>9}{'memory KiB':>12}{'x memory':>9}"
            f"{quality:>10}{'change':>8}")
    rows = [head, "-" * len(head)]
    for r in results:
        dq = r.quality - by_name[r.baseline].quality
        q = "-" if math.isnan(r.quality) else f"{r.quality:.3f}"
        change = "-" if math.isnan(dq) else f"{dq:+.3f}"
        rows.append(f"{r.name[:25]:<26}{r.kind:<10}{r.seconds * 1e3:>9.2f}{r.speedup:>8.2f}x{r.memory / 1024:>12.1f}"
                    f"{r.memory_ratio:>8.2f}x{q:>10}{change:>8}")
    return "\n".join(rows)


def plot(results: Sequence[Result], ax: Any = None, quality: str = "test accuracy") -> Any:
    """Speed x memory x quality: speed-up (x, log) against quality (y); a marker's area is its memory ratio.

    Example:
        plot(results); plt.show()      # results: Harness.run()'s, as in `table`
    """
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(7.5, 4.2))
    colors = {"inference": "tab:blue", "training": "tab:orange"}
    for kind in ("inference", "training"):
        rows = [r for r in results if r.kind == kind]
        if not rows:
            continue
        ax.scatter([r.speedup for r in rows], [r.quality for r in rows], s=[200 * r.memory_ratio for r in rows],
                   alpha=0.45, color=colors[kind], edgecolors="k", label=f"{kind} (area: memory vs its baseline)")
        for r in rows:
            ax.annotate(r.name, (r.speedup, r.quality), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.axvline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xscale("log")
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.xaxis.set_minor_formatter(NullFormatter())  # log-scale minor labels crowd the axis
    lo, hi = ax.get_xlim()
    ax.set_xticks([t for t in (0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20) if lo <= t <= hi])
    ax.set_xlabel("speed-up over its baseline (x, log scale)")
    ax.set_ylabel(quality)
    ax.legend(fontsize=7, loc="lower left")
    return ax
