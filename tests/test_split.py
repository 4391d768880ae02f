"""mplib.split: a SplitModel equals the unsplit model in outputs, gradients and state_dict."""

import copy
import importlib
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel

from mplib.split import SplitModel, split

GPT2_TINY = dict(vocab_size=64, n_positions=16, n_embd=16, n_layer=3, n_head=2, bos_token_id=0, eos_token_id=0,
                 resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # no dropout: train-mode runs compare exactly
BERT_TINY = dict(vocab_size=64, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32,
                 max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
CPU3 = ["cpu"] * 3


def ids_and_mask():
    ids = torch.randint(0, 64, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, :3] = 0
    return ids, mask


def logits_of(out):
    return out.logits if hasattr(out, "logits") else out


def assert_same_outputs_and_grads(model, *args, devices=CPU3, balance=None, **kwargs):
    """Split `model`, run both with a weighted-sum loss, compare outputs and every parameter's grad."""
    ref = copy.deepcopy(model)
    sm = split(model, devices, balance)
    out, ref_out = logits_of(sm(*args, **kwargs)), logits_of(ref(*args, **kwargs))  # an HF split returns its ModelOutput
    torch.testing.assert_close(out, ref_out)
    weights = torch.randn_like(ref_out)
    (out * weights).sum().backward()
    (ref_out * weights).sum().backward()
    mine = sm.state_dict(keep_vars=True)
    for name, p in ref.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name  # a zero grad would compare vacuously
        torch.testing.assert_close(mine[name].grad, p.grad, msg=lambda m: f"{name}: {m}")
    return sm, ref


def test_hf_gpt2_split_over_three_devices_matches_outputs_and_grads():
    ids, mask = ids_and_mask()
    sm, _ = assert_same_outputs_and_grads(GPT2LMHeadModel(GPT2Config(**GPT2_TINY)), ids, attention_mask=mask)
    assert sm.balance == [2, 2, 1]


def test_hf_bert_split_over_three_devices_matches_outputs_and_grads():
    ids, mask = ids_and_mask()
    assert_same_outputs_and_grads(BertForMaskedLM(BertConfig(**BERT_TINY)), ids, attention_mask=mask,
                                  balance=[1, 2, 2])


def test_sequential_split_with_a_given_balance_matches():
    seq = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    sm, _ = assert_same_outputs_and_grads(seq, torch.randn(5, 4), balance=[1, 3, 1])
    assert [len(s.blocks) for s in sm.stages] == [1, 3, 1]


def _mplib_model(module: str, name: str, preset: str):
    try:
        mod = importlib.import_module(f"mplib.models.{module}")
    except ImportError:
        pytest.skip(f"mplib.models.{module} is not written yet")
    return getattr(mod, name)(getattr(mod, preset))


def test_mplib_gpt_split_over_three_devices_matches_outputs_and_grads():
    model = _mplib_model("gpt", "GPT", "GPT_TINY")
    model.eval()  # dropout off, whatever the preset says
    ids = torch.randint(0, model.config.vocab_size, (2, 8))
    assert_same_outputs_and_grads(model, ids)


def test_mplib_bert_split_over_three_devices_matches_outputs_and_grads_with_padding():
    model = _mplib_model("bert", "BERT", "BERT_TINY")
    model.eval()
    ids, mask = ids_and_mask()  # ids below 64 fit any vocabulary; the mask pads row 1
    assert_same_outputs_and_grads(model, ids, mask)


def test_tied_weight_stays_one_parameter_that_sums_both_uses():
    model = GPT2LMHeadModel(GPT2Config(**GPT2_TINY))
    ref = copy.deepcopy(model)
    sm = split(model, CPU3)
    assert len(list(sm.parameters())) == len(list(ref.parameters()))
    assert sum(p.numel() for p in sm.parameters()) == sum(p.numel() for p in ref.parameters())
    state = sm.state_dict(keep_vars=True)
    assert state["lm_head.weight"] is state["transformer.wte.weight"]
    assert "lm_head.weight" not in dict(sm.stages[2].named_parameters(prefix="", remove_duplicate=False))


def test_state_dict_has_the_unsplit_keys_and_round_trips_exactly():
    model = GPT2LMHeadModel(GPT2Config(**GPT2_TINY))
    fresh = GPT2LMHeadModel(GPT2Config(**GPT2_TINY))  # other random weights
    keys = list(model.state_dict())
    sm = split(model, CPU3)
    assert list(sm.state_dict()) == keys
    fresh.load_state_dict(sm.state_dict())
    other = split(GPT2LMHeadModel(GPT2Config(**GPT2_TINY)), CPU3, balance=[1, 1, 3])
    other.load_state_dict(fresh.state_dict())
    for key, value in sm.state_dict().items():
        torch.testing.assert_close(other.state_dict()[key], value, rtol=0, atol=0)  # exact copies


def test_load_state_dict_names_missing_keys_in_the_unsplit_vocabulary():
    sm = split(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), ["cpu", "cpu"])
    with pytest.raises(RuntimeError, match=r"missing \['1.weight', '1.bias'\]"):
        sm.load_state_dict({"0.weight": torch.zeros(2, 2), "0.bias": torch.zeros(2)})


def test_hf_gpt2_trained_split_saves_with_save_pretrained_and_reloads_equal(tmp_path):
    sm = split(GPT2LMHeadModel(GPT2Config(**GPT2_TINY)), CPU3)
    before = {k: v.clone() for k, v in sm.state_dict().items()}
    opt = torch.optim.SGD(sm.parameters(), lr=0.1)
    ids = torch.randint(0, 64, (2, 8))
    nn.functional.cross_entropy(sm(ids).logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    opt.step()
    assert not torch.equal(before["lm_head.weight"], sm.state_dict()["lm_head.weight"])  # it trained
    single = GPT2LMHeadModel(GPT2Config(**GPT2_TINY))
    single.load_state_dict(sm.state_dict())
    single.save_pretrained(tmp_path)
    reloaded = GPT2LMHeadModel.from_pretrained(tmp_path)
    assert reloaded.lm_head.weight is reloaded.transformer.wte.weight
    for key, value in sm.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[key], value, rtol=0, atol=0)


def test_stages_hold_their_blocks_on_their_devices():
    seq = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    sm = split(seq, ["cpu", "meta"])  # meta: a second device that exists everywhere
    assert seq[0].weight.device.type == "cpu" and seq[1].weight.device.type == "meta"
    assert sm(torch.randn(1, 2)).device.type == "meta"


def test_default_balance_is_uniform_with_the_extra_blocks_first():
    seq = nn.Sequential(*[nn.Identity() for _ in range(7)])
    assert split(seq, CPU3).balance == [3, 2, 2]
    partition = pytest.importorskip("mplib.partition")
    assert split(seq, CPU3).balance == partition.uniform(7, 3)  # the fix our errors suggest


def test_balance_accepts_a_plan_object():
    seq = nn.Sequential(*[nn.Identity() for _ in range(4)])
    assert split(seq, ["cpu", "cpu"], SimpleNamespace(balance=[3, 1])).balance == [3, 1]


def test_plan_prints_blocks_params_devices_and_borrowed_weights():
    sm = split(GPT2LMHeadModel(GPT2Config(**GPT2_TINY)), CPU3)
    text = str(sm.plan)
    assert "embed, h.0" in text and "h.1, h.2" in text and "head.lm_head.weight from stage 0" in text
    assert sum(sm.plan.params) == sum(p.numel() for p in sm.parameters())


def test_timeline_records_forward_copies_and_backward_of_every_stage():
    sm = split(nn.Sequential(*[nn.Linear(8, 8) for _ in range(3)]), CPU3)
    with sm.timeline() as tl:
        sm(torch.randn(4, 8)).sum().backward()
    kinds = [(e.kind, e.stage) for e in tl.events]
    assert kinds == [("forward", 0), ("copy", 1), ("forward", 1), ("copy", 2), ("forward", 2),
                     ("backward", 2), ("backward", 1), ("backward", 0)]
    starts = [e.start for e in tl.events]
    assert starts == sorted(starts)  # one stage at a time
    assert 0 < sum(tl.utilization()) <= 1 + 1e-9  # never two stages busy at once


def test_record_true_keeps_the_timeline_of_the_last_forward():
    sm = split(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), ["cpu", "cpu"], record=True)
    sm(torch.randn(1, 2))
    first = sm.last_timeline
    sm(torch.randn(1, 2))
    assert sm.last_timeline is not first and len(sm.last_timeline.events) == 3


