"""Interactive explorers for the notebooks: sliders that redraw a simulated pipeline timeline.

The widget is a thin shell: `scenario` (what to draw) and `draw` (drawing it) are plain
functions, tested without ipywidgets; `explorer` only wires sliders to `draw`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mplib.schedule import NAMES, Schedule, build, ideal_bubble
from mplib.simulate import simulate
from mplib.timeline import Timeline


@dataclass
class Scenario:
    """A simulated run of one schedule: its timeline and the numbers the explorer prints."""

    schedule: Schedule
    timeline: Timeline
    bubble: float  # measured on the simulated timeline, devices only (links excluded)
    formula: float  # (K-1)/(v*M+K-1): the bubble with free links
    in_flight: list[int]  # per device, micro-batches (x chunks) whose activations it holds at its peak

    @property
    def summary(self) -> str:
        s = self.schedule
        return (f"{s.name}: K={s.num_devices} devices, M={s.chunks} micro-batches"
                + (f", v={s.virtual} chunks per device" if s.virtual > 1 else "")
                + f" | step {self.timeline.duration:.2f} forward-times | bubble {self.bubble:.1%} "
                f"(formula with free links {self.formula:.1%}) | stage 0 holds {self.in_flight[0]} "
                + ("micro-batches" if s.virtual == 1 else "micro-batch chunks") + " at its peak")


def scenario(devices: int = 4, chunks: int = 8, schedule: str = "1f1b", link_time: float = 0.0,
             forward: float = 1.0, backward: float = 2.0, virtual: int = 2) -> Scenario:
    """Simulate `schedule` on `devices` equal devices; times are in units of one stage's forward.

    `link_time` is the time to send one micro-batch's activation across a cut (and its gradient
    back); `virtual` only applies to "interleaved". Invalid combinations raise ValueError.

    Example:
        sc = scenario(devices=4, chunks=8, schedule="gpipe")
        print(sc.summary)   # ... bubble 27.3% (formula with free links 27.3%) ...
    """
    v = virtual if str(schedule).lower() == "interleaved" else 1
    s = build(schedule, devices, chunks, v)
    tl = simulate(s, [forward] * devices, [backward] * devices, transfer=[link_time], bytes_per_microbatch=1)
    bubble = tl.bubble_fraction(list(range(devices)))
    formula = float(ideal_bubble(devices, chunks, v))
    return Scenario(s, tl, bubble, formula, s.peak_in_flight())


def draw(devices: int = 4, chunks: int = 8, schedule: str = "1f1b", link_time: float = 0.0, ax: Any = None,
         **kwargs: Any) -> Any:
    """Draw `scenario(...)`'s timeline with its summary as the title; an invalid combination
    draws the error message instead, so a slider never leaves a broken figure.

    Example:
        ax = draw(devices=4, chunks=8, schedule="gpipe", link_time=0.2)
        plt.show()
    """
    import matplotlib.pyplot as plt

    import mplib.plot

    try:
        sc = scenario(devices, chunks, schedule, link_time, **kwargs)
    except ValueError as exc:
        if ax is None:
            _, ax = plt.subplots(figsize=(9, 1.5))
        ax.axis("off")
        ax.text(0, 0.5, "\n".join(_wrap(str(exc), 110)), va="center", fontsize=9, color="darkred")
        return ax
    ax = mplib.plot.timeline(sc.timeline, ax=ax, labels=devices * chunks <= 64, unit="forward times",
                             title="\n".join(_wrap(sc.summary, 95)))  # a forward costs 1: no seconds here
    return ax


def _wrap(text: str, width: int) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width) or [""]


def explorer(devices: int = 4, chunks: int = 8, schedule: str = "1f1b", link_time: float = 0.0) -> Any:
    """Sliders for devices, micro-batches, schedule and link time that redraw the simulated timeline.

    Example:
        mplib.widgets.explorer()          # last line of a notebook cell: the widget shows
    """
    import ipywidgets as w
    import matplotlib.pyplot as plt

    controls = dict(
        devices=w.IntSlider(value=devices, min=1, max=8, description="devices K"),
        chunks=w.IntSlider(value=chunks, min=1, max=32, description="micro-batches M"),
        schedule=w.Dropdown(options=list(NAMES), value=schedule, description="schedule"),
        link_time=w.FloatSlider(value=link_time, min=0.0, max=2.0, step=0.05, description="link time"),
    )

    def show(**values: Any) -> None:
        draw(**values)
        plt.show()

    out = w.interactive_output(show, controls)
    return w.VBox([w.HBox([controls["devices"], controls["chunks"]]),
                   w.HBox([controls["schedule"], controls["link_time"]]), out])
