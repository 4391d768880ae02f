"""mplib.models.bert: equal to HF BertForMaskedLM (logits and gradients), heads, blocks, errors."""

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForMaskedLM

import mplib.layers
from mplib.models.bert import (BERT, BERT_BASE, BERT_TINY, BERTConfig, BertClassifier, _hf_names, encode_batch,
                               mask_tokens)
from mplib.train import lm_loss

TINY_HF = dict(vocab_size=BERT_TINY.vocab_size, max_position_embeddings=BERT_TINY.block_size,
               num_hidden_layers=BERT_TINY.n_layer, num_attention_heads=BERT_TINY.n_head,
               hidden_size=BERT_TINY.n_embd, intermediate_size=BERT_TINY.intermediate_size)


def hf_tiny(**overrides) -> BertForMaskedLM:
    return BertForMaskedLM(BertConfig(**{**TINY_HF, **overrides})).eval()


def padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask) of 3 rows, the last two padded: padding must not change the others."""
    ids = torch.randint(5, BERT_TINY.vocab_size, (3, 12))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    mask[2, 3:] = 0
    return ids.masked_fill(mask == 0, BERT_TINY.pad_token_id), mask


def test_bert_tiny_has_pinned_parameter_count_equal_to_hf():
    # embeddings 512*64 + 32*64 + 2*64 + 128, 2 layers * 49,984, MLM head 4,160 + 128 + bias 512
    assert BERT(BERT_TINY).num_parameters() == 139_840
    assert hf_tiny().num_parameters() == 139_840


def test_bert_base_preset_has_bert_base_mlm_parameter_count():
    with torch.device("meta"):  # 110M parameters, no storage
        model = BERT(BERT_BASE)
    # HF BertForMaskedLM(BertConfig()) has no pooler: 109,514,298 = BERT-base's 110M minus the pooler
    assert model.num_parameters() == 109_514_298


def test_mlm_decoder_is_the_word_embedding_parameter():
    model = BERT(BERT_TINY)
    assert model.head.decoder.weight is model.embed.word.weight
    tied = mplib.layers.blocks(model).tied
    assert tied == [[(0, "word.weight"), (BERT_TINY.n_layer + 1, "decoder.weight")]]


def chain(blocks: list[torch.nn.Module], ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The blocks run one after the other by hand, as a pipeline runs them: not through `forward`."""
    x = blocks[0](ids, mask)
    for block in blocks[1:]:
        x = block(x)
    return x


def assert_grads_equal_hf(ours: BERT, hf: BertForMaskedLM) -> None:
    """Every parameter of `ours` has the gradient of its HF twin, which is non-zero where it is used."""
    theirs, mine = dict(hf.named_parameters()), dict(ours.named_parameters())
    names = _hf_names(BERT_TINY.n_layer)
    assert {name for name, _ in names} == mine.keys()  # no parameter left out of the comparison
    for name, hf_name in names:
        hf_grad = theirs[hf_name].grad
        if name != "embed.token_type.weight":  # only type 0 is used, row 1 stays zero, but the sum is not
            assert hf_grad.abs().sum() > 0, hf_name
        torch.testing.assert_close(mine[name].grad, hf_grad, msg=name)


def mlm_labels(mask: torch.Tensor) -> torch.Tensor:
    return torch.randint(BERT_TINY.vocab_size, mask.shape).masked_fill(mask == 0, -100)


def test_blocks_chained_by_hand_give_hf_logits_and_grads_with_padding_mask():
    hf = hf_tiny()
    ours = BERT.from_hf(copy.deepcopy(hf)).eval()
    blocks = ours.blocks()
    assert [type(b).__name__ for b in blocks] == ["Embedding"] + ["Layer"] * BERT_TINY.n_layer + ["MLMHead"]
    ids, mask = padded_batch()
    labels = mlm_labels(mask)
    hf_logits, our_logits = hf(input_ids=ids, attention_mask=mask).logits, chain(blocks, ids, mask)
    torch.testing.assert_close(our_logits, hf_logits)
    lm_loss(hf_logits, labels).backward()
    lm_loss(our_logits, labels).backward()
    assert_grads_equal_hf(ours, hf)


def test_from_hf_forward_gives_hf_logits_and_grads():
    hf = hf_tiny()
    ours = BERT.from_hf(copy.deepcopy(hf)).eval()
    ids, mask = padded_batch()
    labels = mlm_labels(mask)
    hf_logits, our_logits = hf(input_ids=ids, attention_mask=mask).logits, ours(ids, mask)
    torch.testing.assert_close(our_logits, hf_logits)
    lm_loss(hf_logits, labels).backward()
    lm_loss(our_logits, labels).backward()
    assert_grads_equal_hf(ours, hf)


def test_to_hf_gives_hf_model_with_equal_logits(tmp_path):
    ours = BERT(BERT_TINY).eval()
    ours.to_hf().save_pretrained(tmp_path)  # the local save/load path, offline
    hf = BertForMaskedLM.from_pretrained(tmp_path).eval()
    ids, mask = padded_batch()
    torch.testing.assert_close(hf(input_ids=ids, attention_mask=mask).logits, ours(ids, mask))


