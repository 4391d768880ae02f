"""Pipeline schedules as pure data: which device runs which micro-batch's forward or backward, in order.

One representation, three consumers: `pipeline` executes it, `simulate` times it, `plot` draws
the resulting timeline. Devices are numbered 0..K-1; with `virtual` v > 1 (interleaved), device
d holds v model chunks, and chunk c of device d is virtual stage c*K + d (Megatron's layout).
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

NAMES = ("gpipe", "1f1b", "interleaved")


@dataclass(frozen=True)
class Action:
    """Run the forward ("F") or backward ("B") of `microbatch` on device `stage`, model chunk `chunk`."""

    stage: int
    microbatch: int
    kind: str  # "F" or "B"
    chunk: int = 0

    def __str__(self) -> str:
        return f"{self.kind}{self.microbatch}" + (f".{self.chunk}" if self.chunk else "")


@dataclass
class Schedule:
    """Per-device action lists; `actions[d]` is what device d runs, in order.

    Example:
        s = build("1f1b", stages=4, chunks=8)
        print(render(s)); s.peak_in_flight()   # [4, 3, 2, 1]
    """

    name: str
    stages: int  # K devices
    chunks: int  # M micro-batches
    virtual: int  # v model chunks per device
    actions: list[list[Action]]

    def virtual_stage(self, action: Action) -> int:
        """Position of the action's model chunk in the whole model: chunk * K + device."""
        return action.chunk * self.stages + action.stage

    def peak_in_flight(self) -> list[int]:
        """Per device, the most (micro-batch, chunk) activations held at once (forward run, backward not yet)."""
        peaks = []
        for acts in self.actions:
            held = peak = 0
            for a in acts:
                held += 1 if a.kind == "F" else -1
                peak = max(peak, held)
            peaks.append(peak)
        return peaks

    def __str__(self) -> str:
        return render(self)


def _gpipe(K: int, M: int) -> list[list[Action]]:
    # fill, then drain: every forward, then every backward (last micro-batch first, as autograd would)
    return [[Action(d, m, "F") for m in range(M)] + [Action(d, m, "B") for m in reversed(range(M))]
            for d in range(K)]


def _one_f_one_b(K: int, M: int) -> list[list[Action]]:
    # PipeDream-flush: K-d-1 warm-up forwards, then alternate one forward / one backward, then drain.
    # Device d never holds more than K-d micro-batches, whatever M is.
    out = []
    for d in range(K):
        warm = min(K - d - 1, M)
        acts = [Action(d, m, "F") for m in range(warm)]
        for i in range(M - warm):
            acts += [Action(d, warm + i, "F"), Action(d, i, "B")]
        acts += [Action(d, m, "B") for m in range(M - warm, M)]
        out.append(acts)
    return out


