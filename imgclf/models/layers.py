"""Layers more than one architecture uses (here, not in an architecture's module, so that
no two architecture modules import each other)."""

from __future__ import annotations

import torch
from torch import nn


class _GlobalMaxPool(nn.Module):
    """Each channel's largest value, (N, C, H, W) -> (N, C): AdaptiveMaxPool2d(1), written as a
    max pool over the whole map, which every ONNX exporter translates (torch 2.11's has no
    translation for adaptive_max_pool2d, seen on the GPU machine; docs/gpu.md). Its gradient
    goes to the same element (the first largest), so training is bit for bit as before."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.max_pool2d(x, kernel_size=x.shape[-2:]).flatten(1)


class _Scale(nn.Module):
    """Multiply by a constant: keeps the head's logits small early in training, which lets
    the fast schedules use a high learning rate (the 0.125 of the DAWNBench ResNet-9)."""

    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor
