"""The trainee (the model being trained, with its optimiser, schedule, scaler and loss), its
step, and one epoch of batches: what ``train()`` and the benchmark share.

:func:`build_trainee` is the one place a model and its optimiser, schedule, scaler and loss
are made from params, so the benchmark measures exactly the step the train stage takes.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from ..core.errors import PipelineError
from ..core.params import ModelParams, TrainParams
from ..models import registry
from ..models.runtime import autocast
from .augment import Augmenter
from .lookahead import Lookahead
from .muon import MuonSGD


def make_optimizer(model: nn.Module, train_params: TrainParams) -> torch.optim.Optimizer:
    # No weight decay on norm layers' scales and on biases: decaying them only fights BN.
    # They learn at train.bias_lr_scale x the rate of the weights (LambdaLR scales each group's own).
    # train.optimizer muon: the conv filters (4-D) go to Muon instead (imgclf/train/muon.py).
    muon = train_params.optimizer == "muon"
    decay, no_decay, filters = [], [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else filters if muon and p.ndim == 4 else decay).append(p)
    groups = [{"params": decay, "weight_decay": train_params.weight_decay},
              {"params": no_decay, "weight_decay": 0.0, "lr": train_params.lr * train_params.bias_lr_scale}]
    if muon:
        if not filters:
            raise PipelineError("train.optimizer = 'muon': the model has no convolution filters for Muon to train; "
                                "use sgd, adam or adamw")
        return MuonSGD(groups, filters, lr=train_params.lr, momentum=train_params.momentum,
                       nesterov=train_params.nesterov, muon_lr=train_params.muon_lr,
                       muon_momentum=train_params.muon_momentum, muon_ns_steps=train_params.muon_ns_steps,
                       muon_weight_decay=train_params.muon_weight_decay)
    if train_params.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=train_params.lr, momentum=train_params.momentum,
                               nesterov=train_params.nesterov and train_params.momentum > 0)
    # Adam's weight_decay is L2 added to the gradient; AdamW's is decoupled (Loshchilov & Hutter).
    cls = torch.optim.Adam if train_params.optimizer == "adam" else torch.optim.AdamW
    return cls(groups, lr=train_params.lr)


def lr_factor(train_params: TrainParams, step: int, total: int, steps_per_epoch: int) -> float:
    """Multiplier of train.lr at optimiser step ``step`` of ``total``."""
    if train_params.schedule == "constant":
        return 1.0
    if train_params.schedule == "onecycle":
        # Linear warm-up over the first 25% to the peak, then linear decay to zero: the
        # shape of the fast CIFAR-10 schedules (a triangle, as in the DAWNBench ResNet-9).
        peak = max(1, int(0.25 * total))
        return step / peak if step < peak else max(0.0, (total - step) / max(1, total - peak))
    warm = int(train_params.warmup_epochs * steps_per_epoch)
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    if train_params.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    return max(0.0, 1 - progress)  # linear


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
    lookahead: Lookahead | None = None

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
        if self.lookahead is not None:
            self.lookahead.after_step(self.scheduler.last_epoch)
        return loss.detach(), (logits.argmax(1) == y).sum()

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs to continue this step exactly."""
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "lookahead": None if self.lookahead is None else self.lookahead.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.lookahead is not None:
            self.lookahead.load_state_dict(state["lookahead"])


def make_step(model: nn.Module, train_params: TrainParams, device: torch.device, amp: torch.dtype | None,
              total_steps: int, steps_per_epoch: int) -> TrainStep:
    """The optimiser, schedule, scaler and loss of ``t`` around ``model``."""
    optimizer = make_optimizer(model, train_params)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(train_params, s, total_steps, steps_per_epoch)
    )
    scaler = torch.amp.GradScaler(device.type, enabled=amp is torch.float16)
    criterion = nn.CrossEntropyLoss(label_smoothing=train_params.label_smoothing)
    lookahead = Lookahead(model, total_steps) if train_params.lookahead else None
    return TrainStep(model, optimizer, scheduler, scaler, criterion, device, amp, lookahead)


@dataclass
class Trainee:
    """A fresh model, the arguments it was built with, and its training step."""

    model: registry.Classifier
    arch_args: dict[str, Any]
    step: TrainStep
    memory_format: torch.memory_format


def build_trainee(model_params: ModelParams, train_params: TrainParams, *, num_classes: int, image_size: int,
                  mean: list[float], std: list[float], device: torch.device, amp: torch.dtype | None,
                  steps_per_epoch: int, init_images: torch.Tensor | None = None) -> Trainee:
    """The model of ``model_params`` (seeded by ``train.seed``; its data-fitted layers, if any,
    fitted to ``init_images``) on ``device`` in the memory format of ``train.channels_last``,
    with the step of ``t`` for ``train.epochs`` epochs."""
    torch.manual_seed(train_params.seed)
    args = registry.arch_args(model_params, num_classes=num_classes, image_size=image_size)
    fmt = torch.channels_last if train_params.channels_last else torch.contiguous_format
    model = registry.build(model_params.arch, args, mean, std).to(device, memory_format=fmt)
    if init_images is not None:
        registry.fit_to_data(model_params.arch, model, init_images)
    step = make_step(model, train_params, device, amp, steps_per_epoch * train_params.epochs, steps_per_epoch)
    return Trainee(model, args, step, fmt)


def epoch_batches(augmenter: Augmenter, y_train: torch.Tensor, *, batch: int, steps: int,
                  generator: torch.Generator, memory_format: torch.memory_format,
                  offset: int = 0, share: int | None = None, epoch: int = 0,
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Epoch ``epoch``'s batches: the epoch permuted and augmented in one batched pass on the
    device, then sliced. ``offset`` and ``share`` pick one process's part of each batch."""
    share = batch if share is None else share
    perm = torch.randperm(len(y_train), generator=generator, device=y_train.device)[: steps * batch]
    xs = augmenter(perm, generator, epoch)
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
                check_finite(reduce(losses[checked : i + 1]), epoch, first_step=checked)
                checked = i + 1
            bar.update()
    return losses, correct


def check_finite(losses: torch.Tensor, epoch: int, first_step: int = 0) -> None:
    """Raise if any loss is non-finite; ``losses[0]`` is step ``first_step`` of the epoch."""
    bad = ~torch.isfinite(losses)
    if bool(bad.any()):
        index = int(bad.nonzero()[0, 0])
        raise PipelineError(
            f"training diverged: non-finite loss ({losses[index].item()}) at epoch {epoch + 1}, "
            f"step {first_step + index + 1}; nothing was written downstream. Lower train.lr, or use "
            "seed_cnn_bn (batch norm) or a warm-up schedule"
        )