def _interleaved(K: int, M: int, v: int) -> list[list[Action]]:
    # Megatron-LM's interleaved 1F1B: micro-batches go through in groups of K; within a group of
    # K*v steps a device runs chunk 0 for K micro-batches, then chunk 1, ... (backward: last chunk first).
    def mb(k: int) -> int:
        return (k // (K * v)) * K + k % K

    def chunk(k: int, forward: bool) -> int:
        c = (k % (K * v)) // K
        return c if forward else v - 1 - c

    total, out = M * v, []
    for d in range(K):
        warm = min((K - d - 1) * 2 + (v - 1) * K, total)
        acts = [Action(d, mb(k), "F", chunk(k, True)) for k in range(warm)]
        for k in range(total - warm):
            acts += [Action(d, mb(warm + k), "F", chunk(warm + k, True)), Action(d, mb(k), "B", chunk(k, False))]
        acts += [Action(d, mb(k), "B", chunk(k, False)) for k in range(total - warm, total)]
        out.append(acts)
    return out


def build(name: str, stages: int, chunks: int, virtual: int = 1) -> Schedule:
    """Build a schedule by name: "gpipe" (fill-drain), "1f1b" (PipeDream-flush), "interleaved".

    1F1B needs chunks >= stages; interleaved needs chunks to be a multiple of stages.

    Example:
        s = build("interleaved", stages=2, chunks=4, virtual=2)
        validate(s); bubble_fraction(s)    # (K-1)/(v*M+K-1) = 1/9
    """
    for label, value in (("stages", stages), ("chunks", chunks), ("virtual", virtual)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{label} must be a positive int, got {value!r}")
    key = str(name).lower()
    if key not in NAMES:
        raise ValueError(f"unknown schedule {name!r}; the known schedules are {', '.join(NAMES)}")
    if key != "interleaved" and virtual != 1:
        raise ValueError(f"schedule {key!r} runs one model chunk per device, got virtual={virtual}; "
                         "use schedule 'interleaved' for several chunks per device")
    if key == "interleaved":
        if virtual < 2:
            raise ValueError(f"interleaved needs virtual >= 2 model chunks per device, got {virtual}; "
                             "with one chunk per device use '1f1b'")
        if chunks % stages:
            raise ValueError(f"interleaved sends micro-batches in groups of K={stages}, so chunks must be a "
                             f"multiple of {stages}, got {chunks}; use chunks="
                             f"{max(stages, chunks - chunks % stages)} or {chunks + stages - chunks % stages}")
        actions = _interleaved(stages, chunks, virtual)
    elif key == "1f1b" and chunks < stages:
        raise ValueError(f"1f1b needs at least as many micro-batches as stages to reach its one-forward-"
                         f"one-backward steady state, got chunks={chunks} < stages={stages}; use chunks >= "
                         f"{stages}, or 'gpipe' (which 1f1b equals when chunks < stages)")
    else:
        actions = _gpipe(stages, chunks) if key == "gpipe" else _one_f_one_b(stages, chunks)
    return Schedule(key, stages, chunks, virtual, actions)


def _deps(s: Schedule, a: Action) -> list[tuple[int, int, str]]:
    """(virtual stage, micro-batch, kind) that must finish before `a` can start."""
    j, last = s.virtual_stage(a), s.stages * s.virtual - 1
    if a.kind == "F":
        return [] if j == 0 else [(j - 1, a.microbatch, "F")]
    return [(j, a.microbatch, "F")] + ([] if j == last else [(j + 1, a.microbatch, "B")])


def validate(s: Schedule) -> None:
    """Check that every (virtual stage, micro-batch) has one F and one B and that the order can run.

    Raises ValueError naming the missing/duplicate action or the actions stuck in a deadlock.

    Example:
        validate(build("gpipe", 4, 8))        # passes silently
    """
    K, M, v = s.stages, s.chunks, s.virtual
    if len(s.actions) != K:
        raise ValueError(f"schedule has action lists for {len(s.actions)} devices but stages={K}")
    seen: dict[tuple[int, int, str], int] = {}
    for d, acts in enumerate(s.actions):
        for a in acts:
            if a.stage != d or a.kind not in ("F", "B") or not (0 <= a.chunk < v and 0 <= a.microbatch < M):
                raise ValueError(f"action {a!r} does not belong in device {d}'s list (K={K}, M={M}, v={v})")
            key = (s.virtual_stage(a), a.microbatch, a.kind)
            seen[key] = seen.get(key, 0) + 1
    want = {(j, m, k) for j in range(K * v) for m in range(M) for k in "FB"}
    wrong = sorted(k for k in want | set(seen) if seen.get(k, 0) != 1)
    if wrong:
        j, m, k = wrong[0]
        raise ValueError(f"{k} of micro-batch {m} on virtual stage {j} appears {seen.get(wrong[0], 0)} times; "
                         f"each must appear exactly once ({len(wrong)} such problems)")
    done: set[tuple[int, int, str]] = set()
    pos = [0] * K
    while any(pos[d] < len(s.actions[d]) for d in range(K)):
        ready = [d for d in range(K) if pos[d] < len(s.actions[d])
                 and all(dep in done for dep in _deps(s, s.actions[d][pos[d]]))]
        if not ready:
            stuck = [str(s.actions[d][pos[d]]) + f"@{d}" for d in range(K) if pos[d] < len(s.actions[d])]
            raise ValueError(f"deadlock: every device waits on another; next actions {stuck}")
        for d in ready:
            a = s.actions[d][pos[d]]
            done.add((s.virtual_stage(a), a.microbatch, a.kind))
            pos[d] += 1


def bubble_fraction(s: Schedule, forward: float = 1, backward: float = 2) -> float:
    """Idle share of device-time for equal stage costs and free transfers (exact, then a float).

    GPipe and 1F1B give (K-1)/(M+K-1); interleaved gives (K-1)/(v*M+K-1).

    Example:
        bubble_fraction(build("gpipe", 4, 8))   # 3/11 = 0.2727...
    """
    return float(exact_bubble(s, forward, backward))


def exact_bubble(s: Schedule, forward: float = 1, backward: float = 2) -> Fraction:
    """`bubble_fraction` as a Fraction: costs are per device and split evenly over its v chunks."""
    from mplib.simulate import action_times

    f, b = Fraction(forward) / s.virtual, Fraction(backward) / s.virtual
    times = action_times(s, lambda j: f, lambda j: b, lambda j: Fraction(0))
    end = max(t[1] for t in times.values())
    busy = s.chunks * s.virtual * (f + b)  # per device
    return 1 - busy / end


def render(s: Schedule) -> str:
    """A clock-cycle table: rows are devices, columns time steps (F and B one step each).

    Example:
        print(render(build("gpipe", 2, 3)))
        # dev 0 | F0 F1 F2 .  B2 B1 B0 .
    """
    from mplib.simulate import action_times

    times = action_times(s, lambda j: 1, lambda j: 1, lambda j: 0)
    end = int(max(t[1] for t in times.values()))
    grid = [["." for _ in range(end)] for _ in range(s.stages)]
    for a, (start, _) in times.items():
        grid[a.stage][int(start)] = str(a)
    w = max(len(c) for row in grid for c in row)
    head = f"{s.name}: K={s.stages} M={s.chunks}" + (f" v={s.virtual}" if s.virtual > 1 else "")
    return "\n".join([head] + [f"dev {d} | " + " ".join(c.ljust(w) for c in row).rstrip()
                               for d, row in enumerate(grid)])
