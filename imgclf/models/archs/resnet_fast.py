"""``resnet_fast``: a small batch-normalised residual net (ResNet-9 of the DAWNBench entries)."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from ..layers import _GlobalMaxPool, _Scale
from ..registry import architecture


class _Residual(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(_conv_bn(channels, channels), _conv_bn(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def _conv_bn(cin: int, cout: int, pool: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1, bias=False)]
    if pool:
        layers.append(nn.MaxPool2d(2))  # pool before BN: 4x less normalisation work
    layers += [nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


@architecture(meaning={"width": "channels of the first layer (the three stages: 2x, 4x, 8x)"})
def resnet_fast(num_classes: int = 10, image_size: int = 32, width: int = 64) -> nn.Sequential:
    """A small batch-normalised residual net in the style of the CIFAR-10 speed records
    (ResNet-9 of the DAWNBench entries, airbench): a first layer of w channels, then three
    stages at 2w, 4w and 8w with a max-pool in each, residual blocks after the first and last,
    a global max-pool and a scaled linear head. ``width`` 64 is the original ResNet-9 (6.5M
    parameters); the CPU recipe uses a narrower one."""
    w = width
    return nn.Sequential(
        OrderedDict(
            [
                ("prep", _conv_bn(3, w)),
                ("layer1", _conv_bn(w, 2 * w, pool=True)),
                ("res1", _Residual(2 * w)),
                ("layer2", _conv_bn(2 * w, 4 * w, pool=True)),
                ("layer3", _conv_bn(4 * w, 8 * w, pool=True)),
                ("res3", _Residual(8 * w)),
                ("pool", _GlobalMaxPool()),
                ("head", nn.Linear(8 * w, num_classes, bias=False)),
                ("scale", _Scale(0.125)),
            ]
        )
    )
