"""``seed_cnn``, the tutorial's CIFAR-10 network (§4.8), and ``seed_cnn_bn``, the same shape made
trainable: one family, so one file."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from ..registry import architecture


@architecture
def seed_cnn(num_classes: int = 10, image_size: int = 32) -> nn.Sequential:
    """The tutorial's CIFAR-10 network (§4.8), layer for layer and name for name.

    It has no activation at all, so it is a linear classifier in disguise (§4.4 explains why
    that limits it); :func:`seed_cnn_bn` is the fix. ``Linear(1024, 128)`` is 64 x 4 x 4 for
    32-pixel images; other sizes get ``64 * (size // 8) ** 2`` inputs.
    """
    flat = 64 * (image_size // 8) ** 2
    return nn.Sequential(
        OrderedDict(
            [
                ("conv1", nn.Conv2d(in_channels=3, out_channels=32, kernel_size=5, padding=2)),
                ("pool1", nn.MaxPool2d(kernel_size=2)),
                ("conv2", nn.Conv2d(in_channels=32, out_channels=32, kernel_size=5, padding=2)),
                ("pool2", nn.MaxPool2d(kernel_size=2)),
                ("conv3", nn.Conv2d(in_channels=32, out_channels=64, kernel_size=5, padding=2)),
                ("pool3", nn.MaxPool2d(kernel_size=2)),
                ("flatten", nn.Flatten()),
                ("full_connect1", nn.Linear(flat, 128)),
                ("full_connect2", nn.Linear(128, num_classes)),
            ]
        )
    )


@architecture
def seed_cnn_bn(num_classes: int = 10, image_size: int = 32) -> nn.Sequential:
    """The same shape with BatchNorm + ReLU after each convolution and a ReLU between the
    linear layers: the non-linearity §4.4 says a deep network needs."""
    layers: list[tuple[str, nn.Module]] = []
    for i, (cin, cout) in enumerate([(3, 32), (32, 32), (32, 64)], start=1):
        layers += [
            (f"conv{i}", nn.Conv2d(cin, cout, kernel_size=5, padding=2, bias=False)),
            (f"bn{i}", nn.BatchNorm2d(cout)),
            (f"relu{i}", nn.ReLU(inplace=True)),
            (f"pool{i}", nn.MaxPool2d(kernel_size=2)),
        ]
    layers += [
        ("flatten", nn.Flatten()),
        ("full_connect1", nn.Linear(64 * (image_size // 8) ** 2, 128)),
        ("relu4", nn.ReLU(inplace=True)),
        ("full_connect2", nn.Linear(128, num_classes)),
    ]
    return nn.Sequential(OrderedDict(layers))