# Every bad input is refused before any weight moves: weights stay on the CPU, ties stay registered.
def _untouched(model):
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert "weight" in model.lm_head._parameters


@pytest.mark.parametrize("devices, balance, error, match", [
    (["meta"] * 6, None, ValueError, r"6 devices means 6 stages, but the model has only 5 blocks"),
    (["meta"] * 2, [2, 2], ValueError, r"balance \[2, 2\] sums to 4 but the model has 5 blocks; "
                                       r"use mplib.partition.uniform\(5, 2\)"),
    (["meta"] * 2, [5, 0], ValueError, r"balance \[5, 0\] has an entry below 1"),
    (["meta"] * 2, [1, -1, 5], ValueError, r"has 3 stages but there are 2 devices"),
    (["meta"] * 2, [2.5, 2.5], TypeError, r"balance must be a list of ints"),
    (["meta", "gpu0"], None, ValueError, r"unknown device 'gpu0'"),
    (["meta", "cuda:7"], None, ValueError, r"'cuda:7' is not on this machine"),
    ("meta", None, TypeError, r"devices must be a list of devices"),
])
def test_split_rejects_bad_input_before_moving_weights(devices, balance, error, match):
    model = GPT2LMHeadModel(GPT2Config(**GPT2_TINY))
    with pytest.raises(error, match=match):
        split(model, devices, balance)
    _untouched(model)


