"""The in-process pipeline: same loss and gradients as one device, counted memory, errors that surface."""

import copy
import gc
import json
import threading
import traceback
import types
import weakref

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from mplib.microbatch import scatter
from mplib.models.gpt import GPT, GPTConfig
from mplib.models.rnn import CHAR_LSTM_TINY, CharRNN
from mplib.memory import SavedBytes
from mplib.pipeline import Pipeline, PipelineError, microbatch_seed
from mplib.split import split
from mplib.train import lm_loss

GPT_SMALL = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=16)  # 4 blocks
GPT2_TINY = dict(vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0,
                 resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # no dropout: train-mode runs compare exactly
MODELS = {
    "gpt": lambda: GPT(GPT_SMALL),
    "hf_gpt2": lambda: GPT2LMHeadModel(GPT2Config(**GPT2_TINY)),
    "lstm": lambda: CharRNN(CHAR_LSTM_TINY),  # embedding, 2 LSTM layers, head
}
SCHEDULES = {"gpipe": 2, "1f1b": 2, "interleaved": 4}  # stages to split into; interleaved: 2 per device


def logits_of(out):
    return out.logits if hasattr(out, "logits") else out


def batch(b=7, t=8, vocab=64):
    return torch.randint(vocab, (b, t)), torch.randint(vocab, (b, t))


def pipeline_of(model, schedule="gpipe", checkpoint="never", chunks=4, **kwargs):
    sm = split(model, ["cpu"] * SCHEDULES[schedule])
    return Pipeline(sm, chunks=chunks, schedule=schedule, checkpoint=checkpoint, loss_fn=lm_loss, **kwargs)


def assert_grads_equal(pipe, ref):
    mine = pipe.model.state_dict(keep_vars=True)
    for name, p in ref.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name  # a zero grad would compare vacuously
        torch.testing.assert_close(mine[name].grad, p.grad, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("checkpoint", ["never", "except_last", "always"])
@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("model_name", list(MODELS))
def test_pipeline_loss_and_grads_match_single_device(model_name, schedule, checkpoint):
    model = MODELS[model_name]()
    ref = copy.deepcopy(model)
    x, y = batch()  # 7 examples in 4 micro-batches: 2, 2, 2 and an uneven last one of 1
    pipe = pipeline_of(model, schedule, checkpoint)
    loss = pipe.step(x, y)
    ref_loss = lm_loss(logits_of(ref(x)), y)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss.detach())
    assert_grads_equal(pipe, ref)


def test_pipeline_forward_is_inference_equal_to_the_unsplit_model():
    model = GPT(GPT_SMALL)
    ref = copy.deepcopy(model)
    x, _ = batch()
    out = pipeline_of(model, "1f1b")(x)
    assert not out.requires_grad
    torch.testing.assert_close(out, ref(x).detach())


@pytest.mark.parametrize("checkpoint", ["never", "always"])  # a recompute runs under the forward's autocast
def test_autocast_around_the_pipeline_reaches_its_worker_threads(checkpoint):
    model = GPT(GPT_SMALL)
    ref = copy.deepcopy(model)
    x, y = batch()
    pipe = pipeline_of(model, "1f1b", checkpoint)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, ref_out = pipe(x), ref(x)
        loss, ref_loss = pipe.step(x, y), lm_loss(ref(x), y)
    ref_loss.backward()
    assert out.dtype == ref_out.dtype == torch.bfloat16  # autocast is thread-local: workers must re-enter it
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(loss, ref_loss.detach())
    mine = pipe.model.state_dict(keep_vars=True)
    for name, p in ref.named_parameters():
        # bf16 backward: each micro-batch's gradient is rounded before the sum over micro-batches,
        # the whole batch's after it; a few roundings of bf16 (eps 2**-8 = 0.4%) stay under 1%
        assert p.grad.norm() > 0 and (mine[name].grad - p.grad).norm() / p.grad.norm() < 1e-2, name


def test_each_device_runs_in_its_own_worker_thread():
    model = GPT(GPT_SMALL)
    pipe = pipeline_of(model, "1f1b")
    threads = {}
    for j, stage in enumerate(pipe.model.stages):
        stage.register_forward_hook(lambda mod, i, o, j=j: threads.setdefault(j, set()).add(threading.get_ident()))
    pipe.step(*batch())
    assert len(threads[0]) == 1 and len(threads[1]) == 1 and threads[0] != threads[1]
    assert threading.get_ident() not in threads[0] | threads[1]


# -- dropout ------------------------------------------------------------------------------------

def dropout_gpt():
    return GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=16, dropout=0.2))


