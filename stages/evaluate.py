"""Stage `evaluate`: test metrics, per-class accuracy and confusion-matrix data of the exported
model, with its test-time augmentation (what predict and the serving files compute)."""

from imgclf.core import paths
from imgclf.core.params import load_params
from imgclf.core.stage import run_stage
from imgclf.serve.evaluate import evaluate


def main() -> None:
    params = load_params(paths.PARAMS)
    evaluate(paths.EXPORTED_BUNDLE, paths.PROCESSED_DIR, params.evaluate, paths.EVAL_METRICS, paths.PREDICTIONS)


if __name__ == "__main__":
    run_stage("evaluate", main)
