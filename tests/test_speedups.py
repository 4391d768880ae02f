"""mplib.speedups: each technique checked against the plain model or a hand computation; bad input refused."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mplib
import mplib.memory
import mplib.partition
import mplib.speedups as sp
from mplib.memory import SavedBytes
from mplib.models.bert import BERTConfig, BertClassifier, SelfAttention
from mplib.profile import BlockCosts

CFG = BERTConfig(vocab_size=96, block_size=16, n_layer=4, n_head=4, n_embd=32, intermediate_size=64, dropout=0.0)
B, T = 8, 12  # 6 blocks: embed, 4 layers, head


def _model() -> BertClassifier:
    return BertClassifier(CFG, num_labels=4)


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, CFG.vocab_size, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[:3, -4:] = 0  # some padding, so the mask matters
    return ids, mask, torch.randint(0, 4, (B,), generator=g)


def _assert_same_grads(a, b):
    # parameter by parameter, in order (a checkpoint wrapper adds a prefix to the parameter names)
    pa, pb = list(a.parameters()), list(b.named_parameters())
    assert len(pa) == len(pb)
    for p, (name, q) in zip(pa, pb):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, msg=name)


# -- freezing ------------------------------------------------------------------------------------

@pytest.mark.parametrize("schedule, balance, skipped", [("gpipe", [2, 4], [0]), ("1f1b", [2, 4], [0]),
                                                       ("interleaved", [1, 1, 2, 2], [0, 1])])
def test_frozen_stages_run_no_backward_and_the_rest_get_the_unsplit_models_grads(schedule, balance, skipped):
    ids, mask, y = _batch()
    model = _model()
    ref = copy.deepcopy(model)
    assert sp.freeze(model, 3) == ["embed", "layers.0", "layers.1"]
    sp.freeze(ref, 3)
    F.cross_entropy(ref(ids, mask), y).backward()
    sm = mplib.split(model, ["cpu", "cpu"] * (len(balance) // 2), balance)
    pipe = mplib.Pipeline(sm, chunks=4, schedule=schedule, loss_fn=F.cross_entropy)
    with sp.BackwardCounter(model) as counter:
        pipe.step((ids, mask), y)
    # counted: the frozen stages' forwards all ran, and not one backward action; every other stage ran 4
    events = pipe.timeline.events
    stages = range(len(balance))
    assert [sum(e.kind == "forward" and e.stage == j for e in events) for j in stages] == [4] * len(balance)
    assert [sum(e.kind == "backward" and e.stage == j for e in events) for j in stages] == \
        [0 if j in skipped else 4 for j in stages]
    assert counter.counts[:3] == [0, 0, 0] and all(c > 0 for c in counter.counts[3:])  # no autograd node either
    frozen = [p for m in model.blocks()[:3] for p in m.parameters()]
    assert frozen and all(p.grad is None for p in frozen)
    assert all(p.grad is not None for m in model.blocks()[3:] for p in m.parameters())
    _assert_same_grads(model, ref)
    # unfrozen again, the next step runs every backward (the frozen stages are found per step)
    sp.unfreeze(model)
    pipe.step((ids, mask), y)
    assert sum(e.kind == "backward" for e in pipe.timeline.events) == 4 * len(balance)


def test_no_backward_runs_on_a_frozen_prefix_in_the_pipeline():
    ids, mask, y = _batch()
    model = _model()
    with sp.BackwardCounter(model) as unfrozen:
        F.cross_entropy(model(ids, mask), y).backward()
    assert all(c > 0 for c in unfrozen.counts)  # the counter sees every block's backward
    sp.freeze(model, 3)
    pipe = mplib.Pipeline(mplib.split(model, ["cpu", "cpu"], [3, 3]), chunks=4, schedule="1f1b",
                          loss_fn=F.cross_entropy)
    with sp.BackwardCounter(model) as counter:
        pipe.step((ids, mask), y)
    assert counter.counts[:3] == [0, 0, 0]
    assert all(c > 0 for c in counter.counts[3:])
    # the first trainable block skips its input's gradient: fewer nodes than the same layer unfrozen
    assert counter.counts[3] < 4 * unfrozen.counts[3]
    assert sp.frozen_blocks(model) == 3


def test_freeze_rejects_more_blocks_than_the_model_has():
    with pytest.raises(ValueError, match=r"cannot freeze 7 blocks: the model has 6 .* from 0 to 6"):
        sp.freeze(_model(), 7)
    with pytest.raises(ValueError, match="cannot freeze -1"):
        sp.frozen_costs(BlockCosts(forward=[1.0], backward=[2.0]), -1)


def test_frozen_costs_drop_the_prefix_backward_and_halve_the_first_trainable_one():
    costs = BlockCosts(forward=[1.0] * 6, backward=[2.0] * 6, param_bytes=[10] * 6, optimizer_bytes=[20] * 6,
                       activation_bytes=[5] * 6, boundary_bytes=[3] * 6)
    f = sp.frozen_costs(costs, 2)
    assert f.forward == costs.forward
    assert f.backward == [0.0, 0.0, 1.0, 2.0, 2.0, 2.0]
    assert f.param_bytes == [10] * 6  # frozen weights still sit on their device
    assert f.grad_bytes == [0, 0, 10, 10, 10, 10] and f.optimizer_bytes == [0, 0, 20, 20, 20, 20]
    assert f.activation_bytes == [0, 0, 5, 5, 5, 5]


def test_replan_gives_the_lighter_frozen_stages_more_blocks():
    costs = BlockCosts(forward=[1.0] * 8, backward=[2.0] * 8)
    before = mplib.partition.optimal(costs, devices=2, chunks=4)
    after = sp.replan(costs, 4, devices=2, chunks=4)
    assert before.balance == [4, 4]
    assert after.balance[0] > 4  # forward-only blocks are cheap: stage 0 takes more of them
    assert after.step_time < before.step_time
    # the plan is optimal for the frozen costs: no balance does better (exhaustive over 7 cuts)
    frozen = sp.frozen_costs(costs, 4)
    best = min(mplib.partition.evaluate(frozen, [k, 8 - k], devices=2, chunks=4).step_time for k in range(1, 8))
    assert after.step_time == pytest.approx(best)


def test_freeze_schedule_freezes_block_after_block_like_freezeout():
    s = sp.FreezeSchedule.linear(blocks=6, steps=100, start=0.5)
    assert s.milestones == [(50, 1), (60, 2), (70, 3), (80, 4), (90, 5)]
    assert [s.frozen(t) for t in (0, 49, 50, 75, 99)] == [0, 0, 1, 3, 5]
    assert list(s.phases(100))[:2] == [(0, 50, 0), (50, 60, 1)]
    with pytest.raises(ValueError, match="must not decrease"):
        sp.FreezeSchedule([(10, 3), (20, 1)])


def test_replan_phases_gives_each_freezing_phase_its_own_optimal_plan():
    costs = BlockCosts(forward=[1.0] * 8, backward=[2.0] * 8)
    schedule = sp.FreezeSchedule.linear(blocks=8, steps=100, start=0.5, last=6)
    phases = sp.replan_phases(schedule, costs, 100, devices=2, chunks=4)
    assert [(a, b, n) for a, b, n, _ in phases] == list(schedule.phases(100))
    assert phases[0][3].balance == [4, 4] and phases[-1][2] == 6
    for _, _, n, plan in phases:
        assert plan.balance == sp.replan(costs, n, devices=2, chunks=4).balance
    assert phases[-1][3].balance[0] > 4 and phases[-1][3].step_time < phases[0][3].step_time


# -- checkpointing and offload -------------------------------------------------------------------

def _step(model, ids, mask, y):
    F.cross_entropy(model(ids, mask), y).backward()


def test_checkpointing_gives_equal_grads_and_saves_what_the_estimate_predicts():
    ids, mask, y = _batch()
    plain = _model()
    ckpt = copy.deepcopy(plain)
    assert sp.checkpoint(ckpt) == ["layers.0", "layers.1", "layers.2", "layers.3"]
    assert list(ckpt.state_dict()) == list(plain.state_dict())  # keys unchanged
    _step(plain, ids, mask, y)
    _step(ckpt, ids, mask, y)
    _assert_same_grads(ckpt, plain)
    counted = mplib.memory.measure_activations(plain, ids) - mplib.memory.measure_activations(ckpt, ids)
    predicted = mplib.memory.estimate(plain, B, T).activations - sp.estimate(plain, B, T, checkpoint=True).device.activations
    assert counted > 0 and predicted > 0
    assert abs(counted - predicted) <= 0.05 * predicted
    sp.uncheckpoint(ckpt)
    assert isinstance(ckpt.layers[0].attn, SelfAttention)


def test_activation_offload_gives_equal_grads_and_moves_what_the_estimate_predicts():
    ids, mask, y = _batch()
    plain = _model()
    off = copy.deepcopy(plain)
    with SavedBytes(exclude=plain) as saved:
        loss = F.cross_entropy(plain(ids), y)
    loss.backward()
    with sp.OffloadActivations(exclude=off) as moved:
        loss = F.cross_entropy(off(ids), y)
    loss.backward()
    _assert_same_grads(off, plain)
    est = sp.estimate(plain, B, T, offload_activations=True)
    predicted = mplib.memory.estimate(plain, B, T).activations - est.device.activations
    counted = saved.bytes - moved.device_bytes
    assert counted > 0 and moved.host_bytes > 0
    assert abs(counted - predicted) <= 0.05 * predicted
    assert abs(moved.host_bytes - est.host) <= 0.05 * est.host


def test_offloaded_optimizer_equals_adamw_and_keeps_its_states_on_the_host():
    ids, mask, y = _batch()
    ref, model = _model(), None
    model = copy.deepcopy(ref)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    opt = sp.OffloadedOptimizer(model.parameters(), torch.optim.AdamW, lr=1e-2)
    for _ in range(3):
        for m, o in ((ref, opt_ref), (model, opt)):
            o.zero_grad()
            _step(m, ids, mask, y)
            o.step()
    for (name, a), b in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, msg=name)
    assert all(master is not p for master, p in zip(opt.master, model.parameters()))
    est = sp.estimate(ref, B, T, optimizer="adamw", offload_optimizer=True)
    assert est.device.optimizer == 0
    counted = opt.state_bytes() + opt.master_bytes()  # Adam's step counters are 4 bytes each, on top
    assert abs(counted - est.host) <= 0.05 * est.host


def test_estimate_with_a_frozen_prefix_matches_a_measured_frozen_step():
    ids, mask, y = _batch()
    model = _model()
    sp.freeze(model, 3)
    real = mplib.memory.measure(model, ids, optimizer="adam")
    est = sp.estimate(model, B, T, optimizer="adam", frozen=3).device
    assert real.activations > 0
    assert abs(est.activations - real.activations) <= 0.05 * real.activations
    assert est.grads == real.grads
    assert abs(est.optimizer - real.optimizer) <= 0.05 * real.optimizer


# -- decomposition, distillation, pruning ---------------------------------------------------------

def test_low_rank_at_full_rank_equals_the_layer():
    layer = nn.Linear(24, 16)
    x = torch.randn(5, 24)
    low = sp.factorize(layer, rank=16)
    # the SVD is taken in float64, so the product is the weight to float32 rounding
    torch.testing.assert_close(low(x), layer(x))
    assert low.rank == 16


def test_rank_chosen_by_kept_energy():
    layer = nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.diag(torch.tensor([4.0, 2.0, 1.0, 1.0])))  # energies 16, 4, 1, 1 of 22
    assert sp.rank_for_energy(torch.tensor([4.0, 2.0, 1.0, 1.0]), 16 / 22) == 1
    assert sp.factorize(layer, energy=0.9).rank == 2  # 20/22 = 0.909
    assert sp.factorize(layer, energy=0.95).rank == 3  # 21/22 = 0.955


def test_factorize_rejects_a_rank_above_the_layer_size():
    with pytest.raises(ValueError, match=r"rank 17 is not possible for a 16 x 24 weight: its rank is at most"):
        sp.factorize(nn.Linear(24, 16), rank=17)


def test_distillation_loss_and_its_gradient_match_a_hand_computation():
    torch.manual_seed(3)
    s = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randn(6, 5, dtype=torch.float64)
    y = torch.tensor([0, 4, 2, -100, 1, 3])  # one unlabelled example
    Temp, alpha = 3.0, 0.7
    loss = sp.distillation_loss(s, t, y, temperature=Temp, alpha=alpha)
    loss.backward()
    # by hand: soft = T^2 / N sum_i sum_c p_t log(p_t / p_s) at temperature T; hard = mean CE over labelled rows
    pt, ps = (t / Temp).softmax(-1), (s.detach() / Temp).softmax(-1)
    soft = Temp**2 * (pt * (pt.log() - ps.log())).sum() / 6
    lab = y != -100
    p = s.detach().softmax(-1)
    hard = -p.log()[lab.nonzero()[:, 0], y[lab]].mean()
    torch.testing.assert_close(loss.detach(), alpha * soft + (1 - alpha) * hard)
    onehot = F.one_hot(y.clamp(min=0), 5).double() * lab[:, None]
    grad = alpha * Temp * (ps - pt) / 6 + (1 - alpha) * (p - onehot) * lab[:, None] / lab.sum()
    torch.testing.assert_close(s.grad, grad)


def test_distillation_rejects_mismatched_vocabularies():
    with pytest.raises(ValueError, match="the student predicts 5 classes .* but the teacher 7"):
        sp.distillation_loss(torch.randn(2, 5), torch.randn(2, 7), torch.tensor([0, 1]))
    teacher = _model()
    other = BertClassifier(BERTConfig(**{**vars(CFG), "vocab_size": 80}), num_labels=4)
    with pytest.raises(ValueError, match="vocabulary of 80 tokens but the teacher 96"):
        sp.distill_model(teacher, other, [], steps=1)


def test_half_depth_student_keeps_every_other_layer_of_the_teacher():
    teacher = _model()
    student = sp.half_depth_student(teacher)
    assert len(student.layers) == 2 and student.config.n_layer == 2 and teacher.config.n_layer == 4
    for mine, theirs in zip(student.layers, [teacher.layers[0], teacher.layers[2]]):
        for a, b in zip(mine.parameters(), theirs.parameters()):
            assert torch.equal(a, b) and a is not b
    torch.testing.assert_close(student.head.classifier.weight, teacher.head.classifier.weight)


def test_distillation_moves_the_student_towards_the_teacher():
    ids, mask, y = _batch()
    teacher = _model().eval()
    with torch.no_grad():
        teacher.head.classifier.weight.mul_(300)  # a confident teacher: its distribution is far from uniform
    student = sp.half_depth_student(teacher)
    with torch.no_grad():
        student.head.classifier.weight.normal_(std=0.02)  # a fresh head: the student has to learn the teacher's
        before = F.kl_div(student(ids, mask).log_softmax(-1), teacher(ids, mask).log_softmax(-1), log_target=True,
                          reduction="batchmean")
    sp.distill_model(teacher, student, [(ids, mask, torch.full_like(y, -100))], steps=30, lr=3e-3, alpha=1.0)
    with torch.no_grad():
        after = F.kl_div(student(ids, mask).log_softmax(-1), teacher(ids, mask).log_softmax(-1), log_target=True,
                         reduction="batchmean")
    assert after < 0.5 * before


def test_magnitude_pruning_zeroes_exactly_the_smallest_weights():
    model = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 6))
    weights = [model[0].weight.detach().clone(), model[2].weight.detach().clone()]
    shares = sp.magnitude_prune(model, 0.25)
    assert shares == {"0": 0.25, "2": 0.25}
    for w, lin in zip(weights, (model[0], model[2])):
        k = round(0.25 * w.numel())
        smallest = w.abs().flatten().argsort()[:k]  # by hand: the k entries of least magnitude
        expect = w.flatten().clone()
        expect[smallest] = 0
        assert torch.equal(lin.weight.flatten(), expect)
    model = nn.Sequential(nn.Linear(10, 8), nn.Linear(8, 6))
    shares = sp.magnitude_prune(model, 0.5, global_=True)
    zeros = sum((m.weight == 0).sum().item() for m in model)
    assert zeros == round(0.5 * (80 + 48))  # global: the share over both layers, not each


def test_pruning_heads_equals_masking_their_output():
    ids, mask, _ = _batch()
    model = _model().eval()
    masked = copy.deepcopy(model)
    hs = CFG.n_embd // CFG.n_head
    with torch.no_grad():  # by hand: a head whose output columns of proj are zero contributes nothing
        for i, heads in {0: [1, 3], 2: [0]}.items():
            for h in heads:
                masked.layers[i].attn.proj.weight[:, h * hs:(h + 1) * hs] = 0
    kept = sp.prune_heads(model, {0: [1, 3], 2: [0]})
    assert kept == {0: [0, 2], 2: [1, 2, 3]}
    assert model.layers[0].attn.query.out_features == 2 * hs
    with torch.no_grad():
        torch.testing.assert_close(model(ids, mask), masked(ids, mask))
    with pytest.raises(ValueError, match="without a head"):
        sp.prune_heads(model, {1: [0, 1, 2, 3]})


# -- reduced bit widths ---------------------------------------------------------------------------

def _relative(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("dtype, tol", [("bf16", 3e-2), ("fp16", 4e-3)])
def test_mixed_precision_grads_are_within_the_formats_rounding_of_fp32(dtype, tol):
    # bf16 keeps 8 significant bits (unit roundoff 2^-9 ~ 2e-3), fp16 11 (2^-12 ~ 2.4e-4); a gradient passes through
    # ~20 rounded ops, so its relative error is a few tens of roundoffs at most: 3e-2 and 4e-3
    ids, mask, y = _batch()
    ref = _model()
    model = copy.deepcopy(ref)
    _step(ref, ids, mask, y)
    amp = sp.MixedPrecision(dtype)
    with amp.autocast():
        loss = F.cross_entropy(model(ids, mask), y)
    amp.backward(loss)
    scale = amp.scaler.get_scale() if dtype == "fp16" else 1.0
    assert (scale == 2.0**16) == (dtype == "fp16")  # fp16 scales the loss, bf16 needs no scaling
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32
    # over the whole gradient: some entries are 0 in exact arithmetic (a key bias cancels in the softmax)
    grad = torch.cat([p.grad.flatten() for p in model.parameters()]) / scale
    assert _relative(grad, torch.cat([q.grad.flatten() for q in ref.parameters()])) < tol


def test_fp16_loss_scaling_keeps_gradients_that_would_underflow():
    # 1e-8 is below fp16's smallest subnormal (6e-8): unscaled, the gradient of the logits flushes to zero
    torch.manual_seed(0)
    lin = nn.Linear(16, 4)
    x = torch.randn(8, 16)
    grads = {}
    for scale in (1.0, 2.0**16):
        lin.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = lin(x).float().sum() * 1e-8
        (loss * scale).backward()
        grads[scale] = lin.weight.grad.clone() / scale
    assert grads[1.0].abs().max() == 0  # underflowed in the fp16 matmul's backward
    xh = x.half().float()
    expect = torch.ones(4, 1) * xh.sum(0) * 1e-8  # d loss / dW = 1e-8 * sum of the fp16 inputs
    # two fp16 roundings (unit roundoff u = 2^-11): the scaled upstream gradient 1e-8 * 2^16, each term's
    # share, and the matmul's result, at most |result| <= sum |terms|; fp32 accumulation adds ~8 * 2^-24
    bound = 2.1 * 2.0**-11 * 1e-8 * xh.abs().sum(0)
    assert (grads[2.0**16] != 0).all()
    assert ((grads[2.0**16] - expect).abs() <= bound).all()


def test_int8_dynamic_quantization_is_within_two_percent_of_fp32():
    ids, mask, _ = _batch()
    model = _model().eval()
    q = sp.quantize_dynamic(model)
    with torch.no_grad():
        ref, out = model(ids, mask), q(ids, mask)
    # int8 rounds each weight and activation to 1/255 of its range: ~0.4% per matmul, a few matmuls deep
    assert 0 < _relative(out, ref) < 0.02
    assert sp.model_bytes(q) < 0.6 * sp.model_bytes(model)  # Linear weights 4x smaller; embeddings stay fp32


def test_weight_only_int8_and_int4_equal_the_hand_dequantized_weights():
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    x = torch.randn(5, 64)
    w = lin.weight.detach()
    # by hand, int8: symmetric per output channel
    scale = w.abs().amax(1, keepdim=True) / 127
    w8 = torch.round(w / scale).clamp(-127, 127) * scale
    torch.testing.assert_close(sp.Int8WeightLinear(lin)(x), F.linear(x, w8, lin.bias), rtol=1e-4, atol=1e-5)
    # by hand, int4: groups of 32 along the input, 16 levels from the group's min to its max
    g = w.reshape(32, 2, 32)
    low, step = g.amin(-1, keepdim=True), (g.amax(-1, keepdim=True) - g.amin(-1, keepdim=True)) / 15
    w4 = (torch.round((g - low) / step) * step + low).reshape(32, 64)
    torch.testing.assert_close(sp.Int4WeightLinear(lin, 32)(x), F.linear(x, w4, lin.bias), rtol=1e-3, atol=1e-4)
    # and the error is what the bit width allows: int4's step is 15x coarser per group than the range/255 of int8
    assert _relative(F.linear(x, w8), F.linear(x, w)) < 0.01 < _relative(F.linear(x, w4), F.linear(x, w)) < 0.1


def test_quantizing_on_a_backend_without_int8_kernels_is_refused(monkeypatch):
    with pytest.raises(RuntimeError, match="no int8 kernels for quantized engine 'none'"):
        sp.quantize_dynamic(_model(), engine="none")
    monkeypatch.setattr(sp.precision, "int8_engines", lambda: [])
    with pytest.raises(RuntimeError, match="no int8 kernels .* it has none"):
        sp.quantize_dynamic(_model())


# -- harness -------------------------------------------------------------------------------------

def test_harness_times_side_by_side_and_reports_against_the_baseline():
    calls = []
    h = sp.Harness(repeats=3, warmup=1)
    h.training("base", lambda: calls.append("base"), memory=1000, quality=0.8)
    h.training("half", lambda: calls.append("half"), memory=500, quality=0.7, baseline="base")
    results = h.run()
    assert calls == ["base", "half"] * 4  # warm-up round, then 3 rounds, each running both in turn
    assert [r.memory_ratio for r in results] == [1.0, 0.5]
    assert results[0].speedup == 1.0
    text = sp.table(results)
    assert "half" in text and "-0.100" in text
    unmeasured = sp.Result("int8", "inference", 0.004, 250, float("nan"), "base", speedup=2.0, memory_ratio=0.25)
    assert sp.table(results + [unmeasured]).splitlines()[-1].split()[-2:] == ["-", "-"]  # no "nan"
    with pytest.raises(ValueError, match="baseline 'nope' is not registered"):
        h.training("x", lambda: None, memory=1, quality=0.0, baseline="nope")
    with pytest.raises(ValueError, match="must be a positive count"):
        h.training("y", lambda: None, memory=0, quality=0.0)
