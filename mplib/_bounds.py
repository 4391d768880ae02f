"""Lower bounds on the simulated 1F1B step of every split that completes a prefix, and one for any schedule.

Each bound is the weight of paths that exist in the schedule's dependency graph whatever the
costs: the step is the longest path (`mplib.schedule.action_times`), so it is at least each of
them. 1F1B's longest paths (K devices, w_d = K-1-d warm-up forwards on device d, L_d = M-1-w_d
one-forward-one-backward cycles) are read off the schedule: the first micro-batch goes down every
stage and back (base), then each of the M-1 other micro-batches adds either a cycle on one device
d (f_d + b_d: at most L_d of them), or a loop over an interval [a, e] of devices (its f + b and two
transfers per inner cut, for e - a + 1 micro-batches), or, once the forwards are done, one
backward on a device the path passes. The suffix is bounded by tables over (stage, first block).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mplib._search import INF, Node, Problem, _Bound, _cut_after, _stage, _suffix_time, min_max_table
from mplib.simulate import step_times


@dataclass
class _OneState:
    base: float  # sum of t over stages < s and two transfers per cut before stage s
    loop: float  # max over d < s of L_d t_d + (f + b and two transfers per cut) from d+1 to s-1
    closed: float  # the largest path term whose last device is < s
    spans: np.ndarray  # per a < s: f + b of stages a..s-1 and two transfers per cut inside
    top_b: np.ndarray  # per a < s: max backward over stages 0..a


class OneFOneBBound(_Bound):
    """1F1B: the paths of the module docstring whose devices are known, and tables for the rest.

    Path terms (added to base): loop(d, e) = L_d t_d + span(d+1..e) + w_e max_{y<=e} b_y for d <= e
    (cycles on d, the last forward descends to e, then w_e backwards on the slowest device it
    passes); interval(a, e) = n(a,e) span(a..e) + r(a,e) max_{y<=a} b_y, with n(a, e) loops over
    [a, e] while forwards remain and r(a, e) = M-1 - n(a,e)(e-a+1) columns of backwards; and, when
    M = K, w_0 b_0 (device 0 runs all its backwards after the pipeline has drained).
    """

    def __init__(self, p: Problem) -> None:
        super().__init__(p)
        K, M = p.S, p.schedule.chunks
        self.K, self.M = K, M
        self.w = K - 1 - np.arange(K)
        self.L = M - 1 - self.w  # >= 0 as 1F1B needs M >= K
        a, e = np.meshgrid(np.arange(K), np.arange(K), indexing="ij")
        width = e - a + 1
        exists = (e >= a) & (K - a <= M - 1)
        self.n_loops = np.where(exists, (M - 1 - (K - a)) // np.maximum(width, 1) + 1, 0)
        self.r_cols = np.where(exists, M - 1 - self.n_loops * width, 0)
        fastest = np.append(np.maximum.accumulate(p.speed[::-1])[::-1], np.inf)
        self.fastest = fastest

        def per_stage(beta: float):
            def g(s: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
                f, b, t = _stage(p, s, i, j)
                # cycles on s, then backwards on s, or on the slowest backward before the suffix (beta)
                out = self.L[s] * t + self.w[s] * np.maximum(b, beta)
                # cycles on s, then one more trip to the bottom: rises with j only if s's share dominates
                if self.L[s] >= 1 and s < K - 1 and self.L[s] / p.speed[s] >= 1 / fastest[s + 1]:
                    out = np.maximum(out, self.L[s] * t + (p.T[-1] - p.T[j]) / fastest[s + 1])
                return out
            return g

        # tables for a grid of beta (the slowest backward of the known stages): a node reads the
        # largest grid value at or below its own, which can only lower its bound
        most = float(p.B[-1] / p.speed.min())
        self.betas = np.concatenate([[0.0], np.geomspace(most / (4 * K), most, 12)]) if most > 0 else np.zeros(1)
        self.v = np.stack([min_max_table(p, per_stage(float(beta))) for beta in self.betas])
        self.checks = _Sampled()  # the feasibility test is costly: run it while it pays


    def _table(self, s: int, ends: np.ndarray, beta: np.ndarray) -> np.ndarray:
        q = np.searchsorted(self.betas, beta, side="right") - 1
        return self.v[np.maximum(q, 0), s, ends]

    def root(self) -> Node:
        state = _OneState(0.0, -INF, -INF, np.zeros(0), np.zeros(0))
        return Node(0, 0, (0,), float(self.rest[0, 0] + self.v[0, 0, 0]), state)

    def children(self, node: Node, limit: float) -> list[Node]:
        p, s, st, K = self.p, node.s, node.state, self.K
        ends = p.ends(s, node.j)
        f, b, t = _stage(p, s, node.j, ends)
        c_in = 2 * p.cut[s - 1, node.j] if s >= 1 else 0.0  # the cut before stage s, both ways
        c_out = 2 * _cut_after(p, s, ends)
        base = st.base + t + c_out
        loop = np.maximum(st.loop + c_in + t, self.L[s] * t if self.L[s] >= 1 else -INF)
        spans = np.concatenate([st.spans[None, :] + c_in + t[:, None], t[:, None]], axis=1)  # (ends, s + 1)
        top = np.maximum(st.top_b[-1] if s else -INF, b)
        top_b = np.concatenate([np.broadcast_to(st.top_b, (len(ends), s)), top[:, None]], axis=1)
        closed = np.maximum(st.closed, loop + self.w[s] * top)
        closed = np.maximum(closed, self._intervals(spans, top_b, s, s))
        if self.M == K and s == 0:
            closed = np.maximum(closed, self.w[0] * b)
        if s + 1 == K:
            lb = base + closed
        else:
            lb = self._open(base, loop, spans, top_b, top, c_out, closed, ends, s)
            live = np.flatnonzero(lb < limit)
            if len(live) and limit < INF and self.checks.due():
                # the tables gave up the coupling to the known stages: test it on the children
                room = limit - base[live] - self.rest[s + 1, ends[live]]
                ok = self._reachable(s + 1, ends[live], room, top[live], loop[live] + c_out[live],
                                     spans[live] + c_out[live, None], top_b[live])
                self.checks.record(pruned=bool((~ok).any()))
                lb[live[~ok]] = INF
        states = [_OneState(float(base[k]), float(loop[k]), float(closed[k]), spans[k], top_b[k])
                  for k in range(len(ends))]
        return self._keep(node, ends, lb, limit, states)

    def _reachable(self, s1: int, start: np.ndarray, room: np.ndarray, beta: np.ndarray, loop: np.ndarray,
                   spans: np.ndarray, top_b: np.ndarray) -> np.ndarray:
        """Whether blocks [start, n) can go on stages s1..K-1 with every path term <= room (per child).

        Necessary conditions only, so a False is safe to prune: each suffix stage x must keep
        L_x t_x + w_x max(b_x, beta) and its trip to the bottom within room (a monotone test, so the
        reachable ends of a stage form an interval), and the paths from the known stages that end
        on x (a loop from a device before s1, an interval [a, x]) cap how much time stages s1..x may
        take together, hence where x may end.
        """
        p, K, n = self.p, self.K, self.p.n
        fast = self.fastest[s1]
        a, b = start.copy(), start.copy()  # stage x may start anywhere in [a, b]
        alive = np.ones(len(start), dtype=bool)
        for x in range(s1, K):
            # most time stages s1..x may take together, from the known paths that end on x
            cap_time = room - loop - self.w[x] * beta
            nl, rc = self.n_loops[: s1, x], self.r_cols[: s1, x]
            if (nl >= 1).any():
                per_a = np.where(nl >= 1, (room[:, None] - rc * top_b) / np.maximum(nl, 1) - spans, INF)
                cap_time = np.minimum(cap_time, per_a.min(axis=1))
            with np.errstate(invalid="ignore"):
                cap_end = np.searchsorted(p.T, p.T[start] + cap_time * fast, side="right") - 1
            last = np.minimum(np.minimum(p.mem_hi[x, b], n - (K - 1 - x)), cap_end)
            if x == K - 1:
                return alive & (last >= n) & (b < n) & (self._stage_terms(x, b, np.full_like(b, n), beta) <= room)
            lo, hi = b, last  # the largest j in (b, last] whose stage [b, j) keeps its terms within room
            while np.any(lo < hi):
                mid = (lo + hi + 1) // 2
                good = self._stage_terms(x, b, np.minimum(mid, n), beta) <= room
                lo, hi = np.where(good & (lo < hi), mid, lo), np.where(~good & (lo < hi), mid - 1, hi)
            a, b = a + 1, np.maximum(lo, b)  # no end past b from a start before b if [b, b+1) is out
            alive &= (a <= b) & (b <= n - (K - 1 - x))
        return alive

    def _stage_terms(self, x: int, i: np.ndarray, j: np.ndarray, beta: np.ndarray) -> np.ndarray:
        _, b, t = _stage(self.p, x, i, j)
        out = self.L[x] * t + self.w[x] * np.maximum(b, beta)
        if self.L[x] >= 1 and x < self.K - 1 and self.L[x] / self.p.speed[x] >= 1 / self.fastest[x + 1]:
            out = np.maximum(out, self.L[x] * t + (self.p.T[-1] - self.p.T[j]) / self.fastest[x + 1])
        return out

    def _open(self, base: np.ndarray, loop: np.ndarray, spans: np.ndarray, top_b: np.ndarray, top: np.ndarray,
              c_out: np.ndarray, closed: np.ndarray, ends: np.ndarray, s: int) -> np.ndarray:
        """The bound of a child that is not complete: known paths, paths into the unknown, the tables."""
        K = self.K
        with np.errstate(invalid="ignore"):  # inf - inf where the rest cannot fit: that child is dropped
            rest = self.rest[s + 1, ends]
            # paths whose last device is still unknown: drop its unknown costs (all >= 0)
            open_loop = loop + c_out + np.maximum(rest, self.w[s + 1] * top)
            open_iv = np.maximum(self._intervals(spans + c_out[:, None], top_b, s, s + 1),
                                 self._intervals(spans + (c_out + rest)[:, None], top_b, s, K - 1))
            table = self._table(s + 1, ends, top)
            lb = base + rest + np.maximum.reduce([closed, open_loop, open_iv, table])
        return np.where(np.isfinite(rest) & np.isfinite(table), lb, INF)

    def _intervals(self, spans: np.ndarray, top_b: np.ndarray, s: int, e: int) -> np.ndarray:
        """max over a <= s (a < e) of n(a, e) spans[a] + r(a, e) top_b[a]; -inf where none exists."""
        n, r = self.n_loops[: s + 1, e], self.r_cols[: s + 1, e]
        valid = (n >= 1) & (np.arange(s + 1) < e)
        if not valid.any():
            return np.full(len(spans), -INF)
        terms = np.where(valid, np.where(valid, n, 0) * spans + r * top_b, -INF)
        return terms.max(axis=1)


class _Sampled:
    """When to run an optional pruning test: always at first, then while it prunes at least one node
    in `rate`, else on one node in `rate` only (to notice when it starts to pay again). Skipping a
    test only keeps a node a test would have dropped: the search stays exact, it may just take longer."""

    def __init__(self, first: int = 8, rate: int = 32) -> None:
        self.first, self.rate, self.calls, self.runs, self.prunes = first, rate, 0, 0, 0

    def due(self) -> bool:
        self.calls += 1
        return self.runs < self.first or self.prunes * self.rate >= self.runs or self.calls % self.rate == 0

    def record(self, pruned: bool) -> None:
        self.runs += 1
        self.prunes += pruned


class SimulatedBound(_Bound):
    """Any schedule: the step with every unknown stage free (the step never falls as a cost rises),
    and the busiest device's share of all the work."""

    def __init__(self, p: Problem) -> None:
        super().__init__(p)
        self.work = p.schedule.chunks * _suffix_time(p)  # M x least time of the rest

    def root(self) -> Node:
        return Node(0, 0, (0,), float(self.work[0, 0] / self.p.schedule.num_devices), None)

    def children(self, node: Node, limit: float) -> list[Node]:
        p, s = self.p, node.s
        ends = p.ends(s, node.j)
        if len(ends) == 0:
            return []
        # stages after s take no blocks, so they cost nothing; cuts after s do not exist yet
        full = np.concatenate([np.broadcast_to(np.asarray(node.bounds), (len(ends), s + 1)),
                               np.repeat(ends[:, None], p.S - s, axis=1)], axis=1)
        f, b, c = p.stage_costs(full)
        c = np.where(np.arange(p.S - 1) <= s, c, 0.0) if p.S > 1 else None
        lb = step_times(p.levels, f, b, c)
        done = (f + b).sum(axis=1) * p.schedule.chunks
        lb = np.maximum(lb, (done + self.work[s + 1, ends]) / p.schedule.num_devices)
        if p.device_fits is not None:
            fits = np.array([p.device_fits(full[k, : s + 2]) for k in range(len(ends))])
            lb = np.where(fits, lb, INF)
        return self._keep(node, ends, lb, limit, [None] * len(ends))
