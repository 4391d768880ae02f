"""GPipe's exact search: its step is base + (M-1)(slowest forward + slowest backward), searched over a cap on the forwards.

base is the sum over stages of f + b plus two transfers per cut (fill and drain); a micro-batch
leaves the line one slowest forward, then one slowest backward, after the one before.
"""

from __future__ import annotations

import heapq

import numpy as np

from mplib._search import INF, TOLERANCE, Node, Problem, _Bound, _cut_after, _stage, best_first, min_max_table


class SlowestBackwardBound(_Bound):
    """For the objective base + coef x (slowest backward): exact, so exact at every complete split."""

    def __init__(self, p: Problem, coef: float) -> None:
        super().__init__(p)
        self.coef = coef
        self.vb = min_max_table(p, lambda s, i, j: _stage(p, s, i, j)[1])

    def objective(self, bounds: np.ndarray) -> float:
        f, b, c = self.p.stage_costs(np.asarray(bounds))
        return float((f + b).sum() + 2 * c.sum() + self.coef * b.max())

    def _slowest(self, mb: np.ndarray | float, table: np.ndarray | float) -> np.ndarray:
        """coef x (slowest backward); inf where the rest cannot fit (also when coef is 0)."""
        worst = np.maximum(mb, table)
        return np.where(np.asarray(table) == INF, INF, self.coef * worst if self.coef else 0.0)

    def root(self) -> Node:
        return Node(0, 0, (0,), float(self.rest[0, 0] + self._slowest(-INF, self.vb[0, 0])), (0.0, -INF))

    def children(self, node: Node, limit: float) -> list[Node]:
        p, s = self.p, node.s
        base, mb = node.state
        ends = p.ends(s, node.j)
        _, b, t = _stage(p, s, node.j, ends)
        base, mb = base + t + 2 * _cut_after(p, s, ends), np.maximum(mb, b)
        lb = base + self.rest[s + 1, ends] + self._slowest(mb, self.vb[s + 1, ends])
        return self._keep(node, ends, lb, limit, list(zip(base, mb)))


class GPipe:
    """GPipe's step is base + (M-1)(max f + max b) (module docstring). For a cap Bf on every stage's
    forward, H(Bf) = the least base + (M-1) max b over splits within the cap (an exact search with
    `SlowestBackwardBound`); the optimum is the least (M-1) Bf + H(Bf), and H never rises with Bf,
    so a best-first search over intervals of Bf needs H at few points: on (x, y] nothing beats
    (M-1) x + H(y), and nothing beats what was found at x when H(x) == H(y).
    """

    def __init__(self, p: Problem) -> None:
        self.p, self.m1 = p, p.schedule.chunks - 1
        self.expanded = 0

    def _within(self, cap: float) -> Problem:
        """`p` with every stage's forward capped at `cap` seconds: fewer ends per start."""
        p = self.p
        hi = p.mem_hi.copy()
        if cap < INF:
            for s in range(p.S):
                last = np.searchsorted(p.F, p.F + cap * p.speed[s], side="right") - 1
                last = np.minimum(last, p.n)
                over = (p.F[last] - p.F) / p.speed[s] > cap  # rounding: step back where the test fails
                while over.any():
                    last = last - over
                    over = (p.F[last] - p.F) / p.speed[s] > cap
                hi[s] = np.minimum(hi[s], last)
        return Problem(p.schedule, p.F, p.B, p.speed, p.cut, hi, p.device_fits, levels=p.levels)

    def _h(self, cap: float) -> tuple[float, np.ndarray | None]:
        q = self._within(cap)
        bound = SlowestBackwardBound(q, self.m1)
        if not np.isfinite(bound.root().lb):
            return INF, None
        left = None if self.max_nodes is None else max(self.max_nodes - self.expanded, 1)
        bounds, value, expanded, gap = best_first(q, bound, [], objective=bound.objective, max_nodes=left)
        self.expanded += expanded
        self.inner_gap = max(self.inner_gap, gap)
        return value * (1 - gap), np.asarray(bounds)  # a gap left inside: only its bound is sure

    def solve(self, candidates: list, max_nodes: int | None = None) -> tuple[list[int], float, int, float]:
        p, m1 = self.p, self.m1
        self.max_nodes, self.inner_gap = max_nodes, 0.0
        h_all, best = self._h(INF)
        found = {"step": float(p.step(best)[0]), "bounds": best}

        def h(cap: float) -> tuple[float, float]:
            """H(cap), and the largest forward of the split that attains it (H is flat up to cap)."""
            value, bounds = self._h(cap)
            if bounds is None:
                return INF, cap
            step = float(p.step(bounds)[0])
            if step < found["step"]:
                found.update(step=step, bounds=bounds)
            return value, float(p.stage_costs(bounds)[0].max())

        if m1 == 0:
            return [int(x) for x in best], found["step"], self.expanded, self.inner_gap
        high = float(p.stage_costs(best)[0].max())
        low = float(min_max_table(p, lambda s, i, j: _stage(p, s, i, j)[0])[0, 0]) * (1 - 1e-12)
        heap = [(m1 * low + h_all, low, h(low)[0], high, h_all)]
        while heap:
            if self.max_nodes is not None and self.expanded >= self.max_nodes:
                gap = max(0.0, 1 - heap[0][0] / found["step"])
                return [int(v) for v in found["bounds"]], found["step"], self.expanded, gap
            lb, x, hx, y, hy = heapq.heappop(heap)
            if lb >= found["step"] * (1 - TOLERANCE) or hx == hy:
                continue
            if y - x <= 1e-9 * y:  # too narrow to halve: try every stage forward inside
                for cap in _forwards_between(p, x, y):
                    h(cap)
                continue
            mid = (x + y) / 2
            hm, reached = h(mid)
            heapq.heappush(heap, (m1 * x + hm, x, hx, min(reached, mid), hm))
            heapq.heappush(heap, (m1 * mid + hy, mid, hm, y, hy))
        return [int(v) for v in found["bounds"]], found["step"], self.expanded, self.inner_gap


def _forwards_between(p: Problem, low: float, high: float) -> list[float]:
    """Every stage forward time in (low, high], ascending: where H may step down."""
    out = set()
    for s in range(p.S):
        f = (p.F[None, :] - p.F[:, None]) / p.speed[s]
        out.update(f[(f > low) & (f <= high)].tolist())
    return sorted(out)
