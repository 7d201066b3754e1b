"""Stage `preprocess`: decode the archive into cached uint8 tensors and normalisation stats."""

from imgclf.core.stage import run_stage
from imgclf.data.preprocess import run

if __name__ == "__main__":
    run_stage("preprocess", run)
