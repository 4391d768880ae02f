"""Figures of the course: losses, memory, timelines (Gantt charts), plans; all matplotlib."""

from __future__ import annotations

import matplotlib.pyplot as plt

from mplib._plot_memory import memory, memory_vs_gpus  # noqa: F401  (memory estimates vs GPU sizes)
from mplib._plot_plan import plan, plans  # noqa: F401  (per-stage time and memory of partition plans)

# Each function takes the data object it draws plus an optional `ax`, and returns the Axes,
# so notebooks can compose figures: `mplib.plot.timeline(tl, ax=axes[0])`.


def _axes(ax=None, figsize=(7, 3)):
    if ax is None:
        _, ax = plt.subplots(figsize=figsize)
    return ax


def _moving_average(values, window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def loss(history, ax=None, smooth: int | None = None, label: str = "train", logy: bool = False):
    """Training loss per step (faint), its moving average (solid) and any evaluations (dots).

    `history` is an `mplib.train.History` or a plain list of losses; `smooth` is the moving
    average window in steps (None: about 1/20 of the run; 1: no smoothing).

    Example:
        history = mplib.train.fit(model, batches, loss_fn, steps=200)
        mplib.plot.loss(history); plt.show()
    """
    losses = list(getattr(history, "losses", history))
    if not losses:
        raise ValueError("nothing to plot: the history has no losses; train for at least one step")
    window = max(1, len(losses) // 20) if smooth is None else int(smooth)
    if window < 1:
        raise ValueError(f"smooth must be a window of at least 1 step, got {smooth}")
    ax = _axes(ax)
    steps = range(1, len(losses) + 1)
    if window > 1:
        line, = ax.plot(steps, losses, alpha=0.3, linewidth=0.8)
        ax.plot(steps, _moving_average(losses, window), color=line.get_color(),
                label=f"{label} (mean of {window} steps)")
    else:
        ax.plot(steps, losses, label=label)
    evals = list(getattr(history, "evals", []))
    if evals:
        ax.plot([s for s, _ in evals], [v for _, v in evals], "o-", label="eval")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    return ax


# --- timelines (Gantt charts) and memory over time --------------------------------------------

_KIND_STYLE = {  # kind -> (hatch, lightness mix toward white, bar height)
    "forward": ("", 0.0, 0.8),
    "backward": ("", 0.45, 0.8),
    "recompute": ("///", 0.2, 0.8),
    "copy": ("...", 0.6, 0.4),
    "optimizer": ("xx", 0.0, 0.8),
    "collective": ("\\\\", 0.75, 0.5),  # tensor-parallel all-reduce / all-gather / reduce-scatter
    "other": ("", 0.3, 0.8),
}


def _time_unit(duration: float, unit: str | None = None) -> tuple[float, str]:
    """(scale, label): seconds to s/ms/µs picked from `duration`, or `unit` as given; a unit that
    is not a time (a simulation in units of one forward, say) is drawn unscaled with its name."""
    if unit is not None:
        return {"s": 1.0, "ms": 1e3, "µs": 1e6, "us": 1e6}.get(unit, 1.0), unit
    if duration >= 1.0:
        return 1.0, "s"
    if duration >= 1e-3:
        return 1e3, "ms"
    return 1e6, "µs"


def _compute_lanes(tl) -> list[int]:
    """Lanes that did any compute (link lanes that only copy are left out of the bubble)."""
    lanes = sorted({e.lane for e in tl.events if e.kind != "copy"})
    return lanes or list(range(len(tl.lanes)))


def _chunks(tl) -> dict[tuple[int, int], int]:
    """(lane, stage) -> which of the lane's chunks it is (0, 1, ...): interleaved stages apart."""
    stages: dict[int, list[int]] = {}
    for e in tl.events:
        if e.stage is not None and e.stage not in stages.setdefault(e.lane, []):
            stages[e.lane].append(e.stage)
    return {(lane, st): k for lane, sts in stages.items() for k, st in enumerate(sorted(sts))}


def timeline(tl, ax=None, labels: bool = True, title: str | None = None, legend: bool = True,
             xlim: float | None = None, unit: str | None = None):
    """Gantt chart of a Timeline: one row per lane, one colour per micro-batch, idle time blank.

    Forward bars are solid, backward lighter, recompute hatched `///`, copies thin and dotted;
    events without a micro-batch are grey. A device's second chunk of an interleaved schedule
    is outlined thick and labelled `F3'` (a bar too narrow for that shows `3'`). Measured and simulated timelines draw alike; the title
    gives the bubble fraction over the lanes that compute. `xlim` (seconds, or `unit`s) sets the
    end of the time axis: give several timelines the longest one's end so they compare (or draw
    them with `timelines`). `unit`: "s", "ms", "µs", or any name for unitless simulated costs
    ("forward times"); by default s/ms/µs picked from the length.

    Example:
        tl = mplib.simulate.simulate(mplib.schedule.build("1f1b", 4, 8), [1] * 4, [2] * 4)
        mplib.plot.timeline(tl, unit="forward times"); plt.show()
    """
    from matplotlib.colors import to_rgb
    from matplotlib.patches import Patch

    ax = _axes(ax, figsize=(9, 0.55 * len(tl.lanes) + 1.4))
    end = max(tl.end, xlim or 0.0)
    scale, unit = _time_unit(end, unit)
    cmap = plt.get_cmap("tab10")
    chunk = _chunks(tl)
    for e in tl.events:
        hatch, light, height = _KIND_STYLE.get(e.kind, _KIND_STYLE["other"])
        base = (0.55, 0.55, 0.55) if e.microbatch is None else to_rgb(cmap(e.microbatch % 10))
        colour = tuple(c + (1 - c) * light for c in base)
        primes = "'" * chunk.get((e.lane, e.stage), 0) if e.kind != "copy" else ""
        ax.barh(e.lane, e.duration * scale, left=e.start * scale, height=height, color=colour,
                hatch=hatch, edgecolor="black", linewidth=1.6 if primes else 0.4)
        share = e.duration / end if end > 0 else 0
        if labels and e.microbatch is not None and e.kind != "copy" and share > 0.01:
            wide = share > 0.025  # room for "F3'"; a narrow bar gets its micro-batch only ("3'")
            ax.text((e.start + e.duration / 2) * scale, e.lane,
                    f"{e.kind[0].upper() if wide else ''}{e.microbatch}{primes}",
                    ha="center", va="center", fontsize=7 if wide else 6)
    ax.set_yticks(range(len(tl.lanes)), tl.lanes)
    ax.set_ylim(len(tl.lanes) - 0.5, -0.5)  # first lane on top
    ax.set_xlim(0, max(end * scale, 1e-12))
    ax.set_xlabel(f"time ({unit})")
    if title is None:
        title = f"{tl.source} timeline, bubble {tl.bubble_fraction(_compute_lanes(tl)):.0%}"
    ax.set_title(title)
    if legend:
        kinds = [k for k in _KIND_STYLE if any(e.kind == k for e in tl.events)]
        handles = [Patch(facecolor=tuple(c + (1 - c) * _KIND_STYLE[k][1] for c in to_rgb(cmap(0))),
                         hatch=_KIND_STYLE[k][0], edgecolor="black", label=k) for k in kinds]
        if any(k > 0 for k in chunk.values()):
            handles.append(Patch(facecolor="white", edgecolor="black", linewidth=1.6, label="2nd chunk (')"))
        if handles:
            ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8,
                      title="colour = micro-batch", title_fontsize=8)
    return ax


def timelines(tls, titles=None, unit: str | None = None, axes=None, **kwargs):
    """Several timelines stacked on one time axis: same limit, same unit, so lengths compare.

    Example:
        mplib.plot.timelines([tl_uniform, tl_optimal], ["uniform", "optimal"]); plt.show()
    """
    tls = list(tls)
    if not tls:
        raise ValueError("nothing to plot: pass a list of Timelines")
    titles = [None] * len(tls) if titles is None else list(titles)
    if len(titles) != len(tls):
        raise ValueError(f"{len(titles)} titles for {len(tls)} timelines; give one per timeline")
    if axes is None:
        rows = sum(0.55 * len(tl.lanes) + 1.0 for tl in tls)
        _, axes = plt.subplots(len(tls), 1, figsize=(10, rows), sharex=True, squeeze=False)
        axes = axes[:, 0]
    end = max(tl.end for tl in tls)
    for ax, tl, title in zip(axes, tls, titles):
        timeline(tl, ax=ax, title=title, xlim=end, unit=unit, **kwargs)
    axes[0].figure.tight_layout()
    return list(axes)


def memory_over_time(tl, ax=None, lanes: list[int] | None = None):
    """Bytes each lane held over time (from `tl.memory` samples), one step curve per lane.

    Example:
        tl = pipeline.timeline                    # or a simulated Timeline with memory samples
        mplib.plot.memory_over_time(tl); plt.show()
    """
    if not tl.memory:
        raise ValueError("this timeline has no memory samples; record some with tl.sample_memory(lane, "
                         "nbytes) or simulate with bytes_per_microbatch=...")
    ax = _axes(ax)
    scale, unit = _time_unit(max(tl.end, max(m.time for m in tl.memory)))
    peak = max(m.bytes for m in tl.memory)
    div, bunit = next((d, u) for d, u in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB"), (1, "B"))
                      if peak >= d or d == 1)
    for lane in (sorted({m.lane for m in tl.memory}) if lanes is None else lanes):
        samples = sorted((m.time, m.bytes) for m in tl.memory if m.lane == lane)
        if samples:
            ax.step([t * scale for t, _ in samples], [b / div for _, b in samples], where="post",
                    label=tl.lanes[lane])
    ax.set_xlabel(f"time ({unit})")
    ax.set_ylabel(f"memory ({bunit})")
    ax.set_title(f"{tl.source} memory over time")
    ax.legend(fontsize=8)
    return ax


def grad_through_time(norms, ax=None, label: str | None = None):
    """How much of the gradient reaches each time step: `norms[t]` = |d loss / d x_t| (log scale).

    Example:
        norms = x.grad.norm(dim=(0, 2))          # x was (B, T, C)
        mplib.plot.grad_through_time(norms); plt.show()
    """
    values = [float(v) for v in norms]
    if not values:
        raise ValueError("norms is empty; pass one gradient norm per time step")
    ax = _axes(ax)
    ax.plot(range(len(values)), values, "o-", markersize=3, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("time step t of the input")
    ax.set_ylabel("|grad of the last output wrt x_t|")
    if label:
        ax.legend()
    return ax


def layer_bytes(names, series: dict, ax=None, unit: str = "KiB"):
    """Grouped bars of byte counts per layer, one bar colour per series (e.g. params, activations).

    Example:
        mplib.plot.layer_bytes(["embed", "rnn0"], {"parameters": [4096, 8192], "activations": [0, 65536]})
        plt.show()
    """
    scale = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}
    if unit not in scale:
        raise ValueError(f"unknown unit {unit!r}; use one of {list(scale)}")
    names = list(names)
    for key, values in series.items():
        if len(values) != len(names):
            raise ValueError(f"series {key!r} has {len(values)} values for {len(names)} layers; give one per layer")
    ax = _axes(ax)
    width = 0.8 / max(1, len(series))
    for k, (key, values) in enumerate(series.items()):
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(names))]
        ax.bar(xs, [v / scale[unit] for v in values], width=width, label=key)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel(unit)
    ax.legend()
    return ax