def test_padding_does_not_change_the_other_tokens():
    model = BERT(BERT_TINY).eval()
    ids, mask = padded_batch()
    short = model(ids[2:, :3])  # row 2 without its padding
    torch.testing.assert_close(model(ids, mask)[2:, :3], short)


def test_classifier_from_pretrained_copies_the_encoder_not_shares_it():
    bert = BERT(BERT_TINY)
    clf = BertClassifier.from_pretrained(bert, num_labels=4)
    ids, mask = padded_batch()
    assert clf(ids, mask).shape == (3, 4)
    encoder = {name: value for name, value in bert.state_dict().items() if not name.startswith("head.")}
    assert encoder.keys() < clf.state_dict().keys()
    for name, value in encoder.items():  # the embedding and every layer, bit for bit
        assert torch.equal(clf.state_dict()[name], value), name
    assert clf.embed.word.weight is not bert.embed.word.weight
    assert [type(b).__name__ for b in clf.blocks()] == ["Embedding", "Layer", "Layer", "ClassifierHead"]


def test_one_training_step_of_each_head_changes_its_parameters():
    ids, mask = padded_batch()
    for model, loss_fn in ((BERT(BERT_TINY), lambda m: lm_loss(m(ids, mask), ids)),
                           (BertClassifier(BERT_TINY, 3), lambda m: F.cross_entropy(m(ids, mask), torch.arange(3)))):
        before = copy.deepcopy(model.state_dict())
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        loss = loss_fn(model)
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
        for name, value in model.state_dict().items():
            assert not torch.equal(value, before[name]), f"{type(model).__name__}.{name} did not change"


def test_mask_tokens_picks_only_ordinary_tokens_and_labels_only_them():
    ids = torch.randint(5, 100, (64, 20))
    ids[:, 0], ids[:, -1] = 2, 3  # [CLS] ... [SEP]
    inputs, labels = mask_tokens(ids, mask_id=4, vocab_size=100, generator=torch.Generator().manual_seed(0))
    picked = labels != -100
    assert 0.10 < picked.float().mean() < 0.20  # about 15%
    assert not picked[:, [0, -1]].any()
    assert torch.equal(labels[picked], ids[picked])
    assert torch.equal(inputs[~picked], ids[~picked])
    assert 0.7 < (inputs[picked] == 4).float().mean() < 0.9  # about 80% become [MASK]


def test_encode_batch_wraps_in_cls_sep_and_pads():
    class Tok:  # the part of mplib.data.WordTokenizer that encode_batch uses
        def id(self, token):
            return {"[PAD]": 0, "[CLS]": 2, "[SEP]": 3}[token]

        def encode(self, text):
            return [10 + len(w) for w in text.split()]

    ids, mask = encode_batch(Tok(), ["a bb ccc", "dddd"], max_len=4)
    assert ids.tolist() == [[2, 11, 12, 3], [2, 14, 3, 0]]
    assert mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]


def test_config_rejects_heads_not_dividing_width():
    with pytest.raises(ValueError, match=r"n_head 3 must divide n_embd 64.*pick n_head from \[1, 2, 4, 8"):
        BERTConfig(n_head=3, n_embd=64)


def test_forward_rejects_sequence_longer_than_context():
    with pytest.raises(ValueError, match=r"33 tokens is longer than the 32 positions.*truncate the input"):
        BERT(BERT_TINY)(torch.ones(1, 33, dtype=torch.long))


def test_load_hf_rejects_vocabulary_mismatch():
    with pytest.raises(ValueError, match=r"vocabulary mismatch: the HF weights have 700 tokens but this BERT has "
                                         r"vocab_size=512.*BERTConfig\(vocab_size=700"):
        BERT(BERT_TINY).load_hf_state_dict(hf_tiny(vocab_size=700).state_dict())


def test_load_hf_names_the_tensor_of_wrong_shape():
    with pytest.raises(ValueError, match=r"'bert.encoder.layer.0.intermediate.dense.weight' has shape \(128, 64\)"):
        BERT(BERT_TINY).load_hf_state_dict(hf_tiny(intermediate_size=128).state_dict())


def test_load_hf_rejects_an_untied_decoder():
    with pytest.raises(ValueError, match=r"'cls.predictions.decoder.weight' differs.*tie_word_embeddings=True"):
        BERT.from_hf(hf_tiny(tie_word_embeddings=False))


def test_from_hf_rejects_relative_positions():
    with pytest.raises(ValueError, match=r"position_embedding_type='relative_key'.*build it with the defaults"):
        BERT.from_hf(hf_tiny(position_embedding_type="relative_key"))


def test_mask_tokens_rejects_probability_outside_0_1():
    with pytest.raises(ValueError, match=r"prob must be between 0 and 1 \(BERT uses 0.15\), got 1.5"):
        mask_tokens(torch.ones(2, 3, dtype=torch.long), 4, 10, prob=1.5)
