"""What is measured: the recipes, and the three ways a throughput row feeds one training step.

Every row trains a fresh model built by :func:`imgclf.train.trainee.build_trainee`, the function
:func:`imgclf.train.loop.train` builds with, so the step timed here is the step the train stage
takes. The rows differ only in how batches reach that step:

- pipeline: train.py's data path (permute and augment the epoch on the device, then slice);
- compute: one fixed batch already on the device (no data path: the ceiling);
- classic: the tutorial's Dataset + DataLoader, one PIL image at a time.
"""

from __future__ import annotations

import itertools
import tarfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torchvision

from .. import recipes
from ..cache.dataset import Cache
from ..core.params import ModelParams, TrainParams
from ..data import cifar
from ..models.runtime import resolve_precision
from ..train.augment import Augmenter
from ..train.trainee import Trainee, build_trainee, epoch_batches, run_steps


@dataclass(frozen=True)
class Recipe:
    """A model and the train params it is benchmarked with (as in params.yaml / recipes/)."""

    name: str
    arch: str
    width: int  # resnet_fast only
    batch: int
    other_batch: int  # the batch-size comparison row
    lr: float
    label_smoothing: float

    @property
    def model_params(self) -> ModelParams:
        return ModelParams(arch=self.arch, width=self.width)

    @property
    def title(self) -> str:
        return f"{self.arch} w{self.width}" if self.arch == "resnet_fast" else self.arch


def _from_recipe(name: str, other_batch: int) -> Recipe:
    """A recipe of recipes/ (the fast one: make fast), as the bench measures it."""
    values = recipes.flatten(recipes.load(name))
    return Recipe(name, values["model.arch"], values["model.width"], batch=values["train.batch_size"],
                  other_batch=other_batch, lr=values["train.lr"], label_smoothing=values["train.label_smoothing"])


RECIPES = (
    # The tutorial's network at the params.yaml batch size.
    Recipe("seed_cnn", "seed_cnn", 64, batch=128, other_batch=512, lr=0.05, label_smoothing=0.0),
    # The fast CPU recipe (recipes/fast.yaml), and the batch-size row at twice its batch.
    _from_recipe("fast", other_batch=512),
)


@dataclass(frozen=True)
class Config:
    recipe: Recipe
    batch: int
    precision: str  # fp32 | bf16 (autocast)
    channels_last: bool
    threads: int  # 0 = one per usable core (configure_threads)

    def train_params(self, device: torch.device) -> TrainParams:
        # epochs=10: the schedule of a 10-epoch CIFAR-10 run (see build).
        r = self.recipe
        return TrainParams(
            epochs=10, batch_size=self.batch, lr=r.lr, label_smoothing=r.label_smoothing, precision=self.precision,
            channels_last=self.channels_last, device=device.type, threads=self.threads,
        )


def build(cfg: Config, device: torch.device, cache: Cache) -> tuple[Trainee, TrainParams]:
    """A fresh model and its step for ``cfg``, built as train() builds them.

    The schedule is that of a 10-epoch run over the 50,000 CIFAR-10 training images: the few
    hundred steps measured stay in its warm-up, at a small learning rate. Speed does not
    depend on the rate; divergence (which stops a step with an error, as in train()) cannot
    happen."""
    train_params = cfg.train_params(device)
    trainee = build_trainee(
        cfg.recipe.model_params, train_params, num_classes=len(cache.classes), image_size=cache.image_size,
        mean=cache.mean, std=cache.std, device=device, amp=resolve_precision(train_params.precision, device),
        steps_per_epoch=50_000 // cfg.batch,
    )
    return trainee, train_params


# Each feeder runs `steps` training steps and returns the number of images trained on.
Feeder = Callable[[int], int]


