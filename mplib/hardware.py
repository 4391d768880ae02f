"""Catalog of GPUs and links (PCIe, NVLink, NVSwitch) from vendor datasheets, and measured copy bandwidth.

Headline figures (dense rates, SXM boards), each with the document it comes from; NVLink per link
and per GPU apart from what one pair of GPUs gets. Measure your own machine with `measure_bandwidth`.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

import mplib.env


@dataclass(frozen=True)
class GPU:
    """One accelerator: memory (GiB, as marketed in GB), memory bandwidth (GB/s) and peak TFLOPS.

    `bf16_tflops` is None where the chip has no bf16 (V100); it is the dense tensor-core rate.
    """

    name: str
    memory_gib: float
    mem_bandwidth_gbs: float
    fp32_tflops: float
    bf16_tflops: float | None
    source: str

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * 2**30)

    def seconds(self, flops: float, dtype: str = "fp32") -> float:
        """Time of `flops` floating-point operations at this GPU's peak rate for `dtype` (a lower bound).

        Example:
            GPUS["A100 40GB"].seconds(312e12, "bf16")   # 1.0
        """
        rate = {"fp32": self.fp32_tflops, "bf16": self.bf16_tflops}.get(dtype, 0)
        if not rate:
            raise ValueError(f"{self.name} has no {dtype!r} rate in the catalog; use 'fp32'"
                             + (" or 'bf16'" if self.bf16_tflops else ""))
        return flops / (rate * 1e12)


@dataclass(frozen=True)
class Link:
    """A connection between two devices: `gbs_per_direction` GB/s (1e9 bytes/s) each way, `latency` s per message.

    Accepted wherever mplib takes a link (`mplib.partition.optimal(links=...)`): it reads
    `bandwidth` (bytes/s) and `latency`. The datasheets give no latency, so the catalog's is 0;
    measure yours and pass `dataclasses.replace(link, latency=...)`.
    """

    name: str
    gbs_per_direction: float
    source: str
    latency: float = 0.0
    per_gpu_gbs: float | None = None  # the GPU's total over all its links, each way (NVLink/NVSwitch only)

    @property
    def bandwidth(self) -> float:
        """Bytes per second each way."""
        return self.gbs_per_direction * 1e9

    def seconds(self, nbytes: int) -> float:
        """Time to send `nbytes` one way at the link's peak rate plus its latency (a lower bound).

        Example:
            LINKS["PCIe 4.0 x16"].seconds(2**30)   # about 0.034 s for 1 GiB
        """
        return nbytes / self.bandwidth + self.latency


GPUS: dict[str, GPU] = {g.name: g for g in [
    GPU("V100 32GB", 32, 900, 15.7, None, "NVIDIA Tesla V100 GPU Accelerator datasheet (SXM2)"),
    GPU("A100 40GB", 40, 1555, 19.5, 312, "NVIDIA A100 Tensor Core GPU datasheet (SXM, dense BF16)"),
    GPU("A100 80GB", 80, 2039, 19.5, 312, "NVIDIA A100 Tensor Core GPU datasheet (SXM, dense BF16)"),
    GPU("H100 SXM", 80, 3350, 67, 989, "NVIDIA H100 Tensor Core GPU datasheet (SXM, dense BF16)"),
    GPU("H200 SXM", 141, 4800, 67, 989, "NVIDIA H200 Tensor Core GPU datasheet (SXM, dense BF16)"),
]}

@dataclass(frozen=True)
class NVLinkGeneration:
    """One NVLink generation: how many links a GPU has and what one link carries, each way.

    `per_gpu_gbs` is the marketed "NVLink bandwidth" halved: vendors quote both directions summed.
    """

    name: str
    gpu: str
    links_per_gpu: int
    gbs_per_link: float
    source: str

    @property
    def per_gpu_gbs(self) -> float:
        """GB/s each way over all of a GPU's links: the most one GPU can send at once."""
        return self.links_per_gpu * self.gbs_per_link


