import copy
import dataclasses

import pytest
import torch

import mplib.layers
from mplib.models.elmo import (BOS_CHAR, BOW, ELMO_TINY, EOS_CHAR, EOW, ELMo, ELMoConfig, ScalarMix, TokenEncoder,
                               WordVocab, batch_to_ids, bilm_loss, reverse_padded, sentence_batches, tokenize)
from mplib.split import split
from mplib.train import fit

# SMALL has hidden_size > n_embd, so its LSTMs project (proj_size); torch warns that oneDNN lacks that path.
pytestmark = pytest.mark.filterwarnings("ignore:LSTM with projections:UserWarning")

SMALL = ELMoConfig(vocab_size=40, max_chars=8, char_embd=4, filters=((1, 4), (2, 4), (3, 8)), n_highway=1,
                   n_embd=8, hidden_size=12, n_layer=2)
SENTENCES = [["the", "bat", "flew", "over", "the", "barn"], ["a", "bat"]]


def _forward_backward_halves(model: ELMo, char_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    reps, _ = model.representations(char_ids)  # (B, L+1, T, 2C)
    C = model.config.n_embd
    return reps[:, 1:, :, :C], reps[:, 1:, :, C:]  # the biLSTM layers' forward and backward halves


def test_tiny_preset_has_a_pinned_parameter_count():
    # encoder: chars 261*16 + convs (16*16*1+16)+(16*16*2+16)+(32*16*3+32)+(32*16*4+32)+(32*16*5+32)
    #          + highway 128*256+256 + projection 128*64+64 = 52,496
    # biLSTM: 2 layers x 2 directions x (4*64*(64+64) + 2*4*64) = 133,120; softmax 64*512+512 = 33,280
    assert sum(p.numel() for p in ELMo(ELMO_TINY).parameters()) == 218_896


def test_batch_to_ids_marks_words_sentences_and_padding():
    ids = batch_to_ids(SENTENCES, max_chars=8)
    assert ids.shape == (2, 8, 8)  # longest sentence 6 words + <s> and </s>
    assert ids[0, 0, :3].tolist() == [BOW, BOS_CHAR, EOW] and ids[0, 7, :3].tolist() == [BOW, EOS_CHAR, EOW]
    assert ids[0, 2].tolist() == [BOW, ord("b") + 1, ord("a") + 1, ord("t") + 1, EOW, 0, 0, 0]
    assert ids[1, 4:].eq(0).all() and ids[1, :4].ne(0).any(-1).all()  # "a bat" is 4 tokens, then padding
    long = batch_to_ids([["internationalisation"]], max_chars=8)[0, 1]
    assert long[0] == BOW and long[-1] == EOW  # cut to fit, keeping the end-of-word marker


def test_forward_and_representations_have_documented_shapes():
    model = ELMo(SMALL).eval()
    ids = batch_to_ids(SENTENCES, max_chars=8)
    fwd, bwd = model(ids)
    assert fwd.shape == bwd.shape == (2, 8, 40)
    reps, mask = model.representations(ids)
    assert reps.shape == (2, 3, 8, 16)  # token layer + 2 biLSTM layers, [forward, backward] = 2C
    assert mask.tolist() == [[True] * 8, [True] * 4 + [False] * 4]
    token_fwd, token_bwd = reps[:, 0].chunk(2, dim=-1)
    torch.testing.assert_close(token_fwd, token_bwd, rtol=0, atol=0)  # both directions start from one vector


def test_token_layer_is_context_free():
    model = ELMo(SMALL).eval()
    reps, _ = model.representations(batch_to_ids([["the", "bat", "flew"], ["a", "bat", "slept"]], max_chars=8))
    torch.testing.assert_close(reps[0, 0, 2], reps[1, 0, 2], rtol=0, atol=0)  # "bat" in both: same token vector
    assert not torch.allclose(reps[0, 1, 2], reps[1, 1, 2])  # but the biLSTM layer sees the context


def test_forward_direction_sees_only_the_past_and_backward_only_the_future():
    model = ELMo(SMALL).eval()
    a = batch_to_ids([["the", "bat", "flew", "over", "the", "barn"]], max_chars=8)
    t = 3  # token position (0 is <s>): "flew"
    later = a.clone()
    later[0, t + 1:-1] = batch_to_ids([["x", "y", "z", "q", "w", "v"]], max_chars=8)[0, t + 1:-1]
    earlier = a.clone()
    earlier[0, 1:t] = batch_to_ids([["x", "y", "z", "q", "w", "v"]], max_chars=8)[0, 1:t]
    f_a, b_a = _forward_backward_halves(model, a)
    f_later, b_later = _forward_backward_halves(model, later)
    f_earlier, b_earlier = _forward_backward_halves(model, earlier)
    # Changing the future leaves the forward LSTM at <= t unchanged (exactly: it never read them) ...
    torch.testing.assert_close(f_later[..., :t + 1, :], f_a[..., :t + 1, :], rtol=0, atol=0)
    assert not torch.allclose(f_later[..., t + 1:, :], f_a[..., t + 1:, :])  # the check can fail
    assert not torch.allclose(b_later[..., t, :], b_a[..., t, :])  # while the backward LSTM sees it
    # ... and changing the past leaves the backward LSTM at >= t unchanged.
    torch.testing.assert_close(b_earlier[..., t:, :], b_a[..., t:, :], rtol=0, atol=0)
    assert not torch.allclose(b_earlier[..., :t, :], b_a[..., :t, :])
    assert not torch.allclose(f_earlier[..., t, :], f_a[..., t, :])


def test_padding_does_not_change_a_sentence_representation():
    model = ELMo(SMALL).eval()
    alone, _ = model.representations(batch_to_ids([SENTENCES[1]], max_chars=8))
    padded, _ = model.representations(batch_to_ids(SENTENCES, max_chars=8))
    # The backward LSTM reads the short sentence reversed within its own length, not the padding;
    # the two runs differ only in batch shape, so float rounding may differ slightly (default tolerance).
    torch.testing.assert_close(padded[1:, :, :4], alone)


def test_reverse_padded_reverses_within_each_length_and_is_its_own_inverse():
    x = torch.tensor([[1, 2, 3, 0], [4, 5, 6, 7]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]).bool()
    assert reverse_padded(x, mask).tolist() == [[3, 2, 1, 0], [7, 6, 5, 4]]
    torch.testing.assert_close(reverse_padded(reverse_padded(x, mask), mask), x, rtol=0, atol=0)


def test_scalar_mix_weights_sum_to_one_and_mix_the_layers():
    mix = ScalarMix(3)
    with torch.no_grad():
        mix.scalars.copy_(torch.tensor([0.5, -1.0, 2.0]))
        mix.gamma.fill_(2.0)
    torch.testing.assert_close(mix.weights.sum(), torch.tensor(1.0))
    layers = torch.randn(2, 3, 5, 4)
    w = torch.softmax(torch.tensor([0.5, -1.0, 2.0]), dim=0)
    expected = 2.0 * (w[0] * layers[:, 0] + w[1] * layers[:, 1] + w[2] * layers[:, 2])
    torch.testing.assert_close(mix(layers), expected)


def test_bilm_loss_ignores_padding_positions():
    model = ELMo(SMALL)
    vocab = WordVocab([*WordVocab.SPECIALS, "the", "bat", "flew", "over", "barn", "a"])
    fwd, bwd = model(batch_to_ids(SENTENCES, max_chars=8))
    fwd.retain_grad(), bwd.retain_grad()
    bilm_loss((fwd, bwd), vocab.encode_batch(SENTENCES)).backward()
    assert fwd.grad[1, :3].abs().sum() > 0 and bwd.grad[1, 1:4].abs().sum() > 0
    assert fwd.grad[1, 3:].eq(0).all()  # </s> at position 3 predicts nothing; padding neither
    assert bwd.grad[1, 4:].eq(0).all() and bwd.grad[:, 0].eq(0).all()  # <s> has no word before it


def test_one_training_step_lowers_the_loss_on_a_fixed_batch():
    model = ELMo(SMALL)
    vocab = WordVocab([*WordVocab.SPECIALS, "the", "bat", "flew", "over", "barn", "a"])
    batch = (batch_to_ids(SENTENCES, max_chars=8), vocab.encode_batch(SENTENCES))
    loss_fn = lambda m, b: bilm_loss(m(b[0]), b[1])  # noqa: E731
    with torch.no_grad():
        before = loss_fn(model, batch).item()
    fit(model, [batch], loss_fn, steps=1, lr=1e-2, progress=False)
    with torch.no_grad():
        after = loss_fn(model, batch).item()
    assert after < before


def test_blocks_chain_equals_forward_and_splits_over_two_devices():
    model = ELMo(dataclasses.replace(SMALL, n_layer=3)).eval()
    ids = batch_to_ids(SENTENCES, max_chars=8)
    blocks = model.blocks()
    assert len(blocks) == 5 and mplib.layers.blocks(model).names[0] == "encoder"
    x = blocks[0](ids)
    for block in blocks[1:]:
        x = block(x)
    for mine, ref in zip(x, model(ids)):
        torch.testing.assert_close(mine, ref, rtol=0, atol=0)
    split_model = split(copy.deepcopy(model), ["cpu", "cpu"], balance=[2, 3])
    for mine, ref in zip(split_model(ids), model(ids)):
        torch.testing.assert_close(mine, ref)


def test_sentence_batches_align_characters_and_words():
    vocab = WordVocab.from_text("the bat flew. the bat slept.", size=8)
    char_ids, word_ids = next(sentence_batches(["The bat flew.", "a bat slept"], vocab, batch_size=3,
                                               max_chars=8, generator=torch.Generator().manual_seed(0)))
    assert char_ids.shape[:2] == word_ids.shape and char_ids.size(0) == 3
    assert char_ids.ne(0).any(-1).eq(word_ids.ne(-100)).all()  # a word id exactly where there is a token
    assert tokenize("The bank, too.") == ["the", "bank", ",", "too", "."]


@pytest.mark.parametrize("kwargs, message", [
    ({"n_layer": 0}, "n_layer must be a positive int, got 0"),
    ({"filters": ((9, 4),), "max_chars": 8}, "filter width 9 exceeds max_chars=8"),
    ({"filters": ()}, "filters must be a non-empty list"),
    ({"hidden_size": 8, "n_embd": 16}, "hidden_size 8 must be >= n_embd 16"),
    ({"dropout": 1.0}, r"dropout is a probability in \[0, 1\)"),
    ({"n_highway": -1}, "n_highway must be an int >= 0"),
])
def test_config_rejects_bad_values_with_the_rule(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ELMoConfig(**kwargs)


def test_bad_inputs_are_rejected_with_the_fix():
    with pytest.raises(ValueError, match=r"char_ids must be \(B, T, max_chars=8\), got \(2, 5, 16\)"):
        TokenEncoder(SMALL)(batch_to_ids(["a b c", "d"], max_chars=16))
    with pytest.raises(ValueError, match="max_chars must be at least 3"):
        batch_to_ids(["a"], max_chars=2)
    with pytest.raises(ValueError, match="non-empty list of non-empty sentences"):
        batch_to_ids([[]])
    with pytest.raises(ValueError, match=r"layers must be \(B, 3, ...\)"):
        ScalarMix(3)(torch.randn(2, 4, 5, 6))
    with pytest.raises(ValueError, match="n_layers must be a positive int"):
        ScalarMix(0)
    with pytest.raises(ValueError, match="must share"):
        bilm_loss((torch.randn(1, 5, 9), torch.randn(1, 5, 9)), torch.zeros(1, 4, dtype=torch.long))
