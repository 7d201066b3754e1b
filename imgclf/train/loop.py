"""The train stage's work: cached uint8 tensors in, a trained model bundle and its curves out.

The whole training split sits on the training device as one uint8 tensor. Each epoch it is
permuted and augmented in one batched pass (see :class:`imgclf.train.augment.Augmenter`), and a
batch is a slice of that tensor: no DataLoader, no per-sample Python, no per-batch
host-to-device copy. Randomness per epoch comes from a generator seeded by (seed, epoch),
so a resumed run sees exactly the batches an uninterrupted run would.

:func:`train` reads as its phases: set up, resume, one epoch at a time (each followed by a
checkpoint), finish.
"""

from __future__ import annotations

import logging
import random
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..cache.dataset import META_FILE, Cache, Split, hold_out, load_cache, load_meta
from ..core.errors import PipelineError
from ..core.files import atomic_path, save_torch, write_json
from ..core.params import ModelParams, TrainParams
from ..core.paths import TrainPaths
from ..models import registry
from ..models.bundle import make_bundle
from ..models.runtime import configure_threads, keep_freed_memory, predict_logits, resolve_device, resolve_precision, synchronize
from ..models.shapes import check_fits, train_flops_per_image
from . import checkpoint
from .augment import Augmenter
from .distributed import Distributed, is_lost_peer, lost_peer_error
from .epoch_log import EpochLog, log_first_look
from .trial_report import TrialReport
from .trainee import Trainee, build_trainee, epoch_batches, run_steps

log = logging.getLogger(__name__)

@dataclass
class Run:
    """Everything one training run holds between its phases."""

    model_params: ModelParams
    train_params: TrainParams
    dist: Distributed
    device: torch.device
    amp: torch.dtype | None
    threads: int
    cache: Cache  # its train split is what is trained on: the held-out images are in `val`
    val: Split | None  # train.val_fraction of the training images; None when 0
    batch: int  # global images per step
    steps_per_epoch: int
    trainee: Trainee
    fingerprint: str
    flops_per_image: float  # forward and backward, one training image

    @property
    def images_per_epoch(self) -> int:
        return self.steps_per_epoch * self.batch

    @property
    def share(self) -> int:  # images per process per step
        return self.batch // self.dist.world


def train(model_params: ModelParams, train_params: TrainParams, paths: TrainPaths) -> dict[str, Any]:
    """Train per params; resume from ``paths.checkpoint`` if it matches; return the metrics.

    Under ``torchrun`` (``train.nodes`` x ``train.processes`` > 1) each process takes an
    equal share of every global batch of ``train.batch_size`` images, batch norm is
    synchronised over the global batch and DistributedDataParallel averages the gradients;
    rank 0 (the first node's first process) alone evaluates and writes files.
    """
    run = set_up(model_params, train_params, paths.cache_dir)
    start_epoch, history = resume(run, paths.checkpoint)
    x_train = run.cache.train.images.to(run.device)
    y_train = run.cache.train.labels.to(run.device)
    augmenter = Augmenter(x_train, crop_padding=train_params.augment.crop_padding, flip=train_params.augment.flip,
                          seed=train_params.seed)
    epoch_log = EpochLog(paths.curve_out, paths.log_dir, paths.live_dir, history) if run.dist.is_main else None
    if epoch_log is not None and epoch_log.tensorboard is not None:
        n = min(64, len(run.cache.train))  # before the wrap: the graph of the plain model
        augmented = augmenter(torch.arange(n, device=run.device),
                              torch.Generator(run.device).manual_seed(train_params.seed))
        log_first_look(epoch_log.tensorboard, run.trainee.model, augmented, run.cache.train.images[:2])
    forward = run.dist.wrap(run.trainee.model)
    run.trainee.step.forward = torch.compile(forward) if train_params.compile else forward
    _log_plan(run)
    # Under imgclf-search (environment variables, not params): each epoch's val_acc goes to the
    # trial, and its pruner may end the run early; None otherwise.
    trial = TrialReport.from_env() if run.dist.is_main else None
    for row in history if trial is not None else []:
        trial.record(row)
    pruned = False
    try:
        for epoch in range(start_epoch, train_params.epochs):
            row = one_epoch(run, epoch, augmenter, y_train)
            if row is not None:
                history.append(row)
                epoch_log.add(row)
                checkpoint.save(paths.checkpoint, fingerprint=run.fingerprint, epoch=epoch, history=history,
                                model=run.trainee.model, step_state=run.trainee.step.state_dict(),
                                model_params=model_params, train_params=train_params)
            run.dist.barrier()
            if run.dist.broadcast(trial is not None and trial.epoch_done(row)):
                pruned = True
                break
    except Exception as e:
        if run.dist.world == 1 or not is_lost_peer(e):
            raise
        if run.dist.local_rank != 0:
            raise SystemExit(1) from None  # the same news for every process of a node: one says it
        raise lost_peer_error(e, train_params.dist_timeout, paths.checkpoint) from None
    if epoch_log is not None:
        epoch_log.close()
    return finish(run, history, paths, pruned=pruned)


