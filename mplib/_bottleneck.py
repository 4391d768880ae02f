"""The exact search behind `mplib.partition.optimal`: contiguous splits under a bound, vectorised.

Blocks [i, j) on stage s take (P[j] - P[i]) / speed[s] seconds and Q[s][j] - Q[s][i] bytes; the
cut after stage s ending at block j takes cut[s][j] seconds. `solve(B)` is the DP of the
partition docstring: the least sum of stage and cut times over splits with every term <= B.
"""

from __future__ import annotations

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
        # With identical stages and free cuts the reachable ends form an interval: greedy works.
        self.simple = cut is None and len(set(self.speeds)) == 1 and \
            all((a == b).all() for a, b in zip(self.mem_lo, self.mem_lo[1:]))

    def time(self, s: int, i: int, j: int) -> float:
        return (self.P[j] - self.P[i]) / self.speeds[s]

    def lo(self, s: int, bound: float) -> np.ndarray:
        """For every end j, the smallest start i with time(s, i, j) <= bound and fitting memory."""
        if bound == INF:
            return self.mem_lo[s]
        P, j, sp = self.P, self.j, self.speeds[s]
        lo = np.minimum(np.searchsorted(P, P - bound * sp, side="left"), j)
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
        return np.maximum(lo, self.mem_lo[s])

    def _cut_cost(self, s: int, bound: float) -> np.ndarray:
        c = np.zeros(self.n + 1) if self.cut is None else self.cut[s]
        c = np.where(c <= bound, c, INF)
        c[self.n] = INF  # a stage that is not the last cannot end after the last block
        return c

    def feasible(self, bound: float) -> bool:
        if self.simple:
            return self._greedy(bound) is not None
        reach = np.zeros(self.n + 1, dtype=bool)
        reach[0] = True
        for s in range(self.k):
            count = np.concatenate([[0], np.cumsum(reach)])  # count[x]: reachable starts below x
            lo = self.lo(s, bound)
            ok = np.zeros(self.n + 1, dtype=bool)
            ok[1:] = count[self.j[1:]] > count[lo[1:]]
            if s < self.k - 1:
                ok &= self._cut_cost(s, bound) < INF
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
        history = []
        for s in range(self.k):
            sp, lo = self.speeds[s], self.lo(s, bound)
            val = dp - P / sp
            new = np.full(n + 1, INF)
            new[1:] = P[1:] / sp + _range_min(val, lo[1:], self.j[:-1])
            if s < self.k - 1:
                new = new + self._cut_cost(s, bound)
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
        found = []
        for s in range(self.k):
            a, b = self.lo(s, high), self.lo(s, low)  # starts in [a, b) give times in (low, high]
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
        """Bounds of a split minimising (chunks - 1) * bottleneck + total."""
        g_inf, bounds_inf = self.solve(INF)
        if chunks == 1 or (self.simple and self.cut is None):  # sum(t) is the same for every split
            return bounds_inf if chunks == 1 else self.bounds(self.min_bottleneck())
        b0 = self.min_bottleneck()
        best_bounds = self.solve(b0)[1]
        best_step = (chunks - 1) * self.bottleneck(best_bounds) + self.total(best_bounds)
        cands = self.candidates(b0, (best_step - g_inf) / (chunks - 1))
        pos, current = 0, self.total(best_bounds)
        while pos < len(cands) and (chunks - 1) * cands[pos] + g_inf < best_step:
            lo_i, hi_i = pos, len(cands)  # first candidate where g drops below `current`
            while lo_i < hi_i:
                mid = (lo_i + hi_i) // 2
                lo_i, hi_i = (lo_i, mid) if self.solve(float(cands[mid]))[0] < current else (mid + 1, hi_i)
            if lo_i == len(cands):
                break
            current, bounds = self.solve(float(cands[lo_i]))
            step = (chunks - 1) * self.bottleneck(bounds) + self.total(bounds)
            if step < best_step:
                best_step, best_bounds = step, bounds
            pos = lo_i + 1
        return best_bounds


def _range_min(values: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """min(values[a[q] : b[q] + 1]) for every query q (inf when empty), by a sparse table."""
    n = len(values)
    table = [values]
    while 2 ** len(table) <= n:
        h, prev = 2 ** (len(table) - 1), table[-1]
        table.append(np.minimum(prev[:-h], prev[h:]))
    length = b - a + 1
    out = np.full(len(a), INF)
    ok = length > 0
    a, b, length = a[ok], b[ok], length[ok]
    level = np.floor(np.log2(length)).astype(int)
    res = np.empty(len(a))
    for lv in np.unique(level):
        m = level == lv
        t = table[lv]
        res[m] = np.minimum(t[a[m]], t[b[m] - 2 ** lv + 1])
    out[ok] = res
    return out
