"""The pipeline explorer: the function behind the sliders, tested without a widget front end."""

import matplotlib.pyplot as plt
import pytest

from mplib.widgets import draw, explorer, scenario


def test_scenario_bubble_equals_the_formula_when_links_are_free():
    for name, K, M in (("gpipe", 4, 8), ("1f1b", 4, 8), ("interleaved", 4, 8), ("1f1b", 1, 3)):
        sc = scenario(K, M, name)
        assert sc.bubble == pytest.approx(sc.formula, abs=1e-12)
    assert scenario(4, 8, "gpipe").formula == pytest.approx(3 / 11)
    assert scenario(4, 8, "interleaved").formula == pytest.approx(3 / 19)  # v=2 chunks per device


def test_scenario_slow_links_grow_the_bubble_and_the_step():
    free, slow = scenario(4, 8, "1f1b"), scenario(4, 8, "1f1b", link_time=0.5)
    assert slow.bubble > free.bubble and slow.timeline.duration > free.timeline.duration
    assert free.timeline.duration == 3 * (8 + 4 - 1)  # (M+K-1) steps of forward 1 + backward 2


def test_scenario_summary_names_the_schedule_bubble_and_memory():
    sc = scenario(4, 8, "gpipe")
    assert sc.in_flight == [8] * 4 and scenario(4, 8, "1f1b").in_flight == [4, 3, 2, 1]
    assert "gpipe: K=4 devices, M=8 micro-batches" in sc.summary
    assert "bubble 27.3% (formula with free links 27.3%)" in sc.summary and "holds 8 micro-batches" in sc.summary


def test_draw_returns_the_timeline_axes_and_draws_invalid_choices_as_a_message():
    ax = draw(2, 4, "gpipe", link_time=0.1)
    assert len(ax.patches) == 16 + 8  # 16 compute bars on 2 devices, 8 copies on the link
    assert "bubble" in ax.get_title()
    bad = draw(4, 3, "1f1b")  # 1F1B needs M >= K: the message replaces the chart
    assert "chunks >= 4" in bad.texts[0].get_text()
    plt.close("all")


def test_explorer_builds_sliders_for_devices_microbatches_schedule_and_link_time():
    pytest.importorskip("ipywidgets")
    box = explorer(devices=2, chunks=4)
    sliders = [c for row in box.children[:2] for c in row.children]
    assert [s.description for s in sliders] == ["devices K", "micro-batches M", "schedule", "link time"]
    plt.close("all")
