"""mplib.tensor_parallel: split models equal the unsplit ones; collectives counted; bad input refused early."""

import copy
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import mplib.plot
import mplib.tensor_parallel as tp
from mplib.hardware import LINKS
from mplib.models.bert import BERT, BERTConfig
from mplib.models.gpt import GPT, GPTConfig

V = 64
GPT_CFG = GPTConfig(vocab_size=V, block_size=16, n_layer=2, n_head=4, n_embd=32)
BERT_CFG = BERTConfig(vocab_size=V, block_size=16, n_layer=2, n_head=4, n_embd=32, intermediate_size=64, dropout=0.0)
GPT2_CFG = dict(vocab_size=V, n_positions=16, n_layer=2, n_head=4, n_embd=32, resid_pdrop=0.0, embd_pdrop=0.0,
                attn_pdrop=0.0, bos_token_id=None, eos_token_id=None)  # no dropout: train-mode runs compare exactly
# grouped-query attention: 8 query heads share 4 key/value heads, so T=4 leaves 2 query heads and 1 kv head per rank
LLAMA_CFG = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
                 num_key_value_heads=4, max_position_embeddings=16)
# fp32: a split matmul adds its partial products in another order than the whole one (row-parallel
# layers sum T partial sums), so results agree to rounding, not bit for bit; observed <= 1e-7 here.
TOL = dict(rtol=1e-5, atol=1e-5)


def make(kind):
    torch.manual_seed(0)
    if kind == "gpt":
        return GPT(GPT_CFG)
    if kind == "bert":
        return BERT(BERT_CFG)
    if kind == "hf-gpt2":
        return GPT2LMHeadModel(GPT2Config(**GPT2_CFG))
    return LlamaForCausalLM(LlamaConfig(**LLAMA_CFG))


