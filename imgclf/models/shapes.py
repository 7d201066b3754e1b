"""What an architecture takes and costs, found from shapes alone.

Both are traced on PyTorch's meta device: tensors with shapes and no data, so a check costs
milliseconds and no memory whatever the network, and nothing is downloaded.

- :func:`check_fits`: whether the params can work at the image size preprocess chose (a
  crop padding reflect padding can make; an architecture whose forward pass takes the size).
- :func:`train_flops_per_image`: the FLOPs one training image costs, forward and backward,
  counted by ``torch.utils.flop_counter``: matrix products and convolutions, 2 FLOPs per
  multiply-add. Batch norm, activations, pooling and the optimiser are not counted (a few
  percent), so a share of the peak computed from it is a lower bound. The count depends on
  shapes only, not on the precision or the device.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..core.errors import PipelineError
from ..core.params import ModelParams, TrainParams
from . import registry


def check_fits(model_params: ModelParams, train_params: TrainParams, *, image_size: int, num_classes: int,
               source: Path) -> None:
    """Refuse, before any training, params that pass the schema but cannot work at this image
    size: a crop padding reflect padding cannot make, an architecture whose forward pass
    would fail."""
    where = f"preprocess.image_size = {image_size}, in {source}"
    if train_params.augment.crop_padding >= image_size:
        raise PipelineError(
            f"train.augment.crop_padding = {train_params.augment.crop_padding} must be smaller than the images "
            f"({where}): reflect padding cannot be as wide as the image"
        )
    if not _forward_works(model_params, num_classes, image_size):
        smallest = next((s for s in _sizes_above(image_size) if _forward_works(model_params, num_classes, s)), None)
        takes = f"the smallest size it takes is {smallest} pixels" if smallest else "it takes no size up to 1024"
        raise PipelineError(f"model.arch = {model_params.arch!r} cannot classify {image_size}-pixel images ({where}): {takes}")


def train_flops_per_image(model_params: ModelParams, *, num_classes: int, image_size: int) -> float:
    """FLOPs of one training image: the forward pass and the backward pass (gradients of the
    weights and of every activation but the input image's), as the training step runs them."""
    batch = 2  # batch norm in training mode needs more than one image
    with torch.device("meta"):
        model = _meta_model(model_params, num_classes, image_size).train()
        with FlopCounterMode(display=False) as counter:
            model(torch.empty(batch, 3, image_size, image_size, dtype=torch.uint8)).float().sum().backward()
    return counter.get_total_flops() / batch


def _meta_model(model_params: ModelParams, num_classes: int, image_size: int) -> registry.Classifier:
    args = registry.arch_args(model_params, num_classes=num_classes, image_size=image_size)
    return registry.build(model_params.arch, args, [0.0] * 3, [1.0] * 3, rebuild=True)  # shapes only: no download


def _sizes_above(size: int, largest: int = 1024) -> list[int]:
    """Sizes to try, smallest first: every size to 64, then every 8 pixels (pooling networks
    change what they take at multiples of their stride)."""
    return [s for s in range(size + 1, largest + 1) if s <= 64 or s % 8 == 0]


def _forward_works(model_params: ModelParams, num_classes: int, size: int) -> bool:
    """Whether the architecture's forward pass takes ``size``-pixel images."""
    with torch.device("meta"), torch.no_grad():
        model = _meta_model(model_params, num_classes, size).eval()
        try:
            out = model(torch.empty(2, 3, size, size, dtype=torch.uint8))
        except (RuntimeError, ValueError):  # e.g. "Output size is too small" from a pooling layer
            return False
    return tuple(out.shape) == (2, num_classes)
