import copy
import dataclasses

import pytest
import torch
from torch import nn

from mplib.models.rnn import (CHAR_GRU_TINY, CHAR_LSTM_TINY, CHAR_RNN_TINY, RNN, CharRNN, GRUCell,
                              LSTMCell, RNNCell, RNNConfig, StackedRNN, copy_weights, from_torch,
                              saved_activation_bytes, stack_states, to_torch)
from mplib.train import fit, lm_loss

TORCH = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}
CELLS = ["rnn", "lstm", "gru"]


def _flat(state):
    return state if isinstance(state, tuple) else (state,)


@pytest.mark.parametrize("n_layer", [1, 3])
@pytest.mark.parametrize("cell", CELLS)
def test_stacked_rnn_matches_torch_outputs_states_and_grads(cell, n_layer):
    theirs = TORCH[cell](8, 12, num_layers=n_layer, batch_first=True)
    ours = from_torch(theirs)
    x = torch.randn(3, 7, 8)
    x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()

    out, states = ours(x_ours)
    out_t, state_t = theirs(x_theirs)
    torch.testing.assert_close(out, out_t)
    for a, b in zip(_flat(stack_states(states)), _flat(state_t)):
        torch.testing.assert_close(a, b)

    # Backward through the outputs and the final states (an LSTM's c included).
    weights = torch.randn_like(out)
    (out * weights).sum().add(sum(s.sum() for s in _flat(stack_states(states)))).backward()
    (out_t * weights).sum().add(sum(s.sum() for s in _flat(state_t))).backward()
    torch.testing.assert_close(x_ours.grad, x_theirs.grad)
    pairs = list(zip(ours.parameters(), theirs.parameters()))
    assert len(pairs) == 4 * n_layer
    for k in range(n_layer):
        layer = ours.layers[k].rnn.cell
        for mine, name in [(layer.ih.weight, "weight_ih"), (layer.hh.weight, "weight_hh"),
                           (layer.ih.bias, "bias_ih"), (layer.hh.bias, "bias_hh")]:
            assert mine.grad.abs().sum() > 0
            torch.testing.assert_close(mine.grad, getattr(theirs, f"{name}_l{k}").grad)


@pytest.mark.parametrize("cell_cls, cell", [(RNNCell, "rnn"), (LSTMCell, "lstm"), (GRUCell, "gru")])
def test_single_cell_matches_torch_cell(cell_cls, cell):
    theirs = {"rnn": nn.RNNCell, "lstm": nn.LSTMCell, "gru": nn.GRUCell}[cell](5, 6)
    ours = cell_cls(5, 6)
    with torch.no_grad():
        ours.ih.weight.copy_(theirs.weight_ih), ours.hh.weight.copy_(theirs.weight_hh)
        ours.ih.bias.copy_(theirs.bias_ih), ours.hh.bias.copy_(theirs.bias_hh)
    x = torch.randn(4, 5)
    state = ours.zero_state(4, x)
    torch.testing.assert_close(_flat(ours(x, state)), _flat(theirs(x)))