def test_dropout_is_reproducible_and_the_same_for_every_schedule_and_checkpoint_mode():
    model, x, y = dropout_gpt(), *batch()
    grads, losses = [], []
    for schedule, checkpoint in (("gpipe", "never"), ("gpipe", "never"), ("1f1b", "always"),
                                 ("1f1b", "except_last"), ("gpipe", "always")):
        torch.manual_seed(1)
        pipe = pipeline_of(copy.deepcopy(model), schedule, checkpoint)
        losses.append(pipe.step(x, y))
        grads.append({k: v.grad for k, v in pipe.model.state_dict(keep_vars=True).items() if v.grad is not None})
    for other, loss in zip(grads[1:], losses[1:]):
        torch.testing.assert_close(loss, losses[0], rtol=0, atol=0)
        for k in grads[0]:
            torch.testing.assert_close(other[k], grads[0][k], msg=k)


def test_dropout_grads_equal_a_single_device_replay_of_the_same_masks():
    model, x, y = dropout_gpt(), *batch()
    ref = copy.deepcopy(model)
    pipe = pipeline_of(model, "1f1b", "except_last")
    loss = pipe.step(x, y)
    stages = [ref.blocks()[:2], ref.blocks()[2:]]  # the default balance [2, 2]
    total = torch.zeros(())
    for m, (xm, ym) in enumerate(zip(scatter(x, 4), scatter(y, 4))):
        h = xm
        for j, blocks in enumerate(stages):
            with torch.random.fork_rng():
                torch.manual_seed(microbatch_seed(pipe.step_seed, j, m))
                for block in blocks:
                    h = block(h)
        part = lm_loss(h, ym) * (len(xm) / len(x))
        part.backward()
        total += part.detach()
    torch.testing.assert_close(loss, total)
    assert_grads_equal(pipe, ref)


def test_dropout_masks_change_from_step_to_step():
    pipe = pipeline_of(dropout_gpt(), "gpipe")
    x, y = batch()
    first, seed = pipe.step(x, y), pipe.step_seed
    assert pipe.step(x, y) != first and pipe.step_seed != seed


# -- memory -------------------------------------------------------------------------------------

def gpt_for_memory():
    return GPT(GPTConfig(vocab_size=64, block_size=32, n_layer=4, n_head=2, n_embd=32))  # 6 blocks


def peaks(schedule, checkpoint="never", M=8):
    pipe = Pipeline(split(gpt_for_memory(), ["cpu"] * 3), chunks=M, schedule=schedule, checkpoint=checkpoint,
                    loss_fn=lm_loss)
    pipe.step(*batch(16, 32))
    return [pipe.timeline.peak_memory(w) for w in range(3)], pipe


def test_gpipe_holds_every_microbatch_and_1f1b_at_most_k_on_stage_0():
    K, M = 3, 8
    gpipe, pipe = peaks("gpipe", M=M)
    one_f_one_b, _ = peaks("1f1b", M=M)
    stage0, x = pipe.model.stages[0], scatter(batch(16, 32)[0], M)[0]
    with SavedBytes(stage0, whole_storages=False) as counter:
        stage0(x)
    assert counter.bytes > 0
    assert gpipe[0] == M * counter.bytes  # every micro-batch's activations at once
    assert one_f_one_b[0] == K * counter.bytes
    assert one_f_one_b[0] <= K / M * gpipe[0] + gpipe[0] / M  # the bound: K/M of GPipe's + one


