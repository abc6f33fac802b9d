import math

import pytest
import torch

from chinese_clip.config import OptimConfig
from chinese_clip.model import ChineseCLIP
from chinese_clip.optim import build_optimizer, decay_towards_start, lr_at, set_lr, set_weight_decay


def test_no_decay_on_norms_biases_logit_params_and_vit_embeddings(tiny_model_cfg):
    model = ChineseCLIP(tiny_model_cfg)
    model.logit_bias.requires_grad_(False)
    opt = build_optimizer(model, OptimConfig(weight_decay=0.2))
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    no_decay = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert {"logit_scale", "visual.pos_embed", "visual.cls_token", "visual.norm_pre.weight",
            "text.embeddings.LayerNorm.bias", "visual.blocks.0.attn.qkv.bias"} <= no_decay
    assert {"visual_projection.weight", "text_projection.weight", "visual.blocks.0.attn.qkv.weight",
            "text.encoder.layer.0.attention.self.query.weight", "text.embeddings.word_embeddings.weight"} <= decay
    assert "logit_bias" not in decay | no_decay, "frozen parameters stay out of the optimizer"
    assert decay | no_decay == {n for n, p in model.named_parameters() if p.requires_grad}


def test_warmup_then_cosine_to_the_floor():
    cfg = OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, 110, cfg) == pytest.approx(0.1)
    assert lr_at(9, 110, cfg) == pytest.approx(1.0)
    assert lr_at(60, 110, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(110, 110, cfg) == pytest.approx(0.1)
    assert all(lr_at(s, 110, cfg) >= lr_at(s + 1, 110, cfg) for s in range(10, 110))


def test_set_lr_applies_group_multipliers(tiny_model_cfg):
    opt = build_optimizer(ChineseCLIP(tiny_model_cfg), OptimConfig())
    opt.param_groups[1]["lr_scale"] = 0.5
    set_lr(opt, 2e-3)
    assert [g["lr"] for g in opt.param_groups] == [2e-3, 1e-3]


def test_linear_and_constant_schedules_after_the_same_warmup():
    linear = OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.2, schedule="linear")
    constant = OptimConfig(lr=1.0, warmup_steps=10, schedule="constant")
    assert lr_at(4, 110, linear) == lr_at(4, 110, constant) == pytest.approx(0.5)
    assert lr_at(60, 110, linear) == pytest.approx(0.2 + 0.8 * 0.5)
    assert lr_at(110, 110, linear) == pytest.approx(0.2)
    assert lr_at(60, 110, constant) == lr_at(109, 110, constant) == 1.0


def test_groups_split_by_multiplier_and_weight_decay_follows_the_stage(tiny_model_cfg):
    model = ChineseCLIP(tiny_model_cfg)
    scales = {n: (0.1 if n.startswith("text.") else 1.0) for n, p in model.named_parameters() if p.requires_grad}
    opt = build_optimizer(model, OptimConfig(weight_decay=0.2), scales)
    keys = {(g["decays"], g["lr_scale"]) for g in opt.param_groups}
    assert keys == {(True, 1.0), (True, 0.1), (False, 1.0), (False, 0.1)}
    text_weight = model.text.encoder.layer[0].output.dense.weight
    (group,) = [g for g in opt.param_groups if any(p is text_weight for p in g["params"])]
    assert (group["decays"], group["lr_scale"], group["weight_decay"]) == (True, 0.1, 0.2)
    set_weight_decay(opt, 0.05)
    assert {g["weight_decay"] for g in opt.param_groups} == {0.05, 0.0}


def test_decay_to_start_pulls_towards_the_first_weights_and_survives_a_reload():
    """AdamW with wd 0, then lr x wd x (p - start) by hand: the same trajectory, whatever the gradients."""
    start = torch.tensor([2.0, -3.0, 0.5])
    p = torch.nn.Parameter(start.clone())
    optimizer = torch.optim.AdamW([{"params": [p], "weight_decay": 0.5}], lr=0.1)
    decay_towards_start(optimizer)
    reference = torch.nn.Parameter(start.clone())
    plain = torch.optim.AdamW([{"params": [reference], "weight_decay": 0.0}], lr=0.1)
    gradients = torch.randn(8, 3, generator=torch.Generator().manual_seed(0))
    for step, g in enumerate(gradients):
        if step == 4:  # a resumed run: a new optimizer loads the state, the start included
            saved = optimizer.state_dict()
            optimizer = torch.optim.AdamW([{"params": [p], "weight_decay": 0.5}], lr=0.1)
            decay_towards_start(optimizer)
            optimizer.load_state_dict(saved)
        p.grad, reference.grad = g.clone(), g.clone()
        before = reference.detach().clone()
        optimizer.step()
        plain.step()
        with torch.no_grad():
            reference.sub_(0.1 * 0.5 * (before - start))
        torch.testing.assert_close(p, reference)  # one update in two orders: float32 rounding (1e-6 measured)
    assert torch.equal(optimizer.state[p]["start"], start)
    # without a gradient signal the weights stay at the start, where plain AdamW shrinks them
    anchored, shrunk = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    optimizers = [torch.optim.AdamW([{"params": [q], "weight_decay": 0.5}], lr=0.1) for q in (anchored, shrunk)]
    decay_towards_start(optimizers[0])
    for _ in range(3):
        anchored.grad, shrunk.grad = torch.zeros(3), torch.zeros(3)
        for opt in optimizers:
            opt.step()
    torch.testing.assert_close(anchored.detach(), start)
    torch.testing.assert_close(shrunk.detach(), start * 0.95**3)
