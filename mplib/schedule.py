"""Pipeline schedules as pure data: which device runs which stage's forward or backward of which micro-batch.

One representation, three consumers: `pipeline` executes it, `simulate` times it, `plot` draws the
timeline. The schedule is the one home of the facts they share: dependencies (`Schedule.deps`), the
order an action list can run in (`walk`), in-flight counts and bubbles. With `virtual` v > 1
(interleaved), device d holds v stages: d, d + K, ..., d + (v-1)K (Megatron's layout).
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Iterator

NAMES = ("gpipe", "1f1b", "interleaved")
Key = tuple[int, int, str]  # (stage, micro-batch, kind): what an action produces, and what others wait for


@dataclass(frozen=True)
class Action:
    """Device `device` runs the forward ("F") or backward ("B") of `microbatch` through stage `stage`."""

    device: int
    stage: int
    microbatch: int
    kind: str  # "F" or "B"

    @property
    def key(self) -> Key:
        return (self.stage, self.microbatch, self.kind)

    def __str__(self) -> str:
        return f"{self.kind}{self.microbatch}" + (f".{self.stage}" if self.stage != self.device else "")


@dataclass
class Schedule:
    """Per-device action lists: `actions[d]` is what device d runs, in order.

    Example:
        s = build("1f1b", devices=4, chunks=8)
        print(render(s)); s.peak_in_flight()   # [4, 3, 2, 1]
    """

    name: str
    num_devices: int  # K
    chunks: int  # M micro-batches
    virtual: int  # v stages per device
    actions: list[list[Action]]

    @property
    def num_stages(self) -> int:
        return self.num_devices * self.virtual

    def device_of(self, stage: int) -> int:
        return stage % self.num_devices

    def deps(self, a: Action) -> list[Key]:
        """What must finish before `a` starts: F(j, m) needs F(j-1, m); B(j, m) needs F(j, m) and B(j+1, m)."""
        j, last = a.stage, self.num_stages - 1
        if a.kind == "F":
            return [] if j == 0 else [(j - 1, a.microbatch, "F")]
        return [(j, a.microbatch, "F")] + ([] if j == last else [(j + 1, a.microbatch, "B")])

    def crosses(self, dep: Key, a: Action) -> int | None:
        """The cut a dependency crosses (the cut after stage c), or None when it stays on a's device."""
        if dep[0] == a.stage or self.device_of(dep[0]) == a.device:
            return None
        return min(dep[0], a.stage)

    def peak_in_flight(self) -> list[int]:
        """Per device, the most (micro-batch, stage) activations held at once (forward done, backward not yet)."""
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
    return [[Action(d, d, m, "F") for m in range(M)] + [Action(d, d, m, "B") for m in reversed(range(M))]
            for d in range(K)]


def _one_f_one_b(K: int, M: int) -> list[list[Action]]:
    # PipeDream-flush: K-d-1 warm-up forwards, then alternate one forward / one backward, then drain.
    # Device d never holds more than K-d micro-batches, whatever M is.
    out = []
    for d in range(K):
        warm = min(K - d - 1, M)
        acts = [Action(d, d, m, "F") for m in range(warm)]
        for i in range(M - warm):
            acts += [Action(d, d, warm + i, "F"), Action(d, d, i, "B")]
        acts += [Action(d, d, m, "B") for m in range(M - warm, M)]
        out.append(acts)
    return out


