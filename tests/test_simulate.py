"""The simulator: exact timelines for equal costs, transfers on link lanes, memory from in-flight counts."""

import pytest

from mplib.schedule import build
from mplib.simulate import simulate


def test_equal_costs_and_free_transfers_give_the_gpipe_formula():
    for K, M in ((1, 1), (2, 4), (4, 8), (8, 3)):
        tl = simulate(build("gpipe", K, M), [1.0] * K, [2.0] * K)
        assert tl.source == "simulated" and len(tl.lanes) == K
        assert tl.duration == 3.0 * (M + K - 1)
        assert tl.bubble_fraction() == pytest.approx((K - 1) / (M + K - 1), rel=1e-12)


def test_every_action_is_one_event_on_its_device():
    tl = simulate(build("1f1b", 3, 5), [1.0] * 3, [2.0] * 3)
    assert len([e for e in tl.events if e.kind == "forward"]) == 15
    assert {(e.lane, e.microbatch) for e in tl.events if e.kind == "backward"} == {(d, m) for d in range(3) for m in range(5)}


def test_transfers_delay_the_next_stage_and_appear_on_link_lanes():
    tl = simulate(build("gpipe", 2, 2), [1.0, 1.0], [2.0, 2.0], transfer=[0.5])
    assert tl.lanes[-1] == "link 0->1"
    copies = [e for e in tl.events if e.kind == "copy"]
    assert len(copies) == 4  # two activations forward, two gradients back
    first_f1 = min(e.start for e in tl.events if e.lane == 1 and e.kind == "forward")
    assert first_f1 == 1.5
    assert tl.duration == 1 + 0.5 + 2 + 4 + 0.5 + 2  # F0 | copy | F0 F1 on stage 1 | B1 B0 | copy | B0
    assert tl.bubble_fraction([0, 1]) > simulate(build("gpipe", 2, 2), [1.0] * 2, [2.0] * 2).bubble_fraction()


def test_recompute_adds_a_forward_before_each_backward():
    plain = simulate(build("gpipe", 2, 4), [1.0] * 2, [2.0] * 2)
    ckpt = simulate(build("gpipe", 2, 4), [1.0] * 2, [2.0] * 2, recompute=True)
    assert len([e for e in ckpt.events if e.kind == "recompute"]) == 8
    assert ckpt.duration == plain.duration + 4 + 1  # 4 recomputes on the last stage, one more on stage 0


def test_memory_samples_follow_microbatches_in_flight():
    for name, peak0 in (("gpipe", 8), ("1f1b", 4)):
        tl = simulate(build(name, 4, 8), [1.0] * 4, [2.0] * 4, bytes_per_microbatch=100)
        assert tl.peak_memory(0) == 100 * peak0
        assert [m.bytes for m in tl.memory if m.lane == 0][-1] == 0


def test_interleaved_costs_split_over_chunks_and_transfers_wrap_around():
    s = build("interleaved", 2, 4, virtual=2)
    tl = simulate(s, [1.0, 1.0], [2.0, 2.0], transfer=[0.1])
    assert tl.lanes[2:] == ["link 0->1", "link 1->0"]
    f = [e for e in tl.events if e.kind == "forward"]
    assert all(e.duration == pytest.approx(0.5) for e in f) and len(f) == 16


def test_simulate_rejects_cost_lists_of_the_wrong_length():
    with pytest.raises(ValueError, match="forward has 3 entries; give one per device \\(2\\)"):
        simulate(build("gpipe", 2, 2), [1.0] * 3, [1.0] * 2)
    with pytest.raises(ValueError, match="transfer has 2 entries but the pipeline has 1 cuts"):
        simulate(build("gpipe", 2, 2), [1.0] * 2, [1.0] * 2, transfer=[1.0, 1.0])


