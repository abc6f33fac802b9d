"""Peak memory and time of one loss forward + backward per rank, as the global batch grows.

    python bench/loss_memory.py [--world-size 2] [--dim 512] [--batches 1024 2048 ...] [--out FILE.json]

Every (loss, global batch) runs in fresh CPU processes joined by gloo, on random unit features
[B / W, dim] per rank. Peak memory is the rise of the process's peak RSS over its value once the
inputs exist: the logits, their gradients and everything else the loss allocates. glibc is told
to give every allocation above 64 KiB its own mapping (MALLOC_MMAP_THRESHOLD_), so freed blocks
leave the RSS at once instead of lingering in its heap and inflating later peaks. The time is
the slower rank's second iteration (the first pays for allocation). A configuration whose
estimated footprint exceeds --max-gib is skipped and shown as "-".
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from chinese_clip.losses import clip_loss, siglip_loss

LOSSES = {
    "clip (full)": lambda i, t, s, b, chunk: clip_loss(i, t, s),
    "clip (local)": lambda i, t, s, b, chunk: clip_loss(i, t, s, local_loss=True),
    "siglip gather": lambda i, t, s, b, chunk: siglip_loss(i, t, s, b, exchange="gather", chunk_size=chunk),
    "siglip ring": lambda i, t, s, b, chunk: siglip_loss(i, t, s, b, exchange="ring", chunk_size=chunk),
    "siglip ring, unchunked": lambda i, t, s, b, chunk: siglip_loss(i, t, s, b, exchange="ring"),
}


def estimated_gib(loss: str, global_batch: int, world_size: int, chunk: int) -> float:
    """Rough per-rank float32 footprint of the largest logit matrices (x4 for softmax and grads)."""
    b = global_batch // world_size
    rows, columns = {
        "clip (full)": (global_batch, global_batch), "clip (local)": (2 * b, global_batch),
        "siglip gather": (min(chunk, b), global_batch), "siglip ring": (min(chunk, b), b),
        "siglip ring, unchunked": (b, b),
    }[loss]
    return 4 * rows * columns * 4 / 2**30


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def measure(loss: str, global_batch: int, dim: int, chunk: int) -> dict:
    """Runs inside one rank."""
    torch.set_num_threads(1)  # one core per rank: ranks do not fight over the machine
    b = global_batch // dist.get_world_size()
    generator = torch.Generator().manual_seed(dist.get_rank())
    image = F.normalize(torch.randn(b, dim, generator=generator), dim=-1).requires_grad_()
    text = F.normalize(torch.randn(b, dim, generator=generator), dim=-1).requires_grad_()
    scale = torch.tensor([10.0], requires_grad=True)
    bias = torch.tensor([-10.0], requires_grad=True)
    # A tiny call first: lazy imports (torch.utils.checkpoint pulls in ~150 MiB of modules) and
    # thread pools are not the loss's memory.
    LOSSES[loss](image[:8], text[:8], scale, bias, 4).backward()
    image.grad = text.grad = scale.grad = bias.grad = None
    baseline = peak_rss_bytes()
    seconds = []
    for _ in range(2):
        dist.barrier()
        tic = time.perf_counter()
        LOSSES[loss](image, text, scale, bias, chunk).backward()
        seconds.append(time.perf_counter() - tic)
        if len(seconds) == 1:
            peak = peak_rss_bytes() - baseline
        image.grad = text.grad = scale.grad = bias.grad = None
    return {"peak_mib": peak / 2**20, "seconds": seconds[-1]}


def rank_main(rank: int, world_size: int, port: int, args: tuple, results) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    results.put((rank, measure(*args)))
    dist.destroy_process_group()


def on_fresh_ranks(world_size: int, *args) -> list[dict]:
    """measure(*args) in `world_size` new processes joined by gloo: each measurement starts from an
    empty heap. Every rank's figures, in no particular order."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.get_context("spawn").SimpleQueue()
    mp.spawn(rank_main, args=(world_size, port, args, results), nprocs=world_size)
    return [results.get()[1] for _ in range(world_size)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=1024, help="loss.chunk_size for SigLIP")
    parser.add_argument("--batches", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--losses", nargs="+", default=list(LOSSES), choices=list(LOSSES))
    parser.add_argument("--max-gib", type=float, default=6.0, help="skip configurations estimated above this per rank")
    parser.add_argument("--out", help="also write the figures as JSON")
    args = parser.parse_args()
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)  # read by glibc when each rank process starts

    results: dict[str, dict[int, dict]] = {}
    for loss in args.losses:
        results[loss] = {}
        for batch in args.batches:
            if estimated_gib(loss, batch, args.world_size, args.chunk) > args.max_gib:
                continue
            ranks = on_fresh_ranks(args.world_size, loss, batch, args.dim, args.chunk)
            results[loss][batch] = {"peak_mib": max(r["peak_mib"] for r in ranks),
                                    "seconds": max(r["seconds"] for r in ranks)}
            print(f"{loss:<24} B={batch:<6} peak {results[loss][batch]['peak_mib']:9.1f} MiB per rank  "
                  f"{results[loss][batch]['seconds']:8.3f} s", flush=True)

    print(f"\nper-rank peak memory (MiB) / time (s) of forward + backward; {args.world_size} ranks, "
          f"dim {args.dim}, SigLIP chunk {args.chunk}\n")
    print("| global batch | " + " | ".join(args.losses) + " |")
    print("|---:|" + "---:|" * len(args.losses))
    for batch in args.batches:
        cells = [f"{results[loss][batch]['peak_mib']:.0f} / {results[loss][batch]['seconds']:.2f}"
                 if batch in results[loss] else "-" for loss in args.losses]
        print(f"| {batch} | " + " | ".join(cells) + " |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
