"""mplib.hardware: a sane GPU and link catalog, measured copy bandwidth, the fit table."""

from types import SimpleNamespace

import pytest
import torch

from mplib.hardware import ALIASES, GPUS, LINKS, NVLINK, fit_table, measure_bandwidth


def test_catalog_has_every_gpu_generation_the_course_names():
    names = " ".join(GPUS)
    for chip in ("V100", "A100", "H100", "H200"):
        assert chip in names


def test_every_gpu_has_positive_figures_in_the_documented_units_and_a_source():
    for g in GPUS.values():
        assert 16 <= g.memory_gib <= 200, g  # GiB, not bytes or MiB
        assert 500 <= g.mem_bandwidth_gbs <= 10_000, g  # GB/s, not TB/s
        assert 10 <= g.fp32_tflops <= 100, g  # TFLOPS
        assert g.bf16_tflops is None or g.bf16_tflops > g.fp32_tflops, g  # tensor cores beat fp32
        assert g.memory_bytes == int(g.memory_gib * 2**30)
        assert len(g.source) > 10


def test_each_gpu_generation_has_at_least_the_memory_and_bandwidth_of_the_one_before():
    order = ["V100 32GB", "A100 40GB", "A100 80GB", "H100 SXM", "H200 SXM"]
    assert set(order) == set(GPUS)
    for older, newer in zip(order, order[1:]):
        assert GPUS[newer].memory_gib >= GPUS[older].memory_gib, (older, newer)
        assert GPUS[newer].mem_bandwidth_gbs > GPUS[older].mem_bandwidth_gbs, (older, newer)
    assert GPUS["V100 32GB"].bf16_tflops is None  # Volta has no bf16


def test_catalog_has_pcie_3_to_5_nvlink_2_to_4_and_nvswitch_with_sources():
    names = " ".join(LINKS)
    for link in ("PCIe 3.0", "PCIe 4.0", "PCIe 5.0", "NVLink 2", "NVLink 3", "NVLink 4", "NVSwitch"):
        assert link in names
    assert all(k.gbs_per_direction > 0 and len(k.source) > 10 for k in LINKS.values())


def test_each_pcie_generation_doubles_the_one_before_and_nvswitch_beats_the_pcie_of_its_time():
    pcie = [LINKS[f"PCIe {g}.0 x16"].gbs_per_direction for g in (3, 4, 5)]
    assert pcie[1] == pytest.approx(2 * pcie[0]) and pcie[2] == pytest.approx(2 * pcie[1])
    switched = [LINKS[n].gbs_per_direction for n in ("NVSwitch (DGX-2, V100)", "NVSwitch (DGX A100)",
                                                     "NVSwitch (DGX H100)")]
    assert switched == sorted(switched)
    assert all(nv > 5 * p for nv, p in zip(switched, pcie))  # V100/PCIe 3, A100/PCIe 4, H100/PCIe 5


def test_nvlink_per_gpu_is_links_times_per_link_and_half_the_marketed_both_ways_total():
    marketed = {"NVLink 2": 300, "NVLink 3": 600, "NVLink 4": 900}  # GB/s, both directions summed
    for name, gen in NVLINK.items():
        assert gen.gbs_per_link == 25  # every generation here: 25 GB/s each way per link
        assert gen.per_gpu_gbs == gen.links_per_gpu * gen.gbs_per_link == marketed[name] / 2


def test_a_pair_without_a_switch_gets_only_its_links_and_a_switch_gives_it_the_gpus_total():
    for link in LINKS.values():
        if link.per_gpu_gbs is not None:
            assert link.gbs_per_direction <= link.per_gpu_gbs, link.name
    assert LINKS["NVLink 2 x1 (DGX-1 V100)"].gbs_per_direction == 25
    assert LINKS["NVLink 3 x4 (HGX A100 4-GPU)"].gbs_per_direction == 4 * 25
    assert LINKS["NVSwitch (DGX H100)"].gbs_per_direction == NVLINK["NVLink 4"].per_gpu_gbs == 450


def test_earlier_link_names_still_resolve_but_are_not_listed_and_unknown_names_say_what_exists():
    for old, new in ALIASES.items():
        assert LINKS[old] is LINKS[new] and old not in list(LINKS)
    with pytest.raises(KeyError, match="no link named 'NVLink 9'"):
        LINKS["NVLink 9"]


def test_gpu_seconds_is_flops_over_the_peak_rate_and_refuses_a_rate_the_chip_lacks():
    assert GPUS["A100 40GB"].seconds(312e12, "bf16") == pytest.approx(1.0)
    assert GPUS["A100 40GB"].seconds(19.5e12) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="V100 32GB has no 'bf16' rate"):
        GPUS["V100 32GB"].seconds(1e12, "bf16")


def test_link_seconds_is_bytes_over_the_rate():
    assert LINKS["PCIe 4.0 x16"].seconds(2**30) == pytest.approx(2**30 / 31.5e9)
    assert LINKS["PCIe 4.0 x16"].seconds(0) == 0


def test_cpu_copy_bandwidth_is_positive_and_finite():
    rate = measure_bandwidth("cpu", "cpu", nbytes=2**20, repeats=3)
    assert 1e6 < rate < 1e13  # bytes/s: between 1 MB/s and 10 TB/s


@pytest.mark.parametrize("kwargs, error, match", [
    ({"nbytes": 0}, ValueError, "nbytes must be a positive int"),
    ({"repeats": 0}, ValueError, "repeats must be a positive int"),
    ({"dst": "gpu"}, ValueError, "unknown device 'gpu'"),
])
def test_measure_bandwidth_rejects_bad_arguments(kwargs, error, match):
    args = {"src": "cpu", "dst": "cpu", **kwargs}
    with pytest.raises(error, match=match):
        measure_bandwidth(**args)


def test_fit_table_says_ok_or_how_many_gpus_of_memory():
    gib = 2**30
    table = fit_table({"small": SimpleNamespace(total=10 * gib), "big": SimpleNamespace(total=100 * gib)},
                      [GPUS["V100 32GB"], GPUS["H200 SXM"]])
    rows = table.splitlines()
    assert rows[2].split() == ["small", "10.0", "ok", "ok"]
    assert rows[3].split() == ["big", "100.0", "x4", "ok"]  # ceil(100 / 32) = 4 V100s


@pytest.mark.cuda
def test_pinned_host_to_device_copies_are_faster_than_pageable_ones():
    pageable = measure_bandwidth("cpu", "cuda:0", nbytes=2**28, pinned=False)
    pinned = measure_bandwidth("cpu", "cuda:0", nbytes=2**28, pinned=True)
    assert pinned > pageable > 0


@pytest.mark.cuda
def test_device_to_host_and_device_to_device_bandwidth_are_positive():
    assert measure_bandwidth("cuda:0", "cpu", pinned=True) > 1e9  # any GPU link does over 1 GB/s
    assert measure_bandwidth("cuda:0", "cuda:0") > 1e10  # a copy inside GPU memory: over 10 GB/s
    if torch.cuda.device_count() > 1:
        assert measure_bandwidth("cuda:0", "cuda:1") > 1e9
