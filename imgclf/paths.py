"""Every path a stage reads or writes, in one place (dvc.yaml declares the same paths)."""

from pathlib import Path

PARAMS = Path("params.yaml")
SOURCE_DIR = Path("data/source")  # users' own folders/archives: a declared dependency
RAW_DIR = Path("data/raw")  # download: the verified archive
PROCESSED_DIR = Path("data/processed")  # preprocess: cached tensors + meta.json
CHECKPOINT_DIR = Path("checkpoints")  # train: resumable per-epoch checkpoints (not a DVC output)

LOGS_DIR = Path("logs")  # TensorBoard event files, one folder per stage
METRICS_DIR = Path("metrics")
MODELS_DIR = Path("models")
TRAINED_MODEL = MODELS_DIR / "trained.pt"  # train: weights bundle (input of evaluate/export)
WHOLE_MODEL = MODELS_DIR / "model.pt"  # export: torch.save(model)
STATE_DICT = MODELS_DIR / "model_state.pt"  # export: state_dict + what rebuilds the model
TRAIN_METRICS = METRICS_DIR / "train.json"
TRAIN_CURVE = METRICS_DIR / "train_curve.csv"
EVAL_METRICS = METRICS_DIR / "eval.json"
PREDICTIONS = METRICS_DIR / "predictions.csv"
EXPORT_METRICS = METRICS_DIR / "export.json"
TRAIN_CHECKPOINT = CHECKPOINT_DIR / "train.pt"