def test_split_of_an_unsupported_model_is_a_type_error():
    with pytest.raises(TypeError, match="list of modules"):
        split(nn.Linear(2, 2), CPU3)


def test_split_returns_a_split_model_module():
    sm = split([nn.Linear(2, 2), nn.Linear(2, 2)], ["cpu", "cpu"])
    assert isinstance(sm, SplitModel) and isinstance(sm, nn.Module)
    assert list(sm.state_dict()) == ["0.weight", "0.bias", "1.weight", "1.bias"]


def test_stages_chained_by_hand_equal_the_split_model():
    sm = split(GPT2LMHeadModel(GPT2Config(**GPT2_TINY)), CPU3)
    ids, mask = ids_and_mask()
    x = sm.stages[0](ids, attention_mask=mask)  # stage 0 takes the model's inputs
    for stage in sm.stages[1:]:
        x = stage(x)  # later stages take one value: here (hidden, mask)
    torch.testing.assert_close(x, sm(ids, attention_mask=mask).logits)  # the chain of stages returns the logits


def test_a_deep_copy_of_a_split_model_keeps_one_tied_weight_and_its_outputs():
    sm = split(GPT2LMHeadModel(GPT2Config(**GPT2_TINY)), CPU3)
    twin = copy.deepcopy(sm)
    ids, _ = ids_and_mask()
    torch.testing.assert_close(twin(ids).logits, sm(ids).logits)
    state = twin.state_dict(keep_vars=True)
    assert state["lm_head.weight"] is state["transformer.wte.weight"]
    assert state["lm_head.weight"] is not sm.state_dict(keep_vars=True)["lm_head.weight"]


def test_a_split_model_inside_another_module_saves_and_loads_prefixed_unsplit_keys():
    plain = nn.ModuleDict({"net": nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))})
    outer = nn.ModuleDict({"net": split(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), ["cpu", "cpu"])})
    assert list(outer.state_dict()) == list(plain.state_dict())
    outer.load_state_dict(plain.state_dict())  # strict: every key found through the load hook
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(outer.state_dict()[key], value, rtol=0, atol=0)


