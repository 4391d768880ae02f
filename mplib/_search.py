"""The exact search behind `mplib.partition.optimal`: best-first branch and bound over contiguous splits.

A node fixes the first s stages (blocks [0, j)); its bound never exceeds the simulated step of a
split that completes it; complete splits are timed by the simulator. The search stops, exact,
once the best step found is at most the smallest bound left (bounds: `_bounds`, `_gpipe`).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from mplib.schedule import Schedule
from mplib.simulate import compile_levels, step_times

INF = math.inf
TOLERANCE = 1e-9  # relative: steps that close are equal (float sums in another order differ in the last bits)


@dataclass
class Problem:
    """The arrays every bound and the oracle read. Stage s runs on device s % K at `speed[s]`.

    Blocks [i, j) on stage s take (F[j] - F[i]) / speed[s] forward and likewise backward; the cut
    after stage s sitting before block j takes `cut[s, j]` seconds one way (inf where no cut can
    sit); `mem_hi[s, i]` is the last end j for which blocks [i, j) fit stage s's memory alone.
    """

    schedule: Schedule
    F: np.ndarray  # (n + 1,) prefix sums of forward seconds
    B: np.ndarray  # (n + 1,) prefix sums of backward seconds
    speed: np.ndarray  # (S,)
    cut: np.ndarray  # (S - 1, n + 1)
    mem_hi: np.ndarray  # (S, n + 1) int
    device_fits: Callable[[Sequence[int]], bool] | None = None  # full check for shared devices (interleaved)
    levels: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.n, self.S = len(self.F) - 1, len(self.speed)
        self.T = self.F + self.B
        if self.levels is None:
            self.levels = compile_levels(self.schedule)

    def stage_costs(self, bounds: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(forward, backward, transfer) per stage for a batch of splits `bounds` (batch, S + 1)."""
        bounds = np.atleast_2d(bounds)
        f = (self.F[bounds[:, 1:]] - self.F[bounds[:, :-1]]) / self.speed
        b = (self.B[bounds[:, 1:]] - self.B[bounds[:, :-1]]) / self.speed
        c = self.cut[np.arange(self.S - 1), bounds[:, 1:-1]] if self.S > 1 else np.zeros((len(bounds), 0))
        return f, b, c

    def step(self, bounds: np.ndarray) -> np.ndarray:
        """The simulated step of each split: the oracle."""
        f, b, c = self.stage_costs(bounds)
        return step_times(self.levels, f, b, c if self.S > 1 else None)

    def ends(self, s: int, i: int) -> np.ndarray:
        """The ends stage s may take from start i: it fits memory and leaves a block for every later stage."""
        if s == self.S - 1:
            return np.array([self.n]) if i < self.n and self.mem_hi[s, i] >= self.n else np.zeros(0, dtype=np.int64)
        return np.arange(i + 1, min(int(self.mem_hi[s, i]), self.n - (self.S - 1 - s)) + 1)


def min_max_table(p: Problem, weight: Callable[[int, np.ndarray, np.ndarray], np.ndarray]) -> np.ndarray:
    """V[s, i]: a lower bound on the least, over splits of blocks [i, n) into stages s..S-1, of the
    largest `weight(s, i, j)` (stage s = blocks [i, j)); `weight` must not fall as j grows.

    V[s, i] = min over j of max(weight(s, i, j), V[s+1, j]). With V[s+1] replaced by its running
    minimum from the left (never above it, never rising), the best j is where weight first reaches
    it, found by bisection: O(n log n) per stage instead of O(n^2), and the value can only be lower.
    """
    n, S = p.n, p.S
    V = np.full((S + 1, n + 1), INF)
    V[S, n] = -INF
    starts = np.arange(n + 1)
    for s in range(S - 1, -1, -1):
        nxt = np.minimum.accumulate(V[s + 1])
        if s == S - 1:
            lo = np.full(n + 1, n)
            hi = np.where((p.mem_hi[s] >= n) & (starts < n), n, n - 1)
        else:
            lo, hi = starts + 1, np.minimum(p.mem_hi[s], n - (S - 1 - s))
        ok = lo <= hi
        a, b = np.where(ok, lo, 0), np.where(ok, hi + 1, 0)  # search [a, b): the first j that crosses
        while np.any(a < b):
            mid = (a + b) // 2
            crossed = weight(s, starts, mid) >= nxt[mid]
            live = a < b
            b, a = np.where(live & crossed, mid, b), np.where(live & ~crossed, mid + 1, a)
        at, before = ok & (a <= hi), ok & (a - 1 >= lo)
        best = np.full(n + 1, INF)
        best[at] = weight(s, starts, np.minimum(a, n))[at]
        best[before] = np.minimum(best[before], nxt[np.maximum(a - 1, 0)][before])
        V[s] = best
    return V


