"""Per-rank memory and step time of the product's training step under each engine, two ranks each.

    python bench/engine_memory.py [--config recipes/configs/vit_b16_rbt3.yaml] [--batch 4] [--steps 3]
                                  [--engines ddp zero2 zero3 fsdp] [--out FILE.json]

For every engine, `accelerate launch --num_processes 2` (with that engine's flags, as the README
launches it) runs this script again as a worker. Each rank builds the Trainer for the config's first
stage (bench/trainer_step.py) and runs the real step, Trainer.train_step through the engine, on
synthetic tensors: one untimed step, then --steps timed ones. Every rank reports

- model state: its resident memory after the first step, less what it held before the model was
  built: the weights, gradients and Adam's moments this rank keeps between steps (on GPUs, the
  allocated CUDA memory instead);
- peak: its peak resident memory (CUDA: max allocated), activations and gathered parameters included;
- step time: the median timed step.

glibc is told to give every allocation above 64 KiB its own mapping (MALLOC_MMAP_THRESHOLD_), so
that freed memory leaves the resident set at once and the "after" figure is not inflated by freed
blocks. The table shows the worse rank, and each figure's ratio to DDP's.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENGINES = {  # the launch flags, as the README gives them
    "ddp": ["--multi_gpu"],
    "zero2": ["--use_deepspeed", "--deepspeed_config_file", str(ROOT / "ds_configs" / "zero2.json")],
    "zero3": ["--use_deepspeed", "--deepspeed_config_file", str(ROOT / "ds_configs" / "zero3.json")],
    "fsdp": ["--use_fsdp", "--fsdp_version", "2"],
}


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(config: str, batch: int, steps: int, out: Path) -> None:
    """One rank of one engine's launch."""
    import torch
    from trainer_step import first_stage_trainer, synthetic_batch

    from chinese_clip.config import load_config

    cuda = torch.cuda.is_available()
    held = (lambda: torch.cuda.memory_allocated()) if cuda else resident_bytes
    cfg = load_config(config)
    before = held()
    trainer = first_stage_trainer(cfg, out.parent / f"run_{out.stem.split('-')[0]}")
    micro_batch = synthetic_batch(cfg, batch, trainer.accelerator.device)
    seconds = []
    for _ in range(steps + 1):
        trainer.accelerator.wait_for_everyone()
        if cuda:
            torch.cuda.synchronize()
        tic = time.perf_counter()
        trainer.train_step([micro_batch])
        if cuda:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - tic)
        if len(seconds) == 1:
            gc.collect()
            model_state = held() - before
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    rank = trainer.accelerator.process_index
    result = {"rank": rank, "model_state_gib": model_state / 2**30, "peak_gib": peak / 2**30,
              "step_s": statistics.median(seconds[1:]), "threads": torch.get_num_threads(),
              "device": torch.cuda.get_device_name() if cuda else "CPU"}
    out.with_name(f"{out.stem}-rank{rank}.json").write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "recipes" / "configs" / "vit_b16_rbt3.yaml"))
    parser.add_argument("--batch", type=int, default=4, help="per rank")
    parser.add_argument("--steps", type=int, default=3, help="timed steps, after one untimed")
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=list(ENGINES))
    parser.add_argument("--out", help="also write the figures as JSON")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # set when this script launches itself
    args = parser.parse_args()
    if args.worker:
        measure(args.config, args.batch, args.steps, args.worker)
        return

    work = Path(tempfile.mkdtemp(prefix="engine_memory_"))
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}  # read by glibc when each rank starts
    results = {}
    for engine in args.engines:
        subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", *ENGINES[engine],
                        __file__, "--config", args.config, "--batch", str(args.batch), "--steps", str(args.steps),
                        "--worker", str(work / engine)], check=True, env=env, cwd=ROOT)
        ranks = [json.loads((work / f"{engine}-rank{r}.json").read_text()) for r in range(2)]
        results[engine] = {key: max(rank[key] for rank in ranks) for key in ("model_state_gib", "peak_gib", "step_s")}
        results[engine]["device"] = f"{ranks[0]['device']}, {ranks[0]['threads']} thread(s) per rank"
        print(f"{engine}: {results[engine]}", flush=True)

    base = results.get("ddp")
    print(f"\n{Path(args.config).name}, batch {args.batch} per rank, 2 ranks, {results[args.engines[0]]['device']}\n")
    print("| engine | model state per rank | vs DDP | peak per rank | vs DDP | step time | vs DDP |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for engine, r in results.items():
        ratio = (lambda key: f"{r[key] / base[key]:.2f}x") if base else (lambda key: "-")
        print(f"| {engine} | {r['model_state_gib']:.2f} GiB | {ratio('model_state_gib')} | {r['peak_gib']:.2f} GiB | "
              f"{ratio('peak_gib')} | {r['step_s']:.2f} s | {ratio('step_s')} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results},
                                             indent=2))


if __name__ == "__main__":
    main()
