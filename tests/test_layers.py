"""mplib.layers.blocks: every supported model becomes a chain of blocks equal to its forward."""

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel

from mplib.layers import Blocks, blocks, find_tied

GPT2_TINY = dict(vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0,
                 resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
BERT_TINY = dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                 max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def inputs():
    ids = torch.randint(0, 64, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, :3] = 0  # left padding in the second row
    return ids, mask


def test_sequential_blocks_are_its_children_in_order():
    seq = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    b = blocks(seq)
    assert b.modules == list(seq) and b.names == ["0", "1", "2"] and b.tied == []
    x = torch.randn(3, 4)
    torch.testing.assert_close(b(x), seq(x))


def test_a_list_of_modules_becomes_blocks_named_by_index():
    mods = [nn.Linear(4, 4), nn.Tanh()]
    b = blocks(mods)
    assert b.modules == mods and b.names == ["0", "1"]
    assert list(b.source.state_dict()) == ["0.weight", "0.bias"]


class TwoBlockModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight  # tied

    def blocks(self):
        return [self.embed, self.head]

    def forward(self, ids):
        return self.head(self.embed(ids))


def test_an_object_with_blocks_uses_them_named_by_their_attribute():
    model = TwoBlockModel()
    b = blocks(model)
    assert b.names == ["embed", "head"] and b.source is model
    assert b.tied == [[(0, "weight"), (1, "weight")]]


def test_blocks_of_blocks_is_the_same_object():
    b = blocks(nn.Sequential(nn.Linear(2, 2)))
    assert blocks(b) is b and isinstance(b, Blocks)


def test_find_tied_reports_nothing_for_separate_weights():
    assert find_tied([nn.Linear(2, 2), nn.Linear(2, 2)]) == []


@pytest.mark.parametrize("use_mask", [False, True])
def test_hf_gpt2_block_chain_equals_its_logits(use_mask):
    model = GPT2LMHeadModel(GPT2Config(**GPT2_TINY)).eval()
    ids, mask = inputs()
    mask = mask if use_mask else None
    b = blocks(model)
    assert b.names == ["embed", "h.0", "h.1", "head"]
    torch.testing.assert_close(b(ids, mask), model(ids, attention_mask=mask, use_cache=False).logits)


def test_hf_gpt2_reports_wte_and_lm_head_as_one_tied_weight():
    b = blocks(GPT2LMHeadModel(GPT2Config(**GPT2_TINY)))
    assert b.tied == [[(0, "wte.weight"), (3, "lm_head.weight")]]


@pytest.mark.parametrize("use_mask", [False, True])
def test_hf_bert_block_chain_equals_its_logits(use_mask):
    model = BertForMaskedLM(BertConfig(**BERT_TINY)).eval()
    ids, mask = inputs()
    mask = mask if use_mask else None
    b = blocks(model)
    assert b.names == ["embeddings", "layer.0", "layer.1", "head"]
    torch.testing.assert_close(b(ids, mask), model(ids, attention_mask=mask).logits)


def test_hf_bert_reports_word_embeddings_and_decoder_as_tied():
    b = blocks(BertForMaskedLM(BertConfig(**BERT_TINY)))
    assert [(0, "embeddings.word_embeddings.weight"), (3, "cls.predictions.decoder.weight")] in b.tied


def test_an_unsupported_model_is_a_type_error_that_says_how_to_pass_blocks():
    with pytest.raises(TypeError, match=r"does not know how to cut a Linear.*GPT2LMHeadModel.*list of modules"):
        blocks(nn.Linear(2, 2))


def test_a_module_list_becomes_blocks_that_keep_its_state_dict_keys():
    mods = nn.ModuleList([nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2)])
    b = blocks(mods)
    assert b.modules == list(mods) and b.names == ["0", "1", "2"] and b.source is mods
    x = torch.randn(3, 4)
    torch.testing.assert_close(b(x), mods[2](mods[1](mods[0](x))))
