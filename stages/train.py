"""Stage `train`: train model.arch on the cached tensors; resumes from checkpoints/train.pt.

With train.nodes x train.processes > 1 the script restarts itself under torchrun. On the
other nodes of a multi-node run: `python stages/train.py --join` (docs/distributed.md).
"""

import sys

from imgclf.core import paths
from imgclf.core.stage import run_stage
from imgclf.train.launch import launch, needs_torchrun, parse_stage_args, read_params


def main() -> None:
    args = parse_stage_args(sys.argv[1:])
    params = read_params(paths.PARAMS, args)
    if needs_torchrun(params.train):
        launch(params.model, params.train, __file__, sys.argv[1:], join=args.join)
        return
    from imgclf.train.loop import TrainPaths, train  # here: the launching process never trains (saves ~2 s)

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
