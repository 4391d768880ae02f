"""mplib.distributed.DistributedPipeline on 2, 4 and 8 gloo processes equals the single-device model: the loss and
every parameter's gradient (our GPT, HF GPT-2 with its tied embedding and head, a stacked LSTM), under GPipe, 1F1B,
interleaved 1F1B, looped BFS and torch's zero-bubble schedules, with data and tensor parallelism on a mesh; each
rank's timeline follows the schedule, on one clock."""

import warnings

import pytest
import torch
import torch.nn.functional as F

import mplib.schedule
from mplib.distributed import DistributedPipeline, launch

# Rank functions and models live at module level: a fresh process imports them by name.
B, T, V = 8, 8, 64


def model(name, seed=0):
    """A tiny model of each kind, the same on every process (same seed)."""
    torch.manual_seed(seed)
    if name == "gpt":
        from mplib.models.gpt import GPT, GPTConfig

        return GPT(GPTConfig(vocab_size=V, block_size=16, n_layer=2, n_head=2, n_embd=16))
    if name == "hf-gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        return GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=16, n_layer=2, n_head=2, n_embd=16,
                                          bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                                          attn_pdrop=0.0))
    from mplib.models.rnn import CharRNN, RNNConfig

    return CharRNN(RNNConfig(vocab_size=V, n_embd=8, hidden_size=16, n_layer=2, cell="lstm"))  # 4 blocks


def lm_loss(output, targets):
    logits = output.logits if hasattr(output, "logits") else output  # HF's head returns its ModelOutput
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def padding_mask(ids):
    """An HF attention mask with the first 3 positions of every other row padded (left padding)."""
    mask = torch.ones_like(ids)
    mask[::2, :3] = 0
    return mask


def reference(name, ids, targets, masked=False):
    """Loss and every gradient of the unsplit model on one device, on the whole batch."""
    m = model(name)
    kw = {"attention_mask": padding_mask(ids)} if masked else {}
    out = m(ids, use_cache=False, **kw) if name.startswith("hf") else m(ids)
    loss = lm_loss(out, targets)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in m.named_parameters()}


def held_grads(m, pipe):
    """This rank's gradients under the unsplit model's names (tensor-parallel slices gathered whole)."""
    held = {id(p) for p in pipe.parameters()}
    names = [n for n, p in m.named_parameters() if id(p) in held]
    if pipe.mesh.shape["tp"] > 1:
        import mplib.tensor_parallel as tpar

        whole = tpar.unsplit_grads(m)
        return {n: whole[n] for n in names}
    return {n: p.grad.clone() for n, p in m.named_parameters() if id(p) in held}


