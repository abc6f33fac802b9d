import dataclasses

import torch

from chinese_clip.model import ChineseCLIP
from tests.tolerances import FEATURES


def _inputs(cfg, batch=4, length=12):
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(batch, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)
    ids = torch.randint(103, 5000, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    ids[0, 6:] = 0
    return pixels, ids, mask


def test_encoders_return_normalised_features(tiny_model_cfg):
    model = ChineseCLIP(tiny_model_cfg).eval()
    pixels, ids, mask = _inputs(tiny_model_cfg)
    image, text = model.encode_image(pixels), model.encode_text(ids, mask)
    assert image.shape == text.shape == (4, 16)
    # unit length up to float32 rounding (6e-8 measured), which torch's default tolerance for float32 allows
    torch.testing.assert_close(image.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(4))


def test_padding_does_not_change_text_features(tiny_model_cfg):
    model = ChineseCLIP(tiny_model_cfg).eval()
    _, ids, mask = _inputs(tiny_model_cfg)
    short = model.encode_text(ids[:1, :6], mask[:1, :6])
    torch.testing.assert_close(model.encode_text(ids[:1], mask[:1]), short, atol=FEATURES, rtol=0)


def test_scalar_parameters_have_shape_one_and_clip_init(tiny_model_cfg):
    model = ChineseCLIP(tiny_model_cfg)
    assert model.logit_scale.shape == (1,) and model.logit_bias.shape == (1,)
    torch.testing.assert_close(model.logit_scale.exp(), torch.tensor([1 / 0.07]))  # exp(log(x)) = x but for rounding
    assert all(p.ndim > 0 for p in model.parameters())


def test_logit_scale_is_clamped_at_100(tiny_model_cfg):
    model = ChineseCLIP(tiny_model_cfg)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    *_, scale, _ = model(*_inputs(tiny_model_cfg))
    torch.testing.assert_close(scale, torch.tensor([100.0]))  # exp(log(100)): 100 but for rounding


def test_no_unused_parameters_for_ddp(tiny_model_cfg):
    """BERT's pooler is not built; every parameter except the SigLIP bias gets a gradient."""
    model = ChineseCLIP(tiny_model_cfg)
    assert not any("pooler" in n for n, _ in model.named_parameters())
    image, text, scale, _ = model(*_inputs(tiny_model_cfg))
    (scale * image @ text.T).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == ["logit_bias"]


def test_patch_dropout_only_in_training(tiny_model_cfg):
    masked_cfg = dataclasses.replace(tiny_model_cfg, vision=dataclasses.replace(tiny_model_cfg.vision, patch_drop_rate=0.5))
    torch.manual_seed(0)
    masked = ChineseCLIP(masked_cfg)
    plain = ChineseCLIP(tiny_model_cfg)
    plain.load_state_dict(masked.state_dict())
    pixels, *_ = _inputs(tiny_model_cfg)
    masked.eval(), plain.eval()
    assert torch.equal(masked.encode_image(pixels), plain.encode_image(pixels))
    masked.train(), plain.train()
    assert not torch.allclose(masked.encode_image(pixels), plain.encode_image(pixels))


def test_gradient_checkpointing_gives_the_same_gradients(tiny_model_cfg):
    torch.manual_seed(0)
    model = ChineseCLIP(tiny_model_cfg).train()
    inputs = _inputs(tiny_model_cfg)

    def grads():
        model.zero_grad()
        image, text, scale, _ = model(*inputs)
        (scale * image @ text.T).logsumexp(-1).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    reference = grads()
    model.set_grad_checkpointing(True)
    checkpointed = grads()
    assert reference.keys() == checkpointed.keys()
    for name in reference:  # the recomputed forward runs the same kernels on the same inputs
        assert torch.equal(checkpointed[name], reference[name]), name


def test_text_tower_uses_sdpa(tiny_model_cfg):
    assert ChineseCLIP(tiny_model_cfg).text.config._attn_implementation == "sdpa"


def test_compiled_blocks_match_eager_and_a_new_mask_ratio_compiles_once(tiny_model_cfg):
    """train.compile: the same gradients as eager (FLIP's masks drawn from the same RNG, outside the
    compiled blocks), the same parameter names, and one recompile when a stage changes the token count.

    In float64: compiled kernels sum in another order than eager ones, and by how much that moves a
    float32 gradient depends on the CPU (2e-7 of the largest gradient on one, 1e-8 on another). In
    float64 the reordering moves every gradient by ~3e-16 of the largest one, while compiled code that
    computed something else (a wrong mask ratio: 8e-4; a block left out: a missing gradient) stands
    out by orders of magnitude; 1e-9 lies between. (Compiled float32 training matches eager training
    end to end in tests/test_train.py and tests/test_staged.py.)"""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    eager = ChineseCLIP(tiny_model_cfg).double().train()
    compiled = ChineseCLIP(tiny_model_cfg).double().train()
    compiled.load_state_dict(eager.state_dict())
    compiled.compile_blocks()
    assert list(compiled.state_dict()) == list(eager.state_dict())
    pixels, ids, mask = _inputs(tiny_model_cfg)
    inputs = (pixels.double(), ids, mask)

    def grads(model):
        model.zero_grad()
        torch.manual_seed(1)
        image, text, scale, _ = model(*inputs)
        (scale * image @ text.T).logsumexp(-1).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    graphs = []
    for ratio in (0.0, 0.5, 0.5, 0.5):
        eager.set_mask_ratio(ratio), compiled.set_mask_ratio(ratio)
        reference, ours = grads(eager), grads(compiled)
        assert ours.keys() == reference.keys()
        largest = max(g.abs().max() for g in reference.values())
        for name in reference:
            assert (ours[name] - reference[name]).abs().max() <= 1e-9 * largest, (ratio, name)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[1] > graphs[0] and graphs[3] == graphs[2] == graphs[1], graphs


def test_compiled_dropout_repeats_under_the_same_rng_state(tiny_model_cfg):
    """The gradient cache encodes each micro-batch twice, without and with a graph, under one RNG
    state: compiled blocks must draw the same dropout masks both times, as eager ones do."""
    cfg = dataclasses.replace(tiny_model_cfg, text=dataclasses.replace(tiny_model_cfg.text, dropout=0.1))
    torch.manual_seed(0)
    model = ChineseCLIP(cfg).train()
    model.compile_blocks()
    inputs = _inputs(cfg)
    state = torch.get_rng_state()
    with torch.no_grad():
        cached = model(*inputs)[1]
    torch.set_rng_state(state)
    assert torch.equal(model(*inputs)[1], cached)
    assert not torch.equal(model(*inputs)[1], cached)  # a later draw differs: dropout is on
