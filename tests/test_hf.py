"""HF models split by mplib.hf answer as the unsplit model: loss, logits, grads, caches, generate, Pipeline, save.

Split over CPU stand-ins the stages run the very ops of the unsplit model, in the same order, on the
same batch, so a split is compared bitwise (torch.equal). A Pipeline runs micro-batches: the matmuls
see other shapes and the gradients are summed over micro-batches, so those compare at float32 rounding.
"""

import copy

import pytest
import torch
from transformers import (BertConfig, BertForMaskedLM, BertForSequenceClassification, BertForTokenClassification,
                          DynamicCache, GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM, MistralConfig, MistralForCausalLM, OPTConfig, OPTForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM)

from mplib.pipeline import Pipeline
from mplib.split import split

V, T = 64, 8  # vocabulary, tokens per row
GPT2 = dict(vocab_size=V, n_positions=32, n_embd=16, n_layer=3, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2)
BERT = dict(vocab_size=V, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32,
            max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3,
            pad_token_id=0)
LLAMA = dict(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=32, pad_token_id=0, bos_token_id=1, eos_token_id=2)
MODELS = {  # 3 layers each: 5 blocks (embeddings, 3 layers, head)
    "GPT2LMHeadModel": lambda: GPT2LMHeadModel(GPT2Config(**GPT2)),
    "GPT2ForSequenceClassification": lambda: GPT2ForSequenceClassification(GPT2Config(**GPT2, num_labels=3)),
    "BertForMaskedLM": lambda: BertForMaskedLM(BertConfig(**BERT)),
    "BertForSequenceClassification": lambda: BertForSequenceClassification(BertConfig(**BERT)),
    "BertForTokenClassification": lambda: BertForTokenClassification(BertConfig(**BERT)),
    "LlamaForCausalLM": lambda: LlamaForCausalLM(LlamaConfig(**LLAMA)),
    "LlamaForCausalLM-tied": lambda: LlamaForCausalLM(LlamaConfig(**LLAMA, tie_word_embeddings=True)),
    "Qwen2ForCausalLM": lambda: Qwen2ForCausalLM(Qwen2Config(**LLAMA)),
    "MistralForCausalLM": lambda: MistralForCausalLM(MistralConfig(**LLAMA)),
}
DECODERS = ["GPT2LMHeadModel", "LlamaForCausalLM", "LlamaForCausalLM-tied", "Qwen2ForCausalLM", "MistralForCausalLM"]
TIED = ["GPT2LMHeadModel", "BertForMaskedLM", "LlamaForCausalLM-tied"]


def model_of(name):
    return MODELS[name]().eval()  # no dropout in the configs; eval() also fixes HF's own train-mode paths


