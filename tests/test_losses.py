"""clip_loss against a plain double loop, and the distributed contract of DESIGN.md on 2 gloo ranks."""
import math

import pytest
import torch
import torch.nn.functional as F

from chinese_clip.losses import clip_loss
from tests.distributed import run_on_ranks


def _features(n=8, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    return image, text, torch.tensor([7.5], dtype=torch.float64)


def reference_clip_loss(image, text, scale):
    """Symmetric InfoNCE written pair by pair."""
    n = len(image)
    total = 0.0
    for i in range(n):
        logits_i = [scale * (image[i] @ text[j]) for j in range(n)]
        total = total - (logits_i[i] - torch.logsumexp(torch.stack(logits_i), 0))
        logits_t = [scale * (text[i] @ image[j]) for j in range(n)]
        total = total - (logits_t[i] - torch.logsumexp(torch.stack(logits_t), 0))
    return total.squeeze() / (2 * n)


def _loss_and_grads(fn, image, text, scale, **kwargs):
    image, text, scale = (t.clone().requires_grad_() for t in (image, text, scale))
    loss = fn(image, text, scale, **kwargs).squeeze()
    loss.backward()
    return loss.detach(), image.grad, text.grad, scale.grad


@pytest.mark.parametrize("local_loss", [False, True])
def test_matches_the_double_loop_forwards_and_backwards(local_loss):
    image, text, scale = _features()
    ours = _loss_and_grads(clip_loss, image, text, scale, local_loss=local_loss)
    ref = _loss_and_grads(reference_clip_loss, image, text, scale)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_perfect_alignment_is_near_zero_and_random_is_near_log_n():
    image, _, _ = _features(n=64, d=64)
    assert clip_loss(image, image, torch.tensor([100.0], dtype=torch.float64)) < 1e-3
    _, text, _ = _features(n=64, d=64, seed=1)
    assert abs(clip_loss(image, text, torch.tensor([1.0], dtype=torch.float64)) - math.log(64)) < 0.2


def _rank_loss_and_grads(image, text, scale, local_loss):
    import torch.distributed as dist
    r, w = dist.get_rank(), dist.get_world_size()
    b = len(image) // w
    return _loss_and_grads(clip_loss, image[r * b:(r + 1) * b], text[r * b:(r + 1) * b], scale, local_loss=local_loss)


@pytest.mark.parametrize("local_loss", [False, True])
def test_two_ranks_equal_one_process_on_the_global_batch(local_loss):
    image, text, scale = _features(n=8)
    loss, g_image, g_text, g_scale = _loss_and_grads(clip_loss, image, text, scale)
    ranks = run_on_ranks(_rank_loss_and_grads, image, text, scale, local_loss)
    torch.testing.assert_close(sum(r[0] for r in ranks) / 2, loss, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(torch.cat([r[1] for r in ranks]), 2 * g_image, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(torch.cat([r[2] for r in ranks]), 2 * g_text, rtol=1e-6, atol=1e-12)
    # The scale is replicated: the data-parallel mean of its per-rank gradients is the global one.
    torch.testing.assert_close(sum(r[3] for r in ranks) / 2, g_scale, rtol=1e-6, atol=1e-12)