def test_checkpointing_cuts_saved_activations_at_least_5x_on_a_gpt():
    plain, _ = peaks("gpipe", "never")
    ckpt, _ = peaks("gpipe", "always")
    assert all(p > 0 for p in plain + ckpt)
    for stage in (0, 1):  # the last stage also keeps its loss's logits, which no checkpoint removes
        assert plain[stage] >= 5 * ckpt[stage], (plain, ckpt)
    assert ckpt[2] < plain[2]


def test_timeline_records_every_action_recompute_and_memory_and_exports_a_chrome_trace(tmp_path):
    pipe = pipeline_of(GPT(GPT_SMALL), "1f1b", "except_last")
    pipe.step(*batch())
    tl = pipe.timeline
    assert tl.source == "measured" and tl.lanes == ["stage 0: cpu", "stage 1: cpu"]
    for kind in ("forward", "backward"):
        assert sorted((e.stage, e.microbatch) for e in tl.events if e.kind == kind) == [
            (j, m) for j in range(2) for m in range(4)]
    assert sorted((e.stage, e.microbatch) for e in tl.events if e.kind == "recompute") == [
        (j, m) for j in range(2) for m in range(3)]  # every micro-batch but the last
    assert [m.bytes for m in tl.memory if m.lane == 0][-1] == 0 and tl.peak_memory(0) > 0
    doc = json.loads(json.dumps(tl.to_chrome_trace(tmp_path / "t.json")))
    assert json.loads((tmp_path / "t.json").read_text()) == doc
    spans = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    assert len(spans) == len(tl.events) == 8 + 8 + 6
    assert {e["name"] for e in spans if e["cat"] == "forward"} == {"F0", "F1", "F2", "F3"}
    assert all(e["dur"] >= 0 and e["tid"] in (0, 1) for e in spans)


# -- errors -------------------------------------------------------------------------------------

class Boom(nn.Module):
    """Identity that raises on its `fail_at`-th forward (= that micro-batch: forwards run in order)."""

    def __init__(self, fail_at: int) -> None:
        super().__init__()
        self.fail_at, self.calls = fail_at, 0

    def forward(self, x):
        self.calls += 1
        if self.calls == self.fail_at + 1:
            raise RuntimeError("boom in the block")
        return x