def batch():
    ids, targets = torch.randint(0, V, (2, 2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, :2] = 0  # padding in BERT: the mask travels with the hidden states
    return ids, targets, mask


def call(model, kind, ids, mask):
    if kind == "bert":
        return model(ids, mask)
    if kind.startswith("hf-"):
        return model(ids, use_cache=False).logits if not isinstance(model, tp.TensorParallel) else model(ids).logits
    return model(ids)


KINDS = ["gpt", "bert", "hf-gpt2", "hf-llama"]


def test_tiny_configs_have_the_pinned_parameter_counts():
    counts = {k: sum(p.numel() for p in make(k).parameters()) for k in KINDS}
    assert counts == {"gpt": 28032, "bert": 20960, "hf-gpt2": 28032, "hf-llama": 82240}  # counted by hand


@pytest.mark.parametrize("sp", [False, True], ids=["tp", "tp+sp"])
@pytest.mark.parametrize("T", [1, 2, 4])
@pytest.mark.parametrize("kind", KINDS)
def test_outputs_and_every_gradient_equal_the_unsplit_model(kind, T, sp):
    model, (ids, targets, mask) = make(kind), batch()
    ref = copy.deepcopy(model)
    par = tp.parallelize(model, ["cpu"] * T, sequence_parallel=sp)
    out, ref_out = call(par, kind, ids, mask), call(ref, kind, ids, mask)
    torch.testing.assert_close(out, ref_out, **TOL)
    F.cross_entropy(out.reshape(-1, V), targets.reshape(-1)).backward()
    F.cross_entropy(ref_out.reshape(-1, V), targets.reshape(-1)).backward()
    grads = tp.unsplit_grads(par)
    assert set(grads) == {n for n, _ in ref.named_parameters()}
    for name, p in ref.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name  # a zero gradient would compare vacuously
        torch.testing.assert_close(grads[name], p.grad, **TOL, msg=lambda m: f"{name}: {m}")
    splits = tp.split_names(par)
    for name, p in par.ranks[0].named_parameters():  # replicated parameters: every rank has the same gradient
        if name not in splits and p.grad is not None:
            for other in par.ranks[1:]:
                torch.testing.assert_close(dict(other.named_parameters())[name].grad, p.grad, rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_gathers_back_to_the_unsplit_keys_and_values_exactly(kind):
    model = make(kind)
    par = tp.parallelize(model, ["cpu"] * 2)
    mine, theirs = par.state_dict(), model.state_dict()
    assert mine.keys() == theirs.keys()
    for k, v in theirs.items():
        assert torch.equal(mine[k], v), k
    reloaded = tp.parallelize(make(kind), ["cpu"] * 2)
    with torch.no_grad():
        for p in reloaded.parameters():
            p.zero_()
    reloaded.load_state_dict(mine)  # each rank takes its slice again
    for k, v in reloaded.state_dict().items():
        assert torch.equal(v, theirs[k]), k


def test_hf_gpt2_fused_qkv_is_split_per_head_not_by_contiguous_columns():
    model = make("hf-gpt2")
    par = tp.parallelize(model, ["cpu"] * 2)
    w = model.transformer.h[0].attn.c_attn.weight  # (C, 3C): [q | k | v], Conv1D stores (in, out)
    q, k, v = w.split(32, dim=1)
    expected = torch.cat([q[:, :16], k[:, :16], v[:, :16]], dim=1)  # rank 0: heads 0 and 1 of q, k and v
    assert torch.equal(par.ranks[0].transformer.h[0].attn.c_attn.weight, expected)
    assert not torch.equal(expected, w[:, :48])  # which contiguous columns would not be


def test_llama_splits_the_key_value_heads_with_their_query_heads():
    par = tp.parallelize(make("hf-llama"), ["cpu"] * 4)
    attn = par.ranks[0].model.layers[0].self_attn
    assert (attn.q_proj.weight.shape, attn.k_proj.weight.shape, attn.v_proj.weight.shape) == \
        ((16, 64), (8, 64), (8, 64))  # 2 query heads and their 1 key/value head of 8 channels


@pytest.mark.parametrize("T", [1, 2, 4])
def test_vocab_parallel_cross_entropy_equals_f_cross_entropy_with_ignored_tokens(T):
    vocab = 10  # not a multiple of 4: the logits are padded to 12 columns whose values must not count
    padded = -(-vocab // T) * T
    logits = torch.randn(3, 5, padded) * 3
    target = torch.randint(0, vocab, (3, 5))
    target[0, :2] = -100
    target[2, 4] = -100
    ref_logits = logits[..., :vocab].clone().requires_grad_()
    ref = F.cross_entropy(ref_logits.reshape(-1, vocab), target.reshape(-1))
    ref.backward()
    shards = [s.clone().requires_grad_() for s in logits.chunk(T, dim=-1)]
    group = tp.LocalGroup(["cpu"] * T)
    with tp.trace(group) as tr:
        loss = group.run(lambda g, y: tp.vocab_parallel_cross_entropy(shards[g.rank], y, g, vocab), target)
        loss.backward()
    torch.testing.assert_close(loss, ref, **TOL)
    grad = torch.cat([s.grad for s in shards], dim=-1)
    torch.testing.assert_close(grad[..., :vocab], ref_logits.grad, **TOL)
    assert torch.equal(grad[..., vocab:], torch.zeros_like(grad[..., vocab:]))  # padding gets no gradient
    assert tr.counts() == Counter({("forward", "all_reduce"): 3})  # max, target logit, sum of exponentials
    assert all(c.nbytes == 15 * 4 for c in tr.collectives)  # one float per token, never the logits


def test_model_with_split_logits_trains_on_the_vocab_parallel_loss_like_the_whole_one():
    model, (ids, targets, _) = make("gpt"), batch()
    targets[0, :3] = -100
    ref = copy.deepcopy(model)
    par = tp.parallelize(model, ["cpu"] * 2, gather_output=False)
    with tp.trace(par) as tr:
        loss = par.run(lambda m, g, x, y: tp.vocab_parallel_cross_entropy(m(x), y, g, V), ids, targets)
        loss.backward()
    ref_loss = F.cross_entropy(ref(ids).reshape(-1, V), targets.reshape(-1))
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, **TOL)
    grads = tp.unsplit_grads(par)
    for name, p in ref.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, **TOL)
    assert tr.counts("forward")["all_gather"] == 0  # the (B, T, V) logits never travel


LAYER = {False: Counter({("forward", "all_reduce"): 2, ("backward", "all_reduce"): 2}),
         True: Counter({("forward", "all_gather"): 2, ("forward", "reduce_scatter"): 2,
                        ("backward", "all_gather"): 2, ("backward", "reduce_scatter"): 2,
                        ("backward", "all_reduce"): 1})}  # + one all-reduce of the layer's norm gradients


@pytest.mark.parametrize("sp", [False, True], ids=["tp", "tp+sp"])
@pytest.mark.parametrize("kind", KINDS)
def test_collectives_per_layer_are_megatrons_and_their_bytes_the_formula(kind, sp):
    model, (ids, targets, mask) = make(kind), batch()
    par = tp.parallelize(model, ["cpu"] * 2, sequence_parallel=sp)
    with tp.trace(par) as tr:
        call(par, kind, ids, mask).sum().backward()
    layers = {k: v for k, v in tr.by_layer().items() if k[-1].isdigit()}
    assert len(layers) == 2 and all(c == LAYER[sp] for c in layers.values()), layers
    hidden = model.config.n_embd if kind in ("gpt", "bert") else model.config.hidden_size
    formula = tp.layer_collectives(2, 8, hidden, 2, sequence_parallel=sp)  # (B, T, C) fp32 activations
    first = next(iter(layers))
    activation = [c for c in tr.collectives if c.label.startswith(first + ".") and not c.label.endswith("replicated")]
    assert sorted((c.kind, c.phase, c.nbytes) for c in activation) == \
        sorted((c.kind, c.phase, c.nbytes) for c in formula)


def test_each_rank_holds_one_over_T_of_the_split_weights_measured():
    model = make("hf-llama")
    for T in (2, 4):
        par = tp.parallelize(model, ["cpu"] * T)
        names = tp.split_names(par)
        whole = {id(p): p for n, p in model.named_parameters() if n in names}
        split_bytes = sum(p.numel() * p.element_size() for p in whole.values())
        replicated = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if n not in names)
        held = tp.memory(par)
        assert split_bytes > 0 and replicated > 0
        assert [m["split"] for m in held] == [split_bytes // T] * T  # storage sizes: no hidden full copies
        assert [m["replicated"] for m in held] == [replicated] * T


@pytest.mark.parametrize("kind, T", [("gpt", 4), ("hf-gpt2", 4), ("bert", 4)])
def test_a_vocabulary_that_T_does_not_divide_is_padded_and_outputs_stay_exact(kind, T):
    torch.manual_seed(0)
    model = {"gpt": lambda: GPT(GPTConfig(**{**GPT_CFG.__dict__, "vocab_size": 66})),
             "bert": lambda: BERT(BERTConfig(**{**BERT_CFG.__dict__, "vocab_size": 66})),
             "hf-gpt2": lambda: GPT2LMHeadModel(GPT2Config(**{**GPT2_CFG, "vocab_size": 66}))}[kind]()
    ids, _, mask = batch()
    with pytest.warns(UserWarning, match="66 tokens is not a multiple of T=4.*padded to 68"):
        par = tp.parallelize(model, ["cpu"] * T)
    embedding = {"gpt": "embed.wte", "bert": "embed.word", "hf-gpt2": "transformer.wte"}[kind]
    assert par.ranks[3].get_submodule(embedding).weight.shape[0] == 17  # 68 / 4 rows; rank 3's last 2 are padding
    torch.testing.assert_close(call(par, kind, ids, mask), call(model, kind, ids, mask), **TOL)
    for k, v in model.state_dict().items():
        assert torch.equal(par.state_dict()[k], v), k


def test_a_plan_by_hand_splits_an_mlp_into_column_then_row():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8))
    x = torch.randn(4, 8)
    par = tp.parallelize(mlp, ["cpu"] * 4, plan={"0": "column", "2": "row"})
    torch.testing.assert_close(par(x), mlp(x), **TOL)
    assert par.ranks[1][0].weight.shape == (8, 8) and par.ranks[1][2].weight.shape == (8, 8)


