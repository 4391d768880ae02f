"""Issue 15's speed-ups, side by side in one run: int8 inference, a half-depth student, freezing half
the blocks in the pipeline, checkpointing; plus the accuracy each keeps on the course's BERT.

Timing: one `mplib.speedups.Harness`, every contender once per round, ratios are medians of per-round
ratios. Speed on a BERT-base-wide encoder (width 768, 12 heads, random weights: speed does not depend
on them); the pipeline rows on a narrower, deeper BERT over 2 CPU stand-in devices (one intra-op
thread each, as every row runs); accuracy on the course's pre-trained tiny BERT fine-tuned on the noun-category task.

    .venv/bin/python benchmarks/bench_speedups.py               # about 20 s on a quiet 2-core machine
    .venv/bin/python benchmarks/bench_speedups.py --repeats 3 --no-quality   # a quick look

The int8 speed-up depends on the CPU's int8 dot-product instructions (VNNI); the header says whether
this one has them. On a machine with a GPU it also times a bf16 autocast training step against fp32 there.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mplib  # noqa: E402
import mplib.data  # noqa: E402
import mplib.env  # noqa: E402
import mplib.memory  # noqa: E402
import mplib.partition  # noqa: E402
import mplib.profile  # noqa: E402
import mplib.speedups as sp  # noqa: E402
from mplib.models.bert import BERT, BERTConfig, BertClassifier, encode_batch  # noqa: E402
from mplib.train import fit  # noqa: E402

NAN = float("nan")


def ids_batch(batch: int, seq: int, vocab: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(5, vocab, (batch, seq), generator=g), torch.ones(batch, seq, dtype=torch.long),
            torch.randint(0, 4, (batch,), generator=g))


def add_inference(h: sp.Harness, args: argparse.Namespace) -> dict:
    cfg = BERTConfig(vocab_size=1024, block_size=args.seq, n_layer=args.layers, n_head=12, n_embd=768,
                     intermediate_size=3072, dropout=0.0)
    model = BertClassifier(cfg, num_labels=4).eval()
    ids, mask, _ = ids_batch(args.batch, args.seq, cfg.vocab_size)
    int8 = sp.quantize_dynamic(model)
    with torch.no_grad():
        ref, out = model(ids, mask), int8(ids, mask)
    h.inference("fp32 (width 768)", model, (ids, mask), quality=NAN)
    h.inference("int8 dynamic", int8, (ids, mask), quality=NAN, baseline="fp32 (width 768)")
    h.inference("half-depth student", sp.half_depth_student(model), (ids, mask), quality=NAN,
                baseline="fp32 (width 768)")
    return dict(int8_logit_error=((out - ref).norm() / ref.norm()).item())


def add_pipeline(h: sp.Harness, args: argparse.Namespace) -> dict:
    cfg = BERTConfig(vocab_size=1024, block_size=args.seq, n_layer=args.pipe_layers, n_head=4, n_embd=args.pipe_width,
                     intermediate_size=4 * args.pipe_width, dropout=0.0)
    torch.manual_seed(0)
    base = BertClassifier(cfg, num_labels=4)
    ids, mask, y = ids_batch(args.pipe_batch, args.seq, cfg.vocab_size, seed=2)
    chunks, n_blocks = 4, args.pipe_layers + 2
    frozen = n_blocks // 2  # the first half of the blocks: the embedding and the first layers
    micro = args.pipe_batch // chunks
    costs = mplib.profile.measure(base, (ids[:micro], mask[:micro]), ["cpu", "cpu"], repeats=3,
                                  loss_fn=F.cross_entropy, targets=y[:micro], threads_per_worker=1)
    plan = mplib.partition.optimal(costs, devices=2, chunks=chunks)
    replanned = sp.replan(costs, frozen, devices=2, chunks=chunks)
    pipes = {}
    rows = (("pipeline step", 0, plan.balance), (f"{frozen} of {n_blocks} frozen", frozen, plan.balance),
            (f"{frozen} frozen, re-planned", frozen, replanned.balance))
    for name, n, balance in rows:
        model = copy.deepcopy(base)
        sp.freeze(model, n)
        pipe = mplib.Pipeline(mplib.split(model, ["cpu", "cpu"], balance), chunks=chunks, schedule="1f1b",
                              loss_fn=F.cross_entropy, threads_per_worker=1)

        def step(pipe=pipe) -> None:
            pipe.zero_grad(set_to_none=True)
            pipe.step((ids, mask), y)

        memory = mplib.memory.measure(model, ids).total  # counted: parameters, grads, Adam, activations
        h.training(name, step, memory, quality=NAN, baseline=None if not pipes else "pipeline step")
        pipes[name] = balance
    # checkpointing, unsplit: its time overhead and the bytes it saves (counted)
    plain, ckpt = copy.deepcopy(base), copy.deepcopy(base)
    sp.checkpoint(ckpt)

    def unsplit_step(model):
        def step() -> None:
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(ids, mask), y).backward()
        return step

    for name, model in (("unsplit step", plain), ("checkpointed", ckpt)):
        h.training(name, unsplit_step(model), mplib.memory.measure(model, ids).total, quality=NAN,
                   baseline=None if name == "unsplit step" else "unsplit step")
    saved = mplib.memory.measure_activations(plain, ids) - mplib.memory.measure_activations(ckpt, ids)
    predicted = (mplib.memory.estimate(base, args.pipe_batch, args.seq).activations
                 - sp.estimate(base, args.pipe_batch, args.seq, checkpoint=True).device.activations)
    return dict(balances=pipes, simulated=(plan.step_time, mplib.partition.evaluate(
        sp.frozen_costs(costs, frozen), plan.balance, devices=2, chunks=chunks).step_time, replanned.step_time),
        ckpt_saved=saved, ckpt_predicted=predicted)


def quality(args: argparse.Namespace) -> dict:
    """Accuracy on the course's BERT: fp32, int8 dynamic, and a half-depth student distilled from it."""
    ckpts = mplib.data.DATA / "checkpoints"
    tok = mplib.data.WordTokenizer.load(ckpts / "tokenizer.json")
    cfg = BERTConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=2, n_head=4, n_embd=64, intermediate_size=256,
                     dropout=0.0)
    bert = BERT(cfg)
    bert.load_state_dict(torch.load(ckpts / "bert_tiny.pt")["state_dict"])
    data = mplib.data.load_classification()
    sets = {}
    for split in ("train", "test"):
        ids, mask = encode_batch(tok, [t for t, _ in data[split]], cfg.block_size)
        sets[split] = ids, mask, torch.tensor([label for _, label in data[split]])

    def batches(seed: int):
        g = torch.Generator().manual_seed(seed)
        while True:
            i = torch.randint(len(sets["train"][2]), (32,), generator=g)
            yield tuple(t[i] for t in sets["train"])

    def acc(model) -> float:
        ids, mask, y = sets["test"]
        model.eval()
        with torch.no_grad():
            return (model(ids, mask).argmax(-1) == y).float().mean().item()

    torch.manual_seed(0)
    teacher = BertClassifier.from_pretrained(bert, num_labels=len(data["labels"]))  # 240 steps: converged (test
    # accuracy is flat from 120 to 480 steps; after 60 it is 15 points lower, and a student beat it)
    fit(teacher, batches(0), lambda m, b: F.cross_entropy(m(b[0], b[1]), b[2]), 240, lr=1e-3, progress=False)
    student = sp.half_depth_student(teacher)
    sp.distill_model(teacher, student, batches(3), steps=60, lr=1e-3, progress=False)
    return dict(fp32=acc(teacher), int8=acc(sp.quantize_dynamic(teacher)), student=acc(student),
                test=len(sets["test"][2]))