class BackwardBoom(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        raise RuntimeError("boom in backward")


def raise_within_seconds(fn):
    """Run `fn` in a thread; return the exception it raised, failing if it hangs for 10 s."""
    caught = []

    def target():
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - the test inspects whatever came out
            caught.append(exc)

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive(), "the pipeline hung instead of raising"
    assert caught, "the pipeline did not raise"
    return caught[0]


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_a_stage_raising_on_microbatch_m_surfaces_naming_stage_and_microbatch(schedule):
    layers = [nn.Linear(4, 4), nn.Linear(4, 4), Boom(fail_at=2), nn.Linear(4, 4)]
    pipe = Pipeline(split(layers, ["cpu", "cpu"]), chunks=4, schedule=schedule,
                    loss_fn=lambda out, y: (out - y).pow(2).mean())
    exc = raise_within_seconds(lambda: pipe.step(torch.randn(8, 4), torch.randn(8, 4)))
    assert isinstance(exc, PipelineError)
    assert "stage 1 failed on micro-batch 2 during its forward: RuntimeError: boom in the block" in str(exc)
    assert isinstance(exc.__cause__, RuntimeError)
    assert any(frame.name == "forward" and "test_pipeline" in frame.filename
               for frame in traceback.extract_tb(exc.__cause__.__traceback__))  # the original traceback


def test_a_backward_error_surfaces_naming_its_stage():
    class Bad(nn.Module):
        def forward(self, x):
            return BackwardBoom.apply(x)

    pipe = Pipeline(split([nn.Linear(4, 4), Bad(), nn.Linear(4, 4)], ["cpu"] * 3, balance=[1, 1, 1]), chunks=2,
                    loss_fn=lambda out, y: out.sum())
    exc = raise_within_seconds(lambda: pipe.step(torch.randn(4, 4), torch.randn(4, 4)))
    assert isinstance(exc, PipelineError) and "stage 1 failed on micro-batch 1 during its backward" in str(exc)


def test_pipeline_rejects_bad_input_with_the_rule_and_the_fix():
    sm = split(GPT(GPT_SMALL), ["cpu", "cpu"])
    with pytest.raises(ValueError, match="unknown schedule 'zigzag'; the known schedules are gpipe, 1f1b, interleaved"):
        Pipeline(sm, chunks=4, schedule="zigzag")
    with pytest.raises(ValueError, match="unknown checkpoint mode 'sometimes'; use one of never, except_last, always"):
        Pipeline(sm, chunks=4, checkpoint="sometimes")
    with pytest.raises(ValueError, match="chunks=1 < devices=2; use chunks >= 2, or 'gpipe'"):
        Pipeline(sm, chunks=1, schedule="1f1b")
    with pytest.raises(TypeError, match="build one with mplib.split.split"):
        Pipeline(GPT(GPT_SMALL), chunks=2)
    pipe = Pipeline(sm, chunks=4, loss_fn=lm_loss)
    with pytest.raises(ValueError, match="a batch of 3 examples cannot make 4 micro-batches.*use chunks <= 3"):
        pipe.step(*batch(3))
    with pytest.raises(ValueError, match="step needs a loss"):
        Pipeline(sm, chunks=4).step(*batch())
    bad = Pipeline(sm, chunks=2, loss_fn=lambda out, y: (out - 0).pow(2).mean(dim=-1))
    exc = raise_within_seconds(lambda: bad.step(*batch(4)))
    assert isinstance(exc, ValueError) and "loss_fn must return a scalar tensor" in str(exc)
    assert "got shape (2, 8)" in str(exc) and ".mean()" in str(exc) and "stage 1" in str(exc)


def test_a_pipeline_seed_makes_dropout_independent_of_the_global_generator():
    model, x, y = dropout_gpt(), *batch()
    losses = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        losses.append(pipeline_of(copy.deepcopy(model), "1f1b", seed=7).step(x, y))
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)


# -- loss on the gathered output ----------------------------------------------------------------

def sum_loss(out, y):
    return torch.nn.functional.cross_entropy(logits_of(out).flatten(0, 1), y.flatten(), reduction="sum")


def ignore_loss(out, y):
    return lm_loss(logits_of(out), y, ignore_index=-100)  # a mean over the tokens that count


LOSSES = {"mean": lambda out, y: lm_loss(logits_of(out), y), "sum": sum_loss, "ignore_index": ignore_loss}


def targets_with_ignored_tokens(y):
    y = y.clone()
    y[:3, :6] = -100  # micro-batches 0 and 1 keep far fewer tokens than 2 and 3: weighting by examples is off
    return y


def gathered_run(model, loss_name, checkpoint="never", loss_on="gathered"):
    x, y = batch()  # 7 examples in 4 micro-batches, the last one of 1
    y = targets_with_ignored_tokens(y) if loss_name == "ignore_index" else y
    ref = copy.deepcopy(model)
    pipe = Pipeline(split(model, ["cpu", "cpu"]), chunks=4, checkpoint=checkpoint, loss_fn=LOSSES[loss_name],
                    loss_on=loss_on)
    loss = pipe.step(x, y)
    ref_loss = LOSSES[loss_name](ref(x), y)
    ref_loss.backward()
    return pipe, ref, loss, ref_loss.detach()


@pytest.mark.parametrize("loss_name", list(LOSSES))
@pytest.mark.parametrize("checkpoint", ["never", "except_last", "always"])
def test_gathered_loss_and_grads_match_single_device_for_any_loss(checkpoint, loss_name):
    pipe, ref, loss, ref_loss = gathered_run(GPT(GPT_SMALL), loss_name, checkpoint)
    torch.testing.assert_close(loss, ref_loss)
    assert_grads_equal(pipe, ref)


