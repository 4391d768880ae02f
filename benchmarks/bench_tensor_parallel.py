"""Tensor parallelism over two gloo processes: ours (`mplib.tensor_parallel`) against torch's DTensor
`parallelize_module` (ColwiseParallel / RowwiseParallel, torchtitan's Llama plan), on the same model.

The model is an HF LlamaForCausalLM with grouped-query attention (q, k, v are separate Linears,
so DTensor's styles apply without changing the model). Both split the same weights: embedding
and LM head over the vocabulary (logits gathered), q/k/v and gate/up by columns, o and down by
rows; DTensor gets PrepareModuleInput on attention and MLP so that, like ours, q/k/v (and
gate/up) share one input and one backward all-reduce. One step: forward and backward of one
batch (no optimizer), both ranks between barriers, each process on one intra-op thread. Ours
and theirs alternate repeat after repeat in one run; ratios are medians of per-repeat ratios.

It also checks that both give the single-process model's logits and gradients, counts our
communicated bytes per layer against the formula (`tensor_parallel.layer_collectives`), and
predicts our step from the unsplit model's per-layer compute and the gloo link it measures
(latency and bandwidth of an all-reduce), with `tensor_parallel.simulate`.

    .venv/bin/python benchmarks/bench_tensor_parallel.py                # about 40 s on a quiet 2-core machine
    .venv/bin/python benchmarks/bench_tensor_parallel.py --repeats 3    # a quick look

Timings on 2 shared CPU cores vary from run to run (other processes, thermal state): rerun it
and compare medians; the exactness and byte counts do not vary.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mplib.tensor_parallel as tp  # noqa: E402
from mplib.distributed import launch  # noqa: E402


def build(args: SimpleNamespace) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=args.vocab, hidden_size=args.width,
                                        intermediate_size=4 * args.width, num_hidden_layers=args.layers,
                                        num_attention_heads=8, num_key_value_heads=4,
                                        max_position_embeddings=args.seq)).train()


def data(args: SimpleNamespace) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return tuple(torch.randint(args.vocab, (args.batch, args.seq), generator=g) for _ in range(2))


def loss_of(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = model(x, use_cache=False).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)), logits


def dtensor_plan(layers: int) -> dict:
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, PrepareModuleInput, RowwiseParallel

    plan = {"model.embed_tokens": RowwiseParallel(input_layouts=Replicate()),
            "lm_head": ColwiseParallel(output_layouts=Replicate())}
    for i in range(layers):
        p = f"model.layers.{i}"
        plan[f"{p}.self_attn"] = PrepareModuleInput(input_kwarg_layouts={"hidden_states": Replicate()},
                                                    desired_input_kwarg_layouts={"hidden_states": Replicate()},
                                                    use_local_output=False)
        plan[f"{p}.mlp"] = PrepareModuleInput(input_layouts=(Replicate(),), desired_input_layouts=(Replicate(),),
                                              use_local_output=False)
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
            plan[f"{p}.{name}"] = ColwiseParallel()
        for name in ("self_attn.o_proj", "mlp.down_proj"):
            plan[f"{p}.{name}"] = RowwiseParallel()
    return plan


def full_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad) for n, p in model.named_parameters()}


def gloo_link(rank: int, nbytes: int, repeats: int = 20) -> SimpleNamespace:
    """Latency and bandwidth of this gloo group, fitted from all-reduces of 4 KiB and `nbytes` (at least
    64 KiB; a ring, 2 ranks: 2 steps of latency, and the whole tensor on the wire once per direction)."""
    import torch.distributed as dist

    def clock(n: int) -> float:
        x = torch.ones(n // 4)
        times = []
        for _ in range(repeats):
            dist.barrier()
            t = time.perf_counter()
            dist.all_reduce(x)
            times.append(time.perf_counter() - t)
        return statistics.median(times)
    nbytes = max(nbytes, 16 * 4096)  # two sizes well apart, also when a tiny run's activation is under 4 KiB
    small, big = clock(4096), clock(nbytes)
    bandwidth = (nbytes - 4096) / max(big - small, 1e-9)  # wire bytes: 2 (T-1)/T = 1 x the tensor for T=2
    return SimpleNamespace(name="gloo loopback (measured)", bandwidth=bandwidth, latency=max(small, 0.0) / 2)


def per_layer_compute(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, repeats: int) -> dict:
    """Forward and backward seconds of each decoder layer of the unsplit model (hooks), and the rest."""
    fwd, bwd, marks = [[] for _ in model.model.layers], [[] for _ in model.model.layers], {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        hooks += [layer.register_forward_pre_hook(lambda m, a, i=i: marks.__setitem__(("f", i), time.perf_counter())),
                  layer.register_forward_hook(lambda m, a, o, i=i: fwd[i].append(time.perf_counter() - marks["f", i])),
                  layer.register_full_backward_pre_hook(lambda m, g, i=i: marks.__setitem__(("b", i),
                                                                                            time.perf_counter())),
                  layer.register_full_backward_hook(lambda m, gi, go, i=i: bwd[i].append(time.perf_counter()
                                                                                         - marks["b", i]))]
    steps = []
    for _ in range(repeats + 1):
        model.zero_grad(set_to_none=True)
        t = time.perf_counter()
        loss_of(model, x, y)[0].backward()
        steps.append(time.perf_counter() - t)
    for h in hooks:
        h.remove()
    f = [statistics.median(v[1:]) for v in fwd]
    b = [statistics.median(v[1:]) for v in bwd]
    return {"forward": f, "backward": b, "step": statistics.median(steps[1:]), "rest": statistics.median(steps[1:])
            - sum(f) - sum(b)}


def rank_main(rank: int, world: int, args: SimpleNamespace) -> dict:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    x, y = data(args)
    reference = build(args)
    compute = per_layer_compute(reference, x, y, args.repeats) if rank == 0 else None
    ref_loss, ref_logits = loss_of(reference, x, y)
    reference.zero_grad(set_to_none=True)
    ref_loss.backward()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = tp.parallelize(build(args), dist.group.WORLD)
        theirs = parallelize_module(build(args), init_device_mesh("cpu", (world,)), dtensor_plan(args.layers))

    def step(model: torch.nn.Module) -> float:
        model.zero_grad(set_to_none=True)
        dist.barrier()
        t = time.perf_counter()
        loss_of(model, x, y)[0].backward()
        dist.barrier()  # the step is over when both ranks are done
        return time.perf_counter() - t

    for _ in range(2):  # warm-up: allocators, the gloo pairs, DTensor's sharding propagation caches
        step(ours), step(theirs)
    rows = {"ours": [], "theirs": []}
    for r in range(args.repeats):
        for name in (("ours", "theirs") if r % 2 == 0 else ("theirs", "ours")):
            rows[name].append(step(ours if name == "ours" else theirs))
    # exactness: both against the single-process model, after one more step each
    with tp.trace(ours) as tr:
        ours.zero_grad(set_to_none=True)
        loss, logits = loss_of(ours, x, y)
        loss.backward()
    theirs.zero_grad(set_to_none=True)
    their_loss, their_logits = loss_of(theirs, x, y)
    their_loss.backward()
    ref_grads = {n: p.grad for n, p in reference.named_parameters()}
    mine, other = tp.unsplit_grads(ours), full_grads(theirs)
    diff = {"ours": max([(logits - ref_logits).abs().max().item()] + [(mine[n] - g).abs().max().item()
                                                                      for n, g in ref_grads.items()]),
            "theirs": max([(their_logits - ref_logits).abs().max().item()] + [(other[n] - g).abs().max().item()
                                                                               for n, g in ref_grads.items()])}
    link = gloo_link(rank, args.batch * args.seq * args.width * 4)
    spans = sum(e.duration for e in tr.timeline.events if e.kind in ("forward", "backward"))
    return {"rows": rows, "diff": diff, "collectives": tr.collectives, "compute": compute, "link": link,
            "own_compute": spans}


def predicted(args: SimpleNamespace, compute: dict, collectives: list, link: SimpleNamespace) -> float:
    """Our step on paper: every layer's unsplit compute / T, its collectives (the formula) over the link,
    the rest of the step (embedding, head, loss) / T, and the non-layer collectives as measured."""
    T = 2
    per_layer = [tp.layer_collectives(args.batch, args.seq, args.width, T)] * args.layers
    layers = tp.simulate(compute["forward"], compute["backward"], per_layer, T, link).duration
    others = [c for c in collectives if not c.label.startswith("model.layers.")]
    return layers + compute["rest"] / T + sum(tp.collective_seconds(c, link) for c in others)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=1024)
    args = SimpleNamespace(**vars(ap.parse_args()))
    print(f"torch {torch.__version__}, {os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f}; "
          f"Llama {args.layers} layers x {args.width} wide (8 heads, 4 kv heads), vocabulary {args.vocab}, batch "
          f"{args.batch} x {args.seq} tokens; 2 gloo processes, 1 thread each")
    results = launch(rank_main, 2, args, timeout=600)
    r0 = results[0]
    ratios = [t / o for t, o in zip(r0["rows"]["theirs"], r0["rows"]["ours"])]
    for i, (o, t) in enumerate(zip(r0["rows"]["ours"], r0["rows"]["theirs"])):
        print(f"repeat {i}: ours {o * 1e3:.1f} ms, DTensor {t * 1e3:.1f} ms")
    print(f"\nmedian step: ours {statistics.median(r0['rows']['ours']) * 1e3:.1f} ms, DTensor "
          f"{statistics.median(r0['rows']['theirs']) * 1e3:.1f} ms; theirs / ours, median of ratios "
          f"{statistics.median(ratios):.2f}x (min {min(ratios):.2f}, max {max(ratios):.2f})")
    for rank, res in enumerate(results):
        print(f"rank {rank}: largest |difference| from the single-process model, logits and every gradient: "
              f"ours {res['diff']['ours']:.1e}, DTensor {res['diff']['theirs']:.1e}")
        assert max(res["diff"].values()) < 1e-4, res["diff"]
    layer0 = [c for c in r0["collectives"] if c.label.startswith("model.layers.0.")]
    formula = tp.layer_collectives(args.batch, args.seq, args.width, 2)
    measured = sorted((c.phase, c.kind, c.nbytes) for c in layer0)
    assert measured == sorted((c.phase, c.kind, c.nbytes) for c in formula), (measured, formula)
    print(f"per layer, ours: {len(layer0)} collectives, {sum(c.nbytes for c in layer0) / 2**20:.2f} MiB measured = "
          f"{sum(c.nbytes for c in formula) / 2**20:.2f} MiB by the formula (4 all-reduces of B x T x C x 4 bytes); "
          f"{sum(c.wire_bytes for c in layer0) / 2**20:.2f} MiB on a ring's wire per rank")
    link = r0["link"]
    guess = predicted(args, r0["compute"], r0["collectives"], link)
    measured_step = statistics.median(r0["rows"]["ours"])
    print(f"gloo loopback measured: {link.bandwidth / 1e9:.2f} GB/s, {link.latency * 1e6:.0f} us per ring step; "
          f"unsplit step on one process {r0['compute']['step'] * 1e3:.1f} ms")
    print(f"simulated step (unsplit per-layer compute / 2 + collectives over that link): {guess * 1e3:.1f} ms, "
          f"measured {measured_step * 1e3:.1f} ms: {guess / measured_step:.2f}x")
    replay = r0["own_compute"] + sum(tp.collective_seconds(c, link) for c in r0["collectives"])
    print(f"simulated from the TP run's own compute spans (rank 0) + collectives over that link: "
          f"{replay * 1e3:.1f} ms: {replay / measured_step:.2f}x of measured (a rank waiting for the other "
          "and a shared core are what the first estimate misses)")
    load = os.getloadavg()[0]
    print(f"load average at the end: {load:.1f} on {os.cpu_count()} cores"
          + (": other processes shared the cores, timings are noisy" if load > 2.5 else ""))
    if not torch.cuda.is_available():
        print("no GPU here: the T=1 overhead against the plain model on one GPU is measured on a machine with one")


if __name__ == "__main__":
    main()