def hf_batch(name, b=3):
    """A padded batch with its labels: -100 on padding, so rows count different numbers of tokens."""
    ids = torch.randint(3, V, (b, T))
    mask = torch.ones_like(ids)
    for row in range(1, b):
        mask[row, T - 1 - 2 * row % (T - 2):] = 0  # rows of 8, 5, 3, ... tokens
    ids = ids.masked_fill(mask == 0, 0)
    if "Sequence" in name:
        labels = torch.arange(b) % 3
    else:
        labels = ids.masked_fill(mask == 0, -100)
        if "Token" in name:
            labels = labels.where(labels < 0, labels % 3)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def assert_grads_equal(model, ref, exact=True):
    mine = dict(model.named_parameters())
    theirs = dict(ref.named_parameters())
    assert mine.keys() == theirs.keys()
    for name, p in theirs.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name  # a zero grad would compare vacuously
        if exact:
            assert torch.equal(mine[name].grad, p.grad), name
        else:
            torch.testing.assert_close(mine[name].grad, p.grad, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("stages", [2, 3])
@pytest.mark.parametrize("name", list(MODELS))
def test_split_gives_the_same_output_class_loss_logits_and_grads(name, stages):
    model, batch = model_of(name), hf_batch(name)
    ref = copy.deepcopy(model)
    sm = split(model, ["cpu"] * stages)
    out, want = sm(**batch), ref(**batch)
    assert type(out) is type(want)
    assert torch.equal(out.loss, want.loss) and torch.equal(out.logits, want.logits)
    out.loss.backward()
    want.loss.backward()
    assert_grads_equal(sm.hf, ref)
    assert len(sm.plan.blocks) == stages and sum(sm.balance) == 5


@pytest.mark.parametrize("name", TIED)
def test_tied_weights_stay_one_parameter(name):
    model = model_of(name)
    count = sum(p.numel() for p in model.parameters())
    sm = split(model, ["cpu"] * 3)
    hf = sm.hf
    assert hf.get_output_embeddings().weight is hf.get_input_embeddings().weight
    assert sum(p.numel() for p in sm.parameters()) == count  # the head borrows it: not a second copy
    assert any("from stage 0" in b for b in sm.plan.borrowed[-1])
    before = hf.get_input_embeddings().weight.detach().clone()
    sm(**hf_batch(name)).loss.backward()
    torch.optim.SGD(sm.parameters(), lr=0.1).step()
    assert not torch.equal(hf.get_input_embeddings().weight, before)
    assert hf.get_output_embeddings().weight is hf.get_input_embeddings().weight


@pytest.mark.parametrize("name", ["GPT2LMHeadModel", "LlamaForCausalLM", "MistralForCausalLM"])
def test_use_cache_keeps_each_layer_on_its_stage_and_decodes_as_the_unsplit_model(name):
    model, batch = model_of(name), hf_batch(name)
    del batch["labels"]
    ref = copy.deepcopy(model)
    sm = split(model, ["cpu"] * 3)
    out, want = sm(**batch, use_cache=True), ref(**batch, use_cache=True)
    assert torch.equal(out.logits, want.logits)
    layer_stage = [i for i, names in enumerate(sm.plan.blocks) for n in names if n not in ("embed", "head")]
    assert len(out.cache.layers) == len(layer_stage) == 3
    for layer, stage in zip(out.cache.layers, layer_stage):
        assert layer.keys.device == sm.devices[stage] and layer.values.device == sm.devices[stage]
    for mine, theirs in zip(out.cache.layers, want.cache.layers):
        assert torch.equal(mine.keys, theirs.keys) and torch.equal(mine.values, theirs.values)
    nxt = torch.randint(3, V, (3, 1))
    mask = torch.cat([batch["attention_mask"], torch.ones(3, 1, dtype=torch.long)], 1)
    step, ref_step = sm(input_ids=nxt, attention_mask=mask, cache=out.cache), ref(
        input_ids=nxt, attention_mask=mask, cache=want.cache)
    assert torch.equal(step.logits, ref_step.logits)
    assert out.cache.get_seq_length() == T + 1 and step.cache is out.cache  # filled in place, never copied


def test_the_cache_never_crosses_a_cut(monkeypatch):
    """Only hidden states and masks travel between stages: each layer's keys and values stay where it ran."""
    import mplib.split

    sent = []
    real = mplib.split.to_device

    def spy(x, *args, **kwargs):
        mplib.split.map_tensors(x, lambda t: sent.append(t) or t)
        return real(x, *args, **kwargs)

    monkeypatch.setattr(mplib.split, "to_device", spy)
    batch = hf_batch("LlamaForCausalLM")
    del batch["labels"]
    out = split(model_of("LlamaForCausalLM"), ["cpu"] * 3)(**batch, use_cache=True)
    cached = {id(t) for layer in out.cache.layers for t in (layer.keys, layer.values)}
    assert sent and not cached & {id(t) for t in sent}
    assert any(t.shape == (3, T, 16) for t in sent)  # the hidden states did travel


@pytest.mark.cuda
def test_use_cache_on_a_gpu_and_the_cpu_keeps_each_layer_where_it_ran():
    model, batch = model_of("LlamaForCausalLM"), hf_batch("LlamaForCausalLM")
    del batch["labels"]
    ref = copy.deepcopy(model)
    sm = split(model, ["cuda", "cpu"], balance=[2, 3])  # layer 0 on the GPU, layers 1, 2 on the CPU
    out = sm(**batch, use_cache=True)
    assert [layer.keys.device.type for layer in out.cache.layers] == ["cuda", "cpu", "cpu"]
    torch.testing.assert_close(out.logits, ref(**batch).logits, rtol=1e-4, atol=1e-5)  # GPU kernels round otherwise
    prompt = batch["input_ids"][:1, :4]
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    sm.eval()
    assert torch.equal(sm.generate(prompt, **kw), ref.generate(prompt, **kw))  # the logits come back to the prompt


@pytest.mark.parametrize("name", DECODERS)
def test_generate_greedy_and_sampled_equal_the_unsplit_model(name):
    model = model_of(name)
    ref = copy.deepcopy(model)
    sm = split(model, ["cpu"] * 3)
    prompt = torch.randint(3, V, (2, 4))
    kw = dict(max_new_tokens=5, pad_token_id=0, attention_mask=torch.ones_like(prompt))
    greedy = sm.generate(prompt, do_sample=False, **kw)
    assert greedy.shape == (2, 9) and torch.equal(greedy, ref.generate(prompt, do_sample=False, **kw))
    torch.manual_seed(7)
    sampled = sm.generate(prompt, do_sample=True, top_k=0, **kw)
    torch.manual_seed(7)
    assert torch.equal(sampled, ref.generate(prompt, do_sample=True, top_k=0, **kw))
    assert "forward" not in vars(sm.hf)  # generate routed the model's forward through the stages only meanwhile


PIPELINE_CASES = ["GPT2LMHeadModel", "BertForTokenClassification", "BertForSequenceClassification",
                  "LlamaForCausalLM-tied", "Qwen2ForCausalLM"]


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("name", PIPELINE_CASES)
def test_pipeline_takes_hf_batches_and_is_exact_for_padding_and_ignored_labels(name, schedule):
    model, batch = model_of(name), hf_batch(name, b=5)  # 5 rows of 8, 5, 3, 7, 5 tokens: uneven micro-batches
    ref = copy.deepcopy(model)
    pipe = Pipeline(split(model, ["cpu"] * 2), chunks=3, schedule=schedule)  # micro-batches of 2, 2, 1 rows
    loss = pipe.step(batch)
    want = ref(**batch).loss
    want.backward()
    torch.testing.assert_close(loss, want.detach(), rtol=1e-6, atol=1e-6)
    assert_grads_equal(pipe.model.hf, ref, exact=False)


def test_pipeline_weighting_by_examples_would_be_wrong_for_a_token_mean():
    """The check above can fail: weighting micro-batches by rows gives another loss on this batch."""
    model, batch = model_of("GPT2LMHeadModel"), hf_batch("GPT2LMHeadModel", b=5)
    want = copy.deepcopy(model)(**batch).loss
    pipe = Pipeline(split(model, ["cpu"] * 2), chunks=3, items="examples")
    assert abs(pipe.step(batch).item() - want.item()) > 1e-3


@pytest.mark.parametrize("name", ["LlamaForCausalLM", "LlamaForCausalLM-tied", "BertForMaskedLM"])
def test_save_pretrained_reloads_on_one_device_exactly(name, tmp_path):
    model = model_of(name)
    ref = copy.deepcopy(model)
    sm = split(model, ["cpu"] * 3)
    sm.save_pretrained(tmp_path)
    back = type(ref).from_pretrained(tmp_path).eval()
    assert back.state_dict().keys() == ref.state_dict().keys()
    for key, value in ref.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    if name in TIED:
        assert back.get_output_embeddings().weight is back.get_input_embeddings().weight
    batch = hf_batch(name)
    assert torch.equal(back(**batch).logits, ref(**batch).logits)


def test_an_uncuttable_architecture_names_the_supported_classes_and_the_way_out():
    opt = OPTForCausalLM(OPTConfig(vocab_size=V, hidden_size=16, num_hidden_layers=2, ffn_dim=32,
                                   num_attention_heads=2, max_position_embeddings=32, word_embed_proj_dim=16))
    before = {k: v.clone() for k, v in opt.state_dict().items()}
    with pytest.raises(TypeError) as e:
        split(opt, ["cpu"] * 2)
    for words in ("OPTForCausalLM", "LlamaModel", "GPT2Model", "BertForSequenceClassification", "your own blocks",
                  "mplib.split([embed, *layers, head], devices)"):
        assert words in str(e.value), words
    assert all(torch.equal(v, before[k]) for k, v in opt.state_dict().items())
    assert not opt.model.decoder.layers[0]._forward_pre_hooks  # nothing was left behind on the model


def test_qwen2_with_mixed_attention_layers_is_refused():
    model = Qwen2ForCausalLM(Qwen2Config(**LLAMA, use_sliding_window=True, sliding_window=4, max_window_layers=1))
    with pytest.raises(TypeError, match="mix attention types"):
        split(model, ["cpu"] * 2)


def _counting_calls(sm):
    calls = []
    sm.stages[0].register_forward_pre_hook(lambda *a: calls.append(1))
    return calls


@pytest.mark.parametrize("name, shape", [("LlamaForCausalLM", (3, T - 1)), ("BertForSequenceClassification", (3, T)),
                                         ("BertForTokenClassification", (2, T))])
def test_labels_of_the_wrong_shape_are_refused_before_anything_runs(name, shape):
    sm = split(model_of(name), ["cpu"] * 2)
    calls = _counting_calls(sm)
    batch = hf_batch(name)
    batch["labels"] = torch.zeros(shape, dtype=torch.long)
    with pytest.raises(ValueError, match=r"labels of shape .* do not match"):
        sm(**batch)
    with pytest.raises(ValueError, match=r"labels of shape .* do not match"):
        Pipeline(sm, chunks=2).step(batch)
    assert calls == []


def test_a_cache_from_another_split_or_model_is_refused():
    model, batch = model_of("LlamaForCausalLM"), hf_batch("LlamaForCausalLM")
    del batch["labels"]
    other = copy.deepcopy(model)
    sm, sm2 = split(model, ["cpu"] * 2), split(other, ["cpu"] * 3)
    cache = sm2(**batch, use_cache=True).cache
    unsplit_cache = copy.deepcopy(other)(**batch, use_cache=True).cache
    calls = _counting_calls(sm)
    nxt = {"input_ids": torch.ones(3, 1, dtype=torch.long)}
    for foreign in (cache, unsplit_cache):
        with pytest.raises(ValueError, match="computed by another model or split"):
            sm(**nxt, cache=foreign)
    assert calls == []
    assert sm(**nxt, cache=DynamicCache()).logits.shape == (3, 1, V)  # an empty cache is welcome


@pytest.mark.parametrize("name", ["GPT2LMHeadModel", "LlamaForCausalLM"])
def test_generate_past_the_context_is_refused_before_anything_runs(name):
    sm = split(model_of(name), ["cpu"] * 2)
    calls = _counting_calls(sm)
    with pytest.raises(ValueError, match=r"past the 32 positions .* max_new_tokens=22"):
        sm.generate(torch.ones(1, 10, dtype=torch.long), max_new_tokens=30, pad_token_id=0)
    assert calls == []


def test_multi_label_float_labels_are_taken_as_hf_takes_them():
    model = model_of("BertForSequenceClassification")
    ref = copy.deepcopy(model)
    batch = hf_batch("BertForSequenceClassification")
    batch["labels"] = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    assert torch.equal(split(model, ["cpu"] * 2)(**batch).loss, ref(**batch).loss)  # BCE, as HF picks it


def test_pipeline_asks_for_what_it_cannot_do_with_the_models_own_loss():
    batch = hf_batch("GPT2LMHeadModel")
    with pytest.raises(ValueError, match="use loss_on='microbatch', or pass loss_fn"):
        Pipeline(split(model_of("GPT2LMHeadModel"), ["cpu"] * 2), chunks=2, loss_on="gathered").step(batch)
    with pytest.raises(ValueError, match="unknown items 'words'; use one of examples, tokens"):
        Pipeline(split(model_of("GPT2LMHeadModel"), ["cpu"] * 2), chunks=2, items="words")
