"""Open an exported model file for use: what evaluate, ``imgclf-predict`` and the export
stage's own check load.

* :func:`load_state_dict_model`: the state_dict bundle (``weights_only=True``), rebuilt with
  the test-time augmentation it carries (:mod:`imgclf.tta`), so it computes what
  ``metrics/eval.json`` was computed from.
* :func:`load_whole_model`: the whole-model pickle (tutorial §4.10), which holds the same
  module; unpickling runs code from the file.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from .bundle import model_from_bundle, read_bundle
from .tta import with_tta


def load_state_dict_model(path: str | os.PathLike) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the model from a state_dict file, with the test-time augmentation it carries
    (the plain :class:`Classifier` when none); returns ``(model, bundle)``."""
    bundle = read_bundle(path)
    return with_tta(model_from_bundle(bundle), bundle.get("tta")).eval(), bundle


def load_whole_model(path: str | os.PathLike) -> torch.nn.Module:
    """Unpickle a whole-model file. Runs code from the file: trusted files only."""
    return torch.load(path, map_location="cpu", weights_only=False).eval()