def _steps(rank, world, cases, ids, targets):
    """Each case: build the pipeline on this rank, one step; the loss, this rank's gradients, rank 0's timeline."""
    out = []
    for case in cases:
        name, balance, schedule, chunks, kw = case
        kw = dict(kw)
        untied, masked = kw.pop("untied", False), kw.pop("masked", False)
        m = model(name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tensor parallelism announces a padded vocabulary
            pipe = DistributedPipeline(m, balance, loss_fn=lm_loss, chunks=chunks, schedule=schedule, **kw)
        if untied:
            pipe._ties = []  # what torch's pipelining alone does: each stage keeps its own share of a tied weight
        loss = pipe.step((ids, padding_mask(ids)) if masked else ids, targets)  # HF's (input_ids, attention_mask)
        out.append({"loss": loss, "grads": held_grads(m, pipe), "timeline": pipe.gather_timeline()})
    return out


def _assert_equal_to_single_device(cases, results, ids, targets):
    for i, (name, balance, schedule, chunks, kw) in enumerate(cases):
        loss, grads = reference(name, ids, targets, kw.get("masked", False))
        where = f"{name} {balance} {schedule} M={chunks} {kw}"
        seen = set()
        for rank, res in enumerate(results):
            # fp32: micro-batch losses weighted and summed, then gradients summed across ranks, add in another
            # order than the whole batch's mean on one device: equal to ~1e-7 (observed 5e-7 on the loss)
            torch.testing.assert_close(res[i]["loss"], loss, rtol=1e-5, atol=1e-6, msg=lambda m: f"{where}: {m}")
            for n, g in res[i]["grads"].items():
                assert grads[n].abs().sum() > 0, n  # a zero gradient would compare equal to a missing one
                torch.testing.assert_close(g, grads[n], rtol=1e-5, atol=1e-7,
                                           msg=lambda m: f"{where} rank {rank} {n}: {m}")
                seen.add(n)
        assert seen == set(grads), f"{where}: no rank holds {set(grads) - seen}"


def _run(nprocs, cases):
    ids, targets = torch.randint(0, V, (2, B, T))
    results = launch(_steps, nprocs, cases, ids, targets, timeout=150)
    _assert_equal_to_single_device(cases, results, ids, targets)
    return results


TWO = [("gpt", [2, 2], "gpipe", 4, {}), ("gpt", [2, 2], "1f1b", 4, {}), ("hf-gpt2", [2, 2], "gpipe", 4, {}),
       ("hf-gpt2", [2, 2], "1f1b", 4, {}), ("hf-gpt2", [2, 2], "1f1b", 4, {"masked": True}), ("lstm", [2, 2], "gpipe", 4, {}), ("lstm", [2, 2], "1f1b", 2, {}),
       ("gpt", [1, 1, 1, 1], "interleaved", 4, {}), ("gpt", [1, 1, 1, 1], "looped_bfs", 4, {"virtual": 2}),
       ("gpt", [1, 1, 1, 1], "zero_bubble", 4, {"virtual": 2}), ("hf-gpt2", [1, 1, 1, 1], "zbv", 4, {}),
       ("gpt", [1, 1, 1, 1], "dualpipev", 4, {})]  # torch's zero-bubble ones, each backward split in two


def test_two_processes_equal_the_single_device_model_and_each_rank_follows_the_schedule():
    results = _run(2, TWO)
    # the gathered timeline of gpt under 1F1B: one lane per rank, the same order as mplib.schedule.build's
    tl = results[0][1]["timeline"]
    assert results[1][1]["timeline"] is None  # gathered on rank 0 only
    assert tl.lanes == ["rank 0: stage 0", "rank 1: stage 1"]
    plan = mplib.schedule.build("1f1b", 2, 4)
    for lane in range(2):
        ran = [f"{e.kind[0].upper()}{e.microbatch}" for e in tl.events if e.lane == lane and e.microbatch is not None]
        assert ran == [f"{a.kind}{a.microbatch}" for a in plan.actions[lane]], lane
    f = {(e.lane, e.kind, e.microbatch): e for e in tl.events}
    for m in range(4):  # on one clock: stage 1 starts micro-batch m after stage 0 has sent it, and so back
        assert f[1, "forward", m].start >= f[0, "forward", m].end
        assert f[0, "backward", m].start >= f[1, "backward", m].end
    assert sum(e.kind == "collective" for e in tl.events) == 2  # the tied gradient's all-reduce, on each rank


def _untied(rank, world, ids, targets):
    return _steps(rank, world, [("gpt", [2, 2], "1f1b", 4, {"untied": True})], ids, targets)


def test_without_the_tie_all_reduce_the_tied_gradient_is_wrong_on_both_stages():
    # the check above can fail: torch's stages alone leave each rank only its own use of the tied weight
    ids, targets = torch.randint(0, V, (2, B, T))
    results = launch(_untied, 2, ids, targets, timeout=120)
    _, grads = reference("gpt", ids, targets)
    tied = "embed.wte.weight"
    for res in results:
        assert tied in res[0]["grads"]
        assert not torch.allclose(res[0]["grads"][tied], grads[tied], atol=1e-4)
    torch.testing.assert_close(results[0][0]["grads"][tied] + results[1][0]["grads"][tied], grads[tied],
                               rtol=1e-5, atol=1e-7)  # the two shares, summed: what the all-reduce does


FOUR = [("gpt", [1, 1, 1, 1], "gpipe", 4, {}), ("hf-gpt2", [1, 1, 1, 1], "1f1b", 4, {}),
        ("lstm", [1, 1, 1, 1], "1f1b", 4, {}), ("gpt", [2, 2], "1f1b", 2, {"dp": 2})]


def test_four_processes_equal_the_single_device_model():
    _run(4, FOUR)


EIGHT = [("gpt", [2, 2], "1f1b", 2, {"dp": 2, "tp": 2}), ("hf-gpt2", [2, 2], "gpipe", 2, {"dp": 2, "tp": 2})]


def test_dp_pp_tp_on_eight_processes_equals_the_single_device_model():
    results = _run(8, EIGHT)
    assert results[0][0]["timeline"].lanes[5] == "rank 5: stage 1 (dp 0, tp 1)"


def _offsets(rank, world):
    import socket
    import time

    from mplib.distributed import clock

    same = clock.offset(lambda: time.perf_counter() + 10.0 * rank)  # one machine: one clock, no correction
    socket.gethostname = lambda: f"machine-{rank}"  # as if each rank ran on a machine of its own
    start = time.perf_counter()
    other = clock.offset(lambda: time.perf_counter() + 10.0 * rank)
    return same, other, time.perf_counter() - start


def test_ranks_on_other_machines_find_their_offset_to_rank_0s_clock_within_a_round_trip():
    results = launch(_offsets, 3, timeout=60)
    assert [same for same, _, _ in results] == [0.0, 0.0, 0.0]
    for rank, (_, other, spent) in enumerate(results):
        assert spent > 0 and abs(other - (-10.0 * rank)) <= spent  # within the time all its trips took


def bert_classifier():
    torch.manual_seed(0)
    from transformers import BertConfig, BertForSequenceClassification

    return BertForSequenceClassification(BertConfig(vocab_size=V, hidden_size=16, num_hidden_layers=2,
                                                    num_attention_heads=2, intermediate_size=32,
                                                    max_position_embeddings=16, num_labels=3,
                                                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def _dict_steps(rank, world, batches):
    """HF dict batches: the model's own loss (labels in the batch, no loss_fn), and a loss_fn given the labels."""
    out = []
    for name, batch, with_loss_fn in batches:
        m = model("hf-gpt2") if name == "hf-gpt2" else bert_classifier()
        kw = {"loss_fn": lm_loss, "items": "tokens"} if with_loss_fn else {}  # lm_loss: a mean over tokens not -100
        pipe = DistributedPipeline(m, [2, 2], chunks=4, schedule="1f1b", **kw)
        loss = pipe.step(batch)
        out.append({"loss": loss, "grads": held_grads(m, pipe)})
    return out


def test_an_hf_dict_batch_trains_with_the_models_own_loss_or_a_loss_fn():
    # 7 rows in 4 micro-batches: the last one is padded, and the padding's labels are -100 for the model's loss
    ids = torch.randint(0, V, (7, T))
    mask = padding_mask(ids)
    labels = ids.masked_fill(mask == 0, -100)
    lm = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    cls = {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 2, 1, 1, 0, 2, 2])}
    batches = [("hf-gpt2", lm, False), ("hf-gpt2", lm, True), ("bert", cls, False)]
    results = launch(_dict_steps, 2, batches, timeout=150)
    for i, (name, batch, with_loss_fn) in enumerate(batches):
        m = model("hf-gpt2") if name == "hf-gpt2" else bert_classifier()
        if with_loss_fn:  # the labels are loss_fn's targets, popped from the batch, as mplib.Pipeline does
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            loss = lm_loss(m(**inputs, use_cache=False), batch["labels"])
        else:
            loss = m(**batch).loss  # the mean over the shifted labels that are not -100 / over the 7 examples
        loss.backward()
        grads, seen = {n: p.grad for n, p in m.named_parameters()}, set()
        for rank, res in enumerate(results):
            # fp32 sums in another order than one device's: ~1e-7 (as in the cases above)
            torch.testing.assert_close(res[i]["loss"], loss.detach(), rtol=1e-5, atol=1e-6)
            for n, g in res[i]["grads"].items():
                torch.testing.assert_close(g, grads[n], rtol=1e-5, atol=1e-7, msg=lambda e: f"{name} {n}: {e}")
                seen.add(n)
        assert seen == {n for n, g in grads.items() if g is not None}, name


def _dict_errors(rank, world):
    """The messages of what a dict batch may not do, on a 2-rank pipeline of HF GPT-2."""
    ids = torch.randint(0, V, (7, T))
    said = []
    own = DistributedPipeline(model("hf-gpt2"), [2, 2], chunks=4)
    for call in (lambda: own.step(ids, ids),  # targets but no loss_fn
                 lambda: own.step({"input_ids": ids}),  # no labels, no targets
                 lambda: own.step({"input_ids": ids, "labels": ids[:3]})):  # labels of another batch size
        with pytest.raises((ValueError, TypeError)) as e:
            call()
        said.append(str(e.value))
    cls = DistributedPipeline(bert_classifier(), [2, 2], chunks=4)
    with pytest.raises(ValueError) as e:  # float labels: a padding row could not be ignored
        cls.step({"input_ids": ids, "labels": torch.rand(7, 3)})
    said.append(str(e.value))
    return said


def test_a_dict_batch_says_what_is_wrong():
    with pytest.raises(ValueError, match="only an HF model, given dict batches"):
        DistributedPipeline(model("gpt"), [2, 2], chunks=4)  # refused before any process group is needed
    said = launch(_dict_errors, 2, timeout=150)[0]
    assert "targets go to loss_fn, and this pipeline has none" in said[0]
    assert "step needs targets" in said[1]
    assert "labels" in said[2]
    assert "cannot ignore padding rows" in said[3]
