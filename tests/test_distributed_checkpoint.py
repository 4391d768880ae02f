"""mplib.distributed checkpoints (torch.distributed.checkpoint) round-trip exactly across layouts: saved by 4 stages,
loaded by 2 stages x 2 tensor-parallel ranks, saved again, loaded by 2 stages and onto the unsplit model on one device."""

import warnings

import torch

import mplib.distributed as md
from mplib.distributed import DistributedPipeline, launch
from test_distributed_pipeline import B, T, V, lm_loss, model


def _layout(rank, world, cases, ids, targets):
    """Per case: build (seed), maybe load, maybe train one step (plain SGD), maybe save; the whole tensors held."""
    out = []
    for name, balance, kw, seed, load_from, train, save_to in cases:
        m = model(name, seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tensor parallelism announces a padded vocabulary
            pipe = DistributedPipeline(m, balance, loss_fn=lm_loss, chunks=4, **kw)
        if load_from:
            md.load(pipe, load_from)
        if train:
            pipe.step(ids, targets)
            with torch.no_grad():
                for p in pipe.parameters():
                    p -= 0.5 * p.grad  # values no seed can give: a wrong or missed tensor shows
        if save_to:
            md.save(pipe, save_to)
        out.append(md.state_dict(pipe))
    return out


def _whole(results, i):
    state = {}
    for res in results:
        for k, v in res[i].items():
            if k in state:
                assert torch.equal(state[k], v), k  # a tied weight, a replica: every holder has the same value
            state[k] = v
    return state


def _assert_exact(state, ref, what):
    assert set(state) == set(ref), f"{what}: keys differ by {set(state) ^ set(ref)}"
    for k, v in ref.items():
        assert torch.equal(state[k], v), f"{what}: {k} differs (max {(state[k] - v).abs().max():.3g})"


def test_checkpoints_round_trip_exactly_across_layouts_and_onto_one_device(tmp_path):
    ids, targets = torch.randint(0, V, (2, B, T))
    names = ("gpt", "hf-gpt2")
    a, b = {n: str(tmp_path / f"{n}-4stages") for n in names}, {n: str(tmp_path / f"{n}-pp2tp2") for n in names}
    trained = launch(_layout, 4, [(n, [1, 1, 1, 1], {}, 0, None, True, a[n]) for n in names], ids, targets,
                     timeout=150)
    moved = launch(_layout, 4, [(n, [2, 2], {"tp": 2}, 1, a[n], False, b[n]) for n in names], ids, targets,
                   timeout=150)
    back = launch(_layout, 2, [(n, [2, 2], {}, 2, b[n], False, None) for n in names], ids, targets, timeout=150)
    for i, n in enumerate(names):
        ref = _whole(trained, i)
        fresh = model(n, 3).state_dict()
        assert set(ref) == set(fresh)  # every tensor of the model was saved by some rank
        changed = [k for k, v in fresh.items() if v.is_floating_point() and not torch.equal(v, ref[k])]
        assert len(changed) > len(ref) // 2  # trained and seeded apart: a load that did nothing would show
        _assert_exact(_whole(moved, i), ref, f"{n}: 4 stages saved, pp 2 x tp 2 loaded")
        _assert_exact(_whole(back, i), ref, f"{n}: pp 2 x tp 2 saved, 2 stages loaded")
        for path in (a[n], b[n]):
            one = md.load_model(model(n, 4), path)
            _assert_exact(one.state_dict(), ref, f"{n}: {path} on one device")
        tied = model(n, 4)
        md.load_model(tied, a[n])
        head = tied.lm_head.weight if n == "hf-gpt2" else tied.head.lm_head.weight
        wte = tied.transformer.wte.weight if n == "hf-gpt2" else tied.embed.wte.weight
        assert head is wte  # still one tensor after loading
