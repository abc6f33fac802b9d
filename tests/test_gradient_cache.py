"""The gradient cache: k micro-batches give the parameter gradients of one batch of k x b.

In one process directly (float64), and through the Trainer under DDP, DeepSpeed ZeRO-2, ZeRO-3 and
FSDP2 on 2 CPU processes against one process with the whole batch (relative 1e-5).
"""
import pytest
import torch

from chinese_clip.config import LossConfig
from chinese_clip.gradient_cache import gradient_cache_step
from chinese_clip.losses import ContrastiveObjective
from chinese_clip.model import ChineseCLIP
from tests.conftest import ROOT, command, run_ok

PROBE = str(ROOT / "tests" / "grad_probe.py")


def _batch(n, cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = cfg.vision.image_size
    ids = torch.randint(1000, 5000, (n, 12), generator=g)
    ids[:, 0], ids[:, -1] = 101, 102
    return {"pixel_values": torch.randn(n, 3, size, size, generator=g, dtype=torch.float64), "input_ids": ids,
            "attention_mask": torch.ones_like(ids), "image_id": torch.arange(n) % (n - 2)}  # two repeated images


def _split(batch, k):
    return [{key: value.chunk(k)[m] for key, value in batch.items()} for m in range(k)]


def _objective(cfg, batches):
    objective = ContrastiveObjective(cfg)
    ids = torch.cat([b["image_id"] for b in batches])
    return lambda image, text, scale, bias: objective(image, text, scale, bias, image_ids=ids)


def _encode(model):
    return lambda b: model(b["pixel_values"], b["input_ids"], b["attention_mask"])


def _grads(model):
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def _assert_same_grads(ours, reference, rtol):
    """Relative error per tensor; a tensor whose true gradient is ~0 (attention key biases: softmax
    ignores a per-row shift) is measured against 1e-3 of the whole gradient's norm instead. In float64
    in one process, summing micro-batches instead of a batch leaves ~1e-14 (rtol 1e-10); a micro-batch
    dropped, counted twice or replayed with other random draws moves gradients by 1e-2 or more."""
    assert ours.keys() == reference.keys()
    floor = 1e-3 * torch.cat([g.flatten() for g in reference.values()]).norm()
    for name in reference:
        error = (ours[name] - reference[name]).norm() / torch.maximum(reference[name].norm(), floor)
        assert error < rtol, f"{name}: relative error {error:.2e}"


@pytest.mark.parametrize("loss", [LossConfig(), LossConfig(name="siglip", triplet_alpha=0.5, chunk_size=3)],
                         ids=["clip", "siglip+triplet"])
def test_four_micro_batches_equal_one_batch_of_four_times_the_size(tiny_model_cfg, loss):
    torch.manual_seed(0)
    model = ChineseCLIP(tiny_model_cfg).double()
    batch = _batch(16, tiny_model_cfg)
    image, text, scale, bias = _encode(model)(batch)
    _objective(loss, [batch])(image, text, scale, bias)["loss"].backward()
    reference = _grads(model)
    micro = _split(batch, 4)
    parts, _ = gradient_cache_step(_encode(model), micro, _objective(loss, micro), torch.Tensor.backward,
                                   torch.device("cpu"))
    _assert_same_grads(_grads(model), reference, rtol=1e-10)
    assert parts["loss"].requires_grad is False


def test_replays_the_random_state_of_each_micro_batch(tiny_model_cfg):
    """With dropout and FLIP patch dropout on, the re-encoded micro-batches must be the cached ones:
    the reference encodes the micro-batches one after another with graphs (the same random draws)."""
    tiny_model_cfg.text.dropout = 0.1
    tiny_model_cfg.vision.patch_drop_rate = 0.5
    torch.manual_seed(0)
    model = ChineseCLIP(tiny_model_cfg).double().train()
    micro = _split(_batch(16, tiny_model_cfg), 4)
    loss = _objective(LossConfig(), micro)
    torch.manual_seed(1)
    outputs = [_encode(model)(b) for b in micro]
    loss(torch.cat([o[0] for o in outputs]), torch.cat([o[1] for o in outputs]), *outputs[0][2:])["loss"].backward()
    reference = _grads(model)
    torch.manual_seed(1)
    gradient_cache_step(_encode(model), micro, loss, torch.Tensor.backward, torch.device("cpu"))
    _assert_same_grads(_grads(model), reference, rtol=1e-10)


# -- through the Trainer, 1 and 2 processes ------------------------------------------------------
LOSSES = {"clip": [], "siglip+triplet": ["loss.name=siglip", "loss.triplet_alpha=0.5"]}


def probe(tmp_path, name, accum_freq, micro_batch, overrides, engine=None, dtype="float64"):
    """tests/grad_probe.py's gradients: launched on two ranks under `engine`, else in this process (a
    launch of one process would add only its imports)."""
    out = tmp_path / f"{name}.pt"
    args = (str(out), str(tmp_path / name), str(accum_freq), str(micro_batch), dtype, *overrides)
    if engine is None:
        from accelerate.state import AcceleratorState

        from tests import grad_probe
        try:
            grad_probe.main(*args)
        finally:
            AcceleratorState._reset_state(reset_partial_state=True)
    else:
        run_ok(command(PROBE, *args, engine=engine), timeout=600)
    return torch.load(out)


@pytest.fixture(scope="module")
def one_batch_of_16(tmp_path_factory):
    """The reference: one process, one batch of 16, by loss and dtype (each probed once)."""
    probed = {}

    def grads(loss, dtype):
        if (loss, dtype) not in probed:
            probed[loss, dtype] = probe(tmp_path_factory.mktemp("reference"), "batch16", 1, 16, LOSSES[loss],
                                        dtype=dtype)["grads"]
        return probed[loss, dtype]
    return grads


@pytest.mark.parametrize("loss", LOSSES)
def test_trainer_one_process(tmp_path, one_batch_of_16, loss):
    _assert_same_grads(probe(tmp_path, "accum4", 4, 4, LOSSES[loss])["grads"], one_batch_of_16(loss, "float64"),
                       rtol=1e-10)


@pytest.mark.slow
@pytest.mark.parametrize("engine, loss", [("zero2", "siglip+triplet"), ("zero3", "clip"), ("ddp", "clip"),
                                          ("fsdp", "clip")])
def test_trainer_two_processes(tmp_path, one_batch_of_16, engine, loss):
    """accum_freq=4, micro-batch 2 on each of 2 ranks = one process with a batch of 16; and the
    gradients cross the network once per step: no reduction in the first three backward passes."""
    # Measured: 1e-13 in float64 under DDP and FSDP; 4e-8 under ZeRO-2, which reduces gradients in
    # float32; ZeRO-3 partitions 16- and 32-bit parameters only, and in float32 the rounding of two
    # ranks' sums leaves 4e-5. The tolerances are 20 times those.
    dtype, rtol = ("float32", 1e-3) if engine == "zero3" else ("float64", 1e-5)
    ours = probe(tmp_path, "accum4", 4, 2, LOSSES[loss], engine, dtype)
    _assert_same_grads(ours["grads"], one_batch_of_16(loss, dtype), rtol=rtol)
    assert ours["backward_passes"] == ["backward 0", "backward 1", "backward 2", "backward 3"]
    assert ours["reductions"], "no gradient reduction was seen"
    assert not set(ours["reductions"]) & {"backward 0", "backward 1", "backward 2"}, ours["reductions"]
