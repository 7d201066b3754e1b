"""``train.optimizer: muon``: PyTorch's Muon on the convolution filters, Nesterov SGD on the rest.

Muon (``torch.optim.Muon``) replaces each 2-D update by its nearest semi-orthogonal matrix,
computed by a few Newton-Schulz iterations (``train.muon_ns_steps``). It takes 2-D parameters
only, so each filter bank ``(out, in, kh, kw)`` is handed to it as a 2-D *view* of the same
storage, one row per output channel: an update of the view is an update of the filters. A
``channels_last`` bank is stored as ``(out, kh, kw, in)``, so its view's columns come in that
order; the orthogonalised update does not depend on the order of the columns (it is
``(G G^T)^(-1/2) G``), so both memory formats take the same step.

As in airbench94_muon, the head, the biases and the norm parameters keep Nesterov SGD with
``train.lr``, ``train.momentum`` and ``train.weight_decay``; the filters take ``train.muon_lr``
and ``train.muon_momentum``. Both follow ``train.schedule`` (one LambdaLR scales every group).

``train.muon_normalize`` rescales each filter bank to the norm ``sqrt(out channels)`` before
each Muon step, as airbench94_muon does. A batch norm follows every filter bank of
``whitened_net``, so the scale of the filters does not change what the network computes, only
how far a step of a given length moves it; with the scale held, ``muon_lr`` is a fixed share
of the filters' size.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def _rows(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Filter bank ``t`` (``like`` itself, or its gradient) as a 2-D matrix, one row per output
    channel, its columns in the memory order of ``like``: ``(in, kh, kw)``, or ``(kh, kw, in)`` for
    channels_last. A view of ``t``'s storage where its layout allows (``like``'s always does;
    autograd gives a gradient its parameter's layout), else a copy."""
    ordered = t if like.is_contiguous() else t.permute(0, 2, 3, 1)
    return ordered.detach().reshape(t.shape[0], -1)


class MuonSGD(torch.optim.Optimizer):
    """One optimiser over two: ``torch.optim.SGD`` (its groups first) and ``torch.optim.Muon`` on
    2-D views of the 4-D filters. ``param_groups`` are the two optimisers' own group dicts, so a
    scheduler that sets ``group["lr"]`` steers both, and the views' gradients are views of the
    filters' (set as each is accumulated), so a GradScaler unscales them in place."""

    def __init__(self, sgd_groups: list[dict[str, Any]], filters: list[nn.Parameter], *, lr: float, momentum: float,
                 nesterov: bool, muon_lr: float, muon_momentum: float, muon_ns_steps: int, muon_weight_decay: float,
                 muon_normalize: bool = False):
        self.filters = list(filters)
        self.normalize = muon_normalize
        if not all(p.is_contiguous() or p.is_contiguous(memory_format=torch.channels_last) for p in self.filters):
            raise ValueError("Muon's filter banks must be contiguous or channels_last")
        self.views = [_rows(p, p) for p in self.filters]
        self.sgd = torch.optim.SGD(sgd_groups, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0)
        self.muon = torch.optim.Muon(self.views, lr=muon_lr, momentum=muon_momentum, nesterov=nesterov,
                                     ns_steps=muon_ns_steps, weight_decay=muon_weight_decay)
        super().__init__([{"params": [p for g in self.sgd.param_groups for p in g["params"]] + self.filters}], {})
        self.param_groups = [*self.sgd.param_groups, *self.muon.param_groups]
        for p, view in zip(self.filters, self.views):
            p.register_post_accumulate_grad_hook(lambda p, view=view: setattr(view, "grad", _rows(p.grad, p)))

    def _sync_grads(self) -> None:
        for p, view in zip(self.filters, self.views):
            if p.grad is None:
                view.grad = None
            elif view.grad is None or view.grad.data_ptr() != p.grad.data_ptr():
                view.grad = _rows(p.grad, p)

    @torch.no_grad()
    def step(self, closure=None):  # torch's signature
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._sync_grads()  # gradients set by hand rather than by backward()
        self.sgd.step()
        if self.normalize:  # each bank back to norm sqrt(out): unit rows on average, as airbench94_muon
            for p in self.filters:
                p.mul_(p.shape[0] ** 0.5 / p.norm())
        self.muon.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.sgd.zero_grad(set_to_none)
        for p, view in zip(self.filters, self.views):
            view.grad = None
            if p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.zero_()

    def state_dict(self) -> dict[str, Any]:
        return {"sgd": self.sgd.state_dict(), "muon": self.muon.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if set(state_dict) != {"sgd", "muon"}:
            raise ValueError("not the state of train.optimizer: muon (it holds no 'sgd' and 'muon' parts)")
        self.sgd.load_state_dict(state_dict["sgd"])
        self.muon.load_state_dict(state_dict["muon"])
        # load_state_dict makes new group dicts: point at them, so the scheduler steers these.
        self.param_groups = [*self.sgd.param_groups, *self.muon.param_groups]
