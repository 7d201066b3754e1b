"""Lookahead averaging of the weights, as the CIFAR-10 speed records use it.

Every ``every`` optimiser steps the average moves towards the weights, and the weights are
set back to the average: ``avg += (1 - d) * (w - avg); w = avg``. The pull ``d`` grows with
the cube of the run's progress, from 0 (the average simply follows the weights) to
``0.95 ** every`` at the end, so the last steps are averaged over many, and the run ends on
the average. Batch norm's running statistics are averaged with the weights.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class Lookahead:
    def __init__(self, model: nn.Module, total_steps: int, every: int = 5, final_decay: float = 0.95):
        self.model, self.total, self.every = model, total_steps, every
        self.final = final_decay**every
        self.average = {k: v.detach().clone() for k, v in self._floats().items()}

    def _floats(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.model.state_dict().items() if v.is_floating_point()}

    def decay(self, step: int) -> float:
        return self.final * (step / self.total) ** 3

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """Call after optimiser step number ``step`` (1-based) of ``total_steps``."""
        if step % self.every == 0:
            weight = 1.0 - self.decay(step)
        elif step == self.total:
            weight = 0.0  # the last step: the weights become the average
        else:
            return
        for name, value in self._floats().items():
            avg = self.average[name]
            avg.lerp_(value, weight)
            value.copy_(avg)

    def state_dict(self) -> dict[str, Any]:
        return {k: v.cpu() for k, v in self.average.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            self.average[k].copy_(v)