def embeddings(points, labels, ax=None, title: str | None = None):
    """2-D PCA scatter of vectors (N, D), one colour per label: do the labels form separate clouds?

    Example:
        mplib.plot.embeddings(vectors, ["river", "money", ...])   # vectors (N, D), one label each
        plt.show()
    """
    import torch

    x = torch.as_tensor(points, dtype=torch.float32)
    labels = list(labels)
    if x.dim() != 2 or x.size(0) != len(labels) or x.size(0) < 2:
        raise ValueError(f"points must be (N, D) with N >= 2 and one label per row, got shape "
                         f"{tuple(x.shape)} and {len(labels)} labels")
    scale = x.abs().max().clamp_min(1.0)
    x = x - x.mean(0)
    if x.abs().max() <= 1e-6 * scale:
        x = torch.zeros_like(x)  # all points equal up to rounding: draw them on one spot, not on noise
    _, _, vh = torch.linalg.svd(x, full_matrices=False)  # rows of vh: principal directions
    xy = x @ vh[:2].T  # (N, 2), or (N, 1) when D = 1
    if xy.size(1) < 2:
        xy = torch.cat([xy, torch.zeros_like(xy)], dim=1)
    ax = _axes(ax, figsize=(5, 4))
    for label in dict.fromkeys(labels):  # first-seen order keeps colours stable
        keep = torch.tensor([lab == label for lab in labels])
        ax.scatter(xy[keep, 0], xy[keep, 1], s=14, alpha=0.7, label=str(label))
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    if title:
        ax.set_title(title)
    ax.legend(fontsize=8)
    return ax


# --- partition plans (mplib.partition) ----------------------------------------------------------