@pytest.mark.parametrize("model_name", ["hf_gpt2", "lstm"])
def test_gathered_loss_handles_model_outputs_and_other_models(model_name):
    pipe, ref, loss, ref_loss = gathered_run(MODELS[model_name](), "sum", "except_last")
    torch.testing.assert_close(loss, ref_loss)
    assert_grads_equal(pipe, ref)


@pytest.mark.parametrize("loss_name", ["sum", "ignore_index"])
def test_per_microbatch_weighting_misses_a_loss_that_is_not_a_mean_over_examples(loss_name):
    _, _, loss, ref_loss = gathered_run(GPT(GPT_SMALL), loss_name, loss_on="microbatch")
    assert not torch.allclose(loss, ref_loss, rtol=1e-3), (loss, ref_loss)  # the case loss_on="gathered" fixes


def test_gathered_loss_runs_once_between_the_last_forward_and_the_first_backward():
    pipe, *_ = gathered_run(GPT(GPT_SMALL), "mean")
    tl = pipe.timeline
    (loss,) = [e for e in tl.events if e.kind == "other"]
    assert loss.lane == 1 and loss.label == "loss"
    last_lane = [e for e in tl.events if e.lane == 1 and e.kind in ("forward", "backward")]
    assert all(e.end <= loss.start for e in last_lane if e.kind == "forward")
    assert all(e.start >= loss.end for e in last_lane if e.kind == "backward")
    assert tl.peak_memory(1) > 0 and [m.bytes for m in tl.memory if m.lane == 1][-1] == 0


def test_gathered_loss_rejects_schedules_that_start_backwards_early_and_says_the_fix():
    sm = split(GPT(GPT_SMALL), ["cpu", "cpu"])
    with pytest.raises(ValueError, match="loss_on='gathered' needs every forward before the first backward.*"
                                         "schedule='1f1b'.*use schedule='gpipe'"):
        Pipeline(sm, chunks=4, schedule="1f1b", loss_fn=lm_loss, loss_on="gathered")
    with pytest.raises(ValueError, match="schedule='interleaved'"):
        Pipeline(split(GPT(GPT_SMALL), ["cpu"] * 4), chunks=4, schedule="interleaved", loss_on="gathered")
    with pytest.raises(ValueError, match="unknown loss_on 'last'; use one of microbatch, gathered"):
        Pipeline(sm, chunks=4, loss_on="last")


def test_a_failing_or_non_scalar_gathered_loss_surfaces_as_an_error_naming_the_loss():
    sm = split(GPT(GPT_SMALL), ["cpu", "cpu"])
    bad = Pipeline(sm, chunks=2, loss_fn=lambda out, y: out.pow(2).mean(dim=-1), loss_on="gathered")
    exc = raise_within_seconds(lambda: bad.step(*batch(4)))
    assert isinstance(exc, ValueError) and "loss_fn must return a scalar tensor (the loss of the batch)" in str(exc)
    assert "got shape (4, 8)" in str(exc) and "the loss on the gathered output failed on stage 1" in str(exc)

    def broken(out, y):
        raise RuntimeError("boom in the loss")

    pipe = Pipeline(sm, chunks=2, loss_fn=broken, loss_on="gathered")
    exc = raise_within_seconds(lambda: pipe.step(*batch(4)))
    assert isinstance(exc, PipelineError) and "gathered output failed on stage 1: RuntimeError: boom" in str(exc)


# -- lifetime: hooks, threads and the tensors of a step ---------------------------------------------

def mse(out, y):
    return (out - y).pow(2).mean()


def reachable(root):
    """Every object reachable from `root` through instances and containers (not modules, classes, functions)."""
    seen, todo = {}, [root]
    while todo:
        obj = todo.pop()
        if id(obj) in seen or isinstance(obj, (types.ModuleType, type, types.FunctionType, types.CodeType)):
            continue
        seen[id(obj)] = obj
        todo.extend(gc.get_referents(obj))
    return list(seen.values())


