"""The RNN wavefront: a stacked RNN pipelined across time chunks, forward and backward, as a schedule and its executor.

Cell (stage j, chunk t) needs (j-1, t), its input, and (j, t-1), its state: N stages over T chunks take
N + T - 1 steps instead of N x T. The schedule is a `mplib.schedule.Schedule`, so `action_times`,
`render`, `simulate`, `critical_path` and `mplib.plot.timeline` take it as they take GPipe.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from mplib.models.rnn import RNN
from mplib.schedule import Action, Key, Schedule, render
from mplib.timeline import Timeline
from mplib.worker import Workers

LossFn = Callable[[Any, Any], Tensor]
POINTWISE = (nn.Embedding, nn.Linear, nn.Dropout, nn.LayerNorm, nn.Identity, nn.ReLU, nn.Tanh, nn.GELU)
GNMT = "GNMT keeps only its bottom encoder layer bidirectional for this reason (arXiv 1609.08144)"


@dataclass
class WavefrontSchedule(Schedule):
    """A wavefront: per device, the forwards and backwards of every (stage, micro-batch, time chunk) cell.

    `Action.microbatch` holds the cell c = m * T + t (so `chunks` = M * T cells per stage);
    `cell(c)` gives (m, t) back. Stage j runs on device `placement[j]` and walks time forward
    (`directions[j]` = 1) or backward (-1: the reverse direction of a bidirectional bottom layer).
    With a bidirectional bottom layer there are `num_devices + 1` stages, two on device 0:
    `mplib.simulate` takes one cost per stage, or per device (split over the device's stages).

    Example:
        s = wavefront(devices=2, time_chunks=4, chunks=2)
        print(s)                              # render's table
        s.cell(5)                             # (1, 1)
        # cell 5 is micro-batch 1, time chunk 1
    """

    time_chunks: int  # T
    microbatches: int  # M
    placement: tuple[int, ...]  # stage -> device
    directions: tuple[int, ...]  # stage -> +1 (left to right) or -1 (right to left)

    @property
    def num_stages(self) -> int:
        return len(self.placement)

    def device_of(self, stage: int) -> int:
        return self.placement[stage]

    def cell(self, c: int) -> tuple[int, int]:
        """(micro-batch, time chunk) of cell index c."""
        return divmod(c, self.time_chunks)

    def deps(self, a: Action) -> list[Key]:
        """F(j, c) needs F(j-1, c) (its input) and F(j, c - d) (its state, d the stage's direction);
        B(j, c) needs F(j, c), B(j+1, c) (its output's gradient) and B(j, c + d) (its state's gradient)."""
        j, c, d = a.stage, a.microbatch, self.directions[a.stage]
        t = c % self.time_chunks
        if a.kind == "F":
            out = [] if j == 0 else [(j - 1, c, "F")]
            return out + ([(j, c - d, "F")] if 0 <= t - d < self.time_chunks else [])
        out = [(j, c, "F")] + ([(j + 1, c, "B")] if j < self.num_stages - 1 else [])
        return out + ([(j, c + d, "B")] if 0 <= t + d < self.time_chunks else [])

    def __str__(self) -> str:
        """`render`'s table under a header that names T and M (render's own counts cells as micro-batches)."""
        bi = ", bidirectional bottom layer" if -1 in self.directions else ""
        head = f"{self.name}: K={self.num_devices} T={self.time_chunks} M={self.microbatches}{bi}"
        return "\n".join([head] + render(self).splitlines()[1:])


def from_stages(placement: list[int], directions: list[int], time_chunks: int, chunks: int = 1,
                name: str = "wavefront") -> WavefrontSchedule:
    """The wavefront over stages placed on devices (`placement[j]`), each walking time in `directions[j]`.

    Each device runs, micro-batch by micro-batch, the time chunks of its stages in their order, all
    forwards first; its backwards then run in the reverse order (the reverse wavefront of BPTT).

    Example:
        from_stages([0, 0, 1], [-1, 1, 1], time_chunks=4) == wavefront(2, 4, bidirectional=True)   # True
    """
    _check_positive(time_chunks=time_chunks, chunks=chunks)
    K, T = max(placement) + 1, time_chunks
    if sorted(set(placement)) != list(range(K)) or list(placement) != sorted(placement):
        raise ValueError(f"placement {placement} must put consecutive stages on devices 0, 1, ... in order")
    forwards: list[list[Action]] = [[] for _ in range(K)]
    for m in range(chunks):
        for j, (dev, d) in enumerate(zip(placement, directions)):
            order = range(T) if d == 1 else reversed(range(T))
            forwards[dev] += [Action(dev, j, m * T + t, "F") for t in order]
    actions = [f + [Action(a.device, a.stage, a.microbatch, "B") for a in reversed(f)] for f in forwards]
    return WavefrontSchedule(name, K, chunks * T, 1, actions, T, chunks, tuple(placement), tuple(directions))


def wavefront(devices: int, time_chunks: int, chunks: int = 1, bidirectional: bool = False) -> WavefrontSchedule:
    """The wavefront of a stacked RNN, one stage per device, the sequence cut into `time_chunks` chunks.

    `chunks`: micro-batches (each is its own sequence: no state crosses between them).
    `bidirectional`: the bottom layer is bidirectional; its reverse direction is an extra stage on
    device 0 that walks the chunks from last to first, and device 0's forward direction waits for it.
    `time_chunks=1` is the naive layer split: one device busy at a time.

    Example:
        s = wavefront(devices=4, time_chunks=8)
        # one step per forward, free backwards and links: the last forward ends at step 4 + 8 - 1
        max(e for _, e in action_times(s, lambda j: 1, lambda j: 0, lambda c: 0).values())   # 11
    """
    _check_positive(devices=devices)
    placement = ([0] if bidirectional else []) + list(range(devices))
    directions = ([-1] if bidirectional else []) + [1] * devices
    return from_stages(placement, directions, time_chunks, chunks)


def steps(devices: int, time_chunks: int, chunks: int = 1, bidirectional: bool = False) -> int:
    """Chunk-steps the forward takes when every stage's chunk costs one step and links are free.

    K + M*T - 1: the last device starts K-1 steps late and then runs its M*T cells back to back.
    A bidirectional bottom layer makes device 0 run 2*M*T cells, the reverse direction's first (its
    chunk 0 comes last), so the forward takes K - 1 + 2*M*T. With forward f and backward b per chunk
    a training step takes steps * (f + b): the backward is the forward's mirror image (see the tests).

    Example:
        steps(2, 8)   # 9
        # against 2 * 8 = 16 for the naive layer split (time_chunks=1 of 8-times-longer chunks)
    """
    _check_positive(devices=devices, time_chunks=time_chunks, chunks=chunks)
    return devices - 1 + chunks * time_chunks * (2 if bidirectional else 1)


def _check_positive(**values: int) -> None:
    for label, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{label} must be a positive int, got {value!r}")


# ---------------------------------------------------------------------------------------------
# A bidirectional layer (the GNMT encoder's bottom layer) as a block: sequence in, sequence out.


class Bidirectional(nn.Module):
    """One layer read left to right (`fwd`) and right to left (`rev`), outputs concatenated: (B, T, C) -> (B, T, 2H).

    The same computation as `nn.LSTM(..., bidirectional=True, batch_first=True)` (its `_reverse`
    weights are `rev`'s). Only the bottom recurrent layer of a wavefront may be one.

    Example:
        encoder = nn.Sequential(Bidirectional(8, 16, "lstm"), StackedLayer(RNN(32, 16, "lstm")))
    """

    def __init__(self, input_size: int, hidden_size: int, cell: str = "lstm", bias: bool = True) -> None:
        super().__init__()
        self.fwd = RNN(input_size, hidden_size, cell, bias)
        self.rev = RNN(input_size, hidden_size, cell, bias)

    def forward(self, x: Tensor) -> Tensor:
        right = self.rev(x.flip(1))[0].flip(1)  # (B, T, H): position t has read x[t:] from the right
        return torch.cat([self.fwd(x)[0], right], dim=-1)  # (B, T, 2H)


# ---------------------------------------------------------------------------------------------
# The executor.


class WavefrontError(RuntimeError):
    """A stage raised on one cell (micro-batch, time chunk); the original exception is chained as `__cause__`."""


class Wavefront(nn.Module):
    """A SplitModel of recurrent layers run as a wavefront over time chunks; results equal the unsplit model's.

    Each device's stage runs its blocks one time chunk at a time, handing its recurrent state (h, or
    (h, c) for an LSTM) to its own next chunk and its output to the next device; one long-lived
    worker thread per device (`mplib.worker`). Blocks are recurrent layers (`StackedLayer`, and a
    `Bidirectional` bottom layer) or blocks applied to each time step alone (embedding, linear head,
    dropout, layer norm). `pipe(x)` is inference and returns (output, final states: one per recurrent
    layer, a (left-to-right, right-to-left) pair for a bidirectional one). `step(x, targets)` runs
    forward and backward (gradients accumulate) and returns `loss_fn(output, targets)`. With
    `chunks` > 1 micro-batches the loss is computed per micro-batch on its whole sequence, weighted
    by its share of the batch (exact for a mean over examples, as `Pipeline`'s "microbatch" loss);
    with chunks=1 it is exact for any loss. Dropout masks come from a generator per cell seeded from
    the step's seed: reproducible, independent of thread timing, not the unsplit model's masks.
    `.timeline` holds the last call's events (lanes per device, `microbatch` = the cell m*T + t).

    Example:
        wf = Wavefront(split(stack.layers, ["cpu", "cpu"]), time_chunks=8, loss_fn=mse, threads_per_worker=1)
        out, states = wf(x); loss = wf.step(x, y); mplib.plot.timeline(wf.timeline)
    """

    def __init__(self, split_model: nn.Module, time_chunks: int, chunks: int = 1, loss_fn: LossFn | None = None,
                 seed: int | None = None, threads_per_worker: int | None = None) -> None:
        super().__init__()
        from mplib._wavefront import units_of

        if not hasattr(split_model, "stages") or not hasattr(split_model, "devices"):
            hint = "mplib.split(stack.layers, devices)" if hasattr(split_model, "layers") else \
                "mplib.split(model, devices)"
            raise TypeError(f"Wavefront runs a SplitModel of recurrent layers, got {type(split_model).__name__}; "
                            f"build one with {hint}")
        _check_positive(time_chunks=time_chunks, chunks=chunks)
        self.model, self.loss_fn, self.threads = split_model, loss_fn, threads_per_worker
        self.devices = [torch.device(d) for d in split_model.devices]
        self.units = units_of(split_model)  # checks every block before anything runs
        self.schedule = from_stages([u.worker for u in self.units], [u.direction for u in self.units],
                                    time_chunks, chunks)
        self.time_chunks, self.chunks = time_chunks, chunks
        self._seeds = None if seed is None else torch.Generator().manual_seed(seed)
        self.step_seed: int | None = None
        self.timeline: Timeline | None = None
        self._workers: Workers | None = None
        self._finalizer: weakref.finalize | None = None

    def forward(self, x: Tensor) -> tuple[Tensor, list[Any]]:
        """Inference without a graph: the output (B, T, ...) and the final state of every recurrent layer.

        Example:
            out, states = wf(x)
            torch.allclose(out, stack(x)[0], atol=1e-6)   # True
            # the unsplit StackedRNN's output
        """
        with torch.no_grad():
            return self._run(x, None, train=False)

    def step(self, x: Tensor, targets: Any) -> Tensor:
        """Forward and backward of one batch, cell by cell; gradients accumulate into `.grad`. Returns the loss.

        Example:
            wf.zero_grad(); loss = wf.step(x, y); optimizer.step()
        """
        if self.loss_fn is None:
            raise ValueError("step needs a loss: build Wavefront(..., loss_fn=fn) with fn(output, targets) "
                             "returning a scalar, e.g. mplib.train.lm_loss")
        if not torch.is_grad_enabled():
            raise RuntimeError("step runs backward, but gradients are disabled here (torch.no_grad); "
                               "call wf(x) for inference, or step outside torch.no_grad()")
        return self._run(x, targets, train=True)

    def close(self) -> None:
        """End the worker threads now (a later call starts new ones)."""
        if self._finalizer is not None:
            self._finalizer()
        self._workers = self._finalizer = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_workers": None, "_finalizer": None}

    def _run(self, x: Tensor, targets: Any, train: bool) -> Any:
        from mplib._wavefront import Step

        step = Step(self, x, targets, train)  # per-call state; checks the input before a worker starts
        if self._workers is None:
            self._workers = Workers(len(self.devices), name="wavefront")
            self._finalizer = weakref.finalize(self, self._workers.close)
        try:
            failure = step.run(self._workers)
            if failure is not None:
                m, t = self.schedule.cell(failure.microbatch)
                exc = failure.exc
                raise WavefrontError(f"stage {failure.stage} (on worker {self.schedule.device_of(failure.stage)}) "
                                     f"failed on micro-batch {m}, time chunk {t} during its "
                                     f"{'forward' if failure.part == 'F' else 'backward'}: {type(exc).__name__}: "
                                     f"{exc}") from exc
            return step.result()
        finally:
            self.timeline, self.step_seed = step.timeline, step.step_seed
            step.close()


# ---------------------------------------------------------------------------------------------
# Drawing the dependency grid.


def plot_grid(layers: int, time_chunks: int, ax=None):
    """The (layer, time chunk) grid: arrows from each cell's input and state, each cell numbered by the
    step it runs at (layer + chunk, one step per cell); cells on one anti-diagonal run at once.

    Example:
        plot_grid(3, 6); plt.show()
    """
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(1.1 * time_chunks + 1.5, 0.9 * layers + 1.2))
    cmap = plt.get_cmap("viridis", layers + time_chunks - 1)
    for j in range(layers):
        for t in range(time_chunks):
            ax.add_patch(plt.Rectangle((t - 0.3, j - 0.3), 0.6, 0.6, color=cmap(j + t), alpha=0.85))
            ax.text(t, j, str(j + t), ha="center", va="center", color="white", fontsize=9, weight="bold")
            for dj, dt in ((1, 0), (0, 1)):  # from the cell below (input) and the one to the left (state)
                if j - dj >= 0 and t - dt >= 0:
                    ax.annotate("", xy=(t - 0.3 * dt, j - 0.3 * dj), xytext=(t - dt + 0.3 * dt, j - dj + 0.3 * dj),
                                arrowprops=dict(arrowstyle="->", color="black", lw=0.8))
    ax.set_xlim(-0.6, time_chunks - 0.4)
    ax.set_ylim(-0.6, layers - 0.4)
    ax.set_xticks(range(time_chunks), [f"t={t}" for t in range(time_chunks)])
    ax.set_yticks(range(layers), [f"layer {j}" for j in range(layers)])
    ax.set_aspect("equal")
    ax.set_title(f"cell (l, t) needs (l-1, t) and (l, t-1): {layers} + {time_chunks} - 1 = "
                 f"{layers + time_chunks - 1} steps")
    return ax
