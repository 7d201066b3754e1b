"""Stage `preprocess`: decode the archive into cached uint8 tensors and normalisation stats."""

from imgclf.core import paths
from imgclf.core.params import load_params
from imgclf.core.stage import run_stage
from imgclf.data.preprocess import preprocess


def main() -> None:
    pre = load_params(paths.PARAMS).preprocess
    preprocess(paths.find_archive(paths.RAW_DIR), paths.PROCESSED_DIR, pre, log_dir=paths.LOGS_DIR / "preprocess")


if __name__ == "__main__":
    run_stage("preprocess", main)
