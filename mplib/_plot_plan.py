"""Figures of partition plans: per-stage time and memory against each device's limit; see `mplib.plot`."""

from __future__ import annotations


def plan(plan, ax=None, title: str | None = None, time_max: float | None = None, memory_max: float | None = None):
    """Per-stage time (left axis) and memory (right axis) bars of a Plan; memory limits dashed.

    The bottleneck stage's time bar is hatched; the title (prefixed by `title`, e.g. "optimal")
    gives the predicted step time. The memory axis fits the bars and the limits near them; a
    limit far above every bar is written on the chart instead of stretching it. `time_max` (ms)
    and `memory_max` (MiB) fix the axes, so panels of several plans compare (`plans` does that).

    Example:
        p = mplib.partition.optimal(costs, devices=4, chunks=8, memory=8 * 2**30)
        mplib.plot.plan(p, title="optimal"); plt.show()
    """
    from mplib.plot import _axes  # at call time: mplib.plot imports this module

    k = len(plan.balance)
    if k == 0:
        raise ValueError("this plan has no stages; build one with mplib.partition.optimal(...) or evaluate(...)")
    ax = _axes(ax, figsize=(max(5, 1.2 * k + 2), 3))
    times = [t * 1e3 for t in plan.stage_times]
    xs = range(k)
    bars = ax.bar([x - 0.2 for x in xs], times, width=0.4, color="tab:blue", label="time per micro-batch")
    if plan.bottleneck.startswith("stage"):
        bars[int(plan.bottleneck.split()[1])].set_hatch("//")
    ax.set_ylabel("forward + backward (ms)")
    ax.set_ylim(0, time_max if time_max is not None else 1.15 * max(times + [1e-9]))
    ax.set_xticks(list(xs), [f"stage {s}\n{plan.balance[s]} blocks" for s in xs])
    mem = ax.twinx()
    mib = [m / 2**20 for m in plan.memory]
    mem.bar([x + 0.2 for x in xs], mib, width=0.4, color="tab:orange", label="memory")
    top = memory_max if memory_max is not None else _memory_top(mib, plan.limits)
    for s in xs if plan.limits else ():
        limit = plan.limits[s] / 2**20
        if limit <= top:
            mem.hlines(limit, s - 0.45, s + 0.45, colors="black", linestyles="--",
                       label="memory limit" if s == 0 else None)
        else:  # far above: say it rather than squash every bar to the floor
            mem.annotate(f"limit {limit:,.0f} MiB ↑", (s + 0.2, top), xytext=(0, -12), textcoords="offset points",
                         ha="center", fontsize=7)
    mem.set_ylabel("memory (MiB)")
    mem.set_ylim(0, top)
    handles = ax.get_legend_handles_labels()[0] + mem.get_legend_handles_labels()[0]
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.15, 1.0))
    head = f"{title}: " if title else ""
    ax.set_title(f"{head}{plan.balance}, {plan.schedule}, {plan.chunks} micro-batches: step "
                 f"{plan.step_time * 1e3:.1f} ms, bottleneck {plan.bottleneck}", fontsize=9)
    return ax


def _memory_top(mib: list[float], limits) -> float:
    """The memory axis' top: the bars and every limit within 3x of the tallest bar, plus headroom."""
    tallest = max(mib + [1e-9])
    near = [lim / 2**20 for lim in (limits or []) if lim / 2**20 <= 3 * tallest]
    return 1.15 * max([tallest] + near)


def plans(plans, titles=None, axes=None):
    """Plans side by side on the same time and memory scales, each titled ("uniform", "optimal").

    Example:
        mplib.plot.plans([even, best], ["uniform", "optimal"]); plt.show()
    """
    import matplotlib.pyplot as plt

    plans = list(plans)
    if not plans:
        raise ValueError("nothing to plot: pass a list of Plans")
    titles = [None] * len(plans) if titles is None else list(titles)
    if len(titles) != len(plans):
        raise ValueError(f"{len(titles)} titles for {len(plans)} plans; give one per plan")
    if axes is None:
        _, axes = plt.subplots(1, len(plans), figsize=(6 * len(plans), 3), squeeze=False)
        axes = axes[0]
    time_max = 1.15 * max(t * 1e3 for p in plans for t in p.stage_times)
    memory_max = max(_memory_top([m / 2**20 for m in p.memory], p.limits) for p in plans)
    for k, (ax, p, title) in enumerate(zip(axes, plans, titles)):
        plan(p, ax=ax, title=title, time_max=time_max, memory_max=memory_max)
        if k < len(plans) - 1:
            ax.get_legend().remove()  # one legend, beside the last panel
    axes[0].figure.tight_layout()
    return list(axes)