def set_up(model_params: ModelParams, train_params: TrainParams, cache_dir: Path) -> Run:
    """Processes, device, precision and threads; the data; a fresh seeded model and step."""
    registry.check_arch(model_params.arch)  # a typo fails before any data is read
    meta = load_meta(cache_dir)  # the image size the preprocess stage chose
    check_fits(model_params, train_params, image_size=int(meta["image_size"]), num_classes=len(meta["classes"]),
               source=Path(cache_dir) / META_FILE)
    # The backend follows the training device: gloo for the CPU even where CUDA exists.
    dist = Distributed.from_env(resolve_device(train_params.device), timeout=train_params.dist_timeout)
    device = dist.device
    threads = configure_threads(train_params.threads or dist.cpu_threads_per_process())
    if train_params.keep_memory and not keep_freed_memory():
        log.warning("train.keep_memory: not a glibc C library here; memory is handled as usual")
    amp = resolve_precision(train_params.precision, device)
    cache, fingerprint = _load_data(dist, model_params, train_params, cache_dir)
    val = None
    if train_params.val_fraction:
        cache.train, val = hold_out(cache.train, train_params.val_fraction)
        if len(cache.train) == 0 or len(val) == 0:
            raise PipelineError(f"train.val_fraction = {train_params.val_fraction} of {len(cache.train) + len(val)} training "
                                f"images leaves {len(cache.train)} to train on and {len(val)} to validate on")
    n = len(cache.train)
    # Drop the last incomplete batch (as DataLoader(drop_last=True)), unless it is the only one.
    batch = min(train_params.batch_size, n)
    if batch % dist.world:
        raise PipelineError(f"train.batch_size = {batch} must be a multiple of the {dist.world} processes")
    random.seed(train_params.seed)
    np.random.seed(train_params.seed % 2**32)
    trainee = build_trainee(model_params, train_params, num_classes=len(cache.classes), image_size=cache.image_size,
                            mean=cache.mean, std=cache.std, device=device, amp=amp, steps_per_epoch=n // batch,
                            init_images=cache.train.images)
    flops = train_flops_per_image(model_params, num_classes=len(cache.classes), image_size=cache.image_size)
    return Run(model_params, train_params, dist, device, amp, threads, cache, val, batch, n // batch, trainee, fingerprint,
               flops)


