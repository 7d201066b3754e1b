"""Stage `download`: fetch the dataset archive named by download.url into data/raw/, verified."""

from imgclf.core import paths
from imgclf.core.params import load_params
from imgclf.core.stage import run_stage
from imgclf.download.fetch import fetch


def main() -> None:
    d = load_params(paths.PARAMS).download
    fetch(d.url, paths.RAW_DIR, md5=d.md5, timeout=d.timeout)


if __name__ == "__main__":
    run_stage("download", main)
