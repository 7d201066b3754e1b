"""The model bundle: the format a trained model travels in (make, read, rebuild).

Tutorial §4.10 saves and loads a model two ways:

* ``torch.save(model)`` pickles the whole module. Loading needs ``weights_only=False``, which
  runs arbitrary code from the file, and the model's classes importable (``imgclf``): for
  files you trust only.
* ``torch.save(state_dict)`` stores tensors only, loadable with ``weights_only=True``. Our
  file also carries what is needed to rebuild and use the model: the architecture name and
  arguments, class names and the normalisation mean and std, and (from the export stage) the
  test-time augmentation the model is used with, ``"tta"`` (:mod:`imgclf.models.tta`).

Opening an exported file for use, its test-time augmentation applied, is
:mod:`imgclf.models.bundle` (the train stage writes bundles and never needs it).
"""

from __future__ import annotations

import importlib
import os
import pickle
import types
from pathlib import Path
from typing import Any

import torch

from ..core.errors import PipelineError
from .registry import Classifier, build
from .tta import with_tta

FORMAT = "imgclf-state-dict"
VERSION = 1


def make_bundle(model: Classifier, *, arch: str, arch_args: dict[str, Any], classes: list[str],
                mean: list[float], std: list[float], image_size: int) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "version": VERSION,
        "arch": arch,
        "arch_args": dict(arch_args),
        "classes": list(classes),
        "mean": list(mean),
        "std": list(std),
        "image_size": int(image_size),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }


def read_bundle(path: str | os.PathLike) -> dict[str, Any]:
    """Read a state_dict file safely (``weights_only=True``: tensors and plain data only)."""
    path = Path(path)
    try:
        bundle = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise PipelineError(f"{path}: no such model file (run `dvc repro export`)") from None
    except Exception as e:
        raise PipelineError(f"{path}: not a loadable state_dict file ({type(e).__name__}: {e})") from None
    if not isinstance(bundle, dict) or bundle.get("format") != FORMAT:
        raise PipelineError(f"{path}: not an {FORMAT} file (missing 'format': {FORMAT!r})")
    if bundle.get("version") != VERSION:
        raise PipelineError(f"{path}: format version {bundle.get('version')} is not supported (expected {VERSION})")
    tta = bundle.get("tta")
    if tta is not None and not (isinstance(tta, dict) and set(tta) - {"center_weight"} == {"flip", "shift"}
                                and isinstance(tta["flip"], bool) and type(tta["shift"]) is int
                                and 0 <= tta["shift"] < int(bundle.get("image_size", 0))
                                and type(tta.get("center_weight", 1.0)) is float and tta.get("center_weight", 1.0) > 0):
        raise PipelineError(f"{path}: 'tta' must be {{'flip': bool, 'shift': pixels below the image size"
                            f"[, 'center_weight': a positive float]}}, not {tta!r}")
    return bundle


def model_from_bundle(bundle: dict[str, Any]) -> Classifier:
    # rebuild: the trained weights replace whatever a build-only arg (pretrained) would fetch
    model = build(bundle["arch"], bundle["arch_args"], bundle["mean"], bundle["std"], rebuild=True)
    model.load_state_dict(bundle["state_dict"])
    return model.eval()


def load_state_dict_model(path: str | os.PathLike) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the model from a state_dict file, with the test-time augmentation it carries
    (the plain :class:`Classifier` when none); returns ``(model, bundle)``."""
    bundle = read_bundle(path)
    return with_tta(model_from_bundle(bundle), bundle.get("tta")).eval(), bundle


# A whole-model pickle names each class by the module that defined it when it was written.
# Files written before imgclf was split into subpackages name the old flat modules, and files
# written before each architecture had its own file name the registry or models/whitened.py:
# these are where their classes live now (imgclf.models held the layers too).
MOVED_MODULES = {
    "imgclf.models": ("imgclf.models.registry", "imgclf.models.layers", "imgclf.models.archs.resnet_fast"),
    "imgclf.whitened": ("imgclf.models.archs.whitened_net",),
    "imgclf.tta": ("imgclf.models.tta",),
    "imgclf.models.registry": ("imgclf.models.archs.resnet_fast",),
    "imgclf.models.whitened": ("imgclf.models.archs.whitened_net",),
}


class _MovedClassesUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        for new in MOVED_MODULES.get(module, ()):
            found = getattr(importlib.import_module(new), name, None)
            if isinstance(found, type):
                return found
        return super().find_class(module, name)


# torch.load takes a pickle module: the standard one, with the unpickler above.
_pickle_moved = types.ModuleType("imgclf_pickle_moved")
_pickle_moved.__dict__.update(vars(pickle))
_pickle_moved.Unpickler = _MovedClassesUnpickler


def load_whole_model(path: str | os.PathLike) -> torch.nn.Module:
    """Unpickle a whole-model file. Runs code from the file: trusted files only."""
    return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_pickle_moved).eval()
