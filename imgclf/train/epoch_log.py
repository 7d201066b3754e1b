"""Where each epoch's row goes: the curve CSV, TensorBoard and DVCLive. Rank 0 alone logs.

- ``metrics/train_curve.csv``: every epoch so far, one row each, rewritten atomically after
  each epoch; ``dvc plots`` draws the loss and accuracy curves from it.
- TensorBoard (``logs/train``): the same numbers as scalars (tutorial §3).
- DVCLive (``metrics/live/metrics.json``): the latest epoch's numbers with ``step`` = the
  epoch, rewritten after each epoch, so ``dvc exp show`` shows a running experiment's
  progress (queued ones too), and Studio and the VS Code extension follow it live.

DVCLive is used the way our explicit ``dvc.yaml`` wants: it writes no ``dvc.yaml`` of its
own, saves no experiment, makes no report, and keeps no per-metric history (``plot=False``):
the CSV already holds the curves, with the epoch as its x column. ``dvc.yaml`` declares its
one file as a metric of the train stage.

A resumed run starts with the history its checkpoint carried: DVC deleted the stage's
outputs before rerunning it, so that history is logged again first.
"""

from __future__ import annotations

import copy
import logging
import warnings
from pathlib import Path

import torch

from ..core.files import atomic_path, write_json

# pflop: the training compute spent by the end of the epoch (train.json's train_pflop at the
# last), the x of the accuracy-per-compute plot: the PFLOP a recipe takes to reach an accuracy.
CURVE_COLUMNS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "images_per_s", "seconds", "pflop"]
LIVE_METRICS = [c for c in CURVE_COLUMNS if c != "epoch"]  # the epoch is DVCLive's step

Row = dict[str, float | None]  # val_loss and val_acc are None without validation images


class EpochLog:
    """``add(row)`` after each epoch; ``close()`` at the end. ``tensorboard`` is the
    SummaryWriter (None without a log folder), for what else a run shows there."""

    def __init__(self, curve: Path, tensorboard_dir: Path | None, live_dir: Path | None, history: list[Row]):
        self.curve = curve
        self.rows: list[Row] = []
        self.tensorboard = _tensorboard(tensorboard_dir) if tensorboard_dir is not None else None
        self.live = _live(live_dir) if live_dir is not None else None
        for row in history:
            self.add(row)

    def add(self, row: Row) -> None:
        self.rows.append(row)
        _write_curve(self.curve, self.rows)
        epoch = int(row["epoch"])
        if self.tensorboard is not None:
            for k in ("train_loss", "train_acc", "val_loss", "val_acc"):
                if row[k] is not None:
                    split, name = k.split("_")
                    self.tensorboard.add_scalar(f"{name}/{split}", row[k], epoch)
            self.tensorboard.add_scalar("perf/lr", row["lr"], epoch)
            self.tensorboard.add_scalar("perf/images_per_s", row["images_per_s"], epoch)
            self.tensorboard.flush()
        if self.live is not None:
            self.live.step = epoch
            for k in LIVE_METRICS:
                if row[k] is not None:
                    self.live.log_metric(k, row[k], plot=False)
            self.live.next_step()  # writes metrics.json with "step": epoch

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.live is not None:
            self.live.end()


def _write_curve(path: Path, rows: list[Row]) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(",".join(CURVE_COLUMNS) + "\n")
            for r in rows:
                f.write(",".join("" if r[c] is None else f"{r[c]:.6g}" for c in CURVE_COLUMNS) + "\n")


# TensorBoard names a chart by its tag and its y axis not at all: the Custom Scalars tab gets
# charts titled with what is on the y axis, train and val together (TensorBoard's smoothing is
# a setting of its page, not of the log: docs/training.md says how to turn it off).
TENSORBOARD_LAYOUT = {
    "per epoch": {
        "loss (cross-entropy): train and val": ["Multiline", ["^loss/train$", "^loss/val$"]],
        "accuracy (fraction right): train and val": ["Multiline", ["^acc/train$", "^acc/val$"]],
        "learning rate": ["Multiline", ["^perf/lr$"]],
        "training speed (images per second)": ["Multiline", ["^perf/images_per_s$"]],
    }
}


def _tensorboard(log_dir: Path):
    from torch.utils.tensorboard import SummaryWriter

    log_dir.mkdir(parents=True, exist_ok=True)
    writer = SummaryWriter(log_dir=str(log_dir))
    writer.add_custom_scalars(TENSORBOARD_LAYOUT)
    return writer


def _live(live_dir: Path):
    from dvclive import Live

    class AtomicLive(Live):
        def _init_dvc(self) -> None:
            """As Live's own, but a git repo with no commit yet is not fatal: dvclive 3.49
            asks such a repo for its HEAD (an SCMError) before its own check for it. Our
            Live saves no experiment, so it needs nothing from the repo: log without it."""
            from scmrepo.exceptions import SCMError

            try:
                super()._init_dvc()
            except SCMError:
                self._dvc_repo = None

        def make_summary(self) -> None:
            """As Live's own, but written atomically: `dvc exp show` may read it mid-run."""
            if self._step is not None:
                self.summary["step"] = self.step
            write_json(self.metrics_file, self.summary)

    # "Logging to experiment 'random-name'" would mislead under `dvc repro`: keep warnings only.
    logging.getLogger("dvclive").setLevel(logging.WARNING)
    return AtomicLive(dir=str(live_dir), resume=False, report=None, save_dvc_exp=False, dvcyaml=None)


def log_first_look(writer, model: torch.nn.Module, augmented: torch.Tensor, example: torch.Tensor) -> None:
    """TensorBoard, before the first step (tutorial §3): a grid of augmented training images
    and the model's graph, traced on ``example`` images."""
    writer.add_images("train/augmented samples", augmented.cpu(), 0, dataformats="NCHW")
    graph_model = copy.deepcopy(model).float().cpu().eval()  # tracing must not touch BN stats
    with warnings.catch_warnings():  # add_graph traces with TorchScript, which warns it is deprecated
        warnings.simplefilter("ignore", FutureWarning)
        writer.add_graph(graph_model, example.clone())
