"""The evaluate stage's work: test accuracy, loss, per-class accuracy and the confusion data,
of the exported model (``models/model_state.pt``) with the test-time augmentation it carries:
what ``imgclf-predict`` and the serving files compute."""

from __future__ import annotations

import csv
import logging
import os
from typing import Any

from torch import nn

from ..cache.dataset import load_cache
from ..core.files import atomic_path, write_json
from ..core.params import EvaluateParams
from ..core.paths import EvaluatePaths
from ..models.bundle import load_state_dict_model
from ..models.runtime import predict_logits, resolve_device
from ..models.tta import OFF, views
from .names import display_name

log = logging.getLogger(__name__)


def evaluate(model_path: str | os.PathLike, cache_dir: str | os.PathLike, evaluate_params: EvaluateParams,
             metrics_out: str | os.PathLike, predictions_out: str | os.PathLike) -> dict[str, Any]:
    model, bundle = load_state_dict_model(model_path)
    tta = bundle.get("tta") or OFF
    device = resolve_device("auto")
    model.to(device)
    test = load_cache(cache_dir, splits=("test",)).test
    logits = predict_logits(model, test.images, batch_size=evaluate_params.batch_size, device=device)
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
        "tta_flip": tta["flip"],
        "tta_shift": tta["shift"],
        **({"tta_center_weight": tta["center_weight"]} if "center_weight" in tta else {}),
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
    n_views = views(tta["flip"], tta["shift"])
    log.info("test accuracy %.4f, loss %.4f on %d images%s", metrics["test_acc"], metrics["test_loss"],
             len(labels), f" ({n_views} test-time views)" if n_views > 1 else "")
    worst = sorted((v, k) for k, v in per_class.items() if v is not None)[:3]
    log.info("weakest classes: %s", ", ".join(f"{display_name(k)} {v:.3f}" for v, k in worst))
    return metrics


def run(evaluate_params: EvaluateParams, paths: EvaluatePaths) -> dict[str, Any]:
    """The evaluate stage: the exported model on the cached test split."""
    return evaluate(paths.bundle, paths.cache_dir, evaluate_params, paths.metrics_out, paths.predictions)
