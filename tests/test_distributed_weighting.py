"""DistributedPipeline weighs each micro-batch (and each data-parallel replica's share) by its share of the global
batch's items, as mplib.Pipeline does: the loss and every gradient equal the single-device model's mean over the
counted items with uneven micro-batches and ignored (-100) labels falling unevenly, under GPipe and 1F1B, on 2
processes and on dp=2 x pp=2; equal weights 1/(M dp) would not be."""

import pytest
import torch
import torch.nn.functional as F

from mplib.distributed import DistributedPipeline, launch, weighting

V = 64


def model(name="gpt"):
    """Our tiny GPT, or HF GPT-2 (fed its input_ids and an attention mask: two inputs padded alike)."""
    torch.manual_seed(0)
    if name == "hf-gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        return GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=16, n_layer=2, n_head=2, n_embd=16, bos_token_id=0,
                                          eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    from mplib.models.gpt import GPT, GPTConfig

    return GPT(GPTConfig(vocab_size=V, block_size=16, n_layer=2, n_head=2, n_embd=16))


def logits(output):
    return (output.logits if hasattr(output, "logits") else output).reshape(-1, V)


def lm_loss(output, targets):  # a mean over the tokens whose target is not -100
    return F.cross_entropy(logits(output), targets.reshape(-1), ignore_index=-100)


def row_loss(output, targets):  # a mean over examples (rows): each row's summed token loss
    return F.cross_entropy(logits(output), targets.reshape(-1), reduction="sum") / targets.shape[0]


LOSSES = {"lm": lm_loss, "row": row_loss}


def counted(targets):  # what items="tokens" counts, as a function of the targets (module level: picklable)
    return int((targets != -100).sum())


def batch(B, T=6, seed=1):
    """Ids and targets of B rows; the ignored (-100) targets crowd into the first rows, so they fall unevenly
    across micro-batches and replicas; a row with every target ignored is in there too."""
    g = torch.Generator().manual_seed(seed)
    ids, targets = torch.randint(0, V, (2, B, T), generator=g)
    targets[0] = -100  # a whole row ignored
    targets[1, 1:] = -100
    targets[2, :4] = -100
    targets[B - 1, 2] = -100
    return ids, targets


def mask(ids):
    """An HF attention mask with the first 2 positions of every other row padded (left padding)."""
    out = torch.ones_like(ids)
    out[::2, :2] = 0
    return out


def reference(name, loss, ids, targets):
    m = model(name)
    value = LOSSES[loss](m(ids, attention_mask=mask(ids), use_cache=False) if name == "hf-gpt2" else m(ids), targets)
    value.backward()
    return value.detach(), {n: p.grad for n, p in m.named_parameters()}


def _steps(rank, world, cases, ids, targets):
    out = []
    for name, balance, schedule, chunks, dp, loss, items, rows in cases:
        m = model(name)
        pipe = DistributedPipeline(m, balance, loss_fn=LOSSES[loss], chunks=chunks, schedule=schedule, dp=dp,
                                   items=items)
        x = ids[:rows]
        value = pipe.step((x, mask(x)) if name == "hf-gpt2" else x, targets[:rows])
        held = {id(p) for p in pipe.parameters()}
        out.append((value, {n: p.grad.clone() for n, p in m.named_parameters() if id(p) in held}))
    return out


def _check(cases, results, ids, targets):
    for i, (name, balance, schedule, chunks, dp, loss, items, rows) in enumerate(cases):
        ref, grads = reference(name, loss, ids[:rows], targets[:rows])
        where = f"{name} {balance} {schedule} M={chunks} dp={dp} {loss} items={items} B={rows}"
        seen = set()
        for rank, res in enumerate(results):
            value, held = res[i]
            # fp32: weighted micro-batch losses and replicas' gradients add in another order than one mean: ~1e-7
            torch.testing.assert_close(value, ref, rtol=1e-5, atol=1e-6, msg=lambda m: f"{where}: {m}")
            for n, g in held.items():
                assert grads[n].abs().sum() > 0, n
                torch.testing.assert_close(g, grads[n], rtol=1e-5, atol=1e-7, msg=lambda m: f"{where} rank {rank} "
                                                                                            f"{n}: {m}")
                seen.add(n)
        assert seen == set(grads), f"{where}: no rank holds {set(grads) - seen}"


TWO = [("gpt", [2, 2], "gpipe", 3, 1, "lm", "tokens", 10),  # micro-batches of 4, 3, 3 rows
       ("gpt", [2, 2], "1f1b", 4, 1, "lm", "tokens", 10),  # 3, 3, 2, 2; the all-ignored row in micro-batch 0
       ("gpt", [2, 2], "1f1b", 3, 1, "row", None, 7),  # a mean over examples (the default): 3, 2, 2
       ("gpt", [2, 2], "gpipe", 4, 1, "lm", "tokens", 4),  # micro-batch 0 is the all-ignored row: weighs nothing
       ("hf-gpt2", [2, 2], "1f1b", 3, 1, "lm", "tokens", 10)]  # (ids, mask) padded alike


def test_two_processes_weigh_uneven_micro_batches_by_their_counted_items():
    ids, targets = batch(10)
    _check(TWO, launch(_steps, 2, TWO, ids, targets, timeout=120), ids, targets)


FOUR = [("gpt", [2, 2], "1f1b", 2, 2, "lm", "tokens", 11),  # replicas of 6 and 5 rows; the ignored ones on 0
        ("gpt", [2, 2], "gpipe", 2, 2, "lm", counted, 9)]  # a count function; replicas of 5 and 4 rows


def test_dp_by_pp_weighs_each_replica_by_its_share_of_the_global_items():
    ids, targets = batch(11)
    _check(FOUR, launch(_steps, 4, FOUR, ids, targets, timeout=150), ids, targets)


def test_weights_are_each_micro_batch_share_of_the_items_and_padding_repeats_a_real_row():
    ids, targets = batch(10)
    _, sizes = weighting.rows(10, 1, 0, 4)
    assert sizes == [3, 3, 2, 2]
    count = weighting.check_items("tokens")
    counts = [count(t) for t in targets.split(sizes)]
    assert counts == [0 + 1 + 2, 6 * 3, 6 * 2, 6 * 2 - 1]  # rows 0-2 hold the ignored labels, row 9 one more
    assert weighting.weights(counts, sizes) == [c / sum(counts) for c in counts]
    assert weighting.check_items(None) is None and weighting.check_items("examples") is None
    assert weighting.weights([0, 0], [3, 1]) == [0.75, 0.25]  # nothing counted anywhere: the examples' shares
    padded = weighting.pad(ids, sizes)
    assert padded.shape[0] == 12 and torch.equal(padded[[8, 11]], ids[[6, 8]])
    assert weighting.rows(11, 2, 1, 2) == (slice(6, 11), [3, 2])
    with pytest.raises(ValueError, match="at least 8 rows"):
        weighting.rows(7, 2, 0, 4)
    with pytest.raises(ValueError, match="unknown items 'token'; use one of examples, tokens"):
        DistributedPipeline(model(), [2, 2], loss_fn=lm_loss, chunks=2, items="token")  # before any process group
