"""The throughput rows: which are measured for a recipe, how one is measured, and the ratios
derived from a recipe's rows."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ..cache.dataset import Cache
from ..models.runtime import configure_threads
from .feeders import Config, Recipe, build, classic_feeder, compute_feeder, pipeline_feeder
from .machine import bf16_available
from .timing import Settings, measure, synchronizer


def row_id(kind: str, cfg: Config, workers: int | None = None) -> str:
    parts = [cfg.recipe.name, kind, cfg.precision, "cl" if cfg.channels_last else "nchw", f"b{cfg.batch}", f"t{cfg.threads}"]
    if workers is not None:
        parts.append(f"w{workers}")
    return "/".join(parts)


def plan(recipe: Recipe, device: torch.device, s: Settings, cores: int) -> list[tuple[str, Config, int | None]]:
    """(kind, config, DataLoader workers) for each throughput row of one recipe; the first
    row is the recipe as `dvc repro` trains it (precision auto, channels_last)."""
    best = "bf16" if bf16_available(device) else "fp32"
    ref = Config(recipe, recipe.batch // s.batch_divisor, best, channels_last=True, threads=0)
    rows: list[tuple[str, Config, int | None]] = [
        ("pipeline", ref, None), ("compute", ref, None), ("classic", ref, 0), ("classic", ref, 2),
    ]
    variants = [(best, False), ("fp32", True), ("fp32", False)]
    for precision, cl in dict.fromkeys(variants):
        if (precision, cl) != (best, True):
            cfg = replace(ref, precision=precision, channels_last=cl)
            rows += [("pipeline", cfg, None), ("compute", cfg, None)]
    rows.append(("pipeline", replace(ref, batch=recipe.other_batch // s.batch_divisor), None))
    if device.type == "cpu" and cores > 1:
        rows.append(("pipeline", replace(ref, threads=1), None))
    return rows


@dataclass
class Bench:
    """What every throughput row shares: the device, the cached data, the ceilings."""

    device: torch.device
    settings: Settings
    cache: Cache
    x_train: torch.Tensor  # the whole uint8 train split, on the device (as train.py holds it)
    y_train: torch.Tensor
    classic_root: Path  # the archive's batch files, for torchvision's CIFAR10
    flops_per_image: dict[str, float]
    peaks: dict[tuple[str, int], float]  # (precision, threads; 0 = all) -> FLOP/s

    def row(self, kind: str, cfg: Config, workers: int | None) -> dict[str, Any]:
        """Measure one throughput row; the threads setting applies to it alone."""
        configure_threads(cfg.threads)
        try:
            tr, train_params = build(cfg, self.device, self.cache)
            close = None
            if kind == "pipeline":
                feeder = pipeline_feeder(tr, train_params, self.x_train, self.y_train, torch.Generator(self.device).manual_seed(0))
            elif kind == "compute":
                feeder = compute_feeder(tr, train_params, self.x_train, self.y_train)
            else:
                feeder, close = classic_feeder(tr, train_params, self.classic_root, self.cache.mean, self.cache.std, workers or 0,
                                               self.cache.image_size)
            try:
                timing = measure(feeder, synchronizer(self.device), self.settings)
            finally:
                if close is not None:
                    close()
            threads = torch.get_num_threads()
        finally:
            configure_threads(0)
        peak = self.peaks.get((cfg.precision, cfg.threads), self.peaks[(cfg.precision, 0)])
        return {
            "id": row_id(kind, cfg, workers), "recipe": cfg.recipe.name, "model": cfg.recipe.title, "kind": kind,
            "precision": cfg.precision, "channels_last": cfg.channels_last, "batch": cfg.batch,
            "threads": threads, "workers": workers, **timing,
            "peak_fraction": timing["images_per_s"] * self.flops_per_image[cfg.recipe.name] / peak,
        }


def ratio(name: str, a: str, a_value: float, b: str, b_value: float, formula: str, recipe: str) -> dict[str, Any]:
    value = a_value / b_value if formula == "a/b" else 1 - a_value / b_value
    return {"name": name, "recipe": recipe, "formula": formula, "a": a, "a_value": a_value, "b": b, "b_value": b_value, "value": value}


def recipe_ratios(mine: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One recipe's derived ratios: data-path overhead of each pipeline row with a
    compute-only twin, pipeline/classic, and the gain of all threads over one. Annotates
    the rows with the first two (what the report's notes print)."""
    recipe = mine[0]["recipe"]
    by_id = {r["id"]: r for r in mine}
    ref = mine[0]
    out = []
    for r in mine:
        if r["kind"] == "pipeline":
            twin = by_id.get(r["id"].replace("/pipeline/", "/compute/"))
            if twin is not None:
                out.append(ratio("data-path overhead", r["id"], r["images_per_s"], twin["id"], twin["images_per_s"], "1-a/b", recipe))
                r["overhead"] = out[-1]["value"]
                r["overhead_noise"] = max(r["spread"], twin["spread"]) / 2  # half the wider spread
        if r["kind"] == "classic":
            out.append(ratio(f"pipeline / classic (workers {r['workers']})", ref["id"], ref["images_per_s"], r["id"], r["images_per_s"], "a/b", recipe))
            r["pipeline_over_classic"] = out[-1]["value"]
        if r["kind"] == "pipeline" and r["threads"] == 1 and ref["threads"] > 1:
            out.append(ratio(f"{ref['threads']} threads / 1 thread", ref["id"], ref["images_per_s"], r["id"], r["images_per_s"], "a/b", recipe))
    return out