def unchanged(model):
    return {k: (v.data_ptr(), v.clone()) for k, v in model.state_dict().items()}


def assert_unchanged(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, (ptr, value) in before.items():
        assert after[k].data_ptr() == ptr and torch.equal(after[k], value), k


@pytest.mark.parametrize("build, T, error, match", [
    (lambda: GPT(GPTConfig(vocab_size=V, block_size=16, n_layer=1, n_head=4, n_embd=32)), 3, ValueError,
     r"n_head 4 is not divisible by T=3: each rank holds whole attention heads; use T in \[1, 2, 4\]"),
    (lambda: LlamaForCausalLM(LlamaConfig(**{**LLAMA_CFG, "num_key_value_heads": 2})), 4, ValueError,
     r"num_key_value_heads 2 is not divisible by T=4: grouped-query attention splits the key/value heads"),
    (lambda: BERT(BERTConfig(**{**BERT_CFG.__dict__, "intermediate_size": 66})), 4, ValueError,
     r"intermediate_size 66 is not divisible by T=4"),
    (lambda: nn.Sequential(nn.Linear(8, 8), nn.ReLU()), 2, TypeError,
     r"does not know a Sequential.*plan=\{'0': 'column', '2': 'row'\}"),
])
def test_bad_models_are_refused_before_any_weight_moves(build, T, error, match):
    model = build()
    before = unchanged(model)
    with pytest.raises(error, match=match):
        tp.parallelize(model, ["cpu"] * T)
    assert_unchanged(model, before)


@pytest.mark.parametrize("plan, error, match", [
    ({"0": "column", "2": "row"}, ValueError, r"'0''s output features 10 is not divisible by T=4"),
    ({"1": "column"}, TypeError, r"plan\['1'\] = column needs an Linear, but '1' is a ReLU"),
    ({"5": "row"}, ValueError, r"plan names '5', which is not a submodule"),
    ({"0": "diagonal"}, ValueError, r"plan\['0'\] is 'diagonal'; use 'column', 'row' or 'vocab'"),
])
def test_bad_plans_are_refused_before_any_weight_moves(plan, error, match):
    mlp = nn.Sequential(nn.Linear(8, 10), nn.ReLU(), nn.Linear(10, 8))
    before = unchanged(mlp)
    with pytest.raises(error, match=match):
        tp.parallelize(mlp, ["cpu"] * 4, plan=plan)
    assert_unchanged(mlp, before)


def test_mismatched_groups_are_refused():
    par = tp.parallelize(make("gpt"), ["cpu"] * 2)
    with pytest.raises(ValueError, match=r"already tensor-parallel over rank 0 of LocalGroup\(\[.cpu., .cpu.\]\)"):
        tp.parallelize(par.ranks[0], ["cpu"] * 2)
    with pytest.raises(ValueError, match="takes the devices of a LocalGroup"):
        tp.parallelize(make("gpt"), par.group)
    with pytest.raises(ValueError, match="mixes devices and other things"):
        tp.parallelize(make("gpt"), ["cpu", 1])
    a, b = tp.LocalGroup(["cpu"] * 2), tp.LocalGroup(["cpu"] * 2)
    mixed = nn.Sequential(tp.ColumnParallelLinear(torch.ones(2, 4), None, a.ranks[0]),
                          tp.RowParallelLinear(torch.ones(4, 2), None, b.ranks[0]))
    with pytest.raises(ValueError, match="talk on 2 different groups"):
        tp.unsplit_state_dict(mixed)
    with pytest.raises(ValueError, match="cannot be a vocabulary of 64"):
        group = tp.LocalGroup(["cpu"] * 2)
        group.run(lambda g: tp.vocab_parallel_cross_entropy(torch.zeros(3, 8), torch.zeros(3, dtype=torch.long), g,
                                                            64))


def test_sequence_parallel_refuses_a_sequence_that_T_does_not_split():
    par = tp.parallelize(make("gpt"), ["cpu"] * 2, sequence_parallel=True)
    with pytest.raises(ValueError, match="the 7 tokens of each sequence over T=2.*pad the batch to 8 tokens"):
        par(torch.randint(0, V, (2, 7)))


def test_dropout_in_one_process_is_refused_in_training_and_fine_in_eval():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**GPT_CFG.__dict__, "dropout": 0.1}))
    par = tp.parallelize(model, ["cpu"] * 2)
    ids = torch.randint(0, V, (2, 8))
    with pytest.raises(ValueError, match="dropout is on.*dropout=0.0 or call .eval"):
        par(ids)
    torch.testing.assert_close(par.eval()(ids), model.eval()(ids), **TOL)


