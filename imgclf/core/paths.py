"""Every path a stage reads or writes, in one place (dvc.yaml declares the same paths)."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import PipelineError

PARAMS = Path("params.yaml")
SOURCE_DIR = Path("data/source")  # users' own folders/archives: a declared dependency
RAW_DIR = Path("data/raw")  # download: the verified archive
PROCESSED_DIR = Path("data/processed")  # preprocess: cached tensors + meta.json
CHECKPOINT_DIR = Path("checkpoints")  # train: resumable per-epoch checkpoints (not a DVC output)

LOGS_DIR = Path("logs")  # TensorBoard event files, one folder per stage
METRICS_DIR = Path("metrics")
MODELS_DIR = Path("models")
TRAINED_MODEL = MODELS_DIR / "trained.pt"  # train: the bundle (input of evaluate/export)
WHOLE_MODEL = MODELS_DIR / "model.pt"  # export: torch.save(model)
EXPORTED_BUNDLE = MODELS_DIR / "model_state.pt"  # export: the bundle (state_dict + what rebuilds the model, its TTA)
# export: model.onnx and model.pt2, each when its export param is on. One folder, declared as
# one output, so that a format turned off is simply absent (DVC fails on a missing declared file).
SERVING_DIR = MODELS_DIR / "serving"
TRAIN_METRICS = METRICS_DIR / "train.json"
TRAIN_CURVE = METRICS_DIR / "train_curve.csv"
LIVE_DIR = METRICS_DIR / "live"  # train: DVCLive writes metrics.json there after every epoch
EVAL_METRICS = METRICS_DIR / "eval.json"
PREDICTIONS = METRICS_DIR / "predictions.csv"
EXPORT_METRICS = METRICS_DIR / "export.json"
TRAIN_CHECKPOINT = CHECKPOINT_DIR / "train.pt"


def find_archive(raw_dir: str | os.PathLike = RAW_DIR) -> Path:
    """The one archive the download stage left in ``raw_dir``."""
    raw_dir = Path(raw_dir)
    files = sorted(p for p in raw_dir.glob("*") if p.is_file()) if raw_dir.is_dir() else []
    if len(files) != 1:
        raise PipelineError(
            f"{raw_dir}: expected exactly one archive from the download stage, found "
            f"{len(files)} ({', '.join(p.name for p in files) or 'none'}); run `dvc repro download`"
        )
    return files[0]
