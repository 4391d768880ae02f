"""The measurements of `gpu_campaign.py`, one function per part; each runs on a GPU or, tiny, on the CPU.

A part gets a device, its sizes and a deadline, and adds rows (figure, value, target, met) to a
`Result` that is written to disk after every row, so a part stopped at its time cap keeps what it had.
"""

from __future__ import annotations

import contextlib
import copy
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

import mplib.hardware
from mplib.memory import estimate, measure
from mplib.models.bert import BERT, BERT_BASE, BERT_TINY
from mplib.models.gpt import GPT, GPT2_MEDIUM, GPT2_SMALL, GPT2_XL, GPT_TINY, GPTConfig
from mplib.pipeline import Pipeline
from mplib.split import split
from mplib.train import fit, lm_loss
from mplib.transfer import to_device

MiB = 2**20


@dataclass(frozen=True)
class Sizes:
    """What each part measures on; `TINY` is the CPU dry run's (every line runs, the figures mean nothing)."""

    copy_mib: float = 256  # host-to-device activation of the copy-rate part
    overlap_mib: float = 64  # activation copied while matrix products run
    matmul: int = 4096  # side of the products the copy hides behind
    rounds: int = 20  # rounds of every timed comparison (fewer when the part's deadline nears)
    memory: tuple = (("GPT-2 small", GPT, GPT2_SMALL, 8, 1024), ("BERT-base", BERT, BERT_BASE, 8, 512))
    split: tuple = (GPT2_SMALL, 8, 1024)  # config, batch, sequence
    pipeline: tuple = (GPT2_SMALL, 16, 1024, 4)  # config, batch, sequence, chunks
    mfu: tuple = (("GPT-2 medium", GPT2_MEDIUM, 16, 1024), ("GPT-2 XL", GPT2_XL, 16, 1024))
    mfu_steps: int = 10
    ceiling: int = 8192  # side of the bf16 products that measure the matrix ceiling


TINY = Sizes(copy_mib=1, overlap_mib=0.25, matmul=128, rounds=3,
             memory=(("GPT tiny", GPT, GPT_TINY, 2, 16), ("BERT tiny", BERT, BERT_TINY, 2, 16)),
             split=(GPT_TINY, 2, 16), pipeline=(GPT_TINY, 4, 16, 2), mfu=(("GPT tiny", GPT_TINY, 2, 16),),
             mfu_steps=2, ceiling=128)


@dataclass
class Result:
    """Rows and notes of one part, rewritten to `path` (JSON) after every addition."""

    path: Path
    rows: list[list] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def row(self, figure: str, value: str, target: str = "", met: bool | None = None) -> None:
        self.rows.append([figure, value, target, met])
        self.save()

    def note(self, text: str) -> None:
        self.notes.append(text)
        self.save()

    def save(self) -> None:
        self.path.write_text(json.dumps({"rows": self.rows, "notes": self.notes}))


# -- timing -------------------------------------------------------------------------------------

def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def clock(fn: Callable[[], Any], dev: torch.device) -> float:
    """Seconds of `fn`, the device's queued work included (synchronised before and after)."""
    sync(dev)
    t0 = time.perf_counter()
    fn()
    sync(dev)
    return time.perf_counter() - t0


def rounds(n: int, deadline: float, least: int = 3):
    """range(n), cut short once `deadline` (perf_counter seconds) has passed after `least` rounds."""
    for r in range(n):
        if r >= least and time.perf_counter() > deadline:
            return
        yield r


def mib(nbytes: float) -> str:
    return f"{nbytes / MiB:.1f} MiB"


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def train_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    lm_loss(model(x), y).backward()


def tokens(cfg: GPTConfig, batch: int, seq: int, dev: torch.device, seed: int = 1) -> tuple:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(cfg.vocab_size, (batch, seq + 1), generator=g).to(dev)
    return ids[:, :-1], ids[:, 1:]


# -- parts --------------------------------------------------------------------------------------

