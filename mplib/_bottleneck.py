"""The exact search behind `mplib.partition.optimal`: contiguous splits under a bound, vectorised.

Blocks [i, j) on stage s take (P[j] - P[i]) / speed[s] seconds and Q[s][j] - Q[s][i] bytes; the
cut after stage s ending at block j takes cut[s][j] seconds. `solve(B)` is the DP of the
partition docstring: the least sum of stage and cut times over splits with every term <= B.
"""

from __future__ import annotations

import heapq
import math
from typing import Sequence

import numpy as np

INF = math.inf


class _Solver:
    def __init__(self, prefix: np.ndarray, speeds: Sequence[float], cut: np.ndarray | None,
                 mem: np.ndarray | None, limits: Sequence[int] | None) -> None:
        self.P = np.asarray(prefix, dtype=float)
        self.n, self.k = len(self.P) - 1, len(speeds)
        self.speeds = [float(s) for s in speeds]
        self.cut = cut  # (k - 1, n + 1) seconds, inf where no cut can sit, or None: cuts are free
        self.j = np.arange(self.n + 1)
        self.mem_lo = [np.zeros(self.n + 1, dtype=np.int64) for _ in range(self.k)]
        if mem is not None and limits is not None:
            for s in range(self.k):  # smallest start i whose stage [i, j) fits: exact integer search
                self.mem_lo[s] = np.searchsorted(mem[s], mem[s] - int(limits[s]), side="left")
        self.mem_lo_all = np.stack(self.mem_lo)
        unique, self.speed_row = np.unique(self.speeds, return_inverse=True)
        self.sp_unique = unique[:, None]  # (distinct speeds, 1): broadcasts against (n + 1) ends
        # With identical stages and free cuts the reachable ends form an interval: greedy works.
        self.simple = cut is None and len(set(self.speeds)) == 1 and \
            all((a == b).all() for a, b in zip(self.mem_lo, self.mem_lo[1:]))

    def time(self, s: int, i: int, j: int) -> float:
        return (self.P[j] - self.P[i]) / self.speeds[s]

    def lo(self, s: int, bound: float) -> np.ndarray:
        """For every end j, the smallest start i with time(s, i, j) <= bound and fitting memory."""
        return self.los(bound)[s]

    def los(self, bound: float) -> np.ndarray:
        """`lo` of every stage at once, (k, n + 1): one vectorised search instead of k."""
        if bound == INF:
            return self.mem_lo_all
        P, j, sp = self.P, self.j, self.sp_unique  # stages of one speed share their search
        lo = np.minimum(np.searchsorted(P, (P - bound * sp).ravel(), side="left").reshape(len(sp), -1), j)
        while True:  # make the float test exactly the one `time` uses (rounding may be one off)
            back = (lo > 0) & ((P - P[np.maximum(lo - 1, 0)]) / sp <= bound)
            if not back.any():
                break
            lo = lo - back
        while True:
            ahead = (lo < j) & ((P - P[lo]) / sp > bound)
            if not ahead.any():
                break
            lo = lo + ahead
        return np.maximum(lo[self.speed_row], self.mem_lo_all)

    def _cut_costs(self, bound: float) -> np.ndarray:
        """(k - 1, n + 1) seconds of each cut position, inf where the cut exceeds `bound` or cannot sit."""
        c = np.zeros((max(self.k - 1, 0), self.n + 1)) if self.cut is None else self.cut
        c = np.where(c <= bound, c, INF)
        c[:, self.n] = INF  # a stage that is not the last cannot end after the last block
        return c

    def feasible(self, bound: float) -> bool:
        if self.simple:
            return self._greedy(bound) is not None
        reach = np.zeros(self.n + 1, dtype=bool)
        reach[0] = True
        los, cuts = self.los(bound), self._cut_costs(bound)
        for s in range(self.k):
            count = np.concatenate([[0], np.cumsum(reach)])  # count[x]: reachable starts below x
            ok = np.zeros(self.n + 1, dtype=bool)
            ok[1:] = count[self.j[1:]] > count[los[s][1:]]
            if s < self.k - 1:
                ok &= cuts[s] < INF
            else:
                ok[:self.n] = False
            reach = ok
        return bool(reach[self.n])

    def _greedy(self, bound: float) -> list[int] | None:
        """Identical stages: ends reachable after s stages are [s, far_s]; walk back to a split."""
        far, fars = 0, [0]
        lo = self.lo(0, bound)
        if (lo[1:] >= self.j[1:]).any():  # some block fits no stage on its own
            return None
        for s in range(self.k):
            far = int(np.searchsorted(lo, far, side="right")) - 1  # largest j with lo[j] <= far
            far = min(far, self.n - (self.k - 1 - s))
            if far < s + 1:
                return None
            fars.append(far)
        if fars[-1] != self.n:
            return None
        bounds, j = [self.n], self.n
        for s in range(self.k - 1, 0, -1):
            i = max(int(lo[j]), s)
            assert i <= min(fars[s], j - 1), "greedy walk-back left its reachable interval"
            bounds.append(i)
            j = i
        return [0] + bounds[::-1]

    def solve(self, bound: float) -> tuple[float, list[int] | None]:
        """(least sum of stage + cut times with every term <= bound, its bounds) or (inf, None)."""
        P, n = self.P, self.n
        dp = np.full(n + 1, INF)
        dp[0] = 0.0
        history, los, cuts = [], self.los(bound), self._cut_costs(bound)
        for s in range(self.k):
            sp, lo = self.speeds[s], los[s]
            val = dp - P / sp
            new = np.full(n + 1, INF)
            new[1:] = P[1:] / sp + _range_min(val, lo[1:], self.j[:-1])
            if s < self.k - 1:
                new = new + cuts[s]
            else:
                new[:n] = INF
            history.append((val, lo))
            dp = new
        if dp[n] == INF:
            return INF, None
        bounds, j = [n], n
        for s in range(self.k - 1, 0, -1):
            val, lo = history[s]
            j = int(lo[j]) + int(np.argmin(val[lo[j]:j]))
            bounds.append(j)
        return float(dp[n]), [0] + bounds[::-1]

    def bounds(self, bound: float) -> list[int] | None:
        if self.simple:
            return self._greedy(bound)
        return self.solve(bound)[1]

    def bottleneck(self, bounds: Sequence[int]) -> float:
        times = [self.time(s, bounds[s], bounds[s + 1]) for s in range(self.k)]
        if self.cut is not None:
            times += [float(self.cut[s][bounds[s + 1]]) for s in range(self.k - 1)]
        return max(times)

    def total(self, bounds: Sequence[int]) -> float:
        t = sum(self.time(s, bounds[s], bounds[s + 1]) for s in range(self.k))
        return t + (0.0 if self.cut is None else sum(float(self.cut[s][bounds[s + 1]]) for s in range(self.k - 1)))

    def candidates(self, low: float, high: float) -> np.ndarray:
        """Every stage or cut time in (low, high], sorted, each once."""
        found, his, lows = [], self.los(high), self.los(low)
        for s in range(self.k):
            a, b = his[s], lows[s]  # starts in [a, b) give times in (low, high]
            lens = np.maximum(b - a, 0)
            ends = np.repeat(self.j, lens)
            offsets = np.arange(len(ends)) - np.repeat(np.cumsum(lens) - lens, lens)
            found.append((self.P[ends] - self.P[np.repeat(a, lens) + offsets]) / self.speeds[s])
            if self.cut is not None and s < self.k - 1:
                c = self.cut[s]
                found.append(c[(c > low) & (c <= high)])
        return np.unique(np.concatenate(found))

    def min_bottleneck(self) -> float:
        """The smallest bound admitting a split: float bisection, then an exact pass over candidates."""
        if self.feasible(0.0):
            return 0.0
        hi = self.bottleneck(self.bounds(INF))
        lo = max(self.P[-1] / sum(self.speeds), 0.0) * (1 - 1e-12)  # no split beats perfect sharing
        if self.feasible(lo):
            lo = 0.0
        while hi - lo > 1e-9 * hi:
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if self.feasible(mid) else (mid, hi)
        for c in self.candidates(lo, hi):
            if self.feasible(float(c)):
                return float(c)
        return hi  # unreachable: hi is feasible and some candidate in (lo, hi] is its bottleneck

    def best(self, chunks: int) -> list[int]:
        """Bounds of a split minimising (chunks - 1) * bottleneck + total: best-first branch and bound.

        h(B) = (M-1) B + g(B) over bounds B; g never rises with B, so on (x, y] every h is at least
        (M-1) x + g(y): an interval whose lower bound cannot beat the best split found is dropped,
        and one where g(x) == g(y) holds nothing better than x itself. Intervals too narrow to halve
        are finished exactly on the stage and cut times (candidates) inside them.
        """
        lam = chunks - 1
        g_inf, bounds_inf = self.solve(INF)
        if chunks == 1 or (self.simple and self.cut is None):  # sum(t) is the same for every split
            return bounds_inf if chunks == 1 else self.bounds(self.min_bottleneck())
        found = {"step": lam * self.bottleneck(bounds_inf) + g_inf, "bounds": bounds_inf}

        def g(bound: float) -> float:
            value, bounds = self.solve(bound)
            if bounds is not None:
                step = lam * self.bottleneck(bounds) + self.total(bounds)
                if step < found["step"]:
                    found.update(step=step, bounds=bounds)
            return value

        high = (found["step"] - g_inf) / lam  # a larger bottleneck loses even with the least sum
        low = self.P[-1] / sum(self.speeds) * (1 - 1e-12)  # no split beats perfect sharing
        if not low < high:
            return found["bounds"]
        g_high = g(high)
        heap = [(lam * low + g_high, low, g(low) if self.feasible(low) else INF, high, g_high)]
        while heap:
            bound, x, gx, y, gy = heapq.heappop(heap)
            if bound >= found["step"]:
                break  # every interval left is bounded below by this one
            if gx == gy:
                continue
            if y - x <= 1e-9 * y:
                for c in self.candidates(x, y):
                    if gx < INF or self.feasible(float(c)):
                        g(float(c))
                continue
            mid = (x + y) / 2
            gm = INF if gx == INF and not self.feasible(mid) else g(mid)  # feasibility is the cheaper test
            heapq.heappush(heap, (lam * x + gm, x, gx, mid, gm))
            heapq.heappush(heap, (lam * mid + gy, mid, gm, y, gy))
        return found["bounds"]


def _range_min(values: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """min(values[a[q] : b[q] + 1]) for every query q (inf when empty), by a sparse table.

    Row r of the table holds the minima of windows of 2**r values; a query reads two windows
    of the largest such size that together cover it, so every query costs two lookups.
    """
    n = len(values)
    length = b - a + 1
    ok = length > 0
    levels = max(int(length.max(initial=1)).bit_length(), 1)  # the longest query needs no higher row
    table = np.full((levels, n), INF)
    table[0] = values
    for r in range(1, levels):
        h = 1 << (r - 1)
        table[r, : n - 2 * h + 1] = np.minimum(table[r - 1, : n - 2 * h + 1], table[r - 1, h: n - h + 1])
    level = np.frexp(np.where(ok, length, 1))[1] - 1  # floor(log2(length)), exact for ints
    a0 = np.where(ok, a, 0)
    res = np.minimum(table[level, a0], table[level, np.where(ok, b, 0) - (1 << level) + 1])
    return np.where(ok, res, INF)