def shares_memory(a, b):
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def no_hooks(module):
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in module.modules())


def test_a_deleted_pipeline_is_freed_and_its_workers_end_while_its_split_model_lives_on():
    sm = split(GPT(GPT_SMALL), ["cpu", "cpu"])
    pipe = Pipeline(sm, chunks=2, checkpoint="except_last", loss_fn=lm_loss)  # checkpointing: recompute hooks
    pipe.step(*batch(4))
    alive, threads = weakref.ref(pipe), pipe._workers.threads
    assert all(t.is_alive() for t in threads)
    del pipe
    gc.collect()
    assert alive() is None  # the stages of `sm` hold nothing of it
    for t in threads:
        t.join(10)
        assert not t.is_alive()


def test_five_pipelines_built_on_one_split_model_and_deleted_leave_no_hooks_and_no_threads():
    sm, before = split(GPT(GPT_SMALL), ["cpu", "cpu"]), set(threading.enumerate())
    threads = []
    for schedule, checkpoint in [("gpipe", "never"), ("gpipe", "always"), ("1f1b", "except_last"),
                                 ("1f1b", "always"), ("gpipe", "except_last")]:
        pipe = Pipeline(sm, chunks=2, schedule=schedule, checkpoint=checkpoint, loss_fn=lm_loss)
        pipe.step(*batch(4))
        assert no_hooks(sm)  # the pipeline's hooks live only while a step runs
        threads += pipe._workers.threads
    assert len(threads) == 10 and all(t.is_alive() for t in threads[-2:])
    del pipe
    gc.collect()
    assert no_hooks(sm)
    for t in threads:
        t.join(10)
        assert not t.is_alive()
    assert set(threading.enumerate()) <= before


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_a_failed_step_leaves_no_tensor_of_it_in_the_pipeline_and_the_next_step_is_exact(schedule):
    layers = [nn.Linear(4, 4), nn.Linear(4, 4), Boom(fail_at=2), nn.Linear(4, 4)]
    ref = copy.deepcopy(nn.Sequential(*layers))
    pipe = Pipeline(split(layers, ["cpu", "cpu"]), chunks=4, schedule=schedule, checkpoint="except_last",
                    loss_fn=mse)
    x, y = torch.randn(8, 4), torch.randn(8, 4)
    made = []  # every stage output of the failed step
    hooks = [stage.register_forward_hook(lambda mod, i, out: made.append(out)) for stage in pipe.model.stages]
    exc = raise_within_seconds(lambda: pipe.step(x, y))
    for hook in hooks:
        hook.remove()
    assert isinstance(exc, PipelineError) and len(made) >= 4  # stage 0 ran micro-batches 0-2, stage 1 0-1
    step = [x, y, *made]
    held = [t for t in reachable(pipe) if isinstance(t, torch.Tensor)]
    assert len(held) >= 6  # the walk reaches the parameters, so it would reach the step's tensors too
    assert not [t for t in held if any(shares_memory(t, s) for s in step)]
    gone = [weakref.ref(t) for t in step]
    del exc, made, step, held, x, y  # the caller lets go of the exception too: nothing else keeps them
    gc.collect()
    assert all(r() is None for r in gone)

    x, y = torch.randn(8, 4), torch.randn(8, 4)
    pipe.zero_grad(set_to_none=True)  # the failed step may have left partial gradients
    loss, ref_loss = pipe.step(x, y), mse(ref(x), y)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss.detach())
    assert_grads_equal(pipe, ref)


