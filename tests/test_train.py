import copy

import matplotlib
import pytest
import torch
from torch import nn

import mplib.memory
import mplib.plot
from mplib.train import History, fit, lm_loss, make_optimizer


def _regression_batches(n: int = 4):
    # y = x @ w_true: a linear model can fit it exactly, so the loss must fall.
    g = torch.Generator().manual_seed(0)
    w_true = torch.randn(3, 1, generator=g)
    xs = [torch.randn(16, 3, generator=g) for _ in range(n)]
    return [(x, x @ w_true) for x in xs]


def _mse(model, batch):
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def test_one_step_changes_parameters_and_records_one_loss():
    model = nn.Linear(3, 1)
    before = copy.deepcopy(model)
    history = fit(model, _regression_batches(), _mse, steps=1, progress=False)
    assert history.steps == 1 and len(history.losses) == 1
    assert not torch.equal(model.weight, before.weight)
    assert history.seconds > 0


def test_history_has_one_loss_per_step_and_cycles_a_finite_list():
    history = fit(nn.Linear(3, 1), _regression_batches(n=3), _mse, steps=7, progress=False)
    assert len(history.losses) == 7


@pytest.mark.parametrize("optimizer", ["adamw", "adam", "sgd"])
def test_loss_falls_on_a_learnable_linear_task(optimizer):
    lr = 0.1 if optimizer == "sgd" else 0.05
    history = fit(nn.Linear(3, 1), _regression_batches(), _mse, steps=150, lr=lr,
                  optimizer=optimizer, progress=False)
    assert history.mean_last(5) < 0.01 * history.losses[0]


def test_evals_run_every_eval_every_steps_and_after_the_last():
    seen_training = []

    def eval_fn(model):
        seen_training.append(model.training)
        return 1.0

    history = fit(nn.Linear(3, 1), _regression_batches(), _mse, steps=5, eval_fn=eval_fn,
                  eval_every=2, progress=False)
    assert [s for s, _ in history.evals] == [2, 4, 5]
    assert seen_training == [False, False, False]


def test_grad_clip_bounds_the_update():
    # With SGD and lr=1, one step moves the parameters by exactly the (clipped) gradient.
    model = nn.Linear(3, 1)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    fit(model, [(torch.full((4, 3), 100.0), torch.zeros(4, 1))], _mse, steps=1, lr=1.0,
        optimizer="sgd", grad_clip=0.5, progress=False)
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    torch.testing.assert_close((after - before).norm(), torch.tensor(0.5))


def test_progress_bar_runs():
    history = fit(nn.Linear(3, 1), _regression_batches(), _mse, steps=3, progress=True, log_every=2)
    assert len(history.losses) == 3


def test_fit_accepts_an_optimizer_instance():
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    history = fit(model, _regression_batches(), _mse, steps=2, optimizer=opt, progress=False)
    assert len(history.losses) == 2


def test_fit_rejects_zero_steps():
    with pytest.raises(ValueError, match="steps must be a positive int"):
        fit(nn.Linear(3, 1), _regression_batches(), _mse, steps=0, progress=False)


def test_fit_rejects_unknown_optimizer():
    with pytest.raises(ValueError, match="unknown optimizer 'lion'"):
        fit(nn.Linear(3, 1), _regression_batches(), _mse, steps=1, optimizer="lion", progress=False)


def test_make_optimizer_rejects_a_fully_frozen_model():
    model = nn.Linear(3, 1).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        make_optimizer(model)


@pytest.mark.parametrize("name", ["adamw", "adam", "sgd"])
def test_make_optimizer_keeps_the_state_that_mplib_memory_counts_for_it(name):
    # "sgd" is SGD with momentum: one buffer per parameter, as mplib.memory and mplib.profile charge it
    model, x = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1)), torch.randn(2, 3)
    opt = make_optimizer(model, name)
    model(x).sum().backward()
    opt.step()  # states are created on the first step
    kept = sum(t.nbytes for state in opt.state.values() for t in state.values() if isinstance(t, torch.Tensor))
    assert kept > 0 and kept == mplib.memory.measure(model, x, optimizer=name).optimizer


def test_fit_says_when_batches_run_out():
    with pytest.raises(ValueError, match="batches ran out after 2 of 5"):
        fit(nn.Linear(3, 1), iter(_regression_batches(n=2)), _mse, steps=5, progress=False)


def test_lm_loss_equals_cross_entropy_over_flattened_tokens():
    logits, targets = torch.randn(2, 5, 7), torch.randint(7, (2, 5))
    expected = nn.functional.cross_entropy(logits.view(10, 7), targets.view(10))
    torch.testing.assert_close(lm_loss(logits, targets), expected)


def test_lm_loss_of_uniform_logits_is_log_vocab():
    logits = torch.zeros(2, 3, 11)
    torch.testing.assert_close(lm_loss(logits, torch.zeros(2, 3, dtype=torch.long)),
                               torch.log(torch.tensor(11.0)))


def test_lm_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"logits \(2, 5, 7\) must be targets \(2, 4\)"):
        lm_loss(torch.randn(2, 5, 7), torch.zeros(2, 4, dtype=torch.long))


def test_plot_loss_draws_raw_and_smoothed_lines():
    matplotlib.use("Agg")
    history = History(losses=[3.0, 2.0, 1.5, 1.0] * 10, evals=[(20, 1.2), (40, 1.1)])
    ax = mplib.plot.loss(history, smooth=4)
    assert len(ax.lines) == 3  # raw, moving average, evaluations
    assert ax.lines[1].get_ydata()[-1] == pytest.approx(1.875)
    import matplotlib.pyplot as plt

    plt.close(ax.figure)


def test_plot_loss_rejects_an_empty_history():
    with pytest.raises(ValueError, match="no losses"):
        mplib.plot.loss(History())
