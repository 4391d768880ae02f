"""Schedules as data: every F and B once, dependencies hold, exact bubbles, bounded in-flight micro-batches."""

from fractions import Fraction

import pytest

from mplib.schedule import Action, NAMES, Schedule, build, bubble_fraction, exact_bubble, ideal_bubble, render, validate


def _valid_cases():
    for name in NAMES:
        for v in ([1] if name != "interleaved" else [2, 3]):
            for K in range(1, 9):
                for M in range(1, 17):
                    if (name == "gpipe" or (name == "1f1b" and M >= K)
                            or (name == "interleaved" and M % K == 0)):
                        yield name, K, M, v


CASES = list(_valid_cases())


def test_every_schedule_runs_each_forward_and_backward_once_without_deadlock():
    for name, K, M, v in CASES:
        s = build(name, K, M, v)
        validate(s)  # raises on a missing/duplicate action or a deadlock
        assert sum(len(a) for a in s.actions) == 2 * K * M * v


def test_each_device_runs_backward_after_its_forward_in_its_own_order():
    for name, K, M, v in CASES:
        s = build(name, K, M, v)
        for acts in s.actions:
            where = {(a.microbatch, a.stage, a.kind): i for i, a in enumerate(acts)}
            assert all(where[(m, c, "F")] < where[(m, c, "B")] for (m, c, k) in where if k == "B")


def test_gpipe_and_1f1b_bubble_is_k_minus_1_over_m_plus_k_minus_1_exactly():
    for name, K, M, v in CASES:
        if name == "interleaved":
            continue
        for fwd, bwd in ((1, 2), (1, 1), (3, 5)):
            assert exact_bubble(build(name, K, M), fwd, bwd) == Fraction(K - 1, M + K - 1), (name, K, M)


def test_interleaved_bubble_is_k_minus_1_over_v_m_plus_k_minus_1_exactly():
    # Each device's work is v*M chunk-steps of (f+b)/v; the warm-up and drain still cost K-1
    # chunk-steps of (f+b)/v (the pipeline fills chunk-wide, not device-wide), so idle time per
    # device is (K-1)(f+b)/v and the bubble is (K-1)/(v*M + K-1): v times smaller than 1F1B's.
    for name, K, M, v in CASES:
        if name == "interleaved":
            assert exact_bubble(build(name, K, M, v)) == Fraction(K - 1, v * M + K - 1), (K, M, v)


def test_1f1b_never_holds_more_than_k_microbatches_on_stage_0():
    for K in range(1, 9):
        for M in range(K, 17):
            peaks = build("1f1b", K, M).peak_in_flight()
            assert peaks[0] == K
            assert peaks == [K - d for d in range(K)]
            assert build("gpipe", K, M).peak_in_flight() == [M] * K


def test_interleaved_holds_more_chunks_in_flight_than_1f1b_but_a_bounded_number():
    # Megatron's warm-up is 2(K-d-1) + (v-1)K chunk-forwards, plus the one of the first steady step
    for name, K, M, v in CASES:
        if name == "interleaved":
            peaks = build(name, K, M, v).peak_in_flight()
            assert peaks == [min(2 * (K - d - 1) + (v - 1) * K + 1, v * M) for d in range(K)], (K, M, v)


def test_1f1b_rejects_fewer_microbatches_than_devices():
    with pytest.raises(ValueError, match=r"chunks=3 < devices=4; use chunks >= 4, or 'gpipe'"):
        build("1f1b", 4, 3)


def test_1f1b_action_lists_are_pipedream_flush_written_out():
    # K-d-1 warm-up forwards, then one forward / one backward, then the drain (Narayanan et al. 2021)
    assert [" ".join(map(str, acts)) for acts in build("1f1b", 3, 4).actions] == [
        "F0 F1 F2 B0 F3 B1 B2 B3",
        "F0 F1 B0 F2 B1 F3 B2 B3",
        "F0 B0 F1 B1 F2 B2 F3 B3",
    ]


