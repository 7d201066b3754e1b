"""Where and how models run: device choice, precision, CPU threads, batched inference."""

from __future__ import annotations

import contextlib
import ctypes
import os

import torch
from torch import nn

from ..core.errors import PipelineError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PipelineError(f"train.device = {name!r}, but no CUDA device is available; use auto or cpu")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise PipelineError(f"train.device = {name!r}, but MPS is not available; use auto or cpu")
    return dev


def cpu_supports_bf16() -> bool:
    """True where oneDNN has native bf16 kernels (AVX-512 BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:
        return False


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32."""
    if precision == "fp32":
        return None
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "cpu":
            return torch.bfloat16 if cpu_supports_bf16() else None
        return None
    if precision == "fp16" and device.type == "cpu":
        raise PipelineError("train.precision = 'fp16' is for GPUs; use bf16 or fp32 on CPU")
    return torch.bfloat16 if precision == "bf16" else torch.float16


def configure_threads(threads: int) -> int:
    """Set intra-op threads (0 = one per core the process may use)."""
    if threads == 0:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(threads)
    # Denormal floats can slow x86 arithmetic by orders of magnitude late in training,
    # when small gradients underflow; flushing them to zero costs no accuracy here.
    torch.set_flush_denormal(True)
    return torch.get_num_threads()


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of handing it back to the
    kernel; False where the C library is not glibc.

    By default glibc serves each block over 32 MB (a batch's activations) with a fresh
    ``mmap`` and unmaps it when freed, so every training step faults in its activations and
    gradients page by page, again: on a 2-core CPU, a sixth of whitened_net's step at batch
    1024 (docs/speed.md). With mmap off and no trimming, freed blocks stay in the heap and the
    next step reuses them, once the heap has settled (a few steps, within about one step's
    memory of the peak). The process keeps its peak memory until it exits."""
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    if not hasattr(libc, "gnu_get_libc_version"):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's malloc.h
    return bool(mallopt(m_trim_threshold, -1) and mallopt(m_mmap_max, 0))  # -1: never trim


def synchronize(device: torch.device) -> None:
    """Wait until ``device`` has finished its queued work. A GPU runs asynchronously: a clock
    read without this times how fast work was queued, not the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def predict_logits(model: nn.Module, images: torch.Tensor, *, batch_size: int, device: torch.device,
                   amp: torch.dtype | None = None, channels_last: bool = False) -> torch.Tensor:
    """Logits (float32, on CPU) of a uint8 image tensor, batched."""
    model.eval()
    out = []
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size].to(device, non_blocking=True).contiguous(memory_format=fmt)
        with autocast(device, amp):
            logits = model(x).float()
        out.append(logits.cpu())
    return torch.cat(out) if out else torch.empty(0)