def test_an_exception_the_caller_keeps_does_not_keep_the_other_microbatches_alive():
    # in a notebook the last exception stays referenced (sys.last_value): the failed step must not stay with it
    layers = [nn.Linear(4, 4), nn.Linear(4, 4), Boom(fail_at=2), nn.Linear(4, 4)]
    pipe = Pipeline(split(layers, ["cpu", "cpu"]), chunks=4, loss_fn=mse)
    outputs = []  # stage 0's output of micro-batch m (forwards run in order), kept by the step for its backward
    pipe.model.stages[0].register_forward_hook(lambda mod, i, out: outputs.append(weakref.ref(out)))
    exc = raise_within_seconds(lambda: pipe.step(torch.randn(8, 4), torch.randn(8, 4)))
    gc.collect()
    assert isinstance(exc, PipelineError) and len(outputs) >= 3
    # micro-batch 2 is the one stage 1 failed on: the traceback's frames hold its input, as any exception would
    assert all(r() is None for m, r in enumerate(outputs) if m != 2)


# -- batch norm ---------------------------------------------------------------------------------

def bn_layers(stage=1, momentum=0.1):
    # (B, 3, 5) inputs, one batch norm on stage 0 or 1 (balance [3, 3]). Only the first batch norm of a model
    # sees the unsplit model's inputs: a later one's inputs were normalised per micro-batch by the first
    bn = nn.BatchNorm1d(6, momentum=momentum)
    first, second = (bn, nn.Identity()) if stage == 0 else (nn.Identity(), bn)
    return [nn.Conv1d(3, 6, 3, padding=1), first, nn.ReLU(), nn.Conv1d(6, 6, 3, padding=1), second,
            nn.Sequential(nn.Flatten(), nn.Linear(30, 2))]


def bn_batch():
    return torch.randn(7, 3, 5) * 3 + 1, torch.randn(7, 2)  # micro-batches of 2, 2, 2 and 1 example (5 values)


def assert_running_stats_equal(pipe, ref):
    mine = pipe.model.state_dict()
    for name, buf in ref.named_buffers():
        assert "num_batches" in name or buf.abs().sum() > 0, name  # moved away from 0: compares something
        torch.testing.assert_close(mine[name], buf, msg=lambda m: f"{name}: {m}")


def test_a_batch_norm_in_training_mode_is_refused_naming_the_module_and_the_fixes():
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)), nn.Linear(4, 4))
    assert isinstance(model.get_submodule("1.1"), nn.BatchNorm1d)  # its qualified name in the unsplit model
    with pytest.raises(ValueError, match=r"BatchNorm1d '1\.1' \(stage 0\) is in training mode: with chunks=4 "
                                         "each micro-batch is normalised by its own statistics") as info:
        Pipeline(split(model, ["cpu", "cpu"]), chunks=4, loss_fn=mse)
    for fix in ("batch_norm='deferred'", "model.eval()", "chunks=1", "nn.LayerNorm"):
        assert fix in str(info.value), fix
    with pytest.raises(ValueError, match="checkpoint='always' runs its forward again in the backward"):
        Pipeline(split(model, ["cpu", "cpu"]), chunks=1, checkpoint="always", loss_fn=mse)
    with pytest.raises(ValueError, match="unknown batch_norm 'sync'; use one of refuse, deferred"):
        Pipeline(split(model, ["cpu", "cpu"]), chunks=4, batch_norm="sync")
    Pipeline(split(model, ["cpu", "cpu"]), chunks=1, loss_fn=mse).step(torch.randn(4, 4), torch.randn(4, 4))


def test_a_batch_norm_in_eval_mode_runs_exactly_and_is_refused_once_switched_to_training():
    layers = bn_layers()
    ref = copy.deepcopy(nn.Sequential(*layers)).eval()
    pipe = Pipeline(split(layers, ["cpu", "cpu"], balance=[3, 3]).eval(), chunks=4, loss_fn=mse)
    x, y = bn_batch()
    loss, ref_loss = pipe.step(x, y), mse(ref(x), y)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss.detach())
    assert_grads_equal(pipe, ref)
    pipe.train()
    with pytest.raises(ValueError, match="BatchNorm1d '4' \\(stage 1\\) is in training mode"):
        pipe.step(x, y)
    with pytest.raises(ValueError, match="BatchNorm1d '4' \\(stage 1\\) is in training mode"):
        pipe(x)


