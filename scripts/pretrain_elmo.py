"""Pre-train the tiny ELMo biLM of notebook 03 on data/corpus.txt and write a small checkpoint.

Pre-training takes a few minutes on a CPU, too long for a notebook in CI, so this script does it
once and the notebook loads the result:

    python scripts/pretrain_elmo.py                           # writes data/checkpoints/elmo_tiny.pt
    python scripts/pretrain_elmo.py --steps 5 --out scratch/    # a quick smoke run

Deterministic: one intra-op thread, fixed seeds; the same steps give the same file on the same
machine. The checkpoint is {"config": dict, "vocab": [words], "state_dict": ..., "steps": int,
"final_loss": float}.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch

import mplib.env
from mplib.data import load_text
from mplib.models.elmo import ELMO_TINY, ELMo, WordVocab, bilm_loss, sentence_batches
from mplib.train import fit

ROOT = Path(__file__).resolve().parent.parent


def pretrain(steps: int, batch_size: int = 32, lr: float = 3e-3,
             progress: bool = True) -> tuple[ELMo, WordVocab, float]:
    """Train ELMO_TINY for `steps` steps on random corpus sentences; returns model, vocab, final loss."""
    mplib.env.seed_everything(0)
    text = load_text()
    vocab = WordVocab.from_text(text, size=ELMO_TINY.vocab_size)
    config = dataclasses.replace(ELMO_TINY, vocab_size=len(vocab))  # the corpus may have fewer words
    model = ELMo(config)
    batches = sentence_batches(text.splitlines(), vocab, batch_size, config.max_chars,
                               generator=torch.Generator().manual_seed(1))
    history = fit(model, batches, lambda m, b: bilm_loss(m(b[0]), b[1]), steps=steps, lr=lr,
                  grad_clip=1.0, progress=progress, log_every=20)
    return model, vocab, history.mean_last(20)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "data" / "checkpoints")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # deterministic, and faster than 2 threads for these small matmuls
    start = time.perf_counter()
    model, vocab, loss = pretrain(args.steps, progress=not args.no_progress)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "elmo_tiny.pt"
    torch.save({"config": dataclasses.asdict(model.config), "vocab": vocab.itos, "state_dict": model.state_dict(),
                "steps": args.steps, "final_loss": loss}, path)
    print(f"elmo: {args.steps} steps, final loss {loss:.3f}, {time.perf_counter() - start:.0f} s, "
          f"{path.stat().st_size / 1e6:.2f} MB")
    return path


if __name__ == "__main__":
    main()