def _load_data(dist: Distributed, model_params: ModelParams, train_params: TrainParams,
               cache_dir: Path) -> tuple[Cache, str]:
    """The cache and the run's fingerprint (params and data bytes). Each node reads its own
    copy of the cache, so the processes check that they all hold the same one."""
    try:
        cache = load_cache(cache_dir, splits=("train",))  # the test split is the evaluate stage's
        if len(cache.train) == 0:
            raise PipelineError(f"{cache_dir}: the train split is empty")
        # Where the rendezvous is and how long to wait do not change what is computed: a run
        # resumed with another endpoint (say, another first node) keeps its checkpoint.
        fp = checkpoint.fingerprint(model_params, train_params.model_copy(update={"rdzv_endpoint": "", "dist_timeout": 0}),
                                    cache_dir)
        problem = None
    except PipelineError as e:
        if dist.world == 1:
            raise
        cache, fp, problem = None, "", str(e)
    reports = dist.gather((problem, fp, socket.gethostname()))
    for rank, (other_problem, _, host) in enumerate(reports):
        if other_problem is not None:
            raise PipelineError(other_problem if problem is not None else
                                f"on {host} (rank {rank}): {other_problem}")
    differ = [f"rank {r} on {host}" for r, (_, other, host) in enumerate(reports) if other != reports[0][1]]
    if differ:
        raise PipelineError(
            f"{cache_dir} or the params differ between the nodes: {', '.join(differ)} do{'es' if len(differ) == 1 else ''}"
            f" not hold what rank 0 on {reports[0][2]} (the first node) holds. Run `dvc pull {cache_dir}` (or "
            "`dvc repro preprocess`) at the same commit on every node"
        )
    return cache, fp


def resume(run: Run, path: Path) -> tuple[int, list[dict[str, float]]]:
    """The first epoch to run and the history so far (0 and [] without a usable checkpoint).

    Only the first node holds the checkpoint: rank 0 reads it and sends it to every process,
    so all of them resume the same epoch, weights, optimiser state and history."""
    ckpt = checkpoint.load(path, run.fingerprint, torch.device("cpu")) if run.dist.is_main else None
    ckpt = run.dist.broadcast(ckpt)
    if ckpt is None:
        return 0, []
    run.trainee.model.load_state_dict(ckpt["model"])
    run.trainee.step.load_state_dict(ckpt["step"])
    checkpoint.set_rng_state(ckpt["rng"])
    start = ckpt["epoch"] + 1
    log.info("resuming from %s: epoch %d of %d done", path, start, run.train_params.epochs)
    return start, ckpt["history"]


def one_epoch(run: Run, epoch: int, augmenter: Augmenter, y_train: torch.Tensor) -> dict[str, float] | None:
    """Train one epoch and (rank 0) measure it on the validation images (``train.val_fraction``;
    the test split is the evaluate stage's alone); other ranks return None."""
    train_params, dist, trainee = run.train_params, run.dist, run.trainee
    # Every clock read follows a synchronize: on a GPU the epoch's seconds are the time its
    # work took on the device, not the time Python took to queue it.
    synchronize(run.device)
    t0 = time.perf_counter()
    # Every process draws the same permutation and augmentation, then takes its share.
    gen = torch.Generator(run.device).manual_seed(train_params.seed * 100_003 + epoch)
    trainee.model.train()
    batches = epoch_batches(augmenter, y_train, batch=run.batch, steps=run.steps_per_epoch, generator=gen,
                            memory_format=trainee.memory_format, offset=dist.rank * run.share, share=run.share,
                            epoch=epoch)
    losses, correct = run_steps(trainee.step, batches, run.steps_per_epoch, epoch=epoch, reduce=dist.mean,
                                desc=f"epoch {epoch + 1}/{train_params.epochs}" if dist.is_main else None)
    epoch_losses, epoch_correct = dist.mean(losses), dist.sum(correct)
    synchronize(run.device)
    seconds_train = time.perf_counter() - t0
    if not dist.is_main:
        return None
    val_loss = val_acc = None
    if run.val is not None:
        logits = predict_logits(trainee.model, run.val.images, batch_size=1000, device=run.device, amp=run.amp,
                                channels_last=train_params.channels_last)
        val_loss = nn.functional.cross_entropy(logits, run.val.labels).item()
        val_acc = (logits.argmax(1) == run.val.labels).float().mean().item()
    synchronize(run.device)
    seconds = time.perf_counter() - t0
    row = {
        "epoch": epoch + 1,
        "train_loss": epoch_losses.mean().item(),
        "train_acc": epoch_correct.sum().item() / run.images_per_epoch,
        "val_loss": val_loss,
        "val_acc": val_acc,
        "lr": trainee.step.optimizer.param_groups[0]["lr"],
        "images_per_s": run.images_per_epoch / seconds_train,
        "seconds": seconds,
        "pflop": run.flops_per_image * run.images_per_epoch * (epoch + 1) / 1e15,
    }
    log.info(
        "epoch %d/%d  train loss %.4f acc %.4f%s  lr %.4g  %.0f img/s  %.1f s",
        row["epoch"], train_params.epochs, row["train_loss"], row["train_acc"],
        f"  val loss {val_loss:.4f} acc {val_acc:.4f}" if run.val is not None else "",
        row["lr"], row["images_per_s"], row["seconds"],
    )
    return row


