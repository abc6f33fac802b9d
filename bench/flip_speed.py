"""FLIP patch masking: step time and peak memory against the mask ratio, and the largest batch that
fits a memory budget, for a ViT-heavy preset.

    python bench/flip_speed.py [--config recipes/configs/vit_b16_rbt3.yaml] [--batch 8]
                               [--ratios 0 0.5 0.75] [--budget-gib 6] [--out FILE.json]

Every measurement runs in a fresh process, on the GPU when there is one (bf16) and otherwise on
the CPU (fp32, all cores). A step is the product's own (bench/trainer_step.py): both towers forward
with the stage's mask ratio, InfoNCE, backward, AdamW. The vision-tower step is the image tower alone
(forward with the mask + backward), the part masking speeds up. Times are medians over --repeat
steps after a warm-up step. Peak memory is the whole process: weights, AdamW state, gradients
and activations (CUDA: max_memory_allocated; CPU: peak RSS, glibc told to return freed blocks
at once). The largest batch under --budget-gib (a multiple of 8) is searched with real steps:
doubling from 8 until one does not fit, then bisecting. Peak memory is not linear in the batch at
small batches (AdamW's step has its own fixed peak), so it is measured rather than extrapolated.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch
from trainer_step import first_stage_trainer, synthetic_batch

from chinese_clip.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def measure(config: str, ratio: float, batch: int, repeat: int) -> dict:
    """In a fresh process: times of the vision-tower step and the full step, and the peak memory."""
    cfg = load_config(config, [f"model.vision.patch_drop_rate={ratio}"])  # the stage's mask ratio
    trainer = first_stage_trainer(cfg, Path(tempfile.mkdtemp(prefix="flip_speed_")))
    device, model = trainer.accelerator.device, trainer.engine.module
    micro_batch = synthetic_batch(cfg, batch, device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def vision_step():
        with trainer.accelerator.autocast():
            features = model.encode_image(micro_batch["pixel_values"])
        features.float().pow(2).sum().backward()  # any scalar of the features: the tower's backward is the same
        model.zero_grad(set_to_none=True)

    def full_step():
        trainer.train_step([micro_batch])

    def timed(step) -> float:
        seconds = []
        for _ in range(repeat + 1):  # the first pays for allocation and kernel selection
            sync()
            tic = time.perf_counter()
            step()
            sync()
            seconds.append(time.perf_counter() - tic)
        return statistics.median(seconds[1:] or seconds)

    full = timed(full_step)
    peak = peak_bytes(device)
    vision = timed(vision_step) if repeat > 0 else None
    return {"ratio": ratio, "batch": batch, "vision_s": vision, "step_s": full, "peak_gib": peak / 2**30,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU x {torch.get_num_threads()}"}


def in_fresh_process(*args) -> dict:
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(measure, args)


def largest_batch(config: str, ratio: float, budget_gib: float, start: int) -> dict:
    """The largest multiple of 8 whose training step stays under the budget: double from `start`
    until a step does not fit, then bisect. Each try is a real step in a fresh process."""
    tried: dict[int, float] = {}

    def fits(batch: int) -> bool:
        tried[batch] = in_fresh_process(config, ratio, batch, 0)["peak_gib"]
        return tried[batch] <= budget_gib

    if not fits(start):
        return {"ratio": ratio, "largest_batch": 0, "tried": tried}
    low, high = start, 2 * start
    while fits(high):
        low, high = high, 2 * high
    while high - low > 8:
        middle = (low + high) // 16 * 8
        low, high = (middle, high) if fits(middle) else (low, middle)
    return {"ratio": ratio, "largest_batch": low, "tried": dict(sorted(tried.items()))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "recipes" / "configs" / "vit_b16_rbt3.yaml"))
    parser.add_argument("--batch", type=int, default=8, help="per-device batch of the timed steps")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.0, 0.5, 0.75])
    parser.add_argument("--repeat", type=int, default=3, help="timed steps after the warm-up step")
    parser.add_argument("--budget-gib", type=float, default=6.0, help="memory budget for the largest-batch search; 0 skips it")
    parser.add_argument("--out", help="also write the figures as JSON")
    args = parser.parse_args()
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)  # read by glibc when each fresh process starts

    timings = []
    for ratio in args.ratios:
        timings.append(in_fresh_process(args.config, ratio, args.batch, args.repeat))
        t = timings[-1]
        print(f"ratio {ratio:.2f}: vision step {t['vision_s']:.3f} s  full step {t['step_s']:.3f} s  "
              f"peak {t['peak_gib']:.2f} GiB  ({t['device']})", flush=True)
    budgets = []
    for ratio in args.ratios if args.budget_gib > 0 else []:
        budgets.append(largest_batch(args.config, ratio, args.budget_gib, start=8))
        tried = ", ".join(f"{batch}: {gib:.2f}" for batch, gib in budgets[-1]["tried"].items())
        print(f"ratio {ratio:.2f}: largest batch under {args.budget_gib:g} GiB: {budgets[-1]['largest_batch']} "
              f"(peak GiB by batch: {tried})", flush=True)

    base = timings[0]
    print(f"\n{Path(args.config).name}, batch {args.batch}, {base['device']}\n")
    largest_header = f" largest batch under {args.budget_gib:g} GiB |" if budgets else ""
    print(f"| mask ratio | vision-tower step | speed-up | full step | speed-up | peak memory |{largest_header}")
    print("|---:" * (7 if budgets else 6) + "|")
    for i, t in enumerate(timings):
        largest = f" {budgets[i]['largest_batch']} |" if budgets else ""
        print(f"| {t['ratio']:.2f} | {t['vision_s']:.3f} s | {base['vision_s'] / t['vision_s']:.2f}x | "
              f"{t['step_s']:.3f} s | {base['step_s'] / t['step_s']:.2f}x | {t['peak_gib']:.2f} GiB |{largest}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "timings": timings, "largest_batch": budgets}, f, indent=2)


if __name__ == "__main__":
    main()
