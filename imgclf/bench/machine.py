"""What the figures were taken on: the CPU and its matrix instructions, torch's settings,
the device, and how busy other processes kept the machine."""

from __future__ import annotations

import contextlib
import os
import platform
import time
import warnings
from typing import Any

import torch
import torchvision

from ..models.runtime import cpu_supports_bf16


def machine_info(device: torch.device) -> dict[str, Any]:
    cpu, flags = platform.processor() or platform.machine(), []
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            info = f.read().splitlines()
        cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), cpu)
        flags = next((line.split(":", 1)[1].split() for line in info if line.startswith("flags")), [])
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cores_usable": usable,
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        # The instruction sets behind the fp32 and bf16 peaks (AMX: bf16 matrix tiles).
        "cpu_matrix_isa": [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags],
        "cpu_bf16": cpu_supports_bf16(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "cuda_device": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        # fp32 convolutions on a GPU run as TF32 when cuDNN allows it (the default), matmuls
        # not: fp32 rows can then pass the fp32 matmul "peak".
        "cuda_tf32": _tf32_flags() if device.type == "cuda" else None,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "busy_elsewhere": busy_elsewhere(),
    }


def _tf32_flags() -> dict[str, bool]:
    with warnings.catch_warnings():  # newer torch deprecates these flags for fp32_precision
        warnings.simplefilter("ignore")
        return {"matmul": bool(torch.backends.cuda.matmul.allow_tf32), "cudnn": bool(torch.backends.cudnn.allow_tf32)}


def busy_elsewhere(seconds: float = 1.0) -> float | None:
    """Fraction of all CPUs that other processes kept busy during ``seconds`` of sleep here
    (from /proc/stat; None where there is none). Training threads that share cores with
    another job wait for each other at every parallel region, so a busy machine can slow
    the figures far more than this fraction suggests."""

    def busy_and_total() -> tuple[int, int]:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
        return sum(ticks) - ticks[3] - ticks[4], sum(ticks)

    try:
        busy0, total0 = busy_and_total()
        time.sleep(seconds)
        busy1, total1 = busy_and_total()
    except (OSError, ValueError):
        return None
    return (busy1 - busy0) / max(1, total1 - total0)


def bf16_available(device: torch.device) -> bool:
    """Whether bf16 rows and a bf16 peak are measured on ``device``."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_supports_bf16()