def finish(run: Run, history: list[dict[str, float]], paths: TrainPaths, pruned: bool = False) -> dict[str, Any]:
    """Rank 0 writes the model bundle and the metrics and drops the checkpoint. A run a search's
    pruner stopped (``pruned``) writes what it has, with ``pruned_after_epoch`` in the metrics."""
    if not run.dist.is_main:
        run.dist.close()
        return {}
    train_params, cache = run.train_params, run.cache
    model = run.trainee.model.to("cpu", memory_format=torch.contiguous_format).eval()
    bundle = make_bundle(model, arch=run.model_params.arch, arch_args=run.trainee.arch_args, classes=cache.classes,
                         mean=cache.mean, std=cache.std, image_size=cache.image_size)
    bundle["training"] = {"epochs": len(history), "device": str(run.device), "processes": run.dist.world,
                          "nodes": run.dist.nodes,
                          "precision": "fp32" if run.amp is None else str(run.amp).removeprefix("torch.")}
    with atomic_path(paths.model_out) as tmp:
        save_torch(bundle, tmp)
    last = history[-1]
    seconds = sum(r["seconds"] for r in history)
    flops = run.flops_per_image * run.images_per_epoch * len(history)  # the whole run's, resumed epochs included
    metrics = {
        "train_loss": round(last["train_loss"], 6),
        "train_acc": round(last["train_acc"], 6),
        **({"val_loss": round(last["val_loss"], 6), "val_acc": round(last["val_acc"], 6)} if run.val is not None else {}),
        "epochs": train_params.epochs,
        "train_images": len(cache.train),
        "val_images": len(run.val) if run.val is not None else 0,
        "train_seconds": round(seconds, 2),
        "images_per_s": round(float(np.median([r["images_per_s"] for r in history])), 1),
        # Training compute: FLOPs per image (forward + backward) x images seen; the
        # validation passes are not counted. tflop_per_s is over whole epochs, passes included.
        "gflop_per_image": _sig(run.flops_per_image / 1e9),
        "train_pflop": _sig(flops / 1e15),
        "tflop_per_s": _sig(flops / seconds / 1e12),
        **({"pruned_after_epoch": len(history)} if pruned else {}),
    }
    write_json(paths.metrics_out, metrics)
    paths.checkpoint.unlink(missing_ok=True)  # the run is complete: its outputs are the record
    run.dist.close()
    return metrics


def _sig(x: float) -> float:
    """Six significant digits: a tiny test run's PFLOP must not round to 0."""
    return float(f"{x:.6g}")


def _log_plan(run: Run) -> None:
    dist = run.dist
    log.info(
        "training %s (%d parameters) on %s%s, %s, %d threads, %d images, batch %d, %d steps/epoch",
        run.model_params.arch, sum(p.numel() for p in run.trainee.model.parameters()), run.device,
        f" x {dist.world} processes ({dist.nodes} node{'s' if dist.nodes > 1 else ''}, {dist.backend})"
        if dist.world > 1 else "",
        "fp32" if run.amp is None else f"autocast {str(run.amp).removeprefix('torch.')}", run.threads,
        len(run.cache.train), run.batch, run.steps_per_epoch,
    )