def _interleaved(K: int, M: int, v: int) -> list[list[Action]]:
    # Megatron-LM's interleaved 1F1B: micro-batches go through in groups of K; within a group of
    # K*v steps a device runs its first stage for K micro-batches, then its second, ... (backward:
    # its last stage first).
    def mb(k: int) -> int:
        return (k // (K * v)) * K + k % K

    def stage(d: int, k: int, forward: bool) -> int:
        c = (k % (K * v)) // K
        return (c if forward else v - 1 - c) * K + d

    total, out = M * v, []
    for d in range(K):
        warm = min((K - d - 1) * 2 + (v - 1) * K, total)
        acts = [Action(d, stage(d, k, True), mb(k), "F") for k in range(warm)]
        for k in range(total - warm):
            acts += [Action(d, stage(d, warm + k, True), mb(warm + k), "F"),
                     Action(d, stage(d, k, False), mb(k), "B")]
        acts += [Action(d, stage(d, k, False), mb(k), "B") for k in range(total - warm, total)]
        out.append(acts)
    return out


def build(name: str, devices: int, chunks: int, virtual: int = 1) -> Schedule:
    """Build a schedule by name: "gpipe" (fill-drain), "1f1b" (PipeDream-flush), "interleaved".

    1F1B needs chunks >= devices; interleaved needs chunks to be a multiple of devices.

    Example:
        s = build("interleaved", devices=2, chunks=4, virtual=2)
        validate(s); bubble_fraction(s)    # (K-1)/(v*M+K-1) = 1/9
    """
    for label, value in (("devices", devices), ("chunks", chunks), ("virtual", virtual)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{label} must be a positive int, got {value!r}")
    key = str(name).lower()
    if key not in NAMES:
        raise ValueError(f"unknown schedule {name!r}; the known schedules are {', '.join(NAMES)}")
    if key != "interleaved" and virtual != 1:
        raise ValueError(f"schedule {key!r} runs one stage per device, got virtual={virtual}; "
                         "use schedule 'interleaved' for several stages per device")
    if key == "interleaved":
        if virtual < 2:
            raise ValueError(f"interleaved needs virtual >= 2 stages per device, got {virtual}; "
                             "with one stage per device use '1f1b'")
        if chunks % devices:
            raise ValueError(f"interleaved sends micro-batches in groups of K={devices}, so chunks must be a "
                             f"multiple of {devices}, got {chunks}; use chunks="
                             f"{max(devices, chunks - chunks % devices)} or {chunks + devices - chunks % devices}")
        actions = _interleaved(devices, chunks, virtual)
    elif key == "1f1b" and chunks < devices:
        raise ValueError(f"1f1b needs at least as many micro-batches as devices to reach its one-forward-"
                         f"one-backward steady state, got chunks={chunks} < devices={devices}; use chunks >= "
                         f"{devices}, or 'gpipe' (which 1f1b equals when chunks < devices)")
    else:
        actions = _gpipe(devices, chunks) if key == "gpipe" else _one_f_one_b(devices, chunks)
    return Schedule(key, devices, chunks, virtual, actions)


def walk(s: Schedule) -> Iterator[Action]:
    """Every action, in an order that respects `s.deps` and each device's own order (the one walk).

    Raises ValueError when every device waits on another, showing each device's list with the
    action it is stuck at marked `<-- ERROR HERE`.
    """
    done: set[Key] = set()
    pos = [0] * s.num_devices
    while any(pos[d] < len(s.actions[d]) for d in range(s.num_devices)):
        progressed = False
        for d, acts in enumerate(s.actions):
            while pos[d] < len(acts) and all(dep in done for dep in s.deps(acts[pos[d]])):
                yield acts[pos[d]]
                done.add(acts[pos[d]].key)
                pos[d] += 1
                progressed = True
        if not progressed:
            raise ValueError(f"schedule {s.name!r} deadlocks: every device waits on another\n" + _stuck(s, pos))


def _stuck(s: Schedule, pos: list[int]) -> str:
    rows = []
    for d, acts in enumerate(s.actions):
        cells = [str(a) + (" <-- ERROR HERE" if i == pos[d] else "") for i, a in enumerate(acts)]
        rows.append(f"dev {d}: " + "  ".join(cells))
    return "\n".join(rows)


def validate(s: Schedule) -> None:
    """Check that every (stage, micro-batch) has one F and one B, on its device, and that the order can run.

    Raises ValueError naming the missing/duplicate action or showing where the devices deadlock.

    Example:
        validate(build("gpipe", 4, 8))        # passes silently
    """
    K, M, n = s.num_devices, s.chunks, s.num_stages
    if len(s.actions) != K:
        raise ValueError(f"schedule has action lists for {len(s.actions)} devices but num_devices={K}")
    seen: dict[Key, int] = {}
    for d, acts in enumerate(s.actions):
        for a in acts:
            if (a.device != d or a.kind not in ("F", "B") or not (0 <= a.stage < n and 0 <= a.microbatch < M)
                    or s.device_of(a.stage) != d):
                raise ValueError(f"action {a!r} does not belong in device {d}'s list (K={K}, M={M}, "
                                 f"v={s.virtual}: stage j runs on device j % K)")
            seen[a.key] = seen.get(a.key, 0) + 1
    want = {(j, m, k) for j in range(n) for m in range(M) for k in "FB"}
    wrong = sorted(k for k in want | set(seen) if seen.get(k, 0) != 1)
    if wrong:
        j, m, k = wrong[0]
        raise ValueError(f"{k} of micro-batch {m} on stage {j} appears {seen.get(wrong[0], 0)} times; "
                         f"each must appear exactly once ({len(wrong)} such problems)")
    for _ in walk(s):
        pass


def action_times(s: Schedule, forward: Callable[[int], float], backward: Callable[[int], float],
                 transfer: Callable[[int], float]) -> dict[Action, tuple[float, float]]:
    """(start, end) of every action run as early as `s` allows: `forward(j)` / `backward(j)` on stage j,
    `transfer(c)` the delay across the cut after stage c. Floats or Fractions (exact arithmetic).

    Links are copy engines: a transfer delays its receiver but never occupies a device.

    Example:
        times = action_times(build("gpipe", 2, 2), lambda j: 1, lambda j: 2, lambda j: 0)
        max(end for _, end in times.values())     # 9
    """
    end: dict[Key, float] = {}
    free = [0] * s.num_devices
    times: dict[Action, tuple[float, float]] = {}
    for a in walk(s):
        ready = free[a.device]
        for dep in s.deps(a):
            cut = s.crosses(dep, a)
            ready = max(ready, end[dep] + (0 if cut is None else transfer(cut)))
        finish = ready + (forward(a.stage) if a.kind == "F" else backward(a.stage))
        times[a] = (ready, finish)
        end[a.key] = free[a.device] = finish
    return times


def ideal_bubble(devices: int, chunks: int, virtual: int = 1) -> Fraction:
    """The textbook bubble with equal stages and free links: (K-1)/(v*M+K-1).

    Example:
        ideal_bubble(4, 8)   # Fraction(3, 11)
    """
    return Fraction(devices - 1, virtual * chunks + devices - 1)


def exact_bubble(s: Schedule, forward: float = 1, backward: float = 2) -> Fraction:
    """The idle share of device time for equal per-device costs (split evenly over its v stages), free links.

    Example:
        exact_bubble(build("gpipe", 4, 8)) == ideal_bubble(4, 8)   # True
    """
    f, b = Fraction(forward) / s.virtual, Fraction(backward) / s.virtual
    times = action_times(s, lambda j: f, lambda j: b, lambda c: Fraction(0))
    end = max(t[1] for t in times.values())
    return 1 - s.chunks * s.virtual * (f + b) / end


def bubble_fraction(s: Schedule, forward: float = 1, backward: float = 2) -> float:
    """`exact_bubble` as a float. GPipe and 1F1B give (K-1)/(M+K-1); interleaved (K-1)/(v*M+K-1).

    Example:
        bubble_fraction(build("gpipe", 4, 8))   # 3/11 = 0.2727...
    """
    return float(exact_bubble(s, forward, backward))


def render(s: Schedule) -> str:
    """A clock-cycle table: rows are devices, columns time steps (F and B one step each).

    Example:
        print(render(build("gpipe", 2, 3)))
        # dev 0 | F0 F1 F2 .  B2 B1 B0 .
    """
    times = action_times(s, lambda j: 1, lambda j: 1, lambda c: 0)
    end = int(max(t[1] for t in times.values()))
    grid = [["." for _ in range(end)] for _ in range(s.num_devices)]
    for a, (start, _) in times.items():
        grid[a.device][int(start)] = str(a)
    w = max(len(c) for row in grid for c in row)
    head = f"{s.name}: K={s.num_devices} M={s.chunks}" + (f" v={s.virtual}" if s.virtual > 1 else "")
    return "\n".join([head] + [f"dev {d} | " + " ".join(c.ljust(w) for c in row).rstrip()
                               for d, row in enumerate(grid)])