def test_a_raising_rank_stops_the_others_and_is_named():
    group = tp.LocalGroup(["cpu"] * 2, timeout=30)

    def fn(g, x):
        if g.rank == 1:
            raise KeyError("rank one fails")
        return g.all_reduce(x)  # rank 0 waits here until rank 1's failure releases it
    with pytest.raises(KeyError, match="rank one fails") as exc:
        group.run(fn, torch.ones(2))
    if hasattr(exc.value, "add_note"):  # Python 3.11+: the rank is named in a note under the traceback
        assert "raised on tensor-parallel rank 1 of 2" in "".join(exc.value.__notes__)
    torch.testing.assert_close(group.run(lambda g, x: g.all_reduce(x), torch.ones(2)), 2 * torch.ones(2))


def test_ranks_that_diverge_or_never_arrive_raise_instead_of_hanging():
    group = tp.LocalGroup(["cpu"] * 2, timeout=0.5)
    with pytest.raises(RuntimeError, match="rank 0: all_reduce of \\(2,\\), rank 1: all_gather"):
        group.run(lambda g, x: g.all_reduce(x) if g.rank == 0 else g.all_gather(x, 0), torch.ones(2))
    with pytest.raises(TimeoutError, match="rank 0 waited 0 s at a all_reduce for ranks \\[1\\]"):
        group.run(lambda g, x: g.all_reduce(x) if g.rank == 0 else x, torch.ones(2))


