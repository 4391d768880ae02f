"""HF GPT-2 and Llama over 2 devices: accelerate's dispatch_model against mplib.split, and mplib.Pipeline at M=4.

Ours and accelerate's take turns call after call (alternating which goes first), so both see the same
machine load; the median of the per-pair ratios (ours / accelerate's) is printed. Variants, on copies of one model:

- accelerate: `dispatch_model` with a device map (`infer_auto_device_map` on two GPUs; on CPU the
  same two halves mapped to "cpu" with `force_hooks=True`, so its hooks run as they would on two devices);
- mplib.split over the same two devices (CPU stand-ins on CPU);
- mplib.Pipeline over that split, 4 micro-batches, GPipe, the model's own loss.

Forward is logits without labels; forward+backward is the model's own loss from `labels`, backward.
One device computes at a time in the first two. On CPU stand-ins the stages share the cores, so the
Pipeline cannot overlap them: its ratio there is the cost of micro-batching, not a speed-up.

    .venv/bin/python benchmarks/bench_hf.py                  # ~2 min on 2 busy CPU cores
    .venv/bin/python benchmarks/bench_hf.py --device cuda --rounds 30
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

from mplib.pipeline import Pipeline  # noqa: E402
from mplib.split import split  # noqa: E402

try:
    from accelerate import dispatch_model, infer_auto_device_map
except ImportError:  # the `bench` extra: pip install -e .[bench]
    dispatch_model = infer_auto_device_map = None

VOCAB = 2048
MODELS = {
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=256, n_embd=256, n_layer=4, n_head=4,
                                               bos_token_id=None, eos_token_id=None,
                                               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),
    "llama": lambda: LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=688,
                                                  num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                                                  max_position_embeddings=256)),
}


def accelerate_split(model: torch.nn.Module, devices: list[torch.device]) -> torch.nn.Module:
    """The model dispatched by accelerate over two devices, its layers in two halves."""
    layers = model.config.num_hidden_layers
    if devices[0].type == "cuda" and devices[0] != devices[1]:
        size = sum(p.numel() * p.element_size() for p in model.parameters())
        device_map = infer_auto_device_map(model, max_memory={devices[0].index: int(size * 0.6),
                                                              devices[1].index: 4 * size},
                                           no_split_module_classes=model._no_split_modules)
        return dispatch_model(model, device_map)
    base = model.base_model_prefix
    layer_list = "h" if base == "transformer" else "layers"
    device_map = {name: "cpu" for name, _ in model.named_children() if name != base}
    device_map.update({f"{base}.{name}": "cpu" for name, _ in model.base_model.named_children() if name != layer_list})
    device_map.update({f"{base}.{layer_list}.{i}": "cpu" for i in range(layers)})
    return dispatch_model(model, device_map, main_device="cpu", force_hooks=True)


def timed(fn: Callable[[], Any], sync: Callable[[], None]) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def bench(name: str, devices: list[torch.device], batch: int, seq: int, rounds: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = MODELS[name]().train()
    ids = torch.randint(VOCAB, (batch, seq), device=devices[0])
    sync = torch.cuda.synchronize if devices[0].type == "cuda" else (lambda: None)
    ours = split(copy.deepcopy(model), devices)
    pipe = Pipeline(ours, chunks=4, schedule="gpipe")
    theirs = accelerate_split(copy.deepcopy(model), devices) if dispatch_model is not None else None

    def forward(m: Any) -> Callable[[], Any]:
        def run() -> None:
            with torch.no_grad():
                m(input_ids=ids)
        return run

    def step(m: Any) -> Callable[[], Any]:
        def run() -> None:
            m.zero_grad(set_to_none=True)
            m(input_ids=ids, labels=ids).loss.backward()
        return run

    def pipe_step() -> None:
        pipe.zero_grad(set_to_none=True)
        pipe.step({"input_ids": ids, "labels": ids})

    def one(make: Callable[[Any], Callable[[], Any]]) -> Callable[[], Any] | None:
        return make(theirs) if theirs is not None else None

    pairs = {"split fwd": (forward(ours), one(forward)), "split fwd+bwd": (step(ours), one(step)),
             "pipeline M=4 fwd+bwd": (pipe_step, one(step))}
    result = {}
    for key, (mine, other) in pairs.items():  # one pair at a time, call after call: the load changes slowly
        times: list[tuple[float, float]] = []
        for r in range(rounds + 2):  # 2 warm-up rounds; the order alternates, so neither always runs first
            if other is None:
                times.append((timed(mine, sync), float("nan")))
            elif r % 2:
                times.append((timed(mine, sync), timed(other, sync)))
            else:
                theirs_first = timed(other, sync)
                times.append((timed(mine, sync), theirs_first))
        times = times[2:]
        result[f"{key} (s)"] = statistics.median(t for t, _ in times)
        if other is not None:
            result[f"{key}: accelerate (s)"] = statistics.median(t for _, t in times)
            result[f"{key}: ours/accelerate"] = statistics.median(a / b for a, b in times)
    pipe.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu (two CPU stand-ins) or cuda (cuda:0 and cuda:1)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args()
    if args.device == "cuda" and torch.cuda.device_count() < 2:
        raise SystemExit(f"--device cuda needs 2 GPUs, {torch.cuda.device_count()} here; run with --device cpu")
    devices = [torch.device("cuda:0"), torch.device("cuda:1")] if args.device == "cuda" else [torch.device("cpu")] * 2
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, devices {[str(d) for d in devices]}, "
          f"batch {args.batch} x {args.seq} tokens, {args.rounds} rounds (median)")
    if dispatch_model is None:
        print("accelerate is not installed (pip install -e .[bench]): its variants and the ratios are skipped")
    for name in MODELS:
        result = bench(name, devices, args.batch, args.seq, args.rounds)
        print(f"\n{name}")
        for key, value in result.items():
            print(f"  {key:40s} {value:8.3f}" + ("x" if "/" in key else ""))


if __name__ == "__main__":
    main()