@pytest.mark.parametrize("schedule, checkpoint, stage, momentum", [
    ("gpipe", "never", 0, 0.1), ("gpipe", "always", 1, None), ("1f1b", "except_last", 0, None),
    ("1f1b", "except_last", 1, 0.1), ("1f1b", "always", 0, 0.1), ("1f1b", "always", 1, None)])
def test_deferred_batch_norm_running_statistics_equal_the_unsplit_models_step_after_step(schedule, checkpoint,
                                                                                         stage, momentum):
    layers = bn_layers(stage, momentum)  # momentum=None: a cumulative average over the steps
    ref = copy.deepcopy(nn.Sequential(*layers))
    pipe = Pipeline(split(layers, ["cpu", "cpu"], balance=[3, 3]), chunks=4, schedule=schedule,
                    checkpoint=checkpoint, loss_fn=mse, batch_norm="deferred")
    for _ in range(3):  # momentum and the cumulative average (momentum=None) both build on earlier steps
        x, y = bn_batch()
        loss, ref_loss = pipe.step(x, y), mse(ref(x), y)
        assert_running_stats_equal(pipe, ref)
    assert int(pipe.model.state_dict()[f"{1 + 3 * stage}.num_batches_tracked"]) == 3  # once a step, recomputes not
    assert not torch.allclose(loss, ref_loss.detach())  # training-mode outputs are per micro-batch: they differ
    assert no_hooks(pipe.model) and all(bn.track_running_stats for bn in pipe.model.modules()
                                        if isinstance(bn, nn.BatchNorm1d))


def test_deferred_batch_norm_outputs_differ_by_about_one_over_sqrt_n_and_inference_updates_the_statistics_once():
    C, B, M = 16, 256, 4
    layers = [nn.Linear(C, C), nn.BatchNorm1d(C)]
    ref = copy.deepcopy(nn.Sequential(*layers))
    pipe = Pipeline(split(layers, ["cpu", "cpu"]), chunks=M, batch_norm="deferred")
    x = torch.randn(B, C) * 2 + 3
    with torch.no_grad():
        out, ref_out = pipe(x), ref(x)  # training mode under no_grad: both update their running statistics
    n = B // M  # values per channel in one micro-batch
    rms = (out - ref_out).pow(2).mean().sqrt().item()
    # the docstring's claim: a micro-batch's mean and variance miss the batch's by ~1/sqrt(n) of a std;
    # for M=4 the expected rms is sqrt(1.5 * (1 - 1/M) / n) = 0.13 at n=64
    assert 0.5 / n**0.5 < rms < 2 / n**0.5, rms
    assert_running_stats_equal(pipe, ref)


def test_a_failed_deferred_step_leaves_the_batch_norms_as_they_were_and_the_next_step_is_exact():
    layers = bn_layers(stage=0)
    layers.insert(5, Boom(fail_at=2))  # stage 1: fails on micro-batch 2, when stage 0 may have run them all
    ref = copy.deepcopy(nn.Sequential(*layers))
    pipe = Pipeline(split(layers, ["cpu", "cpu"], balance=[3, 4]), chunks=4, loss_fn=mse, batch_norm="deferred")
    before = copy.deepcopy(pipe.model.state_dict())
    exc = raise_within_seconds(lambda: pipe.step(*bn_batch()))
    assert isinstance(exc, PipelineError) and "micro-batch 2" in str(exc)
    after = pipe.model.state_dict()
    for name, buf in before.items():
        torch.testing.assert_close(after[name], buf, rtol=0, atol=0, msg=name)  # no partial update
    assert no_hooks(pipe.model) and all(bn.track_running_stats for bn in pipe.model.modules()
                                        if isinstance(bn, nn.BatchNorm1d))
    x, y = bn_batch()
    pipe.step(x, y), mse(ref(x), y)
    assert_running_stats_equal(pipe, ref)
