"""One training step of a tiny GPT pipelined over the processes of a torchrun job; each rank saves its loss and grads.

The same command runs on one machine and on several (gloo on CPUs, NCCL where there are GPUs):

    torchrun --nproc-per-node 2 scripts/distributed_step.py --out /tmp/step           # one machine
    # two machines (or two launches on this one), the same line on each, the first one's address:
    torchrun --nnodes 2 --nproc-per-node 1 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \
        scripts/distributed_step.py --out /tmp/step

Every rank writes OUT/rank{R}.pt = {"loss", "grads" (under the unsplit model's names), "lane"}; the tests
compare them with the unsplit model's on one device.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

import mplib.distributed as md
from mplib.models.gpt import GPT, GPTConfig

CONFIG = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=16)


def batch(seed: int = 0, B: int = 8, T: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's inputs and targets, the same on every rank and in the test."""
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randint(0, CONFIG.vocab_size, (2, B, T), generator=g))


def model() -> GPT:
    torch.manual_seed(0)  # every rank builds the same weights (the fingerprint checks it)
    return GPT(CONFIG)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for each rank's rank{R}.pt")
    ap.add_argument("--schedule", default="1f1b", help="gpipe, 1f1b, ... (mplib.distributed.SCHEDULES)")
    ap.add_argument("--chunks", type=int, default=4, help="micro-batches per step")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds for the rendezvous and every collective")
    args = ap.parse_args()
    rank, world = md.init(timeout=args.timeout)
    m = model()
    n = len(m.blocks())
    balance = [n // world + (1 if s < n % world else 0) for s in range(world)]  # mplib.partition.uniform's cut
    pipe = md.DistributedPipeline(m, balance, loss_fn=lm_loss, chunks=args.chunks, schedule=args.schedule,
                                  timeout=args.timeout)
    ids, targets = batch()
    loss = pipe.step(ids, targets)
    held = {id(p) for p in pipe.parameters()}
    grads = {name: p.grad for name, p in m.named_parameters() if id(p) in held}
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save({"loss": loss, "grads": grads, "lane": pipe.lane_name()}, args.out / f"rank{rank}.pt")
    print(f"{pipe.lane_name()}: loss {loss.item():.6f}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
