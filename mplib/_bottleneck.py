"""Min-max contiguous splits, vectorised: the smallest bound on any stage's weight that a split can meet.

Blocks [i, j) on stage s weigh (prefix[j] - prefix[i]) / speeds[s] and hold mem[s][j] - mem[s][i]
bytes, at most limits[s]. `partition.by_params` / `by_time` ask for the least bottleneck;
`partition` asks whether any split fits memory at all.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

INF = math.inf


class _Solver:
    """Splits of n blocks into k stages under a bound on every stage's weight (and memory)."""

    def __init__(self, prefix: np.ndarray, speeds: Sequence[float], mem: np.ndarray | None,
                 limits: Sequence[int] | None) -> None:
        self.prefix = np.asarray(prefix, dtype=float)
        self.n, self.k = len(self.prefix) - 1, len(speeds)
        self.speeds = np.asarray(speeds, dtype=float)
        self.ends = np.arange(self.n + 1)
        first_fit = np.zeros((self.k, self.n + 1), dtype=np.int64)  # smallest start whose stage fits memory
        if mem is not None and limits is not None:
            for s in range(self.k):
                first_fit[s] = np.searchsorted(mem[s], mem[s] - int(limits[s]), side="left")
        self.first_fit = first_fit
        # identical stages: the reachable ends after s stages form an interval, so a greedy walk decides
        self.identical = len(set(self.speeds.tolist())) == 1 and bool((first_fit == first_fit[0]).all())

    def weight(self, s: int, i: int, j: int) -> float:
        return (self.prefix[j] - self.prefix[i]) / self.speeds[s]

    def first_starts(self, bound: float) -> np.ndarray:
        """(k, n + 1): for every stage and end j, the smallest start i with weight <= bound that fits memory."""
        if bound == INF:
            return self.first_fit
        P, j = self.prefix, self.ends
        lo = np.minimum(np.searchsorted(P, P[None, :] - bound * self.speeds[:, None], side="left"), j)
        while True:  # make the float test exactly the one `weight` uses (rounding may be one off)
            back = (lo > 0) & ((P - P[np.maximum(lo - 1, 0)]) / self.speeds[:, None] <= bound)
            if not back.any():
                break
            lo = lo - back
        while True:
            ahead = (lo < j) & ((P - P[lo]) / self.speeds[:, None] > bound)
            if not ahead.any():
                break
            lo = lo + ahead
        return np.maximum(lo, self.first_fit)

    def feasible(self, bound: float) -> bool:
        if self.identical:
            return self._greedy(bound) is not None
        reach = np.zeros(self.n + 1, dtype=bool)
        reach[0] = True
        starts = self.first_starts(bound)
        for s in range(self.k):
            count = np.concatenate([[0], np.cumsum(reach)])  # count[x]: reachable starts below x
            ok = np.zeros(self.n + 1, dtype=bool)
            ok[1:] = count[self.ends[1:]] > count[starts[s][1:]]
            if s < self.k - 1:
                ok[self.n] = False
            else:
                ok[: self.n] = False
            reach = ok
        return bool(reach[self.n])

    def _greedy(self, bound: float) -> list[int] | None:
        """Identical stages: the ends reachable after s stages are [s, far_s]; walk back to a split."""
        far, fars = 0, [0]
        lo = self.first_starts(bound)[0]
        if (lo[1:] >= self.ends[1:]).any():  # some block fits no stage on its own
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

    def bounds(self, bound: float) -> list[int] | None:
        """A split whose every stage weighs at most `bound` (identical stages only), or None."""
        assert self.identical, "bounds() walks back the greedy split of identical stages"
        return self._greedy(bound)

    def candidates(self, low: float, high: float) -> np.ndarray:
        """Every stage weight in (low, high], sorted, each once."""
        found, his, lows = [], self.first_starts(high), self.first_starts(low)
        for s in range(self.k):
            a, b = his[s], lows[s]  # starts in [a, b) give weights in (low, high]
            lens = np.maximum(b - a, 0)
            ends = np.repeat(self.ends, lens)
            offsets = np.arange(len(ends)) - np.repeat(np.cumsum(lens) - lens, lens)
            found.append((self.prefix[ends] - self.prefix[np.repeat(a, lens) + offsets]) / self.speeds[s])
        return np.unique(np.concatenate(found))

    def min_bottleneck(self) -> float:
        """The smallest bound admitting a split: float bisection, then an exact pass over the weights in range."""
        if self.feasible(0.0):
            return 0.0
        hi = self.prefix[-1] / self.speeds.min()  # one stage takes everything
        lo = max(self.prefix[-1] / self.speeds.sum(), 0.0) * (1 - 1e-12)  # no split beats perfect sharing
        if self.feasible(lo):
            lo = 0.0
        while hi - lo > 1e-9 * hi:
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if self.feasible(mid) else (mid, hi)
        for c in self.candidates(lo, hi):
            if self.feasible(float(c)):
                return float(c)
        return hi  # unreachable: hi is feasible and some weight in (lo, hi] is its bottleneck
