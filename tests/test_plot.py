import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import pytest
import torch

import mplib.plot


def test_layer_bytes_draws_one_bar_per_layer_and_series_in_the_unit():
    ax = mplib.plot.layer_bytes(["embed", "lstm 0"], {"parameters": [1024, 2048], "activations": [0, 4096]})
    heights = sorted(patch.get_height() for patch in ax.patches)
    assert heights == [0.0, 1.0, 2.0, 4.0]  # KiB
    plt.close("all")


def test_layer_bytes_rejects_a_series_of_the_wrong_length():
    with pytest.raises(ValueError, match="series 'activations' has 1 values for 2 layers"):
        mplib.plot.layer_bytes(["a", "b"], {"activations": [1]})


def test_embeddings_scatters_the_first_two_principal_components_by_label():
    points = torch.zeros(6, 4)
    points[:3, 0], points[3:, 0] = 1.0, -1.0  # two clouds along one axis
    ax = mplib.plot.embeddings(points, ["a"] * 3 + ["b"] * 3)
    a, b = (torch.as_tensor(c.get_offsets().data) for c in ax.collections)
    assert a.shape == b.shape == (3, 2)
    torch.testing.assert_close(a[:, 0].abs(), torch.ones(3, dtype=a.dtype))  # PC 1 is the axis that separates them
    assert torch.sign(a[0, 0]) != torch.sign(b[0, 0])
    plt.close("all")


def test_embeddings_draws_identical_vectors_on_one_spot():
    ax = mplib.plot.embeddings(torch.full((4, 3), 2.5), ["x", "x", "y", "y"])
    assert all(torch.as_tensor(c.get_offsets().data).abs().max() == 0 for c in ax.collections)
    with pytest.raises(ValueError, match="one label per row"):
        mplib.plot.embeddings(torch.zeros(4, 3), ["x"])
    plt.close("all")


def _tl(durations, stages=None):
    from mplib.timeline import Event, Timeline
    events, t = [], 0.0
    for i, d in enumerate(durations):
        events.append(Event(lane=0, kind="forward", start=t, end=t + d, microbatch=i,
                            stage=None if stages is None else stages[i]))
        t += d
    return Timeline(lanes=["device 0"], events=events, source="simulated")


def test_timelines_share_one_time_axis_so_the_longer_one_is_not_cut_off():
    short, long = _tl([0.001] * 2), _tl([0.001] * 5)
    axes = mplib.plot.timelines([short, long], ["short", "long"])
    assert [ax.get_xlim()[1] for ax in axes] == [pytest.approx(5.0)] * 2  # ms, the longer one's end
    assert [ax.get_title() for ax in axes] == ["short", "long"]
    bars = [p for p in axes[1].patches]
    assert max(p.get_x() + p.get_width() for p in bars) <= axes[1].get_xlim()[1] + 1e-9
    with pytest.raises(ValueError, match="2 titles for 1 timelines"):
        mplib.plot.timelines([short], ["a", "b"])
    plt.close("all")


def test_timeline_labels_unitless_simulations_by_their_unit_and_marks_a_second_chunk():
    ax = mplib.plot.timeline(_tl([1.0, 2.0], stages=[0, 4]), unit="forward times")
    assert ax.get_xlabel() == "time (forward times)" and ax.get_xlim()[1] == pytest.approx(3.0)
    assert [t.get_text() for t in ax.texts] == ["F0", "F1'"]  # stage 4 is the device's 2nd chunk
    assert [p.get_linewidth() for p in ax.patches[:2]] == [0.4, 1.6]
    plt.close("all")


def test_memory_stacks_on_a_linear_axis_and_log_draws_parts_side_by_side():
    from types import SimpleNamespace
    gib = 2**30
    est = {"a": SimpleNamespace(params=gib, grads=gib, optimizer=2 * gib, activations=4 * gib, total=8 * gib),
           "b": SimpleNamespace(params=gib, grads=gib, optimizer=2 * gib, activations=60 * gib, total=64 * gib)}
    ax = mplib.plot.memory(est)
    assert ax.get_yscale() == "linear"
    tops = sorted(p.get_y() + p.get_height() for p in ax.patches)
    assert tops[-2:] == [pytest.approx(8.0), pytest.approx(64.0)]  # stacks reach the totals
    ax = mplib.plot.memory(est, logy=True)
    assert ax.get_yscale() == "log" and all(p.get_y() == 0 for p in ax.patches)  # nothing stacked
    plt.close("all")


def test_plan_memory_axis_fits_the_bars_and_writes_a_far_limit_instead_of_drawing_it():
    from types import SimpleNamespace
    mib = 2**20
    p = SimpleNamespace(balance=[3, 2], stage_times=[0.002, 0.003], memory=[10 * mib, 8 * mib],
                        limits=[12 * mib, 10_000 * mib], bottleneck="stage 1", schedule="1f1b", chunks=4,
                        step_time=0.02)
    ax = mplib.plot.plan(p, title="tight")
    mem = ax.figure.axes[-1]
    assert mem.get_ylim()[1] == pytest.approx(1.15 * 12)  # the near limit shows, the far one does not stretch it
    assert any("10,000 MiB" in t.get_text() for t in mem.texts)
    assert ax.get_title().startswith("tight: [3, 2]")
    axes = mplib.plot.plans([p, p], ["uniform", "optimal"])
    assert axes[0].get_ylim() == axes[1].get_ylim()
    plt.close("all")
