"""The one module that talks to torch.distributed: rank queries and exchanges that carry gradients.

`accelerator.gather` is detached, so a contrastive loss over the global batch needs its own
differentiable exchanges: an all-gather, and neighbour-to-neighbour sends for ring losses that
never hold the whole batch. Everything here degrades to the identity without a process group,
so callers never branch on whether they are distributed.
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


def gather_without_grad(x: torch.Tensor) -> torch.Tensor:
    """[b, ...] on each rank -> [W*b, ...], rank-ordered; for ids and other non-differentiable data."""
    if not is_distributed():
        return x
    out = x.new_empty((world_size() * x.shape[0], *x.shape[1:]))
    dist.all_gather_single(out, x.contiguous())
    return out


def _send_and_receive(tensors: tuple[torch.Tensor, ...], destinations: tuple[int, ...],
                      sources: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
    """Send tensors[i] to destinations[i] and receive a tensor of the same shape from sources[i], all at once."""
    received = tuple(torch.empty_like(t) for t in tensors)
    ops = [dist.P2POp(dist.isend, t.contiguous(), dst) for t, dst in zip(tensors, destinations)]
    ops += [dist.P2POp(dist.irecv, buf, src) for buf, src in zip(received, sources)]
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    return received


class _Exchange(torch.autograd.Function):
    """Forward: tensors[i] goes to destinations[i], output i comes from sources[i].

    Backward runs the same routes in reverse: the gradient of what came from sources[i] is sent
    back there, and the gradient for tensors[i] arrives from destinations[i].
    """

    @staticmethod
    def forward(ctx, destinations, sources, *tensors):
        ctx.destinations, ctx.sources = destinations, sources
        return _send_and_receive(tensors, destinations, sources)

    @staticmethod
    def backward(ctx, *grads):
        return (None, None, *_send_and_receive(grads, ctx.sources, ctx.destinations))


def exchange_with_neighbours(to_right: torch.Tensor, to_left: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """One ring step, differentiable: send `to_right` to rank+1 (and `to_left` to rank-1).

    Returns what arrived from rank-1 (and from rank+1), in that order. Sending both ways at once
    uses both directions of every link, so a full ring takes half as many steps.
    """
    w, r = world_size(), rank()
    right, left = (r + 1) % w, (r - 1) % w
    if to_left is None:
        return _Exchange.apply((right,), (left,), to_right)
    return _Exchange.apply((right, left), (left, right), to_right, to_left)


def sum_across_ranks(x: torch.Tensor) -> torch.Tensor:
    """Element-wise sum over ranks (a copy; the input is left alone)."""
    x = x.clone()
    if is_distributed():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x
