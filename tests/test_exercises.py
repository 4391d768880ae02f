"""Every stored exercise accepts its right answer (computed here from mplib) and rejects a wrong one."""

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import mplib._hf_split
import mplib._losses
import mplib.data
import mplib.hardware
import mplib.memory
import mplib.microbatch
from mplib.exercises import EXERCISES, check, digest, is_right
from mplib.models.bert import BERT, BERT_BASE, BERTConfig
from mplib.models.elmo import ELMO_TINY, ELMo, ScalarMix, batch_to_ids
from mplib.models.gpt import GPT, GPT2_MEDIUM, GPT2_SMALL, GPT2_XL, GPTConfig
from mplib.models.rnn import RNN, CharRNN, RNNConfig
from mplib.schedule import bubble_fraction, build
from mplib.simulate import simulate
from mplib.speedups import FreezeSchedule
from mplib.tensor_parallel import layer_collectives
from mplib.wavefront import wavefront


def _n(module):
    return sum(p.numel() for p in module.parameters())


def _corpus_vocab():
    return mplib.data.CharTokenizer.from_text(mplib.data.load_text()).vocab_size


def _heavier_device():  # notebook 02, exercise 2: balance [2, 4] of the 4-layer char LSTM
    config = RNNConfig(vocab_size=_corpus_vocab(), n_embd=32, hidden_size=64, n_layer=4, cell="lstm")
    acts = [b.activations for b in mplib.memory.estimate(CharRNN(config), batch=8, seq=64).per_block]
    return int(sum(acts[2:]) > sum(acts[:2]))


def _changed_counts():  # notebook 03: change word 2 of 7; positions whose top-layer vector changes
    model = ELMo(ELMO_TINY).eval()
    a = "the bat flew out of the cave".split()
    b = a[:2] + ["sat"] + a[3:]
    with torch.no_grad():
        ra, _ = model.representations(batch_to_ids([a]))
        rb, _ = model.representations(batch_to_ids([b]))
    C = ra.size(-1) // 2
    diff = (ra[0, -1] - rb[0, -1]).abs()
    return (int((diff[:, :C].amax(-1) > 0).sum()), int((diff[:, C:].amax(-1) > 0).sum()))


def _top_mix_weight():
    mix = ScalarMix(3)
    with torch.no_grad():
        mix.scalars.copy_(torch.tensor([0.0, 1.0, 1.0]))
    return mix.weights[2].item()


def _mixed_bytes_per_param():
    est = mplib.memory.estimate(GPTConfig(vocab_size=64, block_size=8, n_layer=1, n_head=2, n_embd=16), batch=1,
                                seq=8, dtype=torch.bfloat16, mixed_precision=True)
    return (est.params + est.grads + est.optimizer) / est.num_parameters


def _largest_batch():  # notebook 06, exercise 2
    one = mplib.memory.estimate(GPT2_SMALL, batch=1, seq=1024)
    return (mplib.hardware.GPUS["A100 40GB"].memory_bytes - (one.params + one.grads + one.optimizer)) // one.activations


def _h100s_for_gpt3():  # notebook 06, exercise 3: by memory alone, batch 1
    gpt3 = GPTConfig(vocab_size=50257, block_size=2048, n_layer=96, n_head=96, n_embd=12288)
    return math.ceil(mplib.memory.estimate(gpt3, batch=1, seq=2048).total / mplib.hardware.GPUS["H100 SXM"].memory_bytes)


def _mixed_precision_parts():  # notebook 05, exercise 3: (the part that grows, the part a halved batch halves)
    def gib(**kw):
        return mplib.memory.estimate(GPT2_XL, seq=1024, optimizer="adam", **kw).gib()
    fp32, mixed = gib(batch=8), gib(batch=8, dtype=torch.bfloat16, mixed_precision=True)
    half = gib(batch=4, dtype=torch.bfloat16, mixed_precision=True)
    parts = ("params", "grads", "optimizer", "activations")
    grows = [k for k in parts if mixed[k] > fp32[k]]
    halves = [k for k in parts if math.isclose(half[k], mixed[k] / 2, rel_tol=1e-3)]  # a few fixed bytes aside
    assert len(grows) == len(halves) == 1, (grows, halves)
    return grows[0], halves[0]


