"""The training loop: cached uint8 tensors in, a trained model bundle and its curves out.

The whole training split sits on the training device as one uint8 tensor. Each epoch it is
permuted and augmented in one batched pass (see :class:`imgclf.transforms.Augmenter`), and a
batch is a slice of that tensor: no DataLoader, no per-sample Python, no per-batch
host-to-device copy. Randomness per epoch comes from a generator seeded by (seed, epoch),
so a resumed run sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import os
import random
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from . import models
from .dataset import load_cache
from .export import make_bundle
from .files import PipelineError, atomic_path, file_digest, write_json
from .params import ModelParams, TrainParams
from .runtime import autocast, configure_threads, predict_logits, resolve_device, resolve_precision
from .transforms import Augmenter

log = logging.getLogger(__name__)


# --- Optimiser and schedule --------------------------------------------------------------


def make_optimizer(model: nn.Module, t: TrainParams) -> torch.optim.Optimizer:
    # No weight decay on norm layers' scales and on biases: decaying them only fights BN.
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if t.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum, nesterov=t.nesterov and t.momentum > 0)
    # Adam's weight_decay is L2 added to the gradient; AdamW's is decoupled (Loshchilov & Hutter).
    cls = torch.optim.Adam if t.optimizer == "adam" else torch.optim.AdamW
    return cls(groups, lr=t.lr)


def lr_factor(t: TrainParams, step: int, total: int, steps_per_epoch: int) -> float:
    """Multiplier of train.lr at optimiser step ``step`` of ``total``."""
    if t.schedule == "constant":
        return 1.0
    if t.schedule == "onecycle":
        # Linear warm-up over the first 25% to the peak, then linear decay to zero: the
        # shape of the fast CIFAR-10 schedules (a triangle, as in the DAWNBench ResNet-9).
        peak = max(1, int(0.25 * total))
        return step / peak if step < peak else max(0.0, (total - step) / max(1, total - peak))
    warm = int(t.warmup_epochs * steps_per_epoch)
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    if t.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    return max(0.0, 1 - progress)  # linear


# --- One step, one epoch of batches (shared with imgclf.bench) -----------------------------


@dataclass
class TrainStep:
    """One optimiser step as train() takes it: forward under autocast, the loss in fp32,
    backward through the GradScaler (a no-op unless fp16), optimiser and schedule step."""

    forward: Callable[[torch.Tensor], torch.Tensor]  # the model, or its DDP/compiled wrapper
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    criterion: nn.Module
    device: torch.device
    amp: torch.dtype | None

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's loss (detached) and its number of correct predictions, on the device."""
        with autocast(self.device, self.amp):
            logits = self.forward(x)
            loss = self.criterion(logits.float(), y)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return loss.detach(), (logits.argmax(1) == y).sum()


def make_step(model: nn.Module, t: TrainParams, device: torch.device, amp: torch.dtype | None,
              total_steps: int, steps_per_epoch: int) -> TrainStep:
    """The optimiser, schedule, scaler and loss of ``t`` around ``model``."""
    optimizer = make_optimizer(model, t)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(t, s, total_steps, steps_per_epoch)
    )
    scaler = torch.amp.GradScaler(device.type, enabled=amp is torch.float16)
    criterion = nn.CrossEntropyLoss(label_smoothing=t.label_smoothing)
    return TrainStep(model, optimizer, scheduler, scaler, criterion, device, amp)


