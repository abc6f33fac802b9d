"""The loss family against plain double loops over pairs, against open_clip, and the distributed
contract of DESIGN.md on 2 (and 3, 4) gloo ranks: mean over ranks of the loss = the one-process
loss on the global batch; each rank's feature gradient = W x the one-process gradient of its rows."""
import math

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss

from chinese_clip.config import LossConfig
from chinese_clip.losses import ContrastiveObjective, clip_loss, siglip_loss, triplet_loss
from tests.conftest import run_on_cpu_ranks

# Samples 0 and 3 show the same image, samples 1 and 6 too; samples 2 and 5 have the same caption.
IMAGE_IDS = torch.tensor([10, 11, 12, 10, 14, 15, 11, 17])
CAPTION_IDS = torch.tensor([20, 21, 22, 23, 24, 22, 26, 27])
KEYS = torch.stack([IMAGE_IDS, CAPTION_IDS], dim=1)


def _features(n=8, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    return image, text, torch.tensor([7.5], dtype=torch.float64), torch.tensor([-3.0], dtype=torch.float64)


def _same(keys, i, j):
    return i == j or (keys is not None and bool((keys[i] == keys[j]).any()))


# -- references, pair by pair -------------------------------------------------------------------
def reference_clip(image, text, scale, bias=None, keys=None):
    n = len(image)
    total = 0.0
    for anchors, others in ((image, text), (text, image)):
        for i in range(n):
            logits = [scale * (anchors[i] @ others[j]) for j in range(n) if j == i or not _same(keys, i, j)]
            total = total - (scale * (anchors[i] @ others[i]) - torch.logsumexp(torch.cat(logits), 0))
    return total.squeeze() / (2 * n)


def reference_siglip(image, text, scale, bias, keys=None):
    n = len(image)
    total = 0.0
    for i in range(n):
        for j in range(n):
            label = 1.0 if _same(keys, i, j) else -1.0
            total = total - F.logsigmoid(label * (scale * (image[i] @ text[j]) + bias))
    return total.squeeze() / n


def reference_triplet(image, text, margin, keys=None):
    n = len(image)
    total = 0.0
    for anchors, others in ((image, text), (text, image)):
        for i in range(n):
            negatives = [j for j in range(n) if not _same(keys, i, j)]
            if not negatives:
                continue
            hardest = max(negatives, key=lambda j: float(anchors[i].detach() @ others[j].detach()))
            positive = torch.linalg.vector_norm(anchors[i] - others[i] + 1e-6)  # triplet_margin_loss's eps
            negative = torch.linalg.vector_norm(anchors[i] - others[hardest] + 1e-6)
            total = total + torch.clamp(positive - negative + margin, min=0)
    return total / (2 * n)


# -- the variants under test, one callable each -------------------------------------------------
VARIANTS = {
    "clip": lambda i, t, s, b, k: clip_loss(i, t, s, keys=k),
    "clip_local": lambda i, t, s, b, k: clip_loss(i, t, s, local_loss=True, keys=k),
    "siglip_ring": lambda i, t, s, b, k: siglip_loss(i, t, s, b, exchange="ring", keys=k),
    "siglip_ring_chunked": lambda i, t, s, b, k: siglip_loss(i, t, s, b, exchange="ring", keys=k, chunk_size=3),
    "siglip_gather": lambda i, t, s, b, k: siglip_loss(i, t, s, b, exchange="gather", keys=k),
    "siglip_gather_chunked": lambda i, t, s, b, k: siglip_loss(i, t, s, b, exchange="gather", keys=k, chunk_size=3),
    "triplet": lambda i, t, s, b, k: triplet_loss(i, t, margin=0.3, keys=k),
    "triplet_chunked": lambda i, t, s, b, k: triplet_loss(i, t, margin=0.3, keys=k, chunk_size=3),
}
REFERENCES = {
    "clip": reference_clip, "clip_local": reference_clip,
    "siglip_ring": reference_siglip, "siglip_ring_chunked": reference_siglip,
    "siglip_gather": reference_siglip, "siglip_gather_chunked": reference_siglip,
    "triplet": lambda i, t, s, b, k: reference_triplet(i, t, 0.3, k),
    "triplet_chunked": lambda i, t, s, b, k: reference_triplet(i, t, 0.3, k),
}


def _loss_and_grads(fn, image, text, scale, bias, keys):
    """(loss, d image, d text, d scale, d bias); zeros for a parameter the loss does not use."""
    leaves = [t.clone().requires_grad_() for t in (image, text, scale, bias)]
    loss = fn(*leaves, keys).squeeze()
    grads = torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)
    return (loss.detach(), *grads)


