"""Model factory: the architecture is named in params (``model.arch``) and built here.

Every model is wrapped in :class:`Classifier`, which takes uint8 images ``(N, 3, H, W)``
(or floats on the 0..255 scale) and applies the training normalisation itself. The
normalisation therefore travels inside both exports, and training, evaluation, export and
prediction cannot disagree about it.
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .layers import _GlobalMaxPool, _Scale
from .whitened import fit_to_data, whitened_net

# Every architecture ``model.arch`` can name: ``@architecture`` on its builder is the one edit
# that adds one. A builder takes ``num_classes`` and ``image_size`` first; any further
# keyword must be a ``model`` param of the same name (e.g. ``width``), passed from params.yaml
# and stored with the exported weights.
ARCHS: dict[str, Callable[..., nn.Module]] = {}


def architecture(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    ARCHS[fn.__name__] = fn
    return fn


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


@architecture
def vgg16(num_classes: int = 10, image_size: int = 32, pretrained: bool = False) -> nn.Module:
    """torchvision's VGG16 modified as in §4.9: the last classifier layer is replaced.

    The tutorial shows two edits: appending a layer (``classifier.add_module``) or
    replacing ``classifier[6]``. Replacing keeps the 1000-way ImageNet head from sitting
    uselessly in front of ours, so that is what we do.
    """
    import torchvision

    weights = torchvision.models.VGG16_Weights.IMAGENET1K_V1 if pretrained else None
    try:
        model = torchvision.models.vgg16(weights=weights)
    except Exception as e:  # the weights come from the internet
        from ..core.errors import PipelineError

        raise PipelineError(
            f"cannot load VGG16's pretrained weights ({type(e).__name__}: {e}); "
            "set model.pretrained=false, or put the file in torch's hub cache (TORCH_HOME)"
        ) from None
    model.classifier[6] = nn.Linear(model.classifier[6].in_features, num_classes)
    return model


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


@architecture
def resnet_fast(num_classes: int = 10, image_size: int = 32, width: int = 64) -> nn.Sequential:
    """A small batch-normalised residual net in the style of the CIFAR-10 speed records
    (ResNet-9 of the DAWNBench entries, airbench): three stages at widths w, 2w, 4w with a
    max-pool in each, residual blocks after the first and last, a global max-pool and a
    scaled linear head. ``width`` 64 is the original ResNet-9 (6.5M parameters); the CPU
    recipe uses a narrower one."""
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


class Classifier(nn.Module):
    """A network plus the normalisation it was trained with.

    Input: images ``(N, 3, H, W)``, uint8 or float on the 0..255 scale. The first op is
    ``ToDtype(float32, scale=True)`` followed by ``Normalize(mean, std)``, folded into one
    multiply-add (the tests check it equals the tutorial's v2 pipeline).
    """

    def __init__(self, net: nn.Module, mean: list[float], std: list[float]):
        super().__init__()
        self.net = net
        std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.register_buffer("scale", 1.0 / (255.0 * std_t))
        self.register_buffer("shift", -mean_t / std_t)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.shift, x.float(), self.scale)

    def fit_to_data(self, images: torch.Tensor) -> None:
        """Initialise the layers that are set from training images (uint8, N x 3 x H x W),
        before the first step: the whitening layer of ``whitened_net``; others have none."""
        fit_to_data(self.net, images, self.normalize, self.scale.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))


architecture(whitened_net)


def arch_args(model_params: Any, *, num_classes: int, image_size: int) -> dict[str, Any]:
    """The keyword arguments ``model_params.arch`` is built with (stored with the weights):
    ``num_classes`` and ``image_size``, plus every ``model`` param its function takes."""
    fn = ARCHS[check_arch(model_params.arch)]
    args: dict[str, Any] = {"num_classes": num_classes, "image_size": image_size}
    for name in list(inspect.signature(fn).parameters)[2:]:
        args[name] = getattr(model_params, name)
    return args


def check_arch(arch: str) -> str:
    if arch not in ARCHS:
        from ..core.errors import PipelineError

        raise PipelineError(f"model.arch = {arch!r}: unknown architecture; known: {', '.join(ARCHS)}")
    return arch


def build(arch: str, args: dict[str, Any], mean: list[float], std: list[float]) -> Classifier:
    return Classifier(ARCHS[check_arch(arch)](**args), mean, std)