def gpu_bf16(args: argparse.Namespace) -> dict | None:
    if not torch.cuda.is_available():
        return None
    cfg = BERTConfig(vocab_size=1024, block_size=128, n_layer=4, n_head=12, n_embd=768, intermediate_size=3072,
                     dropout=0.0)
    model = BertClassifier(cfg, num_labels=4).cuda()
    ids, mask, y = (t.cuda() for t in ids_batch(32, 128, cfg.vocab_size))
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for r in range(args.repeats + 1):
        for name in times:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=name == "bf16"):
                loss = F.cross_entropy(model(ids, mask), y)
            loss.backward()
            torch.cuda.synchronize()
            if r:
                times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--layers", type=int, default=2, help="layers of the width-768 encoder (inference rows)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--pipe-layers", type=int, default=8)
    ap.add_argument("--pipe-width", type=int, default=256)
    ap.add_argument("--pipe-batch", type=int, default=16)
    ap.add_argument("--no-quality", action="store_true", help="skip the fine-tuning and the accuracy table")
    args = ap.parse_args()
    # one intra-op thread everywhere: a stand-in device is one core, and the pipeline's workers set the
    # (process-wide) thread count to 1 anyway, so every row runs under the same setting
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread, quantized engine "
          f"{torch.backends.quantized.engine}; CPU {mplib.env.cpu()}")
    h = sp.Harness(repeats=args.repeats, warmup=1)
    info = add_inference(h, args)
    info.update(add_pipeline(h, args))
    print(sp.table(h.run(), quality="(speed)"))
    print(f"int8 logits vs fp32 (width 768): relative error {info['int8_logit_error']:.3f}")
    print("pipeline balances:", info["balances"])
    print("simulated step from the measured costs: plain {:.4f} s, half frozen {:.4f} s, re-planned {:.4f} s"
          .format(*info["simulated"]))
    print(f"checkpointing saves {info['ckpt_saved'] / 2**20:.2f} MiB of activations (counted); "
          f"sp.estimate predicts {info['ckpt_predicted'] / 2**20:.2f} MiB")
    if not args.no_quality:
        q = quality(args)
        print(f"test accuracy on the course BERT ({q['test']} sentences): fp32 {q['fp32']:.3f}, int8 {q['int8']:.3f} "
              f"({100 * (q['int8'] - q['fp32']):+.1f} points), distilled half-depth student {q['student']:.3f} "
              f"({q['student'] / q['fp32']:.0%} of the teacher)")
    bf16 = gpu_bf16(args)
    if bf16 is not None:
        print(f"GPU training step: fp32 {bf16['fp32'] * 1e3:.1f} ms, bf16 {bf16['bf16'] * 1e3:.1f} ms, "
              f"speed-up {bf16['fp32'] / bf16['bf16']:.2f}x")


if __name__ == "__main__":
    main()
