"""Figures of the course: losses, memory, timelines (Gantt charts), plans; all matplotlib."""

from __future__ import annotations

import matplotlib.pyplot as plt

# Each function takes the data object it draws plus an optional `ax`, and returns the Axes,
# so notebooks can compose figures: `mplib.plot.timeline(tl, ax=axes[0])`.


def _axes(ax=None, figsize=(7, 3)):
    if ax is None:
        _, ax = plt.subplots(figsize=figsize)
    return ax
