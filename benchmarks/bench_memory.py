"""How close `mplib.memory.estimate` comes to the memory of a real training step.

For a few small models: the estimate (from the config, under FakeTensorMode, one layer
repeated) against `mplib.memory.measure` (a real forward, backward and Adam step whose saved
activations, parameters, gradients and optimizer states are counted byte by byte). On a GPU
it also compares the estimate with `torch.cuda.max_memory_allocated` over two real steps.
Target: every ratio within 5 % of 1. Bytes are exact, so one run is enough (no medians).

    .venv/bin/python benchmarks/bench_memory.py            # ~45 s on 2 busy CPU cores
    .venv/bin/python benchmarks/bench_memory.py --device cuda:0
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel  # noqa: E402

import mplib.env  # noqa: E402
from mplib.memory import estimate, measure  # noqa: E402
from mplib.models.bert import BERT, BERTConfig  # noqa: E402
from mplib.models.gpt import GPT, GPTConfig  # noqa: E402
from mplib.models.rnn import CharRNN, RNNConfig  # noqa: E402

V, T, C, L = 512, 64, 128, 4  # vocabulary, positions, width, layers of every model below
MODELS = {  # name -> (config, constructor); the LSTM has no config path: its module is estimated
    "mplib GPT": (GPTConfig(vocab_size=V, block_size=T, n_layer=L, n_head=4, n_embd=C, dropout=0.1), GPT),
    "mplib BERT": (BERTConfig(vocab_size=V, block_size=T, n_layer=L, n_head=4, n_embd=C, intermediate_size=4 * C),
                   BERT),
    "HF GPT-2": (GPT2Config(vocab_size=V, n_positions=T, n_embd=C, n_layer=L, n_head=4, use_cache=False,
                            bos_token_id=0, eos_token_id=0),
                 GPT2LMHeadModel),
    "HF BERT": (BertConfig(vocab_size=V, max_position_embeddings=T, hidden_size=C, num_hidden_layers=L,
                           num_attention_heads=4, intermediate_size=4 * C), BertForMaskedLM),
    "mplib LSTM": (RNNConfig(vocab_size=V, n_embd=C, hidden_size=C, n_layer=L, cell="lstm"), CharRNN),
}


def gpu_peak(model: torch.nn.Module, ids: torch.Tensor, device: torch.device) -> int:
    """Peak bytes allocated on `device` over two Adam steps of `model` (a fresh copy placed there)."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    model = model.to(device).train()
    opt = torch.optim.Adam(model.parameters())
    for _ in range(2):  # the second step holds Adam's states from the first
        out = model(ids)
        logits = out.logits if hasattr(out, "logits") else out
        F.cross_entropy(logits.flatten(0, -2), torch.zeros(ids.numel(), dtype=torch.long, device=device)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    device = mplib.env.check_device(args.device)
    mplib.env.seed_everything(0)

    print(f"torch {torch.__version__}, device {device}; {L} layers x {C} wide, batch {args.batch} x {T} tokens, "
          "Adam, fp32, train mode (dropout masks count)")
    head = f"{'model':<12}{'params':>10}{'estimate MiB':>14}{'measured MiB':>14}{'activations':>13}{'total':>8}"
    print(head + (f"{'GPU peak MiB':>14}{'peak/est':>10}" if device.type == "cuda" else ""))
    print("-" * (len(head) + (24 if device.type == "cuda" else 0)))
    for name, (config, ctor) in MODELS.items():
        model = ctor(config).to(device)
        ids = torch.randint(0, V, (args.batch, T), device=device)
        est = estimate(model if name == "mplib LSTM" or device.type == "cuda" else config, args.batch, T)
        real = measure(model, ids, optimizer="adam")
        assert real.activations > 0 and real.optimizer > 0  # a zero measurement would compare vacuously
        row = (f"{name:<12}{real.num_parameters:>10,}{est.total / 2**20:>14.2f}{real.total / 2**20:>14.2f}"
               f"{est.activations / real.activations:>13.4f}{est.total / real.total:>8.4f}")
        if device.type == "cuda":
            peak = gpu_peak(ctor(config), ids, device)
            row += f"{peak / 2**20:>14.2f}{peak / est.total:>10.3f}"
        print(row)
    print("activations, total: estimate / measured (target 0.95-1.05)")


if __name__ == "__main__":
    main()
