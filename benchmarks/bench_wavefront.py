"""The RNN wavefront against the naive layer split on 2 CPU stand-in devices, and the simulator's prediction.

A 2-layer LSTM wide enough that compute dominates, one layer per stand-in device, one intra-op thread
each (a stand-in is one core). Width 256 keeps a layer's recurrent weights (4 x 256 x 256 floats, 1 MiB)
inside one core's L2 cache, so the two workers do not both stream their weights from the shared L3 at
every time step; batch 128 keeps each chunk's products large against the per-chunk hand-over. At width
512 (4 MiB per weight matrix) two workers at once run each other 10-20% slower on a 2-core machine. One step is forward and backward of one batch (gradients only). Per
repeat, side by side: the naive split (`mplib.split`: layer 1 waits for layer 0 over the whole
sequence), the wavefront (`mplib.wavefront.Wavefront`, the sequence cut into T time chunks), and the
step `mplib.simulate` predicts for the wavefront from: the naive run's per-layer times divided by T;
`mplib.profile.measure` of one chunk per layer beside the other worker's load (costs profiled
under the conditions the wavefront runs in, with no wavefront run); the wavefront's own median cell
times. Ratios are medians of per-repeat ratios; the bound on the speed-up is 2T/(T+1). Each repeat
also times one layer's work alone and two copies of it on two threads at once: their ratio is what
the machine gives two workers (1.0: two free cores; 2.0: one core's worth, no parallel speed-up).

    .venv/bin/python benchmarks/bench_wavefront.py               # about 30 s on a quiet 2-core machine
    .venv/bin/python benchmarks/bench_wavefront.py --repeats 3 --sweep 1,2,4,8,16   # speed-up per T
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mplib.env import cpu  # noqa: E402
from mplib.models.rnn import RNNConfig, StackedRNN  # noqa: E402
from mplib.profile import measure  # noqa: E402
from mplib.simulate import simulate  # noqa: E402
from mplib.split import split  # noqa: E402
from mplib.wavefront import Wavefront, wavefront  # noqa: E402


def mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((out - target) ** 2).mean()


def clock(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def two_at_once(layer: torch.nn.Module, x: torch.Tensor, repeats: int = 3) -> float:
    """Time of two copies of one layer's forward+backward on two threads at once, over one of them alone.

    Both sides run on fresh threads (a fresh thread is slower than the warm main thread), after a
    warm-up of both copies; medians of `repeats`.
    """
    twins = [layer, copy.deepcopy(layer)]

    def work(m: torch.nn.Module) -> None:
        torch.set_num_threads(1)
        m.zero_grad(set_to_none=True)
        m(x).sum().backward()

    def on_threads(models: list[torch.nn.Module]) -> None:
        threads = [threading.Thread(target=work, args=(m,)) for m in models]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    on_threads(twins)  # warm-up
    alone = statistics.median(clock(lambda: on_threads(twins[:1])) for _ in range(repeats))
    both = statistics.median(clock(lambda: on_threads(twins)) for _ in range(repeats))
    return both / alone


def per_stage(tl, kind: str) -> list[float]:
    return [sum(e.duration for e in tl.events if e.lane == s and e.kind == kind) for s in range(2)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--width", type=int, default=256, help="input and hidden size of both LSTM layers")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--time-chunks", type=int, default=8, help="T, the chunks the sequence is cut into")
    ap.add_argument("--sweep", default="", help="also time these T, e.g. 1,2,4,8,16")
    args = ap.parse_args()
    torch.set_num_threads(1)  # the naive split computes on one stand-in at a time: one core
    T = args.time_chunks
    sweep = sorted({int(t) for t in args.sweep.split(",") if t} - {T})
    print(f"torch {torch.__version__}, {os.cpu_count()} CPU cores ({cpu()}); 2-layer LSTM {args.width} wide, batch "
          f"{args.batch} x {args.seq} steps, T={T}; load average {os.getloadavg()[0]:.1f}")

    torch.manual_seed(0)
    stack = StackedRNN(RNNConfig(n_embd=args.width, hidden_size=args.width, n_layer=2, cell="lstm"))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, args.seq, args.width, generator=g)
    y = torch.randn(args.batch, args.seq, args.width, generator=g)
    naive = split(copy.deepcopy(stack).layers, ["cpu", "cpu"], record=True)
    waves = {t: Wavefront(split(copy.deepcopy(stack).layers, ["cpu", "cpu"]), time_chunks=t, loss_fn=mse,
                          threads_per_worker=1) for t in [T] + sweep}

    def naive_step() -> None:
        naive.zero_grad(set_to_none=True)
        mse(naive(x), y).backward()

    def wave_step(t: int) -> None:
        waves[t].zero_grad(set_to_none=True)
        waves[t].step(x, y)

    rows: dict[str, list[float]] = {"naive": [], "wavefront": [], "simulated": [], "profiled": [], "replayed": [],
                                    "two at once": []}
    Lc = -(-args.seq // T)  # the longest chunk: what one cell of the wavefront reads
    layers = copy.deepcopy(stack).layers
    rows.update({f"T={t}": [] for t in sweep})
    for _ in range(2):  # warm-up: allocators, worker threads
        naive_step()
        for t in waves:
            wave_step(t)
    for r in range(args.repeats):
        rows["naive"].append(clock(naive_step))
        fwd, bwd = per_stage(naive.last_timeline, "forward"), per_stage(naive.last_timeline, "backward")
        rows["wavefront"].append(clock(lambda: wave_step(T)))
        # predicted from the naive run alone: each layer's time over the whole sequence, split into T chunks
        rows["simulated"].append(simulate(wavefront(2, T), [f / T for f in fwd], [b / T for b in bwd]).duration)
        tl = waves[T].timeline  # the schedule model alone: the wavefront's own median cell times, replayed
        med = [[statistics.median(e.duration for e in tl.events if e.lane == s and e.kind == k) for s in range(2)]
               for k in ("forward", "backward")]
        rows["replayed"].append(simulate(wavefront(2, T), med[0], med[1]).duration)
        costs = measure(layers, x[:, :Lc], ["cpu", "cpu"], repeats=3, loss_fn=mse, targets=y[:, :Lc],
                        threads_per_worker=1)  # each layer on one chunk, beside the other worker's load
        rows["profiled"].append(simulate(wavefront(2, T), costs.forward, costs.backward).duration)
        rows["two at once"].append(two_at_once(layers[0], x[:, :4 * Lc]))
        for t in sweep:
            rows[f"T={t}"].append(clock(lambda: wave_step(t)))
        print(f"repeat {r}: " + ", ".join(f"{k} {v[-1] * 1e3:.0f} ms" for k, v in rows.items() if k != "two at once")
              + f"; two at once {rows['two at once'][-1]:.2f}x one alone")
    report(rows, T, sweep)
    load = os.getloadavg()[0]
    print(f"load average (1 min) at the end: {load:.1f} on {os.cpu_count()} cores"
          + (": other processes shared the cores, so these ratios understate a quiet machine" if load > 2.5 else ""))


def report(rows: dict[str, list[float]], T: int, sweep: list[int]) -> None:
    def ratios(a: str, b: str) -> list[float]:
        return [p / q for p, q in zip(rows[a], rows[b])]

    med = {k: statistics.median(v) for k, v in rows.items() if k != "two at once"}
    print("\nmedian step time: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in med.items()))
    two = statistics.median(rows["two at once"])
    print(f"two workers at once take {two:.2f}x one alone (1.0: two free cores, 2.0: one core's worth): the "
          f"bound 2T/(T+1) = {2 * T / (T + 1):.2f}x becomes about {2 * T / (T + 1) / two:.2f}x on this machine now")
    speedup = statistics.median(ratios("naive", "wavefront"))
    print(f"wavefront over the naive layer split (naive / wavefront), median of ratios: {speedup:.2f}x  "
          f"(target >= 1.5x, bound 2T/(T+1) = {2 * T / (T + 1):.2f}x)")
    for key, what in (("simulated", "predicted from the naive run's layer times / T"),
                      ("profiled", "predicted from mplib.profile.measure of one chunk beside a load"),
                      ("replayed", "from the wavefront's own median cell times")):
        err = statistics.median([abs(s / m - 1) for s, m in zip(rows[key], rows["wavefront"])])
        print(f"simulated vs measured wavefront step, {what}: {err:.0%} apart (median; target within 15%)")
    for t in sweep:
        print(f"T={t}: naive / wavefront {statistics.median(ratios('naive', f'T={t}')):.2f}x "
              f"(bound {2 * t / (t + 1):.2f}x)")


if __name__ == "__main__":
    main()
