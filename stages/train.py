"""Stage `train`: train model.arch on the cached tensors; resumes from checkpoints/train.pt.

With train.processes > 1 the script restarts itself under torchrun, one process per GPU.
"""

import os

from imgclf import paths
from imgclf.cli import run_stage
from imgclf.params import load_params
from imgclf.distributed import launch_processes
from imgclf.train import TrainPaths, train


def main() -> None:
    params = load_params(paths.PARAMS)
    if params.train.processes > 1 and "LOCAL_RANK" not in os.environ:
        launch_processes(params.train.processes, __file__)
        return
    train(
        params.model,
        params.train,
        TrainPaths(
            cache_dir=paths.PROCESSED_DIR,
            model_out=paths.TRAINED_MODEL,
            metrics_out=paths.TRAIN_METRICS,
            curve_out=paths.TRAIN_CURVE,
            checkpoint=paths.TRAIN_CHECKPOINT,
            log_dir=paths.LOGS_DIR / "train",
            live_dir=paths.LIVE_DIR,
        ),
    )


if __name__ == "__main__":
    run_stage("train", main)
