"""Stage `evaluate`: test metrics, per-class accuracy and confusion-matrix data of the exported
model, with its test-time augmentation (what predict and the serving files compute)."""

from imgclf.core.stage import run_stage
from imgclf.serve.evaluate import run

if __name__ == "__main__":
    run_stage("evaluate", run)
