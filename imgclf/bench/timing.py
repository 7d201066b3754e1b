"""How figures are taken: a synchronised clock, warm-up and timed repeats, the matmul peak,
the cost of denormals, and the time to load the cache. (The FLOP count of a training image
is :func:`imgclf.models.shapes.train_flops_per_image`, which the train stage reports too.)"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..cache.dataset import Cache, load_cache
from .feeders import Feeder


@dataclass(frozen=True)
class Settings:
    """How hard to measure: --quick trades precision of the figures for a run of seconds."""

    repeats: int = 5  # timed repeats; the median is reported
    min_seconds: float = 1.0  # a timed repeat runs at least this long (whole steps)
    matmul_size: int = 4096  # square matrices for the peak-FLOP/s measurement
    num_train: int = 50_000  # synthetic data only
    num_test: int = 10_000
    batch_divisor: int = 1  # --quick: smaller batches so every row takes a second


FULL = Settings()
QUICK = Settings(repeats=5, min_seconds=0.0, matmul_size=512, num_train=512, num_test=128, batch_divisor=8)


def synchronizer(device: torch.device) -> Callable[[], None]:
    """Wait for queued device work: a GPU runs asynchronously, so the clock may be read only
    after a synchronize (CPU work is synchronous already)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    if device.type == "mps":
        return torch.mps.synchronize
    return lambda: None


def measure(run: Feeder, sync: Callable[[], None], s: Settings) -> dict[str, Any]:
    """Warm up, pick whole steps per repeat for >= s.min_seconds, time s.repeats repeats."""
    run(1)  # first step: lazy initialisation, kernel selection, allocator growth
    sync()
    steps = 1
    if s.min_seconds > 0:
        t0 = time.perf_counter()
        run(1)
        sync()
        one = time.perf_counter() - t0
        steps = min(1000, max(1, math.ceil(s.min_seconds / max(one, 1e-6))))
        if steps > 1:
            run(steps)  # warm at the repeat's size (an epoch of that many batches)
    rates = []
    for _ in range(s.repeats):
        sync()
        t0 = time.perf_counter()
        images = run(steps)
        sync()
        rates.append(images / (time.perf_counter() - t0))
    median = statistics.median(rates)
    return {"images_per_s": median, "repeats": rates, "steps_per_repeat": steps, "spread": (max(rates) - min(rates)) / median}


def peak_flops(dtype: torch.dtype, device: torch.device, n: int, repeats: int, sync: Callable[[], None]) -> float:
    """FLOP/s of an n x n matrix product (2 n^3 FLOPs): what the hardware sustains at best."""
    g = torch.Generator(device).manual_seed(0)
    a = torch.randn(n, n, device=device, generator=g).to(dtype)
    b = torch.randn(n, n, device=device, generator=g).to(dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    torch.mm(a, b, out=out)
    sync()
    rates = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        sync()
        rates.append(2 * n**3 / (time.perf_counter() - t0))
    return statistics.median(rates)


def denormal_cost(repeats: int, n: int = 256) -> dict[str, float]:
    """Seconds of an n x n matrix product whose products underflow to denormals, with
    flush-to-zero off, then on.

    Denormals (|x| < 1.2e-38 in fp32) appear late in training, when small gradients
    underflow; x86 handles them in slow microcode unless flush-to-zero is set, which
    :func:`imgclf.models.runtime.configure_threads` does. A fresh model has none, so the effect is
    shown on matrices made to produce them rather than in the throughput rows."""
    a = torch.full((n, n), 1e-20)  # normal floats whose products (1e-40) are denormal
    out = torch.empty(n, n)
    result: dict[str, float] = {"matmul": n}
    try:
        for flush in (False, True):
            torch.set_flush_denormal(flush)
            times = []
            for _ in range(repeats + 1):  # the first is a warm-up
                t0 = time.perf_counter()
                torch.mm(a, a, out=out)
                times.append(time.perf_counter() - t0)
            result["flush_on" if flush else "flush_off"] = statistics.median(times[1:])
    finally:
        torch.set_flush_denormal(True)  # the pipeline's setting
    result["slowdown"] = result["flush_off"] / result["flush_on"]
    return result


def timed_load(cache_dir: str | os.PathLike) -> tuple[Cache, float]:
    """Load the cache fully into memory and return it with the seconds it took."""
    t0 = time.perf_counter()
    cache = load_cache(cache_dir)
    # Touch every page so the figure includes the read, not just the mmap call.
    for s in (cache.train, cache.test):
        s.images = s.images.clone()
        s.labels = s.labels.clone()
    return cache, time.perf_counter() - t0