def min_sum_table(p: Problem) -> np.ndarray:
    """C[s, i]: the least total one-way transfer of the cuts after stages s..S-2 over splits of [i, n)."""
    n, S = p.n, p.S
    C = np.full((S + 1, n + 1), INF)
    C[S - 1] = np.where((p.mem_hi[S - 1] >= n) & (np.arange(n + 1) < n), 0.0, INF)
    for s in range(S - 2, -1, -1):
        val = p.cut[s] + C[s + 1]  # cut after stage s before block j, then the rest
        hi = np.minimum(p.mem_hi[s], n - (S - 1 - s))
        C[s] = _window_min(val, np.arange(n + 1) + 1, hi)
    return C


def _window_min(values: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """min(values[a[q] : b[q] + 1]) for every q (inf when empty), two lookups in a sparse table."""
    n = len(values)
    a = np.minimum(a, n - 1)
    length = b - a + 1
    ok = length > 0
    levels = max(int(length.max(initial=1)).bit_length(), 1)
    table = np.full((levels, n), INF)
    table[0] = values
    for r in range(1, levels):
        h = 1 << (r - 1)
        table[r, : n - 2 * h + 1] = np.minimum(table[r - 1, : n - 2 * h + 1], table[r - 1, h: n - h + 1])
    level = np.frexp(np.where(ok, length, 1))[1] - 1
    a0 = np.where(ok, a, 0)
    res = np.minimum(table[level, a0], table[level, np.where(ok, b, 0) - (1 << level) + 1])
    return np.where(ok, res, INF)


@dataclass
class Node:
    """Stages 0..s-1 fixed, covering blocks [0, j); `bounds` their ends; `state` what its bound carries."""

    s: int
    j: int
    bounds: tuple[int, ...]
    lb: float
    state: Any


def best_first(p: Problem, bound: Any, candidates: list[Sequence[int]],
               objective: Callable[[np.ndarray], float] | None = None,
               max_nodes: int | None = None) -> tuple[list[int], float, int, float]:
    """(bounds of a split with the least objective, that objective, nodes expanded, gap).

    The objective is the simulated step unless given; `bound` must bound it from below.
    `candidates` are splits (their bounds) timed first, so that the search starts with a good
    incumbent and prunes what cannot beat it. After `max_nodes` expansions the search stops with
    the best split so far; `gap` is then how far above the optimum it may be, relative (0: proven).
    """
    many = None if objective else (lambda splits: p.step(np.asarray(splits)))  # the simulator times a batch at once
    objective = objective or (lambda bounds: float(p.step(np.asarray(bounds))[0]))
    best_step, best = INF, None
    if candidates:
        steps = [objective(np.asarray(c)) for c in candidates]
        k = int(np.argmin(steps))
        best_step, best = float(steps[k]), [int(x) for x in candidates[k]]
    root = bound.root()
    dived = _dive(p, bound, root, objective)
    if dived is not None and dived[1] < best_step:
        best, best_step = dived
    heap: list = [(0, 0, 0, root)]
    count, expanded = 1, 0
    scale = max(abs(best_step), 1.0) if best_step < INF else 1.0
    gap = 0.0
    while heap:
        _, _, _, node = heapq.heappop(heap)
        if node.lb >= best_step * (1 - TOLERANCE):
            break
        if max_nodes is not None and expanded >= max_nodes:
            floor = min([node.lb] + [h[3].lb for h in heap])
            best, best_step = _polish(p, best, best_step, objective, many)
            gap = max(0.0, 1 - floor / best_step)
            break
        expanded += 1
        if node.s == p.S:
            step = objective(np.array(node.bounds))
            if step < best_step:
                best_step, best = step, list(node.bounds)
            continue
        for child in bound.children(node, best_step * (1 - TOLERANCE)):
            # by bound, deeper first among (near) ties: a complete split ends the search sooner
            heapq.heappush(heap, (math.floor(child.lb / (scale * 1e-12)), -child.s, count, child))
            count += 1
    if best is None:
        raise ValueError("no split fits")  # callers check feasibility first; this is a safety net
    return best, best_step, expanded, gap


def _dive(p: Problem, bound: Any, node: Node, objective: Callable) -> tuple[list[int], float] | None:
    """Follow the child with the least bound down to a complete split: a good first incumbent."""
    while node.s < p.S:
        kids = bound.children(node, INF)
        if not kids:
            return None
        node = min(kids, key=lambda k: k.lb)
    return list(node.bounds), objective(np.array(node.bounds))


def _polish(p: Problem, bounds: list[int], step: float, objective: Callable,
            many: Callable | None = None) -> tuple[list[int], float]:
    """Local search: move one cut by one block while that lowers the step (when the search gave up)."""
    bounds = np.asarray(bounds)
    while p.S > 1:
        moves = []
        for c in range(1, p.S):
            for d in (-1, 1):
                nb = bounds.copy()
                nb[c] += d
                if nb[c - 1] < nb[c] < nb[c + 1] and _fits(p, nb):
                    moves.append(nb)
        if not moves:
            break
        steps = list(many(moves)) if many else [objective(m) for m in moves]
        k = int(np.argmin(steps))
        if not steps[k] < step * (1 - TOLERANCE):
            break
        bounds, step = moves[k], float(steps[k])
    return [int(x) for x in bounds], step


def _fits(p: Problem, bounds: np.ndarray) -> bool:
    ok = all(bounds[s + 1] <= p.mem_hi[s, bounds[s]] for s in range(p.S))
    return ok and (p.device_fits is None or p.device_fits(bounds))


# --- what every bound shares ------------------------------------------------------------------


def _suffix_time(p: Problem) -> np.ndarray:
    """Tsuf[s, j]: the least compute time of blocks [j, n) on stages s..S-1 (at their fastest device)."""
    fastest = np.maximum.accumulate(p.speed[::-1])[::-1]  # fastest device among stages s..S-1
    out = np.zeros((p.S + 1, p.n + 1))
    out[: p.S] = (p.T[-1] - p.T)[None, :] / fastest[:, None]
    return out


def _stage(p: Problem, s: int, i: int | np.ndarray, j: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(forward, backward, total) seconds of stage s = blocks [i, j)."""
    f = (p.F[j] - p.F[i]) / p.speed[s]
    b = (p.B[j] - p.B[i]) / p.speed[s]
    return f, b, f + b


def _cut_after(p: Problem, s: int, j: np.ndarray) -> np.ndarray:
    return p.cut[s, j] if s < p.S - 1 else np.zeros(len(j))


class _Bound:
    """Common parts: the suffix's least base (time plus two transfers per cut); `solve` by best-first search."""

    def __init__(self, p: Problem) -> None:
        self.p = p
        self.rest = _suffix_time(p) + 2 * min_sum_table(p)  # (S + 1, n + 1)
        self.rest[p.S, p.n] = 0.0

    def solve(self, candidates: list, max_nodes: int | None = None) -> tuple[list[int], float, int, float]:
        return best_first(self.p, self, candidates, max_nodes=max_nodes)

    def _keep(self, node: Node, ends: np.ndarray, lb: np.ndarray, limit: float, states: list) -> list[Node]:
        out = []
        for k in np.flatnonzero(lb < limit):
            out.append(Node(node.s + 1, int(ends[k]), node.bounds + (int(ends[k]),), float(lb[k]), states[k]))
        return out