def pipeline_feeder(tr: Trainee, train_params: TrainParams, x_train: torch.Tensor, y_train: torch.Tensor,
                    generator: torch.Generator) -> Feeder:
    """train.py's data path: permute, augment the whole epoch in one batched pass on the
    device, then slice batches. A timed repeat of k steps is an epoch of k batches, so the
    per-epoch augmentation is paid in proportion, as in a full epoch."""
    n, b = len(x_train), train_params.batch_size
    augmenter = Augmenter(x_train, crop_padding=train_params.augment.crop_padding, flip=train_params.augment.flip,
                          seed=train_params.seed)

    def run(steps: int) -> int:
        done = 0
        while done < steps:
            k = min(steps - done, n // b)
            batches = epoch_batches(augmenter, y_train, batch=b, steps=k, generator=generator,
                                    memory_format=tr.memory_format)
            run_steps(tr.step, batches, k, epoch=0)
            done += k
        return steps * b

    return run


def compute_feeder(tr: Trainee, train_params: TrainParams, x_train: torch.Tensor, y_train: torch.Tensor) -> Feeder:
    """No data path: the same step on one fixed batch already on the device, in the
    model's memory format. The ceiling of this model at this batch size on this machine."""
    b = train_params.batch_size
    batch = (x_train[:b].contiguous(memory_format=tr.memory_format), y_train[:b].clone())

    def run(steps: int) -> int:
        run_steps(tr.step, itertools.repeat(batch), steps, epoch=0)
        return steps * b

    return run


class TutorialCIFAR10(torchvision.datasets.CIFAR10):
    """torchvision's CIFAR-10 Dataset over a local copy of the official-format archive.

    torchvision checks each batch file against the md5 sums of the official download. The
    archive benchmarked here has the official format but need not have those bytes:
    tools/make_cifar_archive.py repacks re-encoded images, and without an archive the bench
    writes a synthetic one. Speed, not provenance, is measured here; the same archive was
    read just before by :func:`imgclf.data.cifar.read_archive`, which refuses any pickle holding
    more than arrays, lists and dicts, so torchvision's plain ``pickle.load`` reads only
    vetted files. Hence: the sums are not checked, only that the files exist.
    """

    meta = {**torchvision.datasets.CIFAR10.meta, "md5": None}  # None: existence only

    def _check_integrity(self) -> bool:
        return True


def extract_batches(archive: Path, dest: Path) -> Path:
    """Unpack the archive's batch folder (what torchvision's CIFAR10 reads) under ``dest``."""
    with tarfile.open(archive, "r:*") as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.removeprefix("./").startswith(cifar.FOLDER + "/")]
        tar.extractall(dest, members=members, filter="data")
    return dest


def classic_feeder(tr: Trainee, train_params: TrainParams, root: Path, mean: list[float], std: list[float], workers: int,
                   image_size: int) -> tuple[Feeder, Callable[[], None]]:
    """The tutorial's way (§1): a Dataset returning one PIL image at a time, transformed per
    sample, collated by a DataLoader, copied to the device per batch. The per-sample
    transform does the pipeline's augmentation (reflect-padded crop, flip) and then the
    tutorial's ToTensor + Normalize, so both paths do the same work. The normalised floats
    go to the network inside the Classifier (``model.net``), past its own normalisation.
    Returns the feeder and what ends its worker processes."""
    from torchvision.transforms import v2

    aug, b, device = train_params.augment, train_params.batch_size, tr.step.device
    ops: list[Any] = []
    if aug.crop_padding:
        ops.append(v2.RandomCrop(image_size, padding=aug.crop_padding, padding_mode="reflect"))
    if aug.flip:
        ops.append(v2.RandomHorizontalFlip())
    with warnings.catch_warnings():  # the official pickles name numpy.core (NumPy 2: a shim)
        warnings.simplefilter("ignore", DeprecationWarning)
        dataset = TutorialCIFAR10(str(root), train=True, transform=v2.Compose([*ops, tutorial_transform(mean, std)]))
    loader = torch.utils.data.DataLoader(dataset, batch_size=b, shuffle=True, num_workers=workers, drop_last=True)
    step = replace(tr.step, forward=tr.model.net)

    def forever() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            for x, y in loader:  # as the tutorial: inputs.to(device), labels.to(device)
                yield x.to(device).contiguous(memory_format=tr.memory_format), y.to(device)

    batches = forever()

    def run(steps: int) -> int:
        run_steps(step, batches, steps, epoch=0)
        return steps * b

    return run, batches.close  # closing the generator ends the worker processes


def tutorial_transform(mean: list[float], std: list[float]) -> Any:
    """The tutorial's per-image transform (§1, §2): image -> float in [0, 1] -> normalised.
    The classic feeder's, and the reference the batched pipeline is tested against; no stage
    runs it."""
    from torchvision.transforms import v2

    return v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])
