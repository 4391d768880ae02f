"""mplib.models.gpt: equal to HF GPT-2 (logits and gradients), KV cache, blocks, errors."""

import copy

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import mplib.layers
from mplib.models.gpt import GPT, GPT2_SMALL, GPT_TINY, GPTConfig, _hf_names
from mplib.train import lm_loss

TINY_HF = dict(vocab_size=GPT_TINY.vocab_size, n_positions=GPT_TINY.block_size, n_layer=GPT_TINY.n_layer,
               n_head=GPT_TINY.n_head, n_embd=GPT_TINY.n_embd, bos_token_id=None, eos_token_id=None)


def hf_tiny(**overrides) -> GPT2LMHeadModel:
    return GPT2LMHeadModel(GPT2Config(**{**TINY_HF, **overrides})).eval()


def tokens(batch: int = 2, T: int = 16, vocab: int = GPT_TINY.vocab_size) -> torch.Tensor:
    return torch.randint(vocab, (batch, T))


def test_gpt_tiny_has_pinned_parameter_count_equal_to_hf():
    # wte 512*32 + wpe 64*32 + 2 layers * 12,704 + ln_f 64; lm_head is wte, counted once
    assert GPT(GPT_TINY).num_parameters() == 43_904
    assert hf_tiny().num_parameters() == 43_904


def test_gpt2_small_preset_has_gpt2_small_parameter_count():
    with torch.device("meta"):  # 124M parameters, no storage
        model = GPT(GPT2_SMALL)
    assert model.num_parameters() == 124_439_808


def test_lm_head_is_the_token_embedding_parameter():
    model = GPT(GPT_TINY)
    assert model.head.lm_head.weight is model.embed.wte.weight
    tied = mplib.layers.blocks(model).tied
    assert tied == [[(0, "wte.weight"), (GPT_TINY.n_layer + 1, "lm_head.weight")]]


def chain(blocks: list[torch.nn.Module], x: torch.Tensor) -> torch.Tensor:
    """The blocks run one after the other by hand, as a pipeline runs them: not through `forward`."""
    for block in blocks:
        x = block(x)
    return x


def assert_grads_equal_hf(ours: GPT, hf: GPT2LMHeadModel) -> None:
    """Every parameter of `ours` has the gradient of its HF twin, which is non-zero."""
    theirs, mine = dict(hf.named_parameters()), dict(ours.named_parameters())
    names = _hf_names(GPT_TINY.n_layer)
    assert {name for name, _, _ in names} == mine.keys()  # no parameter left out of the comparison
    for name, hf_name, transposed in names:
        hf_grad = theirs[hf_name].grad.t() if transposed else theirs[hf_name].grad  # HF Conv1D is (in, out)
        assert hf_grad.abs().sum() > 0, hf_name
        torch.testing.assert_close(mine[name].grad, hf_grad, msg=name)


def test_blocks_chained_by_hand_give_hf_logits_and_grads():
    hf = hf_tiny()
    ours = GPT.from_hf(copy.deepcopy(hf)).eval()
    blocks = ours.blocks()
    assert [type(b).__name__ for b in blocks] == ["Embedding"] + ["Block"] * GPT_TINY.n_layer + ["Head"]
    x, y = tokens(), tokens()
    hf_logits, our_logits = hf(x).logits, chain(blocks, x)
    torch.testing.assert_close(our_logits, hf_logits)
    lm_loss(hf_logits, y).backward()
    lm_loss(our_logits, y).backward()
    assert_grads_equal_hf(ours, hf)


def test_from_hf_forward_gives_hf_logits_and_grads():
    hf = hf_tiny()
    ours = GPT.from_hf(copy.deepcopy(hf)).eval()
    x, y = tokens(), tokens()
    hf_logits, our_logits = hf(x).logits, ours(x)
    torch.testing.assert_close(our_logits, hf_logits)
    lm_loss(hf_logits, y).backward()
    lm_loss(our_logits, y).backward()
    assert_grads_equal_hf(ours, hf)


def test_to_hf_gives_hf_model_with_equal_logits():
    ours = GPT(GPT_TINY).eval()
    hf = ours.to_hf().eval()
    assert isinstance(hf, GPT2LMHeadModel)
    x = tokens()
    torch.testing.assert_close(hf(x).logits, ours(x))
    back = GPT.from_hf(hf).state_dict()  # and back again: the same tensors, bit for bit
    for name, value in ours.state_dict().items():
        assert torch.equal(back[name], value), name


