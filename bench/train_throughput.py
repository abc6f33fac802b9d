"""Training throughput of a preset on this device: samples/s, step time, peak memory, and on GPUs MFU.

    python bench/train_throughput.py --config recipes/configs/vit_b16_roberta_base.yaml --batch-size 8

One process, synthetic tensors (no data loading): the model's forward, the InfoNCE loss, backward
and an AdamW step. FLOPs are counted by torch's FlopCounterMode: each tower's forward alone, and one whole training
step (forward + backward); MFU = the step's FLOPs per second / the device's dense bf16 peak.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from chinese_clip.config import load_config
from chinese_clip.losses import clip_loss
from chinese_clip.model import ChineseCLIP
from chinese_clip.optim import build_optimizer

DENSE_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "4090": 165.0}


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in DENSE_BF16_TFLOPS.items() if k in name), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="recipes/configs/tiny_synthetic.yaml")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the config's data.batch_size")
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU if not in the table")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()

    cfg = load_config(args.config, args.overrides)
    batch = args.batch_size or cfg.data.batch_size
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    torch.manual_seed(0)
    model = ChineseCLIP(cfg.model).to(device).train()
    model.logit_bias.requires_grad_(False)
    optimizer = build_optimizer(model, cfg.optim)
    size, length = cfg.model.vision.image_size, cfg.data.context_length
    pixels = torch.randn(batch, 3, size, size, device=device)
    ids = torch.randint(103, cfg.model.text.vocab_size, (batch, length), device=device)
    mask = torch.ones_like(ids)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            image, text, scale, _ = model(pixels, ids, mask)
        clip_loss(image.float(), text.float(), scale.float()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def count_flops(fn) -> int:
        counter = FlopCounterMode(display=False)
        with counter:
            fn()
        return counter.get_total_flops()

    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        forward_flops = {"vision": count_flops(lambda: model.encode_image(pixels)),
                         "text": count_flops(lambda: model.encode_text(ids, mask))}
    train_flops = count_flops(step)  # forward + backward of both towers and the loss
    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    step_time = (time.perf_counter() - start) / args.steps

    result = {
        "config": args.config,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "precision": "bf16 autocast" if bf16 else "fp32",
        "batch": batch,
        "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "step_time_s": round(step_time, 4),
        "samples_per_s": round(batch / step_time, 1),
        "forward_gflops_per_sample": {k: round(v / batch / 1e9, 3) for k, v in forward_flops.items()},
        "train_gflops_per_sample": round(train_flops / batch / 1e9, 3),
        "achieved_tflops": round(train_flops / step_time / 1e12, 3),
    }
    if device.type == "cuda":
        result["peak_memory_GiB"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    else:  # ru_maxrss is KiB on Linux: the whole process, imports included
        result["peak_rss_GiB"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    peak = args.peak_tflops or peak_tflops(device)
    if peak:
        result["mfu"] = round(train_flops / step_time / (peak * 1e12), 4)
    print(json.dumps(result, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
