"""Figures of memory estimates against GPU sizes (`mplib.memory`, `mplib.hardware`); see `mplib.plot`."""

from __future__ import annotations

_MEMORY_PARTS = ("params", "grads", "optimizer", "activations")


def _named_estimates(estimates) -> dict:
    """A MemoryEstimate, a list of them or a {name: estimate} dict, as a dict."""
    if hasattr(estimates, "total"):
        estimates = [estimates]
    if not isinstance(estimates, dict):
        estimates = {(e.label or str(i)): e for i, e in enumerate(estimates)}
    if not estimates:
        raise ValueError("nothing to plot: pass a MemoryEstimate, a list of them or a {name: estimate} dict")
    return estimates


def memory(estimates, ax=None, gpus=None, logy: bool = False):
    """Stacked bars of training memory (params / grads / optimizer / activations, GiB) per model,
    with a dashed line at each GPU memory size of the catalog.

    Stacks are drawn on a linear axis, where a part's height is its share; `logy=True` draws the
    parts side by side instead (a stack on a log axis would shrink the top part). For models of
    very different sizes, draw the small and the large ones on two axes (`ax=`) rather than a log
    scale. `gpus`: a list of `mplib.hardware.GPU` (default: the catalog); lines far above the
    tallest bar are left out, so the bars stay readable.

    Example:
        est = {"GPT-2 XL": mplib.memory.estimate(GPT2_XL, batch=8, seq=1024)}
        mplib.plot.memory(est); plt.show()
    """
    import mplib.hardware
    from mplib.plot import _axes  # at call time: mplib.plot imports this module

    estimates = _named_estimates(estimates)
    gpus = list(mplib.hardware.GPUS.values()) if gpus is None else list(gpus)
    ax = _axes(ax, figsize=(8, 4))
    names = list(estimates)
    totals = [estimates[n].total / 2**30 for n in names]
    if logy:
        width = 0.8 / len(_MEMORY_PARTS)
        for j, part in enumerate(_MEMORY_PARTS):
            heights = [getattr(estimates[n], part) / 2**30 for n in names]
            ax.bar([i + (j - 1.5) * width for i in range(len(names))], heights, width=width, label=part)
        ax.scatter(range(len(names)), totals, marker="_", s=400, color="black", label="total", zorder=3)
        ax.set_yscale("log")
    else:
        bottom = [0.0] * len(names)
        for part in _MEMORY_PARTS:
            heights = [getattr(estimates[n], part) / 2**30 for n in names]
            ax.bar(range(len(names)), heights, bottom=bottom, label=part)
            bottom = [b + h for b, h in zip(bottom, heights)]
        top = 1.3 * max(totals)
        gpus = [g for g in gpus if g.memory_gib <= top]  # a GPU far above every bar would squash them
        ax.set_ylim(0, max([top] + [1.1 * g.memory_gib for g in gpus]))
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_xlim(-0.6, len(names) - 0.4)
    _gpu_lines(ax, gpus, right=len(names) - 0.45)
    ax.set_ylabel("memory for one training step (GiB)")
    ax.set_title("training memory vs one GPU")
    ax.legend(loc="upper left", fontsize=8)
    return ax


def _gpu_lines(ax, gpus, right: float) -> None:
    """A dashed line at each GPU memory size; one label (inside the axes, right-aligned at x =
    `right`) per group of sizes too close to label apart."""
    by_size: dict[float, list[str]] = {}
    for g in gpus:
        by_size.setdefault(g.memory_gib, []).append(g.name)
    groups: list[list[float]] = []
    close = 0.05 * ax.get_ylim()[1]
    for size in sorted(by_size):
        ax.axhline(size, color="black", linestyle="--", linewidth=0.8)
        if groups and size - groups[-1][-1] < close:
            groups[-1].append(size)
        else:
            groups.append([size])
    for sizes in groups:
        names = [n for size in sizes for n in by_size[size]]
        names = " / ".join(names) if len(sizes) == 1 else f"{names[0]} ... {names[-1]}"
        gib = f"{sizes[0]:g} GiB" if len(sizes) == 1 else f"{sizes[0]:g}-{sizes[-1]:g} GiB"
        ax.text(right, sizes[-1], f"{names} ({gib})", fontsize=7, ha="right", va="bottom",
                bbox=dict(facecolor="white", edgecolor="none", alpha=0.8, pad=1))


def memory_vs_gpus(estimates, ax=None, gpus=None):
    """Grouped bars: how many GPUs of each catalog type a model needs by memory alone (log scale).

    A lower bound: it assumes the memory splits perfectly over the GPUs (ceil(total / size)).

    Example:
        mplib.plot.memory_vs_gpus({"GPT-3": est}); plt.show()
    """
    import mplib.hardware
    from mplib.plot import _axes  # at call time: mplib.plot imports this module

    estimates = _named_estimates(estimates)
    gpus = list(mplib.hardware.GPUS.values()) if gpus is None else list(gpus)
    ax = _axes(ax, figsize=(8, 3.5))
    names = list(estimates)
    width = 0.8 / max(len(gpus), 1)
    for j, g in enumerate(gpus):
        need = [-(-estimates[n].total // g.memory_bytes) for n in names]
        ax.bar([i + (j - (len(gpus) - 1) / 2) * width for i in range(len(names))], need, width=width, label=g.name)
    ax.set_xticks(range(len(names)), names, rotation=30)
    ax.set_yscale("log")
    ax.set_ylabel("GPUs needed (memory only)")
    ax.set_title("minimum GPUs to hold one training step")
    ax.legend(fontsize=8)
    return ax