class ReturnsAnObject(nn.Module):
    def forward(self, x):
        return x, object()  # a value no device can hold


def test_a_non_tensor_crossing_a_cut_is_a_type_error_naming_the_cut_and_the_fix():
    sm = split([nn.Linear(2, 2), ReturnsAnObject(), nn.Identity()], ["cpu", "cpu"], balance=[2, 1])
    with pytest.raises(TypeError, match=r"cut between stage 0 \(ending with block '1'\) and stage 1.*"
                                        r"cannot move a object at the output of stage 0\[1\].*balance="):
        sm(torch.randn(1, 2))


def test_mplib_gpt_tied_head_stays_one_parameter_across_stages():
    model = _mplib_model("gpt", "GPT", "GPT_TINY")
    n = sum(p.numel() for p in model.parameters())
    sm = split(model, CPU3)
    assert sum(p.numel() for p in sm.parameters()) == n
    state = sm.state_dict(keep_vars=True)
    assert state["head.lm_head.weight"] is state["embed.wte.weight"]
    assert "from stage 0" in str(sm.plan)


def test_hf_bert_trained_split_saves_with_save_pretrained_and_reloads_equal(tmp_path):
    sm = split(BertForMaskedLM(BertConfig(**BERT_TINY)), CPU3, balance=[2, 2, 1])
    ids, mask = ids_and_mask()
    logits = sm(ids, attention_mask=mask).logits
    nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()
    torch.optim.SGD(sm.parameters(), lr=0.1).step()
    single = BertForMaskedLM(BertConfig(**BERT_TINY))
    single.load_state_dict(sm.state_dict())
    single.save_pretrained(tmp_path)
    reloaded = BertForMaskedLM.from_pretrained(tmp_path).eval()
    for key, value in sm.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[key], value, rtol=0, atol=0)
    # the reloaded model computes what the trained split computes (dropout is 0 in BERT_TINY)
    torch.testing.assert_close(reloaded(ids, attention_mask=mask).logits, sm(ids, attention_mask=mask).logits)


@pytest.mark.parametrize("ctor, config, n_devices", [
    (GPT2LMHeadModel, GPT2Config(**GPT2_TINY), 1), (GPT2LMHeadModel, GPT2Config(**GPT2_TINY), 3),
    (BertForMaskedLM, BertConfig(**BERT_TINY), 1), (BertForMaskedLM, BertConfig(**BERT_TINY), 3)])
def test_state_dict_keys_are_the_unsplit_ones_also_when_tied_tensors_share_a_stage(ctor, config, n_devices):
    model = ctor(config)
    keys = list(model.state_dict())
    sm = split(model, ["cpu"] * n_devices)
    assert sorted(sm.state_dict()) == sorted(keys)
    outer = nn.ModuleDict({"net": sm})
    outer.load_state_dict({f"net.{k}": v for k, v in ctor(config).state_dict().items()})  # strict


@pytest.mark.cuda
def test_split_from_cpu_onto_a_gpu_matches_the_cpu_model_in_outputs_and_grads():
    model = GPT2LMHeadModel(GPT2Config(**GPT2_TINY))
    ref = copy.deepcopy(model)
    sm = split(model, ["cpu", "cuda:0", "cuda:0"])  # a cut from host to GPU: pinned, non_blocking, copy stream
    ids, mask = ids_and_mask()
    out, ref_out = sm(ids, attention_mask=mask).logits, ref(ids, attention_mask=mask).logits
    assert out.device.type == "cuda"
    # GPU and CPU kernels sum in different orders: fp32 agreement to ~1e-5, not bit for bit
    torch.testing.assert_close(out.cpu(), ref_out, rtol=1e-4, atol=1e-5)
    weights = torch.randn_like(ref_out)
    (out * weights.cuda()).sum().backward()
    (ref_out * weights).sum().backward()
    mine = sm.state_dict(keep_vars=True)
    for name, p in ref.named_parameters():
        assert mine[name].grad is not None and mine[name].grad.device == mine[name].device, name
        torch.testing.assert_close(mine[name].grad.cpu(), p.grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
