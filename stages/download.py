"""Stage `download`: fetch the dataset archive named by data.url into data/raw/, verified."""

from imgclf import paths
from imgclf.cli import run_stage
from imgclf.download import fetch
from imgclf.params import load_params


def main() -> None:
    data = load_params(paths.PARAMS).data
    fetch(data.url, paths.RAW_DIR, md5=data.md5, timeout=data.timeout)


if __name__ == "__main__":
    run_stage("download", main)
