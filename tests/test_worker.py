"""Long-lived workers: tasks run at the same time, on the same threads every step; nothing hangs."""

import copy
import gc
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from mplib.models.gpt import GPT, GPTConfig
from mplib.pipeline import Pipeline
from mplib.split import split
from mplib.train import lm_loss
from mplib.worker import Workers


def test_tasks_run_at_the_same_time_on_distinct_threads():
    workers, ran = Workers(2), {}
    meet = threading.Barrier(2, timeout=10)  # one task alone would time out here: they must overlap

    def task(w):
        meet.wait()
        ran[w] = threading.get_ident()

    workers.run([lambda: task(0), lambda: task(1)])
    assert len(set(ran.values())) == 2 and threading.get_ident() not in ran.values()
    workers.close()


def test_successive_runs_reuse_the_same_threads_and_close_ends_them():
    workers, seen = Workers(2), []
    for _ in range(3):
        workers.run([lambda: seen.append((0, threading.get_ident())), lambda: seen.append((1, threading.get_ident()))])
    assert len(seen) == 6 and len(set(seen)) == 2  # each worker kept its one thread
    workers.close()
    for t in workers.threads:
        t.join(10)
        assert not t.is_alive()


def test_an_exception_escaping_a_task_reaches_the_caller_and_the_workers_stay_usable():
    workers = Workers(2)

    def boom():
        raise KeyError("lost key")

    with pytest.raises(KeyError, match="lost key"):
        workers.run([boom, lambda: None])
    done = []
    workers.run([lambda: done.append(0), lambda: done.append(1)])
    assert sorted(done) == [0, 1]
    workers.close()


def test_run_rejects_a_task_count_that_is_not_the_worker_count():
    workers = Workers(2)
    with pytest.raises(ValueError, match="1 tasks for 2 workers; give one task per worker"):
        workers.run([lambda: None])
    with pytest.raises(ValueError, match="at least one thread"):
        Workers(0)
    workers.close()


def test_an_interrupted_caller_aborts_the_tasks_and_waits_for_them_before_raising():
    workers, stop, finished = Workers(2), threading.Event(), []
    main = threading.main_thread().ident
    assert threading.get_ident() == main  # signals are delivered to the main thread only

    def interrupting():
        signal.pthread_kill(main, signal.SIGINT)  # Ctrl-C while the caller waits in run
        assert stop.wait(10)
        finished.append(0)

    def waiting():
        assert stop.wait(10)
        finished.append(1)

    with pytest.raises(KeyboardInterrupt):
        workers.run([interrupting, waiting], abort=stop.set)
    assert stop.is_set() and sorted(finished) == [0, 1]  # both ended before the interruption went on
    workers.close()


CTRL_C_WHILE_A_TASK_ENDS = """
import signal, threading
from mplib.worker import Workers
workers, main = Workers(2), threading.main_thread().ident
for _ in range(40):
    stop = threading.Event()
    try:
        # task 0 presses Ctrl-C and ends at once: its end and the interrupt reach the caller together
        workers.run([lambda: signal.pthread_kill(main, signal.SIGINT), lambda: stop.wait(5)], abort=stop.set)
    except KeyboardInterrupt:
        pass
print("no hang")
"""


def test_a_ctrl_c_that_arrives_as_a_task_ends_loses_no_task_and_never_hangs():
    # a caller that counted finished tasks off a queue could drop one taken just as the interrupt was raised,
    # then wait forever for it; run in a child process so that a hang is a failure, not a stuck test run
    done = subprocess.run([sys.executable, "-c", CTRL_C_WHILE_A_TASK_ENDS], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and "no hang" in done.stdout, done.stderr


# -- the pipeline's workers -----------------------------------------------------------------------

TINY = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=16)


def pipe_and_batch():
    pipe = Pipeline(split(GPT(TINY), ["cpu", "cpu"]), chunks=2, loss_fn=lm_loss)
    return pipe, torch.randint(64, (4, 8)), torch.randint(64, (4, 8))


def test_a_pipeline_runs_every_step_on_the_same_worker_threads():
    pipe, x, y = pipe_and_batch()
    idents = []
    pipe.model.stages[1].register_forward_hook(lambda *_: idents.append(threading.get_ident()))
    for _ in range(3):
        pipe.step(x, y)
    assert len(idents) == 6 and len(set(idents)) == 1
    assert idents[0] in {t.ident for t in pipe._workers.threads}


def test_a_collected_pipeline_ends_its_worker_threads():
    pipe, x, y = pipe_and_batch()
    pipe.step(x, y)
    threads = pipe._workers.threads
    assert all(t.is_alive() for t in threads)
    del pipe
    gc.collect()
    for t in threads:
        t.join(10)
        assert not t.is_alive()


def test_a_deep_copy_of_a_pipeline_starts_its_own_workers_and_gives_the_same_grads():
    pipe, x, y = pipe_and_batch()
    pipe.step(x, y)
    twin = copy.deepcopy(pipe)
    pipe.zero_grad(), twin.zero_grad()
    torch.testing.assert_close(twin.step(x, y), pipe.step(x, y))
    assert {t.ident for t in twin._workers.threads}.isdisjoint(t.ident for t in pipe._workers.threads)
    for (name, p), q in zip(pipe.named_parameters(), twin.parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        torch.testing.assert_close(q.grad, p.grad, msg=name)


def test_an_interrupted_pipeline_step_stops_its_workers_and_the_next_step_is_exact():
    pipe, x, y = pipe_and_batch()
    ref = copy.deepcopy(pipe)
    main, fired, woke = threading.main_thread().ident, [], []

    def ctrl_c_once(module, inputs):
        if not fired:
            fired.append(threading.get_ident())
            signal.pthread_kill(main, signal.SIGINT)  # as if the reader pressed Ctrl-C mid-step
            time.sleep(0.3)  # still busy when the caller sees the interrupt: it must wait for this
            woke.append(True)

    hook = pipe.model.stages[0].register_forward_pre_hook(ctrl_c_once)
    with pytest.raises(KeyboardInterrupt):
        pipe.step(x, y)
    assert woke, "step raised while a worker was still inside the interrupted step"
    hook.remove()
    pipe.zero_grad(set_to_none=True)  # the interrupted step left partial gradients: start clean
    torch.testing.assert_close(pipe.step(x, y), ref.step(x, y))
    for (name, p), q in zip(pipe.named_parameters(), ref.parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        torch.testing.assert_close(p.grad, q.grad, msg=name)
