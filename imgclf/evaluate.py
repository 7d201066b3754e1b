"""The evaluate stage's work: test accuracy, loss, per-class accuracy and the confusion data."""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .bundle import model_from_bundle, read_bundle
from .dataset import META_FILE, load_cache, load_meta
from .files import PipelineError, atomic_path, write_json
from .params import EvaluateParams
from .runtime import predict_logits, resolve_device

log = logging.getLogger(__name__)


def shift(images: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """The images translated by (dy, dx) pixels, the uncovered border filled by reflection."""
    p = max(abs(dy), abs(dx))
    if p == 0:
        return images
    h, w = images.shape[-2:]
    padded = nn.functional.pad(images, (p, p, p, p), mode="reflect")
    return padded[..., p - dy : p - dy + h, p - dx : p - dx + w]


def tta_logits(model: nn.Module, images: torch.Tensor, e: EvaluateParams, device: torch.device) -> torch.Tensor:
    """Logits averaged over the test-time views the params ask for: the image, its mirror
    (``tta_flip``), and both shifted diagonally by ``tta_shift`` pixels either way."""
    offsets = [(0, 0)] + ([(e.tta_shift, e.tta_shift), (-e.tta_shift, -e.tta_shift)] if e.tta_shift else [])
    total = None
    for dy, dx in offsets:
        logits = predict_logits(model, shift(images, dy, dx), batch_size=e.batch_size, device=device, tta_flip=e.tta_flip)
        total = logits if total is None else total + logits
    return total / len(offsets)


def evaluate(model_path: str | os.PathLike, cache_dir: str | os.PathLike, e: EvaluateParams,
             metrics_out: str | os.PathLike, predictions_out: str | os.PathLike) -> dict[str, Any]:
    image_size = int(load_meta(cache_dir)["image_size"])
    if e.tta_shift >= image_size:  # reflect padding must be narrower than the image
        raise PipelineError(
            f"evaluate.tta_shift = {e.tta_shift} must be smaller than the images (preprocess.image_size = "
            f"{image_size}, in {Path(cache_dir) / META_FILE})"
        )
    bundle = read_bundle(model_path)
    model = model_from_bundle(bundle)
    device = resolve_device("auto")
    model.to(device)
    test = load_cache(cache_dir, splits=("test",)).test
    logits = tta_logits(model, test.images, e, device)
    labels = test.labels
    pred = logits.argmax(1)
    classes = bundle["classes"]
    per_class = {}
    for i, name in enumerate(classes):
        mask = labels == i
        per_class[name] = round((pred[mask] == i).float().mean().item(), 6) if mask.any() else None
    metrics = {
        "test_acc": round((pred == labels).float().mean().item(), 6),
        "test_loss": round(nn.functional.cross_entropy(logits, labels).item(), 6),
        "num_test": len(labels),
        "tta_flip": e.tta_flip,
        "tta_shift": e.tta_shift,
        "per_class_acc": per_class,
    }
    write_json(metrics_out, metrics)
    # One row per test image, for DVC's confusion-matrix template (x: actual, y: predicted).
    # The csv module quotes a class name holding a comma or a quote (a folder "cats, big").
    with atomic_path(predictions_out) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            rows = csv.writer(f, lineterminator="\n")
            rows.writerow(["actual", "predicted"])
            rows.writerows((classes[a], classes[p]) for a, p in zip(labels.tolist(), pred.tolist(), strict=True))
    views = (2 if e.tta_flip else 1) * (3 if e.tta_shift else 1)
    log.info("test accuracy %.4f, loss %.4f on %d images%s", metrics["test_acc"], metrics["test_loss"],
             len(labels), f" ({views} test-time views)" if views > 1 else "")
    worst = sorted((v, k) for k, v in per_class.items() if v is not None)[:3]
    log.info("weakest classes: %s", ", ".join(f"{k} {v:.3f}" for v, k in worst))
    return metrics
