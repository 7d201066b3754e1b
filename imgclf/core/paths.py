"""Every path a stage reads or writes, declared once: one dataclass per stage.

Each field is marked with what ``dvc.yaml`` must declare it as: ``dep`` (an input), ``out``
(an output DVC caches), ``metric`` or ``plot`` (a small file kept in git), or ``local`` (the
stage's own file, which DVC does not track: train's checkpoint). ``tests/test_units.py``
checks ``dvc.yaml`` against these, both ways. Every stage is then ``run(section, paths)``:
:func:`imgclf.core.stage.run_stage` hands it its params section and ``STAGES[name]``.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from .errors import PipelineError

PARAMS = Path("params.yaml")


def _path(kind: str, default: str, *, declare: str | None = None) -> Any:
    """A path field; ``declare``: what dvc.yaml names instead, when that is a file inside it."""
    return dataclasses.field(default=Path(default), metadata={"dvc": kind, "declare": declare or default})


def declared(paths: Any, kind: str) -> set[str]:
    """What ``dvc.yaml`` must declare as ``kind`` for a stage's paths (the defaults)."""
    return {f.metadata["declare"] for f in dataclasses.fields(paths) if f.metadata.get("dvc") == kind}


@dataclasses.dataclass(frozen=True)
class ParamsPaths:
    """The params stage reads params.yaml (declared as params, not as a file) and writes nothing."""


@dataclasses.dataclass(frozen=True)
class DownloadPaths:
    source: Path = _path("dep", "data/source")  # users' own folders/archives (data/source/README.md)
    raw: Path = _path("out", "data/raw")  # the verified archive, alone in its folder


@dataclasses.dataclass(frozen=True)
class PreprocessPaths:
    raw: Path = _path("dep", "data/raw")
    cache_dir: Path = _path("out", "data/processed")  # cached uint8 tensors + meta.json
    log_dir: Path = _path("out", "logs/preprocess")  # TensorBoard: a grid of sample images


@dataclasses.dataclass(frozen=True)
class TrainPaths:
    cache_dir: Path = _path("dep", "data/processed")
    model_out: Path = _path("out", "models/trained.pt")  # the trained model bundle
    metrics_out: Path = _path("metric", "metrics/train.json")  # final training metrics
    curve_out: Path = _path("plot", "metrics/train_curve.csv")  # per-epoch metrics for `dvc plots`
    checkpoint: Path = _path("local", "checkpoints/train.pt")  # resumable state, outside DVC's outputs
    log_dir: Path | None = _path("out", "logs/train")  # TensorBoard; None: none written
    live_dir: Path | None = _path("metric", "metrics/live", declare="metrics/live/metrics.json")  # DVCLive's latest epoch


@dataclasses.dataclass(frozen=True)
class ExportPaths:
    trained: Path = _path("dep", "models/trained.pt")
    cache_dir: Path = _path("dep", "data/processed")  # the test images the exports must agree on
    whole_model: Path = _path("out", "models/model.pt")  # torch.save(model)
    bundle: Path = _path("out", "models/model_state.pt")  # the state_dict bundle, with its TTA
    # model.onnx and model.pt2, each when its export param is on: one folder, so that a
    # format turned off is simply absent (DVC fails a stage whose declared file is missing).
    serving_dir: Path = _path("out", "models/serving")
    metrics_out: Path = _path("metric", "metrics/export.json")


@dataclasses.dataclass(frozen=True)
class EvaluatePaths:
    bundle: Path = _path("dep", "models/model_state.pt")  # the exported model, with its TTA
    cache_dir: Path = _path("dep", "data/processed")
    metrics_out: Path = _path("metric", "metrics/eval.json")
    predictions: Path = _path("plot", "metrics/predictions.csv")  # one row per test image: the confusion plot


STAGES: dict[str, Any] = {
    "params": ParamsPaths(),
    "download": DownloadPaths(),
    "preprocess": PreprocessPaths(),
    "train": TrainPaths(),
    "export": ExportPaths(),
    "evaluate": EvaluatePaths(),
}


def find_archive(raw_dir: str | os.PathLike = STAGES["download"].raw) -> Path:
    """The one archive the download stage left in ``raw_dir``."""
    raw_dir = Path(raw_dir)
    files = sorted(p for p in raw_dir.glob("*") if p.is_file()) if raw_dir.is_dir() else []
    if len(files) != 1:
        raise PipelineError(
            f"{raw_dir}: expected exactly one archive from the download stage, found "
            f"{len(files)} ({', '.join(p.name for p in files) or 'none'}); run `dvc repro download`"
        )
    return files[0]
