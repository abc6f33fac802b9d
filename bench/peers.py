"""Our training step against our peers' at the same architecture, in one process and one run.

    python bench/peers.py [--batch 8] [--steps 3] [--archs rbt3 roberta_base] [--no-compile] [--out FILE.json]
    python bench/peers.py --archs tiny --batch 128 --steps 20 --vit-batch 0   # the tiny preset: compile's effect there

1. One training step (forward, InfoNCE, backward, AdamW) of Chinese-CLIP's own `CLIP` class
   (cn_clip 1.6.0, built from its model_configs as its create_model does: ViT-B-16 with
   RBT3-chinese, and with RoBERTa-wwm-ext-base-chinese), its loss as its train.py computes it on
   one process (logit_scale x image @ text.T, cross-entropy both ways, halved) and its AdamW
   parameter groups; against ours at the same architecture (vit_b16_rbt3.yaml and
   vit_b16_roberta_base.yaml; `--archs tiny`: the tiny preset, and Chinese-CLIP's CLIP at its shape):
   the product's step, `Trainer.train_step` (bench/trainer_step.py:
   forward, the configured InfoNCE, backward, gradient clipping, AdamW), eager and with
   train.compile=true.
2. Our vision tower (timm's VisionTransformer, ViT-B/16, projection to 512) against open_clip's
   `VisionTransformer` of the same shape (QuickGELU, as OpenAI's and Chinese-CLIP's): forward, the
   sum of the projected features, backward and AdamW.

fp32 on whatever device runs it (CPU here, the GPU under bench/gpu_check.sh, where it runs in the
config's bf16 too), the same random batch for every model. Steps are interleaved (peer, ours,
ours compiled, peer, ...) so that a noisy machine slows every side alike; after one untimed warm-up
step each (the compile, for the compiled model, is timed separately). A ratio above 1 means ours
is faster.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from trainer_step import first_stage_trainer, synthetic_batch

from chinese_clip.config import ModelConfig, VisionConfig, load_config
from chinese_clip.model import build_vision_tower

ROOT = Path(__file__).resolve().parents[1]
ARCHS = {  # name -> our preset, Chinese-CLIP's model_configs (vision, text); None: its CLIP built from our shape
    "tiny": ("tiny_synthetic.yaml", None),
    "rbt3": ("vit_b16_rbt3.yaml", ("ViT-B-16", "RBT3-chinese")),
    "roberta_base": ("vit_b16_roberta_base.yaml", ("ViT-B-16", "RoBERTa-wwm-ext-base-chinese")),
}


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def timed(fn) -> float:
    if device().type == "cuda":
        torch.cuda.synchronize()
    tic = time.perf_counter()
    fn()
    if device().type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - tic


def cn_clip_kwargs(cfg: ModelConfig) -> dict:
    """Chinese-CLIP's CLIP arguments for our model shape (its heads are 64 wide: width / 64 of them)."""
    v, t = cfg.vision, cfg.text
    return dict(embed_dim=cfg.embed_dim, image_resolution=v.image_size, vision_layers=v.layers, vision_width=v.width,
                vision_patch_size=v.patch_size, vocab_size=t.vocab_size, text_attention_probs_dropout_prob=t.dropout,
                text_hidden_act="gelu", text_hidden_dropout_prob=t.dropout, text_hidden_size=t.hidden_size,
                text_initializer_range=0.02, text_intermediate_size=t.intermediate_size,
                text_max_position_embeddings=t.max_position_embeddings, text_num_attention_heads=t.heads,
                text_num_hidden_layers=t.layers, text_type_vocab_size=t.type_vocab_size)


def cn_clip_step(configs: tuple[str, str] | None, cfg: ModelConfig, batch: dict):
    """Chinese-CLIP's model (from its own model_configs where it has them), loss and optimizer as its
    training scripts build them."""
    from cn_clip.clip.model import CLIP

    if configs is None:
        info = cn_clip_kwargs(cfg)
    else:
        root = Path(__import__("cn_clip.clip", fromlist=["x"]).__file__).parent / "model_configs"
        info = {k: v for name in configs for k, v in json.loads((root / f"{name}.json").read_text()).items()}
    model = CLIP(**info).float().to(device()).train()
    exclude = lambda n: "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731 (cn_clip's rule)
    named = list(model.named_parameters())
    optimizer = torch.optim.AdamW([{"params": [p for n, p in named if exclude(n)], "weight_decay": 0.0},
                                   {"params": [p for n, p in named if not exclude(n)], "weight_decay": 0.2}],
                                  lr=5e-4, betas=(0.9, 0.98), eps=1e-6)
    labels = torch.arange(len(batch["input_ids"]), device=device())

    def step() -> None:
        image, text_features, logit_scale = model(batch["pixel_values"], batch["input_ids"], 0)
        logits_per_image = logit_scale * image @ text_features.t()
        loss = (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_image.t(), labels)) / 2
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    return model, step


