"""A tensor-parallel step on paper: per-layer compute split T ways, plus its collectives over a link.

A ring collective over T ranks takes (T-1) steps (all-gather, reduce-scatter) or 2(T-1) (all-
reduce), each moving 1/T of the tensor: time = steps * latency + wire_bytes / bandwidth.
Megatron's collectives sit on the critical path (the next matmul needs their result), so a
layer's time is its compute / T plus its collectives, with no overlap.
"""

from __future__ import annotations

from typing import Sequence

from mplib.tensor_parallel.group import Collective
from mplib.timeline import Timeline


def link_bandwidth(link: object) -> tuple[float, float]:
    """(bytes/s, seconds of latency per step) of an `mplib.hardware.Link` (or anything alike)."""
    bw = getattr(link, "bandwidth", None)
    if bw is None:
        bw = float(getattr(link, "gbs_per_direction")) * 1e9
    latency = float(getattr(link, "latency", 0.0) or 0.0)
    if not float(bw) > 0 or not latency >= 0:
        raise ValueError(f"a link needs a bandwidth > 0 bytes/s and a latency >= 0 s; got {bw!r} and {latency!r} "
                         f"from {getattr(link, 'name', link)!r}")
    return float(bw), latency


def collective_seconds(c: Collective, link: object) -> float:
    """Time of one ring collective over `link`, e.g. an all-reduce of 2 MiB over NVLink."""
    bw, latency = link_bandwidth(link)
    steps = (2 if c.kind == "all_reduce" else 1) * (c.ranks - 1)
    return steps * latency + c.wire_bytes / bw


def layer_collectives(batch: int, seq: int, hidden: int, ranks: int, sequence_parallel: bool = False,
                      dtype_bytes: int = 4, label: str = "layer") -> list[Collective]:
    """The collectives of one transformer layer (Megatron's plan): without sequence parallelism two
    all-reduces of the (B, T, C) activation forward (g) and two backward (f); with it, an
    all-gather and a reduce-scatter in place of each (the same bytes on the wire), plus one
    all-reduce of the layer's norm parameters' gradients, not counted here (C-sized, tiny).

    Example:
        sum(c.wire_bytes for c in layer_collectives(8, 1024, 4096, 8))   # bytes per rank per layer
    """
    n = batch * seq * hidden * dtype_bytes
    one = lambda kind, phase: Collective(kind, n, ranks, "formula", phase, label)  # noqa: E731
    if not sequence_parallel:
        return [one("all_reduce", p) for p in ("forward", "forward", "backward", "backward")]
    fwd = [one("all_gather", "forward"), one("reduce_scatter", "forward")] * 2
    bwd = [one("all_gather", "backward"), one("reduce_scatter", "backward")] * 2
    return fwd + bwd


def simulate(forward: Sequence[float], backward: Sequence[float], collectives: Sequence[Sequence[Collective]],
             ranks: int, link: object, lanes: Sequence[str] | None = None) -> Timeline:
    """A simulated Timeline of one TP step: layer l computes forward[l] / ranks seconds in pieces
    between its forward collectives, then the backward in reverse; every rank alike.

    `forward`/`backward`: seconds of each unsplit layer on one device; `collectives[l]`: layer l's
    (e.g. `layer_collectives(...)` or a measured trace's); `link`: an `mplib.hardware.Link`.

    Example:
        tl = simulate([1e-3] * 4, [2e-3] * 4, [layer_collectives(8, 512, 1024, 2)] * 4, 2, mplib.hardware.LINKS["PCIe 4.0 x16"])
        tl.duration; mplib.plot.timeline(tl)
    """
    if not len(forward) == len(backward) == len(collectives):
        raise ValueError(f"give one forward time, backward time and collective list per layer; got "
                         f"{len(forward)}, {len(backward)} and {len(collectives)}")
    names = list(lanes) if lanes is not None else [f"rank {r}" for r in range(ranks)]
    tl = Timeline(lanes=names, source="simulated", t0=1.0)
    t = 0.0
    order = [(l, "forward") for l in range(len(forward))] + [(l, "backward") for l in reversed(range(len(forward)))]
    for layer, phase in order:
        comm = [c for c in collectives[layer] if c.phase == phase]
        compute = (forward if phase == "forward" else backward)[layer] / ranks
        pieces = max(len(comm), 1)
        for i in range(pieces):
            for lane in range(len(names)):
                tl.add(lane, phase, t, t + compute / pieces, microbatch=0, stage=layer)
            t += compute / pieces
            if i < len(comm):
                dt = collective_seconds(comm[i], link)
                for lane in range(len(names)):
                    tl.add(lane, "collective", t, t + dt, microbatch=0, stage=layer,
                           label=f"{comm[i].kind} layer {layer}")
                t += dt
    return tl