def epoch_batches(augmenter: Augmenter, y_train: torch.Tensor, *, batch: int, steps: int,
                  generator: torch.Generator, memory_format: torch.memory_format,
                  offset: int = 0, share: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch's batches: the epoch permuted and augmented in one batched pass on the
    device, then sliced. ``offset`` and ``share`` pick one process's part of each batch."""
    share = batch if share is None else share
    perm = torch.randperm(len(y_train), generator=generator, device=y_train.device)[: steps * batch]
    xs = augmenter(perm, generator)
    ys = y_train[perm]
    for i in range(steps):
        lo = i * batch + offset
        yield xs[lo : lo + share].contiguous(memory_format=memory_format), ys[lo : lo + share]


def run_steps(step: TrainStep, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], steps: int, *, epoch: int,
              reduce: Callable[[torch.Tensor], torch.Tensor] = lambda x: x,
              desc: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Take ``steps`` steps on ``batches``; return each step's loss and correct count."""
    losses = torch.zeros(steps, device=step.device)
    correct = torch.zeros(steps, device=step.device)
    # The bar is updated by hand rather than wrapping ``batches``: tqdm closes an iterator
    # it wraps, and the bench feeds several calls from one endless generator.
    checked = 0
    with tqdm(total=steps, desc=desc, leave=False, disable=desc is None or not sys.stderr.isatty()) as bar:
        for i, (x, y) in zip(range(steps), batches):  # range first: no batch is drawn past `steps`
            losses[i], correct[i] = step(x, y)
            # Check finiteness periodically: every check is a device sync on a GPU.
            # Only the steps since the last check are looked at (and, under DDP, all-reduced).
            if step.device.type == "cpu" or i % 50 == 49 or i == steps - 1:
                _check_finite(reduce(losses[checked : i + 1]), epoch, first_step=checked)
                checked = i + 1
            bar.update()
    return losses, correct


# --- Checkpoints ---------------------------------------------------------------------------


def fingerprint(model_params: ModelParams, t: TrainParams, cache_dir: Path) -> str:
    """What a checkpoint must match to be resumed: the params and the exact data."""
    h = hashlib.sha256()
    h.update(model_params.model_dump_json().encode())
    h.update(t.model_dump_json().encode())
    for name in sorted(p.name for p in cache_dir.iterdir() if p.is_file()):
        h.update(name.encode())
        h.update(file_digest(cache_dir / name).encode())
    return h.hexdigest()


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- Several processes (torchrun) --------------------------------------------------------


@dataclass
class Distributed:
    """This process's place among the ``torchrun`` workers (a single process: world 1)."""

    rank: int = 0
    local_rank: int = 0
    world: int = 1
    local_world: int = 1

    @classmethod
    def from_env(cls) -> "Distributed":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        import torch.distributed as td

        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if not td.is_initialized():
            td.init_process_group(backend)
        return cls(rank=td.get_rank(), local_rank=int(os.environ.get("LOCAL_RANK", "0")), world=world,
                   local_world=int(os.environ.get("LOCAL_WORLD_SIZE", str(world))))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        if self.world > 1 and device.type == "cuda":
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        return device

    def cpu_threads_per_process(self, device: torch.device) -> int:
        """0 (= all cores) for one process; on CPU, the cores shared among the local workers."""
        if self.world == 1 or device.type != "cpu":
            return 0
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        return max(1, cores // self.local_world)

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        if self.world == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def _reduce(self, x: torch.Tensor, average: bool) -> torch.Tensor:
        if self.world == 1:
            return x
        import torch.distributed as td

        x = x.clone()
        td.all_reduce(x)
        return x / self.world if average else x

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        return self._reduce(x, average=True)

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        return self._reduce(x, average=False)

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as td

            td.barrier()

    def close(self) -> None:
        if self.world > 1:
            import torch.distributed as td

            td.destroy_process_group()


# --- Training ------------------------------------------------------------------------------


@dataclass
class TrainPaths:
    cache_dir: Path
    model_out: Path  # the trained model bundle (a DVC output)
    metrics_out: Path  # final training metrics (JSON)
    curve_out: Path  # per-epoch metrics for `dvc plots` (CSV)
    checkpoint: Path  # resumable state, outside DVC's outputs
    log_dir: Path | None  # TensorBoard


CURVE_COLUMNS = ["epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "images_per_s", "seconds"]


def _write_curve(path: Path, rows: list[dict[str, float]]) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(",".join(CURVE_COLUMNS) + "\n")
            for r in rows:
                f.write(",".join(f"{r[c]:.6g}" for c in CURVE_COLUMNS) + "\n")


def train(model_params: ModelParams, t: TrainParams, paths: TrainPaths) -> dict[str, Any]:
    """Train per params; resume from ``paths.checkpoint`` if it matches; return the metrics.

    Under ``torchrun`` (``train.processes`` > 1) each process takes an equal share of every
    global batch of ``train.batch_size`` images and DistributedDataParallel averages the
    gradients; rank 0 alone evaluates and writes files.
    """
    dist = Distributed.from_env()
    device = dist.device(resolve_device(t.device))
    threads = configure_threads(t.threads or dist.cpu_threads_per_process(device))
    amp = resolve_precision(t.precision, device)
    cache = load_cache(paths.cache_dir)
    n = len(cache.train)
    if n == 0:
        raise PipelineError(f"{paths.cache_dir}: the train split is empty")
    # Drop the last incomplete batch (as DataLoader(drop_last=True)), unless it is the only one.
    batch = min(t.batch_size, n)
    if batch % dist.world:
        raise PipelineError(f"train.batch_size = {batch} must be a multiple of the {dist.world} processes")
    share = batch // dist.world  # images per process per step
    steps_per_epoch = n // batch
    total_steps = steps_per_epoch * t.epochs

    torch.manual_seed(t.seed)
    random.seed(t.seed)
    np.random.seed(t.seed % 2**32)
    arch_args = models.arch_args(
        model_params.arch, num_classes=len(cache.classes), image_size=cache.image_size,
        pretrained=model_params.pretrained, width=model_params.width,
    )
    model = models.build(model_params.arch, arch_args, cache.mean, cache.std)
    fmt = torch.channels_last if t.channels_last else torch.contiguous_format
    model = model.to(device, memory_format=fmt)
    step = make_step(model, t, device, amp, total_steps, steps_per_epoch)
    optimizer, scheduler, scaler = step.optimizer, step.scheduler, step.scaler  # checkpointed

    fp = fingerprint(model_params, t, paths.cache_dir)
    start_epoch, history = 0, []
    if paths.checkpoint.exists():
        ckpt = torch.load(paths.checkpoint, map_location=device, weights_only=False)
        if ckpt.get("fingerprint") == fp:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            scaler.load_state_dict(ckpt["scaler"])
            _set_rng_state(ckpt["rng"])
            start_epoch, history = ckpt["epoch"] + 1, ckpt["history"]
            log.info("resuming from %s: epoch %d of %d done", paths.checkpoint, start_epoch, t.epochs)
        else:
            log.info("ignoring %s: it was made with other params or data", paths.checkpoint)
    step.forward = dist.wrap(model, device)
    if t.compile:
        step.forward = torch.compile(step.forward)

    x_train = cache.train.images.to(device)
    y_train = cache.train.labels.to(device)
    augmenter = Augmenter(x_train, crop_padding=t.augment.crop_padding, flip=t.augment.flip)
    writer = _tensorboard(paths.log_dir) if dist.is_main else None
    if writer is not None:
        for row in history:  # DVC cleared the log folder before a resumed run: replay it
            _log_scalars(writer, row)
        sample = augmenter(torch.arange(min(64, n), device=device), torch.Generator(device).manual_seed(t.seed))
        writer.add_images("train/augmented samples", sample.cpu(), 0, dataformats="NCHW")
        graph_model = copy.deepcopy(model).float().cpu().eval()  # tracing must not touch BN stats
        with warnings.catch_warnings():  # add_graph traces with TorchScript, which warns it is deprecated
            warnings.simplefilter("ignore", FutureWarning)
            writer.add_graph(graph_model, cache.train.images[:2].clone())

    log.info(
        "training %s (%d parameters) on %s%s, %s, %d threads, %d images, batch %d, %d steps/epoch",
        model_params.arch, sum(p.numel() for p in model.parameters()), device,
        f" x {dist.world} processes" if dist.world > 1 else "",
        "fp32" if amp is None else f"autocast {str(amp).removeprefix('torch.')}", threads, n, batch, steps_per_epoch,
    )
    for epoch in range(start_epoch, t.epochs):
        t0 = time.perf_counter()
        # Every process draws the same permutation and augmentation, then takes its share.
        gen = torch.Generator(device).manual_seed(t.seed * 100_003 + epoch)
        model.train()
        batches = epoch_batches(augmenter, y_train, batch=batch, steps=steps_per_epoch, generator=gen,
                                memory_format=fmt, offset=dist.rank * share, share=share)
        losses, correct = run_steps(step, batches, steps_per_epoch, epoch=epoch, reduce=dist.mean,
                                    desc=f"epoch {epoch + 1}/{t.epochs}" if dist.is_main else None)
        epoch_losses, epoch_correct = dist.mean(losses), dist.sum(correct)
        seconds_train = time.perf_counter() - t0
        if dist.is_main:
            test_logits = predict_logits(model, cache.test.images, batch_size=1000, device=device, amp=amp, channels_last=t.channels_last)
            row = {
                "epoch": epoch + 1,
                "train_loss": epoch_losses.mean().item(),
                "train_acc": epoch_correct.sum().item() / (steps_per_epoch * batch),
                "test_loss": nn.functional.cross_entropy(test_logits, cache.test.labels).item(),
                "test_acc": (test_logits.argmax(1) == cache.test.labels).float().mean().item(),
                "lr": optimizer.param_groups[0]["lr"],
                "images_per_s": steps_per_epoch * batch / seconds_train,
                "seconds": time.perf_counter() - t0,
            }
            history.append(row)
            log.info(
                "epoch %d/%d  train loss %.4f acc %.4f  test loss %.4f acc %.4f  lr %.4g  %.0f img/s  %.1f s",
                row["epoch"], t.epochs, row["train_loss"], row["train_acc"], row["test_loss"], row["test_acc"],
                row["lr"], row["images_per_s"], row["seconds"],
            )
            if writer is not None:
                _log_scalars(writer, row)
                writer.flush()
            _write_curve(paths.curve_out, history)
            with atomic_path(paths.checkpoint) as tmp:
                torch.save({
                    "fingerprint": fp, "epoch": epoch, "history": history, "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(), "rng": _rng_state(),
                }, tmp)
        dist.barrier()
    if writer is not None:
        writer.close()
    if not dist.is_main:
        dist.close()
        return {}

    model = model.to("cpu", memory_format=torch.contiguous_format).eval()
    bundle = make_bundle(model, arch=model_params.arch, arch_args=arch_args, classes=cache.classes,
                         mean=cache.mean, std=cache.std, image_size=cache.image_size)
    bundle["training"] = {"epochs": t.epochs, "device": str(device), "processes": dist.world,
                          "precision": "fp32" if amp is None else str(amp).removeprefix("torch.")}
    with atomic_path(paths.model_out) as tmp:
        torch.save(bundle, tmp)
    last = history[-1]
    metrics = {
        "train_loss": round(last["train_loss"], 6),
        "train_acc": round(last["train_acc"], 6),
        "test_acc": round(last["test_acc"], 6),
        "epochs": t.epochs,
        "train_seconds": round(sum(r["seconds"] for r in history), 2),
        "images_per_s": round(float(np.median([r["images_per_s"] for r in history])), 1),
    }
    write_json(paths.metrics_out, metrics)
    paths.checkpoint.unlink(missing_ok=True)  # the run is complete: its outputs are the record
    dist.close()
    return metrics


def _check_finite(losses: torch.Tensor, epoch: int, first_step: int = 0) -> None:
    """Raise if any loss is non-finite; ``losses[0]`` is step ``first_step`` of the epoch."""
    bad = ~torch.isfinite(losses)
    if bool(bad.any()):
        index = int(bad.nonzero()[0, 0])
        raise PipelineError(
            f"training diverged: non-finite loss ({losses[index].item()}) at epoch {epoch + 1}, "
            f"step {first_step + index + 1}; nothing was written downstream. Lower train.lr, or use "
            "seed_cnn_bn (batch norm) or a warm-up schedule"
        )


def _tensorboard(log_dir: Path | None):
    if log_dir is None:
        return None
    from torch.utils.tensorboard import SummaryWriter

    log_dir.mkdir(parents=True, exist_ok=True)
    return SummaryWriter(log_dir=str(log_dir))


def _log_scalars(writer, row: dict[str, float]) -> None:
    for k in ("train_loss", "train_acc", "test_loss", "test_acc"):
        split, name = k.split("_")
        writer.add_scalar(f"{name}/{split}", row[k], row["epoch"])
    writer.add_scalar("perf/lr", row["lr"], row["epoch"])
    writer.add_scalar("perf/images_per_s", row["images_per_s"], row["epoch"])


def launch_processes(processes: int, script: str) -> None:
    """Run ``script`` under torchrun as ``processes`` workers on this machine (DDP)."""
    from torch.distributed.run import main as torchrun

    log.info("starting %d training processes with torchrun", processes)
    try:
        torchrun(["--standalone", f"--nproc_per_node={processes}", script])
    except Exception as e:  # torchrun's ChildFailedError: the worker already printed why
        raise PipelineError(f"a training process failed ({type(e).__name__}); its message is above") from None
