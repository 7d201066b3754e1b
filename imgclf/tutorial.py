"""The tutorial's per-image way (§1, §2), kept as the reference the batched pipeline is
measured and tested against. No stage runs this code: the benchmark's classic path and the
tests do.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2


def tutorial_transform(mean: list[float], std: list[float]) -> v2.Compose:
    """The tutorial's transform (§1, §2): image -> float in [0, 1] -> normalised."""
    return v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])
