"""Seeding and device discovery: real GPUs when present, CPU stand-ins otherwise."""

from __future__ import annotations

import os
import platform
import random
import re
from typing import Sequence

import torch

Device = torch.device | str

_told_stand_ins = False


def seed_everything(seed: int = 0) -> None:
    """Seed Python, torch (CPU and every GPU) so a run repeats exactly.

    Example:
        mplib.env.seed_everything(0)
        torch.randn(2)  # the same two numbers every time
    """
    random.seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # numpy is optional for mplib itself
        pass


def gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def available() -> list[str]:
    """Names of the devices this machine has: 'cpu' plus 'cuda:i' for each GPU."""
    return ["cpu"] + [f"cuda:{i}" for i in range(gpu_count())]


def check_device(device: Device) -> torch.device:
    """Parse `device` and make sure this machine has it; ValueError naming what exists otherwise."""
    if isinstance(device, torch.device):
        dev = device
    elif isinstance(device, str) and re.fullmatch(r"(cpu|cuda)(:\d+)?|mps|meta", device.strip()):
        dev = torch.device(device.strip())
    else:
        raise ValueError(f"unknown device {device!r}; use 'cpu' or 'cuda:i'. This machine has {available()}")
    if dev.type == "cuda":
        index = 0 if dev.index is None else dev.index
        if index >= gpu_count():
            raise ValueError(f"device {device!r} is not on this machine: it has {gpu_count()} GPU(s), "
                             f"so the devices are {available()}; use mplib.env.get_devices(n) for stand-ins")
        dev = torch.device("cuda", index)
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(f"device {device!r} is not on this machine; it has {available()}")
    return dev


def get_devices(n: int, prefer: str | None = None) -> list[torch.device]:
    """`n` devices for the course: `cuda:0..n-1` when n GPUs exist, else n CPU stand-ins.

    A stand-in is the CPU playing the part of one GPU: the code path (placement, copies,
    schedules) is the one real GPUs take, but the n "devices" share the same cores.

    Example:
        devices = mplib.env.get_devices(2)   # [cuda:0, cuda:1] or [cpu, cpu]
        model = mplib.split(model, devices)
    """
    global _told_stand_ins
    if isinstance(n, bool) or not isinstance(n, int):
        raise ValueError(f"n must be a positive int, got {n!r}")
    if n < 1:
        raise ValueError(f"n must be at least 1 device, got {n}; this machine has {available()}")
    if prefer not in (None, "cpu", "cuda"):
        raise ValueError(f"prefer must be None, 'cpu' or 'cuda', got {prefer!r}")
    gpus = gpu_count()
    if prefer == "cuda" and gpus < n:
        raise ValueError(f"asked for {n} GPUs but this machine has {gpus}: {available()}")
    if prefer != "cpu" and gpus >= n:
        return [torch.device("cuda", i) for i in range(n)]
    if not _told_stand_ins and prefer != "cpu":
        print(f"mplib: {gpus} GPU(s) here, {n} wanted: using {n} CPU stand-in devices "
              "(same code path, shared cores, no real speed-up).")
        _told_stand_ins = True
    return [torch.device("cpu") for _ in range(n)]


def are_stand_ins(devices: Sequence[Device]) -> bool:
    """True when several 'devices' are really the same one (CPU stand-ins)."""
    devs = [torch.device(d) for d in devices]
    return len(set(devs)) < len(devs)


def cpu() -> str:
    """The CPU's model name, the vector instructions torch uses, and whether it has int8 dot products (VNNI).

    Speed-ups measured on the CPU depend on these: int8 kernels run several times faster with VNNI.

    Example:
        torch.backends.cpu.get_cpu_capability() in cpu()   # True
    """
    name = platform.processor() or platform.machine()
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    name = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:  # not Linux: the model name from platform, the flags unknown
        return f"{name}, torch uses {torch.backends.cpu.get_cpu_capability()}"
    vnni = "yes" if flags & {"avx512_vnni", "avx_vnni", "amx_int8"} else "no"
    return f"{name}, torch uses {torch.backends.cpu.get_cpu_capability()}, int8 dot products (VNNI): {vnni}"


def describe() -> str:
    """Print (and return) what the course will run on: torch, the CPU and its threads, GPUs and their memory."""
    lines = [f"python {platform.python_version()}, torch {torch.__version__}",
             f"CPU: {os.cpu_count()} cores, torch uses {torch.get_num_threads()} intra-op threads; {cpu()}"]
    gpus = gpu_count()
    if gpus == 0:
        lines.append("GPUs: none; notebooks use CPU stand-in devices (the same code path, no real speed-up)")
    for i in range(gpus):
        p = torch.cuda.get_device_properties(i)
        lines.append(f"cuda:{i}: {p.name}, {p.total_memory / 2**30:.1f} GiB")
    text = "\n".join(lines)
    print(text)
    return text