def _assert_all_close(ours, reference, tol=1e-10):
    """float64 sums in another order (vectorised against loops, chunked against whole): rounding leaves
    ~1e-15 (measured 2e-15); a pair masked or counted wrongly moves the loss by 1e-3 or more."""
    for name, a, b in zip(("loss", "d image", "d text", "d scale", "d bias"), ours, reference):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("keys", [None, KEYS], ids=["unmasked", "masked"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_matches_the_double_loop_forwards_and_backwards(variant, keys):
    image, text, scale, bias = _features()
    _assert_all_close(_loss_and_grads(VARIANTS[variant], image, text, scale, bias, keys),
                      _loss_and_grads(REFERENCES[variant], image, text, scale, bias, keys))


def test_masking_two_captions_of_one_image_by_hand():
    """Samples 0 and 1 are two captions of one image; sample 2 is another image."""
    g = torch.Generator().manual_seed(3)
    x0, x2 = F.normalize(torch.randn(2, 4, generator=g, dtype=torch.float64), dim=-1)
    t0, t1, t2 = F.normalize(torch.randn(3, 4, generator=g, dtype=torch.float64), dim=-1)
    image, text = torch.stack([x0, x0, x2]), torch.stack([t0, t1, t2])
    keys = torch.tensor([[5, 0], [5, 1], [6, 2]])
    s, b = 4.0, -2.0
    e = lambda x, t: math.exp(s * float(x @ t))  # noqa: E731
    # InfoNCE: image 0 and text 0 never compete with text 1 / image 1 (and back).
    image_to_text = (-math.log(e(x0, t0) / (e(x0, t0) + e(x0, t2))) - math.log(e(x0, t1) / (e(x0, t1) + e(x0, t2)))
                     - math.log(e(x2, t2) / (e(x2, t0) + e(x2, t1) + e(x2, t2))))
    text_to_image = (-math.log(e(x0, t0) / (e(x0, t0) + e(x2, t0))) - math.log(e(x0, t1) / (e(x0, t1) + e(x2, t1)))
                     - math.log(e(x2, t2) / (e(x0, t2) + e(x0, t2) + e(x2, t2))))
    expected_clip = (image_to_text + text_to_image) / 6
    scale = torch.tensor([s], dtype=torch.float64)
    assert clip_loss(image, text, scale, keys=keys).item() == pytest.approx(expected_clip, rel=1e-12)
    assert clip_loss(image, text, scale, local_loss=True, keys=keys).item() == pytest.approx(expected_clip, rel=1e-12)
    # SigLIP: the pairs (0, 1) and (1, 0) are positives.
    labels = [[1, 1, -1], [1, 1, -1], [-1, -1, 1]]
    expected_siglip = sum(math.log1p(math.exp(-labels[i][j] * (s * float(image[i] @ text[j]) + b)))
                          for i in range(3) for j in range(3)) / 3
    got = siglip_loss(image, text, scale, torch.tensor([b], dtype=torch.float64), keys=keys).item()
    assert got == pytest.approx(expected_siglip, rel=1e-12)
    # Masking changes the loss: the unmasked loss pushes the two captions of one image apart.
    assert clip_loss(image, text, scale).item() != pytest.approx(expected_clip, rel=1e-3)


def test_the_triplet_term_skips_anchors_without_negatives():
    image, text, _, _ = _features(n=3)
    everything_is_one_pair = torch.zeros(3, 2, dtype=torch.long)
    assert triplet_loss(image, text, margin=0.5, keys=everything_is_one_pair).item() == 0.0


def test_matches_open_clip_in_one_process():
    image, text, scale, bias = _features(n=16, d=8)
    open_clip_losses = {
        "clip": lambda i, t, s, b, k: ClipLoss()(i, t, s),
        "siglip_ring": lambda i, t, s, b, k: SigLipLoss()(i, t, s, b),
    }
    for name, theirs in open_clip_losses.items():
        _assert_all_close(_loss_and_grads(VARIANTS[name], image, text, scale, bias, None),
                          _loss_and_grads(theirs, image, text, scale, bias, None))


def test_known_values():
    """Values the loss takes where it is known: near 0 when each image is its own caption at scale 100
    (the others sit at cosine ~0, e^-100 away); near log(64) for unrelated features at scale 1
    (logits within about +-1 of each other: the log of a sum of 64 terms near 1)."""
    image, _, _, _ = _features(n=64, d=64)
    assert clip_loss(image, image, torch.tensor([100.0], dtype=torch.float64)) < 1e-3
    _, text, _, _ = _features(n=64, d=64, seed=1)
    assert abs(clip_loss(image, text, torch.tensor([1.0], dtype=torch.float64)) - math.log(64)) < 0.2
    # SigLIP at initialisation (scale 10, bias -10): every pair pays about softplus(-10) except the
    # n positives, which pay about softplus(10) = 10 each; divided by n: about 10.
    siglip = siglip_loss(image, text, torch.tensor([10.0], dtype=torch.float64), torch.tensor([-10.0], dtype=torch.float64))
    assert 9 < siglip.item() < 11


def test_objective_adds_the_weighted_triplet_and_reports_the_parts():
    image, text, scale, bias = _features()
    cfg = LossConfig(name="siglip", triplet_alpha=0.5, triplet_margin=0.3)
    parts = ContrastiveObjective(cfg)(image, text, scale, bias, image_ids=IMAGE_IDS, caption_ids=CAPTION_IDS)
    assert set(parts) == {"loss", "siglip", "triplet"}
    torch.testing.assert_close(parts["siglip"], reference_siglip(image, text, scale, bias, KEYS).reshape(()))
    torch.testing.assert_close(parts["triplet"], reference_triplet(image, text, 0.3, KEYS).reshape(()))
    torch.testing.assert_close(parts["loss"], parts["siglip"] + 0.5 * parts["triplet"])
    unmasked = ContrastiveObjective(LossConfig(mask_false_negatives=False))(image, text, scale, bias,
                                                                               image_ids=IMAGE_IDS)
    torch.testing.assert_close(unmasked["clip"], reference_clip(image, text, scale))


def test_bad_exchange_is_an_error():
    image, text, scale, bias = _features()
    with pytest.raises(ValueError, match="exchange"):
        siglip_loss(image, text, scale, bias, exchange="allreduce")


# -- distributed ---------------------------------------------------------------------------------
def _rows(x, rank, world_size):
    b = len(x) // world_size
    return x[rank * b:(rank + 1) * b]


def _every_variant_on_this_rank(image, text, scale, bias, keys):
    """Runs inside a rank: every variant, masked and not, plus open_clip's own losses."""
    import torch.distributed as dist
    r, w = dist.get_rank(), dist.get_world_size()
    mine = [_rows(x, r, w) for x in (image, text)]
    out = {}
    for masked, rank_keys in (("unmasked", None), ("masked", _rows(keys, r, w))):
        for name, fn in VARIANTS.items():
            out[name, masked] = _loss_and_grads(fn, *mine, scale, bias, rank_keys)
    theirs = {
        "clip": lambda i, t, s, b, k: ClipLoss(gather_with_grad=True, rank=r, world_size=w)(i, t, s),
        "clip_local": lambda i, t, s, b, k: ClipLoss(local_loss=True, gather_with_grad=True, rank=r,
                                                     world_size=w)(i, t, s),
        "siglip_ring": lambda i, t, s, b, k: SigLipLoss(rank=r, world_size=w, dist_impl="bidir")(i, t, s, b),
        "siglip_gather": lambda i, t, s, b, k: SigLipLoss(rank=r, world_size=w, dist_impl="gather")(i, t, s, b),
    }
    for name, fn in theirs.items():
        out[name, "open_clip"] = _loss_and_grads(fn, *mine, scale, bias, None)
    return out


def _check_contract(world_size):
    image, text, scale, bias = _features(n=4 * world_size)
    # Duplicates within and across ranks: the last 3 image ids repeat the first 3; captions repeat every 5.
    all_keys = torch.stack([torch.arange(len(image)) % (len(image) - 3), 100 + torch.arange(len(image)) % 5], dim=1)
    ranks = run_on_cpu_ranks(_every_variant_on_this_rank, image, text, scale, bias, all_keys, world_size=world_size)
    for (name, masked), _ in ranks[0].items():
        keys = all_keys if masked == "masked" else None
        single = _loss_and_grads(VARIANTS[name], image, text, scale, bias, keys)
        got = [r[name, masked] for r in ranks]
        label = f"{name} {masked} W={world_size}"  # float64: tolerances as _assert_all_close's
        torch.testing.assert_close(sum(g[0] for g in got) / world_size, single[0], rtol=1e-10, atol=1e-10, msg=label)
        for index in (1, 2):  # image and text feature gradients
            torch.testing.assert_close(torch.cat([g[index] for g in got]), world_size * single[index],
                                       rtol=1e-10, atol=1e-10, msg=label)
        for index in (3, 4):  # replicated scalars: the data-parallel mean of their gradients
            torch.testing.assert_close(sum(g[index] for g in got) / world_size, single[index],
                                       rtol=1e-10, atol=1e-10, msg=label)


def test_two_ranks_equal_one_process_on_the_global_batch():
    _check_contract(2)


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [3, 4])
def test_ring_with_both_directions_and_an_odd_step(world_size):
    """W=3: one two-way step; W=4: a two-way step then a one-way step to the opposite rank."""
    _check_contract(world_size)
