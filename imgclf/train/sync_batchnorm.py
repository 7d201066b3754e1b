"""Batch norm over the global batch when several processes train one model (DDP).

Plain batch norm normalises each process's share of a batch with that share's own mean and
variance, so N processes of B/N images do not compute what one process of B images does.
A synchronised batch norm sums the per-channel statistics across processes first.
``torch.nn.SyncBatchNorm`` does this on CUDA only (it refuses CPU tensors), so on CPU (gloo)
:class:`CPUSyncBatchNorm` does it with one all-reduce of sum, sum of squares and count.

:func:`convert` swaps the layers in place and keeps the very same ``Parameter`` and buffer
objects: the optimiser built around the model stays valid and ``state_dict`` keys do not
change, so checkpoints, bundles and exports rebuild with plain ``BatchNorm2d``.
"""

from __future__ import annotations

import torch
import torch.distributed as td
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes, differentiable: the gradient is summed over processes too.

    Process p's loss reaches every process's statistics through the sum, so the gradient of the
    sum is the sum of every process's gradient; under DDP's averaging this gives exactly the
    gradient of one process's batch norm over the global batch. (torch.distributed.nn's
    all_reduce does the same but is deprecated in this torch.)
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        td.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        td.all_reduce(grad)
        return grad


class CPUSyncBatchNorm(_BatchNorm):
    """Batch norm whose training-mode statistics span every process's share of the batch.

    Statistics are taken in fp32 (the input may be bf16 under autocast); the running mean
    and the unbiased running variance are updated as ``BatchNorm2d`` does. In eval mode, or
    with a single process, it is plain batch norm.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected a batch of at least 2 dimensions, got {x.dim()}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and td.is_available() and td.is_initialized() and td.get_world_size() > 1):
            return super().forward(x)
        self._check_input_dim(x)
        c = x.shape[1]
        dims = [0, *range(2, x.dim())]
        xf = x.float()
        local = torch.cat([xf.sum(dims), (xf * xf).sum(dims), xf.new_full((1,), x.numel() / c)])
        total = _AllReduceSum.apply(local)
        count = total[2 * c]
        mean = total[:c] / count
        var = (total[c : 2 * c] / count - mean * mean).clamp_min(0)  # biased, as used to normalise
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                f = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - f).add_(mean.detach(), alpha=f)
                self.running_var.mul_(1 - f).add_(var.detach() * (count / (count - 1).clamp_min(1)), alpha=f)
        shape = [1, c] + [1] * (x.dim() - 2)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def convert(module: nn.Module, device: torch.device) -> nn.Module:
    """Every batch-norm layer of ``module`` made synchronised (in place; returns ``module``)."""
    if device.type == "cuda":
        # SyncBatchNorm keeps the Parameter objects too (convert_sync_batchnorm assigns them).
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        if isinstance(child, _BatchNorm) and not isinstance(child, (CPUSyncBatchNorm, nn.SyncBatchNorm)):
            sync = CPUSyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                    child.track_running_stats, device=device)
            if child.affine:
                sync.weight, sync.bias = child.weight, child.bias
            if child.track_running_stats:
                sync.running_mean, sync.running_var = child.running_mean, child.running_var
                sync.num_batches_tracked = child.num_batches_tracked
            sync.train(child.training)
            setattr(module, name, sync)
        else:
            convert(child, device)
    return module