def test_interleaved_action_lists_are_megatrons_written_out():
    # K=2, v=2: device 0 holds stages 0 and 2 ("F1.2": micro-batch 1 through stage 2), device 1
    # stages 1 and 3; groups of K micro-batches go through a device's stages in turn, the
    # backward of the later stage first; warm-up 2(K-d-1) + (v-1)K forwards (Narayanan et al. 2021)
    assert [" ".join(map(str, acts)) for acts in build("interleaved", 2, 4, virtual=2).actions] == [
        "F0 F1 F0.2 F1.2 F2 B0.2 F3 B1.2 F2.2 B0 F3.2 B1 B2.2 B3.2 B2 B3",
        "F0 F1 F0.3 B0.3 F1.3 B1.3 F2 B0 F3 B1 F2.3 B2.3 F3.3 B3.3 B2 B3",
    ]


def test_deps_are_the_previous_stage_forward_and_the_next_stage_backward():
    s = build("interleaved", 2, 2, virtual=2)
    f, b = Action(1, 3, 0, "F"), Action(0, 2, 1, "B")
    assert s.deps(f) == [(2, 0, "F")] and s.crosses((2, 0, "F"), f) == 2
    assert s.deps(b) == [(2, 1, "F"), (3, 1, "B")] and s.crosses((3, 1, "B"), b) == 2
    assert s.crosses((2, 1, "F"), b) is None  # its own forward: no cut


def test_ideal_bubble_is_the_textbook_formula():
    assert ideal_bubble(4, 8) == Fraction(3, 11) and ideal_bubble(2, 4, virtual=2) == Fraction(1, 9)


def test_bubble_fraction_is_a_float_of_the_exact_value():
    assert bubble_fraction(build("gpipe", 4, 8)) == pytest.approx(3 / 11, rel=1e-15)


def test_render_is_a_clock_cycle_table():
    assert render(build("gpipe", 2, 3)).splitlines() == [
        "gpipe: K=2 M=3",
        "dev 0 | F0 F1 F2 .  .  B2 B1 B0",
        "dev 1 | .  F0 F1 F2 B2 B1 B0 .",
    ]
    assert "F1.2" in render(build("interleaved", 2, 2, virtual=2))


def test_build_rejects_unknown_names_listing_the_known_ones():
    with pytest.raises(ValueError, match="unknown schedule 'zigzag'; the known schedules are gpipe, 1f1b, interleaved"):
        build("zigzag", 2, 4)


def test_interleaved_rejects_chunks_not_a_multiple_of_devices():
    with pytest.raises(ValueError, match="chunks must be a multiple of 4, got 6; use chunks=4 or 8"):
        build("interleaved", 4, 6, virtual=2)
    with pytest.raises(ValueError, match="virtual >= 2"):
        build("interleaved", 2, 4, virtual=1)
    with pytest.raises(ValueError, match="use schedule 'interleaved'"):
        build("1f1b", 2, 4, virtual=2)
    with pytest.raises(ValueError, match="devices must be a positive int"):
        build("gpipe", 0, 4)


def test_validate_catches_duplicates_missing_actions_and_deadlocks():
    s = build("gpipe", 2, 2)
    dup = Schedule("x", 2, 2, 1, [s.actions[0] + [Action(0, 0, 0, "F")], s.actions[1]])
    with pytest.raises(ValueError, match="F of micro-batch 0 on stage 0 appears 2 times"):
        validate(dup)
    # device 1 wants B0 before F0: it waits on itself
    bad = Schedule("x", 2, 1, 1, [[Action(0, 0, 0, "F"), Action(0, 0, 0, "B")],
                                  [Action(1, 1, 0, "B"), Action(1, 1, 0, "F")]])
    with pytest.raises(ValueError, match=r"deadlocks(.|\n)*dev 1: B0 <-- ERROR HERE  F0"):
        validate(bad)
    with pytest.raises(ValueError, match="does not belong in device 1's list"):
        validate(Schedule("x", 2, 1, 1, [s.actions[0][:1] + s.actions[0][-1:], [Action(1, 0, 0, "F")]]))