def test_the_trace_puts_compute_and_collectives_of_every_rank_on_one_timeline():
    par = tp.parallelize(make("gpt"), ["cpu"] * 2)
    ids = torch.randint(0, V, (2, 8))
    with tp.trace(par) as tr:
        par(ids).sum().backward()
    tl = tr.timeline
    assert tl.lanes == ["rank 0 (cpu)", "rank 1 (cpu)"]
    for lane in (0, 1):
        kinds = Counter(e.kind for e in tl.events if e.lane == lane)
        assert kinds["collective"] == len(tr.collectives) and kinds["forward"] > 0 and kinds["backward"] > 0
    assert tl.busy(0) > 0 and 0 < tl.utilization()[0] < 1
    mplib.plot.timeline(tl)


def test_simulated_step_is_compute_over_T_plus_ring_collectives():
    link = SimpleNamespace(gbs_per_direction=1.0)  # 1e9 bytes/s
    coll = tp.layer_collectives(1, 1, 250_000_000, 2)  # 1e9 bytes: an all-reduce sends 2 * (1/2) of it = 1 s
    tl = tp.simulate([1.0, 1.0], [2.0, 2.0], [coll, coll], ranks=2, link=link)
    assert tl.duration == pytest.approx(2 * (0.5 + 1.0) + 8 * 1.0)
    slow = SimpleNamespace(bandwidth=1e9, latency=0.1)  # attributes a Link may gain: used when present
    assert tp.collective_seconds(coll[0], slow) == pytest.approx(1.0 + 2 * 0.1)
    assert tp.collective_seconds(coll[0], LINKS["NVLink 3 (A100)"]) < tp.collective_seconds(coll[0],
                                                                                             LINKS["PCIe 4.0 x16"])
    bad_fit, bad_latency = SimpleNamespace(bandwidth=-5e8, latency=0.0), SimpleNamespace(bandwidth=1e9, latency=-1e-6)
    for bad in (bad_fit, bad_latency):
        with pytest.raises(ValueError, match="bandwidth > 0 bytes/s and a latency >= 0"):
            tp.collective_seconds(coll[0], bad)  # a negative time would draw an event that ends before it starts


def test_a_tensor_parallel_training_step_equals_the_unsplit_one():
    model, (ids, targets, _) = make("hf-llama"), batch()
    ref = copy.deepcopy(model)
    par = tp.parallelize(model, ["cpu"] * 2)
    for m, params in ((par, par.parameters()), (ref, ref.parameters())):
        opt = torch.optim.SGD(params, lr=0.1)
        out = (m(ids).logits if m is par else m(ids, use_cache=False).logits)
        F.cross_entropy(out.reshape(-1, V), targets.reshape(-1)).backward()
        opt.step()
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(par.state_dict()[k], v, **TOL)
