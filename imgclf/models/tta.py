"""Test-time augmentation: logits averaged over views of each image, as a module.

The views are the image, its mirror (``flip``), and both of those shifted diagonally by
``shift`` pixels either way, the uncovered border filled by reflection: 1, 2, 3 or 6 views.
They weigh the same, unless ``center_weight`` (``export.tta_center_weight``) weighs the
unshifted ones more: airbench94 counts them twice, as much as both shifted pairs together.
Being a module, the averaging travels inside every export (the whole model, ONNX, ``.pt2``)
and is rebuilt from the state_dict bundle's ``"tta"`` entry, so evaluation, ``imgclf-predict``
and a serving stack all compute the same logits. The export stage sets it
(``export.tta_flip``, ``export.tta_shift``): it is part of the model a user gets.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

OFF = {"flip": False, "shift": 0}


def shift(images: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """The images translated by (dy, dx) pixels, the uncovered border filled by reflection."""
    p = max(abs(dy), abs(dx))
    if p == 0:
        return images
    h, w = images.shape[-2:]
    padded = nn.functional.pad(images, (p, p, p, p), mode="reflect")
    return padded[..., p - dy : p - dy + h, p - dx : p - dx + w]


class TestTimeAugmented(nn.Module):
    """``model``'s logits averaged over the views; takes and returns what ``model`` does."""

    def __init__(self, model: nn.Module, flip: bool, shift: int, center_weight: float = 1.0):
        super().__init__()
        self.model, self.flip, self.shift = model, bool(flip), int(shift)
        self.center_weight = float(center_weight)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()  # reflect padding takes floats; the model takes 0..255 floats as uint8
        s = self.shift
        # A whole model pickled before center_weight existed has no such attribute: 1.
        center = getattr(self, "center_weight", 1.0)
        total, weights = None, 0.0
        for dy in [0] + ([s, -s] if s else []):
            view = shift(x, dy, dy)
            weight = center if dy == 0 and s else 1.0
            for v in [view, view.flip(-1)] if self.flip else [view]:
                logits = self.model(v).float()
                if weight != 1.0:
                    logits = logits * weight
                total = logits if total is None else total + logits
                weights += weight
        return total / weights


def views(flip: bool, shift: int) -> int:
    return (2 if flip else 1) * (3 if shift else 1)


def with_tta(model: nn.Module, tta: dict[str, Any] | None) -> nn.Module:
    """``model`` wrapped per a bundle's ``"tta"`` entry; itself when there is none or it is off."""
    tta = tta or OFF
    if not tta["flip"] and not tta["shift"]:
        return model
    return TestTimeAugmented(model, tta["flip"], tta["shift"], tta.get("center_weight", 1.0))