def test_to_hf_round_trips_through_save_pretrained(tmp_path):
    ours = GPT(GPT_TINY).eval()
    ours.to_hf().save_pretrained(tmp_path)
    back = GPT.from_hf(GPT2LMHeadModel.from_pretrained(tmp_path))
    for (name, a), b in zip(ours.state_dict().items(), back.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_generate_with_kv_cache_equals_without_greedy():
    model = GPT(GPT_TINY).eval()
    prompt = tokens(2, 5)
    # 70 new tokens run past block_size (64): the window slides and the cache is refilled
    cached = model.generate(prompt, 70, temperature=0, use_cache=True)
    plain = model.generate(prompt, 70, temperature=0, use_cache=False)
    assert cached.shape == (2, 75)
    assert torch.equal(cached, plain)


def test_generate_with_kv_cache_equals_without_seeded_sampling():
    model = GPT(GPT_TINY).eval()
    prompt = tokens(3, 4)
    cached = model.generate(prompt, 30, temperature=1.0, top_k=50, generator=torch.Generator().manual_seed(7))
    plain = model.generate(prompt, 30, temperature=1.0, top_k=50, use_cache=False,
                           generator=torch.Generator().manual_seed(7))
    assert torch.equal(cached, plain)
    other = model.generate(prompt, 30, temperature=1.0, top_k=50, generator=torch.Generator().manual_seed(8))
    assert not torch.equal(cached, other)  # the seed matters, so the equality above is not vacuous


def test_forward_cached_logits_equal_full_forward():
    model = GPT(GPT_TINY).eval()
    x = tokens(2, 12)
    first, cache = model.forward_cached(x[:, :7], None)
    rest, _ = model.forward_cached(x[:, 7:], cache)  # 5 new tokens at once see 7 cached ones
    torch.testing.assert_close(torch.cat([first, rest], dim=1), model(x))


def test_one_training_step_changes_every_parameter_and_loss_is_finite():
    model = GPT(GPT_TINY)
    before = copy.deepcopy(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = tokens(), tokens()
    loss = lm_loss(model(x), y)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    for name, value in model.state_dict().items():
        assert not torch.equal(value, before[name]), f"{name} did not change"


def test_config_rejects_heads_not_dividing_width():
    with pytest.raises(ValueError, match=r"n_head 5 must divide n_embd 32.*pick n_head from \[1, 2, 4, 8"):
        GPTConfig(n_head=5, n_embd=32)


def test_forward_rejects_sequence_longer_than_context():
    model = GPT(GPT_TINY)
    with pytest.raises(ValueError, match=r"65 tokens is longer than the context of 64.*crop the input"):
        model(tokens(1, 65))


def test_load_hf_rejects_vocabulary_mismatch():
    model = GPT(GPT_TINY)
    with pytest.raises(ValueError, match=r"vocabulary mismatch: the HF weights have 600 tokens but this GPT has "
                                         r"vocab_size=512.*GPTConfig\(vocab_size=600"):
        model.load_hf_state_dict(hf_tiny(vocab_size=600).state_dict())


def test_load_hf_names_the_tensor_of_wrong_shape():
    model = GPT(GPT_TINY)
    with pytest.raises(ValueError, match=r"'transformer.wpe.weight' has shape \(128, 32\)"):
        model.load_hf_state_dict(hf_tiny(n_positions=128).state_dict())


def test_load_hf_names_a_missing_tensor():
    state = hf_tiny().state_dict()
    del state["transformer.h.1.mlp.c_fc.bias"]
    with pytest.raises(ValueError, match=r"no 'transformer.h.1.mlp.c_fc.bias'"):
        GPT(GPT_TINY).load_hf_state_dict(state)


def test_load_hf_rejects_an_untied_head():
    hf = hf_tiny(tie_word_embeddings=False)
    assert hf.lm_head.weight is not hf.transformer.wte.weight
    with pytest.raises(ValueError, match=r"'lm_head.weight' differs.*tie_word_embeddings=True"):
        GPT.from_hf(hf)


def test_from_hf_rejects_a_different_activation():
    with pytest.raises(ValueError, match=r"activation_function 'relu'.*build the HF model with the default"):
        GPT.from_hf(hf_tiny(activation_function="relu"))


def test_generate_rejects_negative_temperature():
    with pytest.raises(ValueError, match=r"temperature must be >= 0 \(0 means greedy\), got -1"):
        GPT(GPT_TINY).generate(tokens(1, 2), 3, temperature=-1)