@pytest.mark.parametrize("cell", CELLS)
def test_to_torch_round_trips_the_weights(cell):
    ours = StackedRNN(RNNConfig(n_embd=4, hidden_size=5, n_layer=2, cell=cell))
    theirs = to_torch(ours)
    x = torch.randn(2, 3, 4)
    torch.testing.assert_close(ours(x)[0], theirs(x)[0])
    back = from_torch(theirs)
    for a, b in zip(ours.parameters(), back.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_single_layer_rnn_copies_from_nn_rnn():
    theirs, ours = nn.RNN(3, 4, batch_first=True), RNN(3, 4)
    copy_weights(theirs, ours)
    x = torch.randn(2, 5, 3)
    torch.testing.assert_close(ours(x)[0], theirs(x)[0])


def test_copy_weights_rejects_a_different_depth():
    with pytest.raises(ValueError, match="shapes differ"):
        copy_weights(nn.LSTM(3, 4, num_layers=2), from_torch(nn.LSTM(3, 4, num_layers=1)))


def test_from_torch_rejects_bidirectional_and_other_modules():
    with pytest.raises(ValueError, match="unidirectional"):
        from_torch(nn.GRU(3, 4, bidirectional=True))
    with pytest.raises(TypeError, match="nn.RNN, nn.LSTM or nn.GRU"):
        from_torch(nn.Linear(3, 4))


def test_config_rejects_a_zero_hidden_size():
    with pytest.raises(ValueError, match="hidden_size must be a positive int, got 0"):
        RNNConfig(hidden_size=0)


def test_config_rejects_an_unknown_cell():
    with pytest.raises(ValueError, match=r"unknown cell 'transformer'; use one of \('rnn', 'lstm', 'gru'\)"):
        RNNConfig(cell="transformer")
    with pytest.raises(ValueError, match="unknown cell"):
        RNN(3, 4, cell="lstn")


def test_config_rejects_dropout_of_one():
    with pytest.raises(ValueError, match=r"dropout is a probability in \[0, 1\)"):
        RNNConfig(dropout=1.0)


@pytest.mark.parametrize("config, expected", [(CHAR_RNN_TINY, 10_432), (CHAR_LSTM_TINY, 17_984),
                                              (CHAR_GRU_TINY, 14_272)])
def test_tiny_presets_have_pinned_parameter_counts(config, expected):
    # embedding 64*16 + layers + head (H*64 + 64); RNN: 1024 + (16*64 + 64*64 + 2*64) + 4160;
    # LSTM: 1024 + (16*128 + 32*128 + 256) + (2*32*128 + 256) + 2112; GRU likewise with 3H = 96
    assert sum(p.numel() for p in CharRNN(config).parameters()) == expected


@pytest.mark.parametrize("config", [CHAR_RNN_TINY, CHAR_LSTM_TINY, CHAR_GRU_TINY])
def test_blocks_chain_equals_forward(config):
    model = CharRNN(dataclasses.replace(config, dropout=0.0 if config.n_layer == 1 else 0.5)).eval()
    idx = torch.randint(config.vocab_size, (2, 9))
    blocks = model.blocks()
    assert len(blocks) == config.n_layer + 2
    x = blocks[0](idx)
    for block in blocks[1:]:
        x = block(x)
    torch.testing.assert_close(x, model(idx), rtol=0, atol=0)
    # and the stateful path used by generate computes the same logits
    torch.testing.assert_close(model.head(model.rnn(model.embed(idx))[0]), model(idx))


def test_one_training_step_changes_every_parameter():
    model = CharRNN(CHAR_LSTM_TINY)
    before = copy.deepcopy(model)
    x, y = torch.randint(64, (4, 10)), torch.randint(64, (4, 10))
    history = fit(model, [(x, y)], lambda m, b: lm_loss(m(b[0]), b[1]), steps=1, progress=False)
    assert len(history.losses) == 1
    for (name, p), q in zip(model.named_parameters(), before.parameters()):
        assert not torch.equal(p, q), name


def test_char_rnn_learns_a_repeating_string():
    tokens = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7] * 4)
    batch = (tokens[:-1].unsqueeze(0), tokens[1:].unsqueeze(0))
    model = CharRNN(dataclasses.replace(CHAR_GRU_TINY, vocab_size=8))
    history = fit(model, [batch], lambda m, b: lm_loss(m(b[0]), b[1]), steps=60, lr=0.03, progress=False)
    assert history.losses[-1] < 0.1 < history.losses[0]


def test_generate_is_deterministic_with_a_seeded_generator():
    model = CharRNN(CHAR_LSTM_TINY).eval()
    prompt = torch.tensor([[1, 2, 3], [4, 5, 6]])
    a = model.generate(prompt, 12, generator=torch.Generator().manual_seed(7))
    b = model.generate(prompt, 12, generator=torch.Generator().manual_seed(7))
    c = model.generate(prompt, 12, generator=torch.Generator().manual_seed(8))
    assert a.shape == (2, 15) and torch.equal(a[:, :3], prompt)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_greedy_generate_follows_the_argmax_of_forward():
    model = CharRNN(CHAR_RNN_TINY).eval()
    out = model.generate(torch.tensor([[3, 1]]), 5, temperature=0)
    logits = model(out[:, :-1])  # (1, 6, V): the forward pass over the generated sequence
    torch.testing.assert_close(logits[0, 1:].argmax(-1), out[0, 2:])


def test_rnn_rejects_unbatched_input():
    with pytest.raises(ValueError, match=r"batch-first input \(B, T, C\)"):
        RNN(3, 4)(torch.randn(5, 3))


def test_saved_activation_bytes_of_an_rnn_layer_are_inputs_plus_one_hidden_state_per_step():
    B, T, C, H = 4, 10, 8, 16
    layer = StackedRNN(RNNConfig(n_embd=C, hidden_size=H, n_layer=1, cell="rnn")).layers[0]
    saved = saved_activation_bytes(layer, torch.randn(B, T, C))
    # float32: the input x (for W_ih's grad), h_0, and each h_t once: tanh saves its output and
    # the next step's W_hh matmul saves that same tensor as its input. No parameter counts.
    assert saved > 0
    assert saved == 4 * (B * T * C + B * H + T * B * H)
    assert saved_activation_bytes(layer, torch.randn(B, 2 * T, C)) > 1.8 * saved
