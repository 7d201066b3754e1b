"""``whitened_net``: the network of the CIFAR-10 speed records (airbench94's design), in our terms.

What makes it buy more accuracy per FLOP than a plain ResNet (docs/recipes.md):

- **A whitening first layer.** A 2x2 convolution, not trained, whose filters are the
  eigenvectors of the covariance of 2x2 patches of the training images, each scaled by
  ``1/sqrt(eigenvalue)``, and their negatives (24 filters for 3 channels). Its output patches
  are decorrelated with unit variance, so the first trained layer starts well conditioned.
  :func:`fit_whitening` sets it from data; the train stage calls it once, before the first
  step, on the first 5,000 training images (the weights are then part of the state_dict).
- **Identity (Dirac) initialisation.** Each 3x3 convolution starts by passing its first
  ``in_channels`` inputs through unchanged, so the deep net starts as a shallow one.
- **Batch norm with frozen scales.** The scales stay 1 (not trained); the biases are, with a
  much higher learning rate (``train.bias_lr_scale``). The running statistics follow the
  batches closely (momentum 0.4), which matters in a run this short.
- **GELU** activations, max-pooling inside each block (before batch norm: 4x less
  normalisation work), a global max-pool and a linear head scaled by 1/9.

``width`` is the first block's channels; the next two have 4x as many (64 -> 64, 256, 256,
the published network: 0.72 GFLOP per training image at 32 pixels).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from ..layers import _GlobalMaxPool, _Scale
from ..registry import architecture

WHITEN_KERNEL = 2
WHITEN_EPS = 5e-4  # added to the eigenvalues: bounds the gain of the flattest directions
BN_MOMENTUM = 0.4  # PyTorch's convention: the weight of the newest batch in the running stats
BN_EPS = 1e-12
FIT_IMAGES = 5000  # training images the whitening layer is fitted to: enough for a 12 x 12 covariance


class Whitening(nn.Conv2d):
    """The frozen whitening convolution (3 -> 2 x 3 x k x k channels, no padding). Its bias is
    trained: it sets where each filter's GELU bends."""

    def __init__(self, in_channels: int = 3, kernel: int = WHITEN_KERNEL):
        super().__init__(in_channels, 2 * in_channels * kernel * kernel, kernel, padding=0, bias=True)
        self.weight.requires_grad_(False)
        nn.init.zeros_(self.bias)


@torch.no_grad()
def fit_whitening(layer: Whitening, images: torch.Tensor, eps: float = WHITEN_EPS) -> None:
    """Set ``layer``'s filters from ``images`` (normalised floats, N x C x H x W): the
    eigenvectors of the patch covariance scaled by 1/sqrt(eigenvalue + eps), then negated."""
    c, (kh, kw) = images.shape[1], layer.kernel_size
    patches = images.float().unfold(2, kh, 1).unfold(3, kw, 1)  # N, C, H', W', kh, kw
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, c * kh * kw).double()
    cov = patches.T @ patches / len(patches)
    eigenvalues, eigenvectors = torch.linalg.eigh(cov)  # ascending; the columns are the vectors
    filters = (eigenvectors / (eigenvalues + eps).sqrt()).T.flip(0)  # strongest direction first
    filters = filters.reshape(-1, c, kh, kw).to(layer.weight.dtype)
    layer.weight.copy_(torch.cat([filters, -filters]))


def _conv(cin: int, cout: int) -> nn.Conv2d:
    conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
    with torch.no_grad():
        nn.init.dirac_(conv.weight[:cin])  # the first cin filters pass their input through
    return conv


def _norm(channels: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)
    bn.weight.requires_grad_(False)  # the scale stays 1; the bias trains
    return bn


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        OrderedDict(
            [
                ("conv1", _conv(cin, cout)),
                ("pool", nn.MaxPool2d(2)),
                ("norm1", _norm(cout)),
                ("act1", nn.GELU()),
                ("conv2", _conv(cout, cout)),
                ("norm2", _norm(cout)),
                ("act2", nn.GELU()),
            ]
        )
    )


def fit_to_data(model: nn.Module, images: torch.Tensor, normalize, device: torch.device) -> bool:
    """Fit every whitening layer of ``model`` to the first ``FIT_IMAGES`` of ``images`` (uint8,
    N x 3 x H x W), normalised on ``device``; False if it has none."""
    layers = [m for m in model.modules() if isinstance(m, Whitening)]
    if not layers:
        return False
    x = normalize(images[:FIT_IMAGES].to(device).float())  # only these go to the device
    for layer in layers:
        fit_whitening(layer, x)
    return True


@architecture(fit_to_data=fit_to_data, whiten_bias=lambda net: [net.whiten.bias],
              meaning={"width": "channels of the first block (then 4x, 4x)"})
def whitened_net(num_classes: int = 10, image_size: int = 32, width: int = 64) -> nn.Sequential:
    """The speed records' network (airbench94's design): a frozen whitening first layer fitted to
    the training images, three blocks of two identity-initialised 3x3 convolutions with frozen
    batch-norm scales and GELU, a global max-pool and a scaled linear head."""
    widths = [width, 4 * width, 4 * width]
    whiten = Whitening(3)
    return nn.Sequential(
        OrderedDict(
            [
                ("whiten", whiten),
                ("act0", nn.GELU()),
                ("block1", _block(whiten.out_channels, widths[0])),
                ("block2", _block(widths[0], widths[1])),
                ("block3", _block(widths[1], widths[2])),
                ("pool", _GlobalMaxPool()),  # 3 x 3 -> 1 at 32 pixels, as MaxPool2d(3)
                ("head", nn.Linear(widths[2], num_classes, bias=False)),
                ("scale", _Scale(1 / 9)),
            ]
        )
    )
