"""The one module that talks to torch.distributed: rank queries and a gather that carries gradients.

`accelerator.gather` is detached, so a contrastive loss over the global batch needs its own
differentiable exchange. Everything here degrades to the identity without a process group, so
callers never branch on whether they are distributed.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 forward; backward sums every rank's gradient for this rank's rows.

    When every rank computes the same global loss L, the gradient that reaches rank r's rows is
    sum over ranks of dL/dx_r = W x dL/dx_r; the W is undone by DDP/DeepSpeed's gradient mean.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.batch = x.shape[0]
        out = x.new_empty((world_size() * x.shape[0], *x.shape[1:]))  # [W*b, ...]
        dist.all_gather_single(out, x.contiguous())
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        out = grad.new_empty((ctx.batch, *grad.shape[1:]))  # [b, ...]
        dist.reduce_scatter_single(out, grad.contiguous(), op=dist.ReduceOp.SUM)
        return out


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """[b, ...] on each rank -> [W*b, ...], rank-ordered, differentiable."""
    if not is_distributed():
        return x
    return _GatherWithGrad.apply(x)


def sum_across_ranks(x: torch.Tensor) -> torch.Tensor:
    """Element-wise sum over ranks (a copy; the input is left alone)."""
    x = x.clone()
    if is_distributed():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x
