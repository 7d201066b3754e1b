"""Every path a stage reads or writes, in one place (dvc.yaml declares the same paths)."""

from pathlib import Path

PARAMS = Path("params.yaml")
SOURCE_DIR = Path("data/source")  # users' own folders/archives: a declared dependency
RAW_DIR = Path("data/raw")  # download: the verified archive
PROCESSED_DIR = Path("data/processed")  # preprocess: cached tensors + meta.json
CHECKPOINT_DIR = Path("checkpoints")  # train: resumable per-epoch checkpoints (not a DVC output)
TRAIN_DIR = Path("models/train")  # train: final weights + training state
LOGS_DIR = Path("logs")  # TensorBoard event files, one folder per stage
METRICS_DIR = Path("metrics")
MODELS_DIR = Path("models")
