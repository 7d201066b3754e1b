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
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ..core.errors import PipelineError
from ..core.params import ModelParams, TrainParams
from ..models import registry
from ..models.runtime import autocast
from .augment import Augmenter
from .lookahead import Lookahead
from .muon import MuonSGD


def make_optimizer(model: nn.Module, train_params: TrainParams,
                   whiten_bias: list[nn.Parameter] | None = None) -> torch.optim.Optimizer:
    # Biases and norm parameters learn at train.bias_lr_scale x the weights' rate (LambdaLR
    # scales each group's own) and decay only with train.decay_biases (by default not: decaying
    # them only fights BN). train.optimizer muon: the 4-D conv filters go to Muon instead
    # (imgclf/train/muon.py). train.whiten_bias_lr weights: the whitening bias learns at the
    # weights' rate, in a group of its own, as airbench94's does.
    muon = train_params.optimizer == "muon"
    as_weight = {id(p) for p in whiten_bias or ()} if train_params.whiten_bias_lr == "weights" else set()
    decay, no_decay, filters, weight_like = [], [], [], []
    for p in (p for p in model.parameters() if p.requires_grad):
        if id(p) in as_weight:
            weight_like.append(p)
        elif p.ndim <= 1:
            no_decay.append(p)
        elif muon and p.ndim == 4:
            filters.append(p)
        else:
            decay.append(p)
    # decay_biases: the same share per step as the weights (lr x weight_decay), at their rate.
    bias_decay = train_params.weight_decay / train_params.bias_lr_scale if train_params.decay_biases else 0.0
    groups = [{"params": decay, "weight_decay": train_params.weight_decay},
              {"params": no_decay, "weight_decay": bias_decay, "lr": train_params.lr * train_params.bias_lr_scale}]
    if weight_like:
        groups.append({"params": weight_like,
                       "weight_decay": train_params.weight_decay if train_params.decay_biases else 0.0})
    if muon:
        if not filters:
            raise PipelineError("train.optimizer = 'muon': the model has no convolution filters for Muon to train; "
                                "use sgd, adam or adamw")
        return MuonSGD(groups, filters, lr=train_params.lr, momentum=train_params.momentum,
                       nesterov=train_params.nesterov, muon_lr=train_params.muon_lr,
                       muon_momentum=train_params.muon_momentum, muon_ns_steps=train_params.muon_ns_steps,
                       muon_weight_decay=train_params.muon_weight_decay, muon_normalize=train_params.muon_normalize)
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
        # Linear warm-up from onecycle_start over the first onecycle_peak of the steps (25%) to
        # the peak, then linear decay to onecycle_end: the shape of the fast CIFAR-10 schedules
        # (by default a triangle from 0 to 0, as in the DAWNBench ResNet-9).
        start, end = train_params.onecycle_start, train_params.onecycle_end
        peak = max(1, int(train_params.onecycle_peak * total))
        if step < peak:
            return start + (1 - start) * (step / peak)
        return end + (1 - end) * max(0.0, (total - step) / max(1, total - peak))
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
    frozen_later: tuple[nn.Parameter, ...] = ()  # no longer stepped from step `freeze_at` on
    freeze_at: int = 0

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's loss (detached) and its number of correct predictions, on the device."""
        frozen = bool(self.frozen_later) and self.scheduler.last_epoch >= self.freeze_at
        if frozen and self.frozen_later[0].requires_grad and not isinstance(self.forward, DistributedDataParallel):
            # Autograd then skips the gradients that lead only to them (whitened_net: the first
            # 3x3 convolution's input gradient, about 4% of a step). DDP keeps the set of
            # parameters it was built with, so under it they keep their (discarded) gradient.
            for p in self.frozen_later:
                p.requires_grad_(False)
        with autocast(self.device, self.amp):
            logits = self.forward(x)
            loss = self.criterion(logits.float(), y)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if frozen:
            for p in self.frozen_later:  # no gradient: the optimiser leaves it (and its momentum) be
                p.grad = None
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
              total_steps: int, steps_per_epoch: int, whiten_bias: list[nn.Parameter] | None = None) -> TrainStep:
    """The optimiser, schedule, scaler and loss of ``train_params`` around ``model``;
    ``whiten_bias`` freezes after ``train.whiten_bias_epochs`` epochs."""
    optimizer = make_optimizer(model, train_params, whiten_bias)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(train_params, s, total_steps, steps_per_epoch)
    )
    scaler = torch.amp.GradScaler(device.type, enabled=amp is torch.float16)
    criterion = nn.CrossEntropyLoss(label_smoothing=train_params.label_smoothing)
    lookahead = Lookahead(model, total_steps) if train_params.lookahead else None
    frozen = tuple(whiten_bias or ()) if train_params.whiten_bias_epochs else ()
    return TrainStep(model, optimizer, scheduler, scaler, criterion, device, amp, lookahead, frozen,
                     train_params.whiten_bias_epochs * steps_per_epoch)


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
    whiten_bias = registry.whiten_bias(model_params.arch, model)
    if train_params.whiten_bias_epochs and not whiten_bias:
        raise PipelineError(f"train.whiten_bias_epochs = {train_params.whiten_bias_epochs}: model.arch "
                            f"{model_params.arch!r} has no whitening layer; set it to 0")
    if train_params.whiten_bias_lr != "bias" and not whiten_bias:
        raise PipelineError(f"train.whiten_bias_lr = {train_params.whiten_bias_lr!r}: model.arch "
                            f"{model_params.arch!r} has no whitening layer; leave it at 'bias'")
    step = make_step(model, train_params, device, amp, steps_per_epoch * train_params.epochs, steps_per_epoch,
                     whiten_bias)
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
