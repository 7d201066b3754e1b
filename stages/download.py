"""Stage `download`: fetch the dataset archive named by download.url into data/raw/, verified."""

from imgclf.core.stage import run_stage
from imgclf.download.fetch import run

if __name__ == "__main__":
    run_stage("download", run)