def our_step(config: str, batch: dict, *overrides: str):
    cfg = load_config(ROOT / "recipes" / "configs" / config, ["data.source=synthetic", "train.mixed_precision=no", *overrides])
    trainer = first_stage_trainer(cfg, Path(tempfile.mkdtemp(prefix="peers_")))
    return trainer, lambda: trainer.train_step([batch])


def compare(steps: dict, count: int) -> dict[str, float]:
    """Median seconds per step of each, interleaved; the first (warm-up, compile) step reported apart."""
    first = {name: timed(step) for name, step in steps.items()}
    times = {name: [] for name in steps}
    for _ in range(count):
        for name, step in steps.items():
            times[name].append(timed(step))
    return {**{f"{name} s/step": statistics.median(t) for name, t in times.items()},
            **{f"{name} first step s": first[name] for name in steps}}


def clip_steps(arch: str, batch_size: int, count: int, compile_too: bool) -> dict:
    config, theirs = ARCHS[arch]
    cfg = load_config(ROOT / "recipes" / "configs" / config, ["data.source=synthetic"])
    torch.manual_seed(0)
    batch = synthetic_batch(cfg, batch_size, device())
    batch["input_ids"][:, 0] = 101  # [CLS], as both tokenizers begin
    held = [cn_clip_step(theirs, cfg.model, batch), our_step(config, batch)]
    if compile_too:
        held.append(our_step(config, batch, "train.compile=true"))
    names = ["Chinese-CLIP CLIP", "ours", "ours, train.compile"][:len(held)]
    result = compare({name: step for name, (_, step) in zip(names, held)}, count)
    del held
    gc.collect()
    base = result["Chinese-CLIP CLIP s/step"]
    result["ours vs Chinese-CLIP"] = base / result["ours s/step"]
    if compile_too:
        result["ours compiled vs Chinese-CLIP"] = base / result["ours, train.compile s/step"]
    return result


def vit_steps(batch_size: int, count: int) -> dict:
    from open_clip.transformer import QuickGELU, VisionTransformer

    torch.manual_seed(0)
    theirs = VisionTransformer(image_size=224, patch_size=16, width=768, layers=12, heads=12, mlp_ratio=4.0,
                               output_dim=512, act_layer=QuickGELU).to(device()).train()
    ours = torch.nn.Sequential(build_vision_tower(VisionConfig()), torch.nn.Linear(768, 512, bias=False))
    ours = ours.to(device()).train()
    pixels = torch.randn(batch_size, 3, 224, 224, device=device())

    def step_of(model):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step() -> None:
            model(pixels).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
        return step

    result = compare({"open_clip VisionTransformer": step_of(theirs), "ours (timm)": step_of(ours)}, count)
    result["ours vs open_clip"] = result["open_clip VisionTransformer s/step"] / result["ours (timm) s/step"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="timed steps of each model")
    parser.add_argument("--archs", nargs="+", default=["rbt3", "roberta_base"], choices=list(ARCHS))
    parser.add_argument("--no-compile", action="store_true", help="leave out the compiled model")
    parser.add_argument("--vit-batch", type=int, default=8, help="batch of the ViT-tower comparison; 0 skips it")
    parser.add_argument("--out")
    args = parser.parse_args()
    result = {"device": torch.cuda.get_device_name() if device().type == "cuda" else
              f"CPU, {torch.get_num_threads()} threads", "batch": args.batch, "precision": "fp32"}
    for arch in args.archs:
        result[arch] = clip_steps(arch, args.batch, args.steps, not args.no_compile)
        print(json.dumps({arch: result[arch]}, indent=2), flush=True)
    if args.vit_batch:
        result["ViT-B/16 tower"] = vit_steps(args.vit_batch, args.steps)
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
