"""Training throughput of a preset on this device: samples/s, step time, peak memory, and on GPUs MFU.

    python bench/train_throughput.py --config recipes/configs/vit_b16_roberta_base.yaml --batch-size 8
    python bench/train_throughput.py train.compile=true    # compiled blocks; first_step_s is the compile

One process, synthetic tensors (no data loading), the product's own step (bench/trainer_step.py):
the model's forward in the run's precision, the configured loss, backward and the AdamW step.
FLOPs are counted by torch's FlopCounterMode: each tower's forward alone, and one whole training
step; MFU = the step's FLOPs per second / the device's dense bf16 peak.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode
from trainer_step import first_stage_trainer, synthetic_batch

from chinese_clip.config import load_config
from chinese_clip.runtime import resolve_mixed_precision

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
    parser.add_argument("--out", help="also write the figures as JSON")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()

    cfg = load_config(args.config, args.overrides)
    batch = args.batch_size or cfg.data.batch_size
    trainer = first_stage_trainer(cfg, Path(tempfile.mkdtemp(prefix="train_throughput_")))
    device, model = trainer.accelerator.device, trainer.engine.module
    micro_batch = synthetic_batch(cfg, batch, device)

    def step() -> None:
        trainer.train_step([micro_batch])

    def count_flops(fn) -> int:
        counter = FlopCounterMode(display=False)
        with counter:
            fn()
        return counter.get_total_flops()

    start = time.perf_counter()
    step()  # with train.compile=true, compiles the blocks
    first_step = time.perf_counter() - start
    with torch.no_grad(), trainer.accelerator.autocast():
        forward_flops = {"vision": count_flops(lambda: model.encode_image(micro_batch["pixel_values"])),
                         "text": count_flops(lambda: model.encode_text(micro_batch["input_ids"],
                                                                       micro_batch["attention_mask"]))}
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

    precision = resolve_mixed_precision(cfg.train.mixed_precision)
    result = {
        "config": args.config,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "precision": "fp32" if precision == "no" else precision,
        "batch": batch,
        "compile": cfg.train.compile,
        "mask_ratio": trainer.stage.cfg.mask_ratio,
        "first_step_s": round(first_step, 2),
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
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
