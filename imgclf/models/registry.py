"""The architectures ``model.arch`` can name, and the :class:`Classifier` every model is wrapped in.

**An architecture is one file** in ``imgclf/models/archs/``: its builder, marked
``@architecture``. Every module in that folder is imported when this registry is, so the new
file is the whole edit. A builder takes ``num_classes`` and ``image_size`` first; any further
keyword must be a ``model`` param of the same name (``width``, ``pretrained``), passed from
params.yaml and stored with the exported weights. The decorator carries the architecture's
hooks:

- ``meaning``: what each ``model`` param it takes means for it (``width`` is the first
  stage's channels in one net, the first block's in another); the docs and errors say it.
- ``build_only``: params used only when the network is first built (``pretrained``: the
  trained weights replace what it downloads), dropped when a file or a shape check rebuilds it.
- ``fit_to_data``: a function ``(net, images, normalize, device)`` that sets layers from the
  training images before the first step (the whitening layer of ``whitened_net``).
- ``whiten_bias``: a function ``(net) -> [parameters]``, the whitening layer's bias, which
  ``train.whiten_bias_epochs`` freezes after that many epochs (airbench94's rule).

Every model is wrapped in :class:`Classifier`, which takes uint8 images ``(N, 3, H, W)`` (or
floats on the 0..255 scale) and applies the training normalisation itself. The normalisation
therefore travels inside every export, and training, evaluation, export and prediction cannot
disagree about it.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..core.errors import PipelineError


@dataclass(frozen=True)
class Architecture:
    name: str
    build: Callable[..., nn.Module]
    params: tuple[str, ...]  # the model params the builder takes, after num_classes and image_size
    meaning: dict[str, str] = field(default_factory=dict)
    build_only: tuple[str, ...] = ()
    fit_to_data: Callable[[nn.Module, torch.Tensor, Callable, torch.device], bool] | None = None
    whiten_bias: Callable[[nn.Module], list[nn.Parameter]] | None = None


ARCHS: dict[str, Architecture] = {}


def architecture(fn: Callable[..., nn.Module] | None = None, *, meaning: dict[str, str] | None = None,
                 build_only: tuple[str, ...] = (), fit_to_data: Callable | None = None,
                 whiten_bias: Callable | None = None):
    """Register a builder under its function's name: ``@architecture`` or ``@architecture(...)``
    with the hooks above."""

    def register(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        params = tuple(inspect.signature(fn).parameters)
        if params[:2] != ("num_classes", "image_size"):
            raise TypeError(f"architecture {fn.__name__}: takes num_classes and image_size first, not {params[:2]}")
        unknown = set(meaning or {}) | set(build_only)
        if not unknown <= set(params[2:]):
            raise TypeError(f"architecture {fn.__name__}: hooks name {sorted(unknown - set(params[2:]))}, "
                            f"which it does not take")
        if fn.__name__ in ARCHS:
            raise TypeError(f"architecture {fn.__name__}: registered twice "
                            f"({ARCHS[fn.__name__].build.__module__} and {fn.__module__})")
        ARCHS[fn.__name__] = Architecture(fn.__name__, fn, params[2:], dict(meaning or {}), tuple(build_only),
                                          fit_to_data, whiten_bias)
        return fn

    return register(fn) if fn is not None else register


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))


def check_arch(arch: str) -> Architecture:
    if arch not in ARCHS:
        raise PipelineError(f"model.arch = {arch!r}: unknown architecture; known: {', '.join(sorted(ARCHS))}")
    return ARCHS[arch]


def check_params_file(params: Any, stage_paths: Any = None) -> dict[str, Any]:
    """The params stage: the whole file is valid (the runner checked it) and ``model.arch`` names
    an architecture, so a typo fails first, not in train after a download."""
    from ..core.params import check_whole_file

    check_arch(params.model.arch)
    return check_whole_file(params, stage_paths)


def arch_args(model_params: Any, *, num_classes: int, image_size: int) -> dict[str, Any]:
    """The keyword arguments ``model_params.arch`` is built with (stored with the weights):
    ``num_classes`` and ``image_size``, plus every ``model`` param its builder takes."""
    arch = check_arch(model_params.arch)
    return {"num_classes": num_classes, "image_size": image_size,
            **{name: getattr(model_params, name) for name in arch.params}}


def build(arch: str, args: dict[str, Any], mean: list[float], std: list[float], *, rebuild: bool = False) -> Classifier:
    """The architecture wrapped in a :class:`Classifier`. ``rebuild``: for weights that will be
    loaded, or shapes alone: the build-only args (a download) are left out."""
    spec = check_arch(arch)
    if rebuild:
        args = {k: v for k, v in args.items() if k not in spec.build_only}
    return Classifier(spec.build(**args), mean, std)


def fit_to_data(arch: str, model: Classifier, images: torch.Tensor) -> None:
    """Initialise the layers of ``model`` (built as ``arch``) that are set from training images
    (uint8, N x 3 x H x W), before the first step; most architectures have none."""
    hook = check_arch(arch).fit_to_data
    if hook is not None:
        hook(model.net, images, model.normalize, model.scale.device)


def whiten_bias(arch: str, model: Classifier) -> list[nn.Parameter]:
    """The whitening layer's bias of ``model`` (built as ``arch``); [] when it has none."""
    hook = check_arch(arch).whiten_bias
    return [] if hook is None else list(hook(model.net))


def _discover() -> None:
    from . import archs

    for module in pkgutil.iter_modules(archs.__path__):
        importlib.import_module(f"{archs.__name__}.{module.name}")


_discover()