def test_simulated_timeline_bubble_matches_the_formulas_for_every_valid_schedule():
    for name in ("gpipe", "1f1b", "interleaved"):
        v = 2 if name == "interleaved" else 1
        for K in range(1, 9):
            for M in range(1, 17):
                if (name == "1f1b" and M < K) or (name == "interleaved" and M % K):
                    continue
                tl = simulate(build(name, K, M, v), [1.0] * K, [2.0] * K)
                assert tl.bubble_fraction() == pytest.approx((K - 1) / (v * M + K - 1), abs=1e-12), (name, K, M)


def test_chrome_trace_of_a_simulated_timeline_loads_as_json_with_one_event_per_action(tmp_path):
    import json

    s = build("1f1b", 2, 3)
    tl = simulate(s, [1.0, 1.0], [2.0, 2.0], transfer=[0.5], bytes_per_microbatch=10)
    tl.to_chrome_trace(tmp_path / "trace.json")
    doc = json.loads((tmp_path / "trace.json").read_text())
    spans = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    assert len([e for e in spans if e["cat"] == "forward"]) == 6 and len([e for e in spans if e["cat"] == "copy"]) == 6
    f0 = next(e for e in spans if e["tid"] == 1 and e["cat"] == "forward" and e["args"]["microbatch"] == 0)
    assert (f0["name"], f0["ts"], f0["dur"]) == ("F0", 1.5e6, 1e6)  # after F0 on stage 0 and the copy
    names = {e["args"]["name"] for e in doc["traceEvents"] if e["ph"] == "M"}
    assert names == {"stage 0", "stage 1", "link 0->1"}
    assert any(e["ph"] == "C" and e["args"]["bytes"] == 20 for e in doc["traceEvents"])  # 2 in flight x 10 B


def test_step_times_equals_simulate_for_every_row_with_and_without_transfers():
    import numpy as np

    from mplib.simulate import step_times

    rng = np.random.default_rng(0)
    for name, K, M, v in (("gpipe", 3, 4, 1), ("1f1b", 4, 8, 1), ("interleaved", 2, 4, 2)):
        s = build(name, K, M, v)
        S = s.num_stages
        f, b, c = rng.uniform(0.5, 1.5, (5, S)), rng.uniform(1, 3, (5, S)), rng.uniform(0, 0.3, (5, S - 1))
        for transfer in (None, c):
            got = step_times(s, f, b, transfer)
            want = [simulate(s, list(f[i]), list(b[i]), [] if transfer is None else list(c[i])).duration
                    for i in range(5)]
            assert got == pytest.approx(want, rel=1e-12)


def test_critical_path_over_compiled_levels_is_the_same_path():
    """The vectorised path (what `partition.optimal` uses) equals the action-by-action one, ties
    included (integer costs make many), for GPipe, 1F1B, interleaved and the wavefront."""
    import random

    from mplib.simulate import compile_levels, critical_path, step_times
    from mplib.wavefront import wavefront

    rng = random.Random(0)
    checked = 0
    for _ in range(300):
        kind = rng.choice(["gpipe", "1f1b", "interleaved", "wavefront"])
        K = rng.randint(1, 4)
        M = rng.randint(K if kind == "1f1b" else 1, 6)
        if kind == "wavefront":
            s = wavefront(K, rng.randint(1, 5), chunks=rng.randint(1, 2))
        elif kind == "interleaved":
            s = build(kind, K, K * rng.randint(1, 2), virtual=2)
        else:
            s = build(kind, K, M)
        S, ties = s.num_stages, rng.random() < 0.5
        draw = (lambda: float(rng.randint(0, 3))) if ties else rng.random
        f, b = [draw() for _ in range(S)], [draw() for _ in range(S)]
        t = [draw() for _ in range(S - 1)] if S > 1 and rng.random() < 0.7 else []
        levels = compile_levels(s)  # a wavefront cell has three dependencies, the others at most two
        slow, fast = critical_path(s, f, b, t), critical_path(s, f, b, t, levels=levels)
        assert [a.key for a in fast] == [a.key for a in slow], (kind, K, M, f, b, t)
        assert step_times(levels, [f], [b], [t] if t else None)[0] == pytest.approx(simulate(s, f, b, t).duration)
        checked += 1
    assert checked == 300
