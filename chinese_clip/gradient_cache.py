"""Gradient cache: a contrastive step over k micro-batches at the activation memory of one.

A contrastive loss couples every sample with every other, so plain gradient accumulation (a
separate loss per micro-batch) shrinks the pool of negatives to one micro-batch. Instead
(Gao et al., "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup"):

1. encode all k micro-batches without building graphs and keep only their features;
2. compute the loss once over all k x b features (x W ranks) and its gradient with respect to
   those features (and to the logit scale and bias);
3. re-encode each micro-batch with a graph, under the random state of its first pass (patch
   dropout, dropout), and backpropagate the cached feature gradient through it.

The parameter gradients equal one backward pass over the whole batch: each micro-batch's
parameters see exactly their share of d loss / d features.
"""
from __future__ import annotations

import contextlib
from typing import Callable, ContextManager

import torch

Features = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # image [b, D], text [b, D], scale, bias


def _rng_state(device: torch.device) -> tuple:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(state: tuple, device: torch.device) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


def gradient_cache_step(
    encode: Callable[[dict], Features],
    micro_batches: list[dict],
    loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], dict[str, torch.Tensor]],
    backward: Callable[[torch.Tensor], None],
    device: torch.device,
    defer_reduction: Callable[[], ContextManager] = contextlib.nullcontext,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One step's gradients over all micro-batches; returns the detached loss parts and logit scale.

    `loss_fn(image, text, scale, bias)` sees the features of every micro-batch in order;
    `backward(tensor)` runs one backward pass. Every micro-batch but the last is re-encoded and
    backpropagated inside `defer_reduction()` (DDP's no_sync decides at forward time), so
    gradients are reduced across ranks once, with the last.
    """
    states, images, texts = [], [], []
    with torch.no_grad():
        for batch in micro_batches:
            states.append(_rng_state(device))
            image, text, scale, bias = encode(batch)
            images.append(image)
            texts.append(text)
    leaves = [torch.cat(images).requires_grad_(), torch.cat(texts).requires_grad_(),
              scale.detach().requires_grad_(), bias.detach().requires_grad_()]
    parts = loss_fn(*leaves)
    # A leaf the loss does not use (InfoNCE's bias) gets None, and so no gradient, as in plain backward.
    image_grad, text_grad, scale_grad, bias_grad = torch.autograd.grad(parts["loss"], leaves, allow_unused=True)
    sizes = [len(image) for image in images]
    last = len(micro_batches) - 1
    after_caching = _rng_state(device)
    micro_grads = zip(image_grad.split(sizes), text_grad.split(sizes))
    for index, (batch, (image_g, text_g)) in enumerate(zip(micro_batches, micro_grads)):
        _set_rng_state(states[index], device)
        with contextlib.nullcontext() if index == last else defer_reduction():
            image, text, scale, bias = encode(batch)
            # Only its gradient matters: d surrogate / d features = the cached feature gradients.
            surrogate = (image * image_g).sum() + (text * text_g).sum()
            if index == last:
                # The scale and bias are shared by every micro-batch: their gradient goes in once. The
                # last pass carries it so that, when gradients are reduced, every parameter has one.
                for shared, grad in ((scale, scale_grad), (bias, bias_grad)):
                    if grad is not None:
                        surrogate = surrogate + (shared * grad).sum()
            backward(surrogate)
    _set_rng_state(after_caching, device)
    return {name: value.detach() for name, value in parts.items()}, leaves[2].detach()