NVLINK: dict[str, NVLinkGeneration] = {g.name: g for g in [
    NVLinkGeneration("NVLink 2", "V100", 6, 25, "NVIDIA Tesla V100 GPU Architecture whitepaper (6 links, "
                     "300 GB/s total both ways)"),
    NVLinkGeneration("NVLink 3", "A100", 12, 25, "NVIDIA A100 Tensor Core GPU Architecture whitepaper (12 links, "
                     "600 GB/s total both ways)"),
    NVLinkGeneration("NVLink 4", "H100", 18, 25, "NVIDIA H100 Tensor Core GPU Architecture whitepaper (18 links, "
                     "900 GB/s total both ways)"),
]}

# A Link is what ONE PAIR of GPUs gets each way. PCIe: transfer rate x 16 lanes x 128b/130b / 8.
# Without a switch, a pair gets the links wired between the two (DGX-1: 1 or 2 of a V100's 6;
# a 4-GPU HGX A100: 4 of 12 to each peer; an H100 NVL pair: a 12-link bridge). An NVSwitch lets a pair use all of a GPU's links, but
# only while that GPU talks to one peer: sending to several at once, they share its total.
_V2, _V3, _V4 = NVLINK["NVLink 2"], NVLINK["NVLink 3"], NVLINK["NVLink 4"]
LINKS: dict[str, Link] = {k.name: k for k in [
    Link("PCIe 3.0 x16", 15.75, "PCI-SIG, PCI Express Base Specification Revision 3.0 (8 GT/s)"),
    Link("PCIe 4.0 x16", 31.5, "PCI-SIG, PCI Express Base Specification Revision 4.0 (16 GT/s)"),
    Link("PCIe 5.0 x16", 63.0, "PCI-SIG, PCI Express Base Specification Revision 5.0 (32 GT/s)"),
    Link("NVLink 2 x1 (DGX-1 V100)", 1 * _V2.gbs_per_link, "NVIDIA DGX-1 with Tesla V100 system architecture "
         "whitepaper (hybrid cube-mesh: a pair has 1 or 2 links)", per_gpu_gbs=_V2.per_gpu_gbs),
    Link("NVLink 2 x2 (DGX-1 V100)", 2 * _V2.gbs_per_link, "NVIDIA DGX-1 with Tesla V100 system architecture "
         "whitepaper (hybrid cube-mesh: a pair has 1 or 2 links)", per_gpu_gbs=_V2.per_gpu_gbs),
    Link("NVLink 3 x4 (HGX A100 4-GPU)", 4 * _V3.gbs_per_link, "NVIDIA HGX A100 4-GPU: every pair joined "
         "by 4 of each GPU's 12 links", per_gpu_gbs=_V3.per_gpu_gbs),
    Link("NVLink 4 bridge (H100 NVL pair)", 12 * _V4.gbs_per_link, "NVIDIA H100 NVL datasheet (NVLink bridge "
         "between the two cards of a pair: 600 GB/s both ways)", per_gpu_gbs=12 * _V4.gbs_per_link),
    Link("NVSwitch (DGX-2, V100)", _V2.per_gpu_gbs, "NVIDIA DGX-2 datasheet (NVSwitch gen 1: 300 GB/s per GPU "
         "both ways, any pair)", per_gpu_gbs=_V2.per_gpu_gbs),
    Link("NVSwitch (DGX A100)", _V3.per_gpu_gbs, "NVIDIA DGX A100 datasheet (NVSwitch gen 2: 600 GB/s per GPU "
         "both ways, any pair)", per_gpu_gbs=_V3.per_gpu_gbs),
    Link("NVSwitch (DGX H100)", _V4.per_gpu_gbs, "NVIDIA DGX H100 datasheet (NVSwitch gen 3: 900 GB/s per GPU "
         "both ways, any pair)", per_gpu_gbs=_V4.per_gpu_gbs),
]}
# Earlier names, kept so existing code keeps working: "NVLink N (GPU)" meant a GPU's whole NVLink
# bandwidth toward one peer, which only a switch provides.
ALIASES: dict[str, str] = {"NVLink 2 (V100)": "NVSwitch (DGX-2, V100)", "NVLink 3 (A100)": "NVSwitch (DGX A100)",
                           "NVLink 4 (H100)": "NVSwitch (DGX H100)"}