def h2d_copy(dev: torch.device, s: Sizes, deadline: float, out: Result) -> None:
    """`to_device(non_blocking=True)` of an activation against the raw pinned copy, round by round."""
    nbytes = int(s.copy_mib * MiB)
    pin = dev.type == "cuda"  # page-locked memory needs CUDA
    pinned = torch.ones(nbytes // 4, pin_memory=pin)
    pageable = torch.ones(nbytes // 4)
    for act in (pinned, pageable):
        to_device(act, dev, non_blocking=True)  # warm-up: copy stream, allocators
    raw, ours, staged, pageable_raw = [], [], [], []
    for _ in rounds(s.rounds, deadline):
        r = mplib.hardware.measure_bandwidth("cpu", dev, nbytes=nbytes, pinned=True, repeats=1)
        raw.append(r)
        ours.append(nbytes / clock(lambda: to_device(pinned, dev, non_blocking=True), dev) / r)
        staged.append(nbytes / clock(lambda: to_device(pageable, dev, non_blocking=True), dev) / r)
        pageable_raw.append(mplib.hardware.measure_bandwidth("cpu", dev, nbytes=nbytes, pinned=False, repeats=1))
    n = len(raw)
    out.row(f"raw pinned copy host->{dev}, {s.copy_mib:g} MiB", f"{med(raw) / 1e9:.1f} GB/s", "", None)
    out.row("to_device(non_blocking) of a pinned activation / raw pinned copy", f"{med(ours):.3f}", ">= 0.90",
            med(ours) >= 0.9)
    out.row("to_device(non_blocking) of a pageable activation (pinned staging) / raw pinned copy",
            f"{med(staged):.3f}", "", None)
    out.row("raw pageable copy / raw pinned copy", f"{med(pageable_raw) / med(raw):.3f}", "", None)
    out.note(f"medians of {n} rounds; each round times every variant once, side by side")


def overlap(dev: torch.device, s: Sizes, deadline: float, out: Result) -> None:
    """Share of a host-to-device activation copy (mplib's side-stream path) hidden behind compute.

    Matrix products are queued on the compute stream just before the copy, as a stage's earlier work
    still runs when the next activation arrives. Hidden = (compute + copy - both) / the shorter one.
    """
    pin = dev.type == "cuda"
    act = torch.randn(int(s.overlap_mib * MiB) // 4)
    acts = {"pinned": act.pin_memory() if pin else act, "pageable": act.clone()}
    a = torch.randn(s.matmul, s.matmul, device=dev)

    def compute(n: int) -> None:
        for _ in range(n):
            a @ a

    for x in acts.values():
        clock(lambda: to_device(x, dev, non_blocking=True), dev)
    clock(lambda: compute(1), dev)
    one = med([clock(lambda: compute(1), dev) for _ in range(5)])
    for name, x in acts.items():
        tx = med([clock(lambda: to_device(x, dev, non_blocking=True), dev) for _ in range(5)])
        n = max(1, round(tx / one))  # compute about as long as the copy
        hidden, times = [], []
        for _ in rounds(s.rounds, deadline):
            tc = clock(lambda: compute(n), dev)
            tx = clock(lambda: to_device(x, dev, non_blocking=True), dev)
            tb = clock(lambda: (compute(n), to_device(x, dev, non_blocking=True)), dev)
            hidden.append(min(1.0, max(0.0, (tc + tx - tb) / min(tc, tx))))
            times.append((tc, tx, tb))
        tc, tx, tb = (med([t[i] for t in times]) for i in range(3))
        target = ">= 90%" if name == "pinned" else ""
        out.row(f"copy hidden behind compute, {s.overlap_mib:g} MiB {name} activation", f"{med(hidden):.0%}",
                target, med(hidden) >= 0.9 if name == "pinned" else None)
        out.note(f"{name}: {n} products of {s.matmul}^2 fp32: compute {tc * 1e3:.2f} ms, copy {tx * 1e3:.2f} ms, "
                 f"both {tb * 1e3:.2f} ms (medians of {len(times)} rounds)")


def peak_bytes(model: torch.nn.Module, ids: torch.Tensor, dev: torch.device) -> int:
    """The reference: max_memory_allocated over two Adam steps of `model` (on the CPU: counted bytes).

    On the CPU there is no allocator statistic, so the dry run takes `mplib.memory.measure`'s total.
    """
    if dev.type != "cuda":
        return measure(model, ids, optimizer="adam").total
    model = copy.deepcopy(model).cpu()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(dev)
    base = torch.cuda.memory_allocated(dev)
    model = model.to(dev).train()
    opt = torch.optim.Adam(model.parameters())
    for _ in range(2):  # the second step holds Adam's states from the first
        logits = model(ids)
        torch.nn.functional.cross_entropy(logits.flatten(0, -2), torch.zeros(ids.numel(), dtype=torch.long,
                                                                               device=dev)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync(dev)
    peak = torch.cuda.max_memory_allocated(dev) - base
    del model, opt, logits
    torch.cuda.empty_cache()
    return peak


def memory(dev: torch.device, s: Sizes, deadline: float, out: Result) -> None:
    """`mplib.memory.estimate` over the peak of real training steps, fused attention and the math one."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for name, ctor, cfg, batch, seq in s.memory:
        torch.manual_seed(0)
        model = ctor(cfg).to(dev)
        ids = torch.randint(cfg.vocab_size, (batch, seq), device=dev)
        est_cfg = estimate(cfg, batch, seq)  # from the config: CPU kernels under FakeTensorMode
        counted = measure(model, ids, optimizer="adam")  # bytes a real step holds, counted tensor by tensor
        seen = {}
        for kernel, ctx in (("fused", None), ("math", SDPBackend.MATH)):
            with sdpa_kernel(ctx) if ctx is not None else contextlib.nullcontext():
                est = estimate(model, batch, seq)  # fake twins on the device: its kernels' saved tensors
                peak = peak_bytes(model, ids, dev)
            ratio, seen[kernel] = est.total / peak, (est.total, peak)
            out.row(f"{name} (batch {batch} x {seq}, fp32, Adam), {kernel} attention: estimate / peak",
                    f"{ratio:.3f}", "0.95-1.05", abs(ratio - 1) <= 0.05)
            out.note(f"{name}, {kernel} attention: estimate {mib(est.total)} (activations "
                     f"{mib(est.activations)}), peak {mib(peak)}")
        (ef, pf), (em, pm) = seen["fused"], seen["math"]
        out.note(f"{name}: fused attention instead of the math one moves the peak by {(pf - pm) / MiB:+.2f} MiB "
                 f"and the estimate by {(ef - em) / MiB:+.2f} MiB (estimate / peak {em / pm:.3f} -> {ef / pf:.3f})")
        out.note(f"{name}: estimate from the config {mib(est_cfg.total)} (activations "
                 f"{mib(est_cfg.activations)}); counted in a real step {mib(counted.total)} "
                 f"(activations {mib(counted.activations)})")
        del model
        if time.perf_counter() > deadline:
            out.note("deadline reached: the remaining models were skipped")
            return


def split_overhead(dev: torch.device, s: Sizes, deadline: float, out: Result) -> None:
    """SplitModel with two stages on one device against the plain model: forward + backward steps."""
    cfg, batch, seq = s.split
    torch.manual_seed(0)
    plain = GPT(cfg).to(dev)
    two = split(copy.deepcopy(plain), [dev, dev])
    x, y = tokens(cfg, batch, seq, dev)
    with torch.no_grad():
        err = (two(x) - plain(x)).abs().max().item()
    out.note(f"same weights, same logits: max |split - plain| = {err:.2e}")
    for _ in range(3):
        train_step(plain, x, y), train_step(two, x, y)
    ratios, base = [], []
    for _ in rounds(s.rounds, deadline):
        tp = clock(lambda: train_step(plain, x, y), dev)
        ts = clock(lambda: train_step(two, x, y), dev)
        ratios.append(ts / tp)
        base.append(tp)
    r = med(ratios)
    out.row(f"SplitModel on [{dev}, {dev}] / plain, GPT {cfg.n_layer}x{cfg.n_embd}, batch {batch} x {seq}",
            f"{r:.3f} ({(r - 1):+.1%})", "<= 1.03", r <= 1.03)
    out.note(f"plain step {med(base) * 1e3:.1f} ms; median of {len(ratios)} per-round ratios")


def pipeline(dev: torch.device, s: Sizes, deadline: float, out: Result) -> None:
    """The in-process pipeline over two stages that share one device, against the plain model."""
    cfg, batch, seq, chunks = s.pipeline
    torch.manual_seed(0)
    plain = GPT(cfg).to(dev)
    x, y = tokens(cfg, batch, seq, dev)
    naive = split(copy.deepcopy(plain), [dev, dev])
    pipes = {sched: Pipeline(split(copy.deepcopy(plain), [dev, dev]), chunks=chunks, schedule=sched,
                             loss_fn=lm_loss) for sched in ("gpipe", "1f1b")}
    steps = {"plain": lambda: train_step(plain, x, y), "naive split": lambda: train_step(naive, x, y)}
    for sched, pipe in pipes.items():
        steps[sched] = lambda pipe=pipe: (pipe.zero_grad(set_to_none=True), pipe.step(x, y))
    ref = lm_loss(plain(x), y).item()
    for sched, pipe in pipes.items():
        out.note(f"{sched}: loss {pipe.step(x, y).item():.6f} vs plain {ref:.6f}")
    for fn in steps.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in rounds(s.rounds, deadline):
        for k, fn in steps.items():
            times[k].append(clock(fn, dev))
    for k in list(steps)[1:]:
        r = med([a / b for a, b in zip(times[k], times["plain"])])
        out.row(f"{k} on [{dev}, {dev}], M={chunks}, GPT {cfg.n_layer}x{cfg.n_embd}, batch {batch} x {seq}: "
                "step / plain step", f"{r:.3f}", "none set (one GPU: the stages take turns)", None)
    tl = pipes["1f1b"].timeline
    out.note(f"plain step {med(times['plain']) * 1e3:.1f} ms; medians of {len(times['plain'])} per-round ratios; "
             f"last 1F1B step's utilisation per stage {[round(u, 2) for u in tl.utilization()]}")
    for pipe in pipes.values():
        pipe.close()


def matmul_ceiling(dev: torch.device, n: int) -> float:
    """FLOP/s of an n x n x n bf16 product, mean of ten after three warm-ups."""
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    t = clock(lambda: [a @ a for _ in range(10)], dev) / 10
    return 2 * n**3 / t


def train_flops_per_token(model: GPT, seq: int) -> float:
    """6 N + 12 L T C (Megatron-LM's count, no recompute): N the weights that multiply, the head's too."""
    cfg = model.config
    n = model.num_parameters() - model.embed.wpe.weight.numel()  # a position lookup does no product
    return 6 * n + 12 * cfg.n_layer * seq * cfg.n_embd


def mfu(dev: torch.device, s: Sizes, deadline: float, out: Result, compiled: bool = False) -> None:
    """Model FLOPs utilisation of `mplib.train.fit` on our GPT in bf16 autocast (fp32 weights, AdamW)."""
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    gpu = next((g for k, g in mplib.hardware.GPUS.items() if k.split()[0] in name), None)
    peak = gpu.bf16_tflops * 1e12 if gpu is not None and gpu.bf16_tflops else None
    ceiling = matmul_ceiling(dev, s.ceiling)
    out.note(f"bf16 {s.ceiling}^3 product: {ceiling / 1e12:.0f} TFLOP/s measured; datasheet peak "
             + (f"{peak / 1e12:.0f} TFLOP/s ({gpu.name}: {gpu.source})" if peak else "unknown for this device"))
    for label, cfg, batch, seq in (s.mfu[:1] if compiled else s.mfu):
        with torch.device(dev):
            torch.manual_seed(0)
            model = GPT(cfg)
        # the dry run traces with Dynamo only (backend "eager"): inductor's CPU code generation takes a minute
        run = torch.compile(model, **({} if dev.type == "cuda" else {"backend": "eager"})) if compiled else model
        x, y = tokens(cfg, batch, seq, dev)

        def loss_fn(m, b):
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                return lm_loss(m(b[0]), b[1])

        batches = [(x, y)] * (s.mfu_steps + 3)
        fit(run, batches[:3], loss_fn, steps=3, progress=False)  # warm-up: allocator, kernels, compilation
        hist = fit(run, batches, loss_fn, steps=s.mfu_steps, progress=False)  # .item() each step: synchronised
        step = hist.seconds / s.mfu_steps
        achieved = train_flops_per_token(model, seq) * batch * seq / step
        what = f"{label} ({model.num_parameters() / 1e6:.1f}M), batch {batch} x {seq}, bf16" + \
            (", torch.compile" if compiled else ", eager")
        value = f"{achieved / peak:.1%}" if peak else "n/a"
        out.row(f"MFU of fit on {what}", value, ">= 45% of datasheet peak",
                achieved / peak >= 0.45 if peak else None)
        out.note(f"{what}: {step * 1e3:.0f} ms per step, {achieved / 1e12:.1f} TFLOP/s, "
                 f"{achieved / ceiling:.1%} of the measured bf16 product rate; final loss {hist.losses[-1]:.3f}")
        del model, run
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        if time.perf_counter() > deadline:
            out.note("deadline reached: larger models skipped")
            return


def mfu_compiled(dev: torch.device, s: Sizes, deadline: float, out: Result) -> None:
    """The first MFU model again, under torch.compile (the first steps compile it)."""
    mfu(dev, s, deadline, out, compiled=True)


PARTS: dict[str, Callable[[torch.device, Sizes, float, Result], None]] = {
    "h2d_copy": h2d_copy, "overlap": overlap, "memory": memory, "split": split_overhead,
    "pipeline": pipeline, "mfu": mfu, "mfu_compiled": mfu_compiled}