def _kv_cache_mib():  # notebook 05, exercise 4: measured on one layer of GPT-2 XL's width, scaled to 48 layers
    T = 8
    layer = GPT(GPTConfig(vocab_size=16, block_size=T, n_layer=1, n_head=GPT2_XL.n_head, n_embd=GPT2_XL.n_embd))
    with torch.no_grad():
        _, cache = layer.forward_cached(torch.zeros(1, T, dtype=torch.long), None)
    per_layer = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in cache)
    return per_layer * GPT2_XL.n_layer * (1024 // T) / 2**20


def _padded_batch_counts():  # notebook 07, exercise 4: counted tokens per micro-batch, and each one's share
    text = mplib.data.load_text()
    tok = mplib.data.CharTokenizer.from_text(text)
    x = torch.tensor(tok.encode(text[: 8 * 128])).view(8, 128)[:, :-1]
    mask = torch.ones_like(x)
    mask[1, 90:], mask[5, 40:] = 0, 0
    labels = x.masked_fill(mask == 0, -100)
    count = mplib._hf_split.items(LlamaForCausalLM(TINY_LLAMA))  # what Pipeline counts for a causal LM
    chunks = mplib.microbatch.scatter(labels, chunks=4)
    counts = [count(c) for c in chunks]
    return tuple(counts), mplib._losses.shares(counts, [len(c) for c in chunks])


def _min_chunks(k=4):
    return next(m for m in range(1, 1000) if bubble_fraction(build("gpipe", k, m)) < 0.10)


TINY_LLAMA = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
TINY_BERT = BERTConfig(vocab_size=1000, block_size=32, n_layer=2, n_head=4, n_embd=64, intermediate_size=256)

# name -> (a function computing the right answer, a wrong answer a reader might give)
ANSWERS = {
    "00.mib": (lambda: 25 * 2**20 * 4 / 2**20, 25),
    "00.mb": (lambda: 25 * 2**20 * 4 / 1e6, 100),
    "01.rnn_params": (lambda: _n(RNN(32, 64, cell="rnn")), 32 * 64 + 64 * 64 + 64),
    "01.charrnn_params": (lambda: _n(CharRNN(RNNConfig(vocab_size=_corpus_vocab(), n_embd=32, hidden_size=128,
                                                       n_layer=1, cell="rnn"))), 30000),
    "02.param_growth": (lambda: _n(RNN(128, 128, cell="lstm")) / _n(RNN(64, 64, cell="lstm")), 2.0),
    "02.heavier_device": (_heavier_device, 0),
    "03.changed_counts": (_changed_counts, (4, 6)),
    "03.top_weight": (_top_mix_weight, 1 / 3),
    "04.attention_mib": (lambda: 8 * BERT_BASE.n_head * 512 * 512 * 4 / 2**20, 8),
    "04.tiny_params": (lambda: BERT(TINY_BERT).num_parameters(), 100_000),
    "05.mixed_parts": (_mixed_precision_parts, ("optimizer", "params")),
    "05.kv_cache_mib": (_kv_cache_mib, 300),
    "06.mixed_bytes": (_mixed_bytes_per_param, 12),
    "06.layer_mib": (lambda: mplib.memory.estimate(GPT2_MEDIUM, batch=8, seq=1024).per_block[1].activations / 2**20,
                     8 * 1024 * 1024 * 4 * 16 / 2**20),
    "06.largest_batch": (_largest_batch, 8),
    "06.h100s_gpt3": (_h100s_for_gpt3, 47),
    "07.counted_tokens": (lambda: _padded_batch_counts()[0], (216, 253, 166, 253)),
    "07.token_share": (lambda: _padded_batch_counts()[1][2], 0.25),
    "08.min_chunks": (_min_chunks, 27),
    "08.peak_in_flight": (lambda: (build("gpipe", 4, 8).peak_in_flight()[0], build("1f1b", 4, 8).peak_in_flight()[0]),
                          (4, 8)),
    "09.peak_in_flight": (lambda: (build("gpipe", 2, 4).peak_in_flight()[0], build("1f1b", 2, 4).peak_in_flight()[0]),
                          (2, 4)),
    "09.textbook": (lambda: (4 - 1) * max(3.0, 5.0) + (3.0 + 5.0), 20.0),
    # 4 all-reduces per layer and step, each sending 2 (T-1)/T of the (B, S, C) fp16 activation per rank
    "10.tp_bytes": (lambda: sum(c.wire_bytes for c in layer_collectives(8, 1024, 4096, 8, dtype_bytes=2)),
                    4 * 8 * 1024 * 4096 * 2),
    "13.frozen_by_99": (lambda: FreezeSchedule.linear(blocks=10, steps=100, start=0.5).frozen(99), 8),
    # GNMT's encoder: 8 layers on 8 devices, the bottom one bidirectional, T=10 chunks, backward = 2 x forward
    "15.gnmt_step": (lambda: simulate(wavefront(8, 10, bidirectional=True), [1] * 9, [2] * 9).duration, (8 + 10 - 1) * 3),
}


def test_every_stored_exercise_has_a_computed_answer():
    assert sorted(ANSWERS) == sorted(EXERCISES)


@pytest.mark.parametrize("name", sorted(ANSWERS))
def test_right_answer_passes_and_wrong_one_fails(name, capsys):
    compute, wrong = ANSWERS[name]
    right = compute()
    assert is_right(name, right), f"{name}: stored digest is not that of {right!r} (digest {digest(name, right, EXERCISES[name].step)})"
    assert not is_right(name, wrong)
    check(name, wrong)
    assert "Hint:" in capsys.readouterr().out
    check(name, right)
    assert capsys.readouterr().out == f"{name}: right\n"


def test_numbers_pass_within_one_step_of_the_grid_point_and_not_beyond():
    step = EXERCISES["03.top_weight"].step
    right = _top_mix_weight()
    grid = round(right / step) * step
    assert is_right("03.top_weight", grid + 0.4 * step) and is_right("03.top_weight", grid - 0.4 * step)
    assert not is_right("03.top_weight", grid + 1.01 * step)


def test_strings_lists_and_tensors_are_normalised():
    assert is_right("08.peak_in_flight", [8, 4]) and is_right("08.peak_in_flight", (8, 4))
    assert is_right("01.rnn_params", torch.tensor(_n(RNN(32, 64, cell="rnn"))))
    assert digest("x", " Device  0 ") == digest("x", "device 0")


def test_placeholder_and_unknown_names_say_what_to_do(capsys):
    check("00.mib", None)
    assert "replace the placeholder" in capsys.readouterr().out
    with pytest.raises(KeyError, match="no exercise named"):
        check("99.nothing", 1)
    with pytest.raises(TypeError, match="an answer is a number"):
        is_right("00.mib", object())


def test_a_bare_hash_made_in_a_notebook_checks_like_a_stored_exercise(capsys):
    h = digest("", 0.273, step=0.01)
    assert is_right(h, 3 / 11, step=0.01) and not is_right(h, 0.30, step=0.01)
    check(h, 0.2, step=0.01, hint="(K-1)/(M+K-1)")
    assert "Hint: (K-1)/(M+K-1)" in capsys.readouterr().out