class _Links(dict):
    """The catalog; an earlier name (`ALIASES`) still finds its entry but is not listed."""

    def __missing__(self, key: str) -> Link:
        if key in ALIASES:
            return self[ALIASES[key]]
        raise KeyError(f"no link named {key!r}; the catalog has {sorted(self)}")


LINKS = _Links(LINKS)


def measure_bandwidth(src: str | torch.device, dst: str | torch.device, nbytes: int = 2**26,
                      pinned: bool = False, repeats: int = 5) -> float:
    """Median bytes/s of copying an `nbytes` buffer from `src` to `dst` on this machine.

    Host->device, device->host and device->device on CUDA, synchronising before and after each
    copy; `pinned` puts the host side in page-locked memory (what `non_blocking` copies need).
    On a CPU-only machine src and dst are both "cpu" and this measures a memory-to-memory copy
    in RAM, not a link: it says how fast a stand-in "transfer" is, nothing about PCIe.

    Example:
        dst = mplib.env.get_devices(1)[0]                 # cuda:0, or the CPU where there is no GPU
        gbs = mplib.hardware.measure_bandwidth("cpu", dst, pinned=dst.type == "cuda") / 1e9
        print(f"{gbs:.1f} GB/s host to {dst}")
    """
    src_dev, dst_dev = mplib.env.check_device(src), mplib.env.check_device(dst)
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 1:
        raise ValueError(f"nbytes must be a positive int (bytes per copy), got {nbytes!r}; try 2**26 (64 MiB)")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive int (the median of that many copies), got {repeats!r}")
    pin = pinned and torch.cuda.is_available()  # pinning needs CUDA; on CPU it changes nothing
    source = _buffer(nbytes, src_dev, pin).fill_(1)
    target = _buffer(nbytes, dst_dev, pin)
    devices = [d for d in (src_dev, dst_dev) if d.type == "cuda"]
    target.copy_(source, non_blocking=pin)  # warm-up: first touch of pages, CUDA context, kernels
    _sync(devices)
    times = []
    for _ in range(repeats):
        _sync(devices)
        start = time.perf_counter()
        target.copy_(source, non_blocking=pin)
        _sync(devices)  # a non-blocking copy is only done once the device says so
        times.append(time.perf_counter() - start)
    return nbytes / statistics.median(times)


def fit_table(estimates: Mapping[str, object], gpus: Sequence[GPU] | None = None) -> str:
    """A text table: each estimate's total GiB and, per GPU, how many of its memory it fills.

    A cell reads "ok" when the total fits one GPU, else "xN" (N GPUs' worth of memory at least).

    Example:
        print(fit_table({"GPT-2 XL": mplib.memory.estimate(GPT2_XL, 8, 1024)}))
    """
    gpus = list(GPUS.values()) if gpus is None else list(gpus)
    name_w = max([len(n) for n in estimates] + [5])
    head = f"{'model':<{name_w}} {'total GiB':>10} " + " ".join(f"{g.name:>10}" for g in gpus)
    rows = [head, "-" * len(head)]
    for name, est in estimates.items():
        total = est.total  # type: ignore[attr-defined]
        cells = ["ok" if total <= g.memory_bytes else f"x{-(-total // g.memory_bytes)}" for g in gpus]
        rows.append(f"{name:<{name_w}} {total / 2**30:>10.1f} " + " ".join(f"{c:>10}" for c in cells))
    return "\n".join(rows)


def _buffer(nbytes: int, device: torch.device, pinned: bool) -> torch.Tensor:
    pin = pinned and device.type == "cpu"
    return torch.empty(nbytes, dtype=torch.uint8, device=device, pin_memory=pin)


def _sync(devices: Sequence[torch.device]) -> None:
    for d in devices:
        torch.cuda.synchronize(d)
