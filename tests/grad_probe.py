"""Parameter gradients of one training step, as the Trainer computes them (helper for tests).

    [accelerate launch ...] tests/grad_probe.py OUT.pt RUN_DIR ACCUM_FREQ MICRO_BATCH [key=value ...]

It also records when gradients were reduced across ranks (DeepSpeed's reduce collectives, DDP's
bucket all-reduces, FSDP's reduce-scatters): in which backward pass of the step, or after them
(DeepSpeed's coalesced flush).

The global batch is always the first ACCUM_FREQ x MICRO_BATCH x W samples of the synthetic train
set, rank r's micro-batch m holding rows [(m W + r) b, (m W + r + 1) b): one process with one big
batch and W processes with accumulation see the same samples. Rank 0 saves {name: full gradient}.
"""
import sys
from pathlib import Path

import torch
from accelerate.utils import set_seed

from chinese_clip.config import load_config
from chinese_clip.data.loaders import build_collator
from chinese_clip.data.synthetic import SyntheticShapes
from chinese_clip.model import ChineseCLIP
from chinese_clip.engine import build_engine
from chinese_clip.run_dir import RunDir
from chinese_clip.runtime import build_accelerator
from chinese_clip.tokenizer import load_tokenizer
from chinese_clip.trainer import Trainer

TINY = Path(__file__).resolve().parents[1] / "recipes" / "configs" / "tiny_synthetic.yaml"


class ReductionLog:
    """Labels every gradient reduction with the phase it happened in: DeepSpeed's reduce
    collectives (patched in deepspeed.comm, through which ZeRO reduces), FSDP's reduce-scatters
    (patched in torch.distributed), or DDP's bucket all-reduces (a comm hook)."""

    def __init__(self, trainer):
        self.events, self.phase = [], "outside any backward pass"
        engine = trainer.engine
        if engine.name == "deepspeed":
            import deepspeed.comm as ds_comm
            for name in dir(ds_comm):
                function = getattr(ds_comm, name)
                if "reduce" in name and name[0].islower() and not name.startswith("has_") and callable(function):
                    setattr(ds_comm, name, self._logged(function))
        elif engine.name == "fsdp":
            import torch.distributed as dist
            for name in ("reduce_scatter_single", "reduce_scatter_tensor", "all_reduce"):
                setattr(dist, name, self._logged(getattr(dist, name)))
        elif trainer.accelerator.num_processes > 1:
            from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
            logged = self._logged(allreduce_hook)

            def hook(state, bucket):  # DDP checks the hook's parameter names
                return logged(state, bucket)
            engine.model.register_comm_hook(None, hook)
        backward = engine.backward

        def labelled_backward(loss):
            self.phase = f"backward {len(self.backward_calls)}"
            self.backward_calls.append(self.phase)
            backward(loss)
            self.phase = "outside any backward pass"
        self.backward_calls = []
        engine.backward = labelled_backward

    def _logged(self, function):
        def call(*args, **kwargs):
            self.events.append(self.phase)
            return function(*args, **kwargs)
        return call


def main(out: str, run_dir: str, accum_freq: str, micro_batch: str, dtype: str, *overrides: str) -> None:
    accum, b = int(accum_freq), int(micro_batch)
    cfg = load_config(TINY, [f"train.accum_freq={accum}", f"data.batch_size={b}", *overrides])
    accelerator = build_accelerator(cfg.train, Path(run_dir))
    engine = build_engine(accelerator, cfg)
    set_seed(0)
    # float64 where the engine allows it (ZeRO-3 partitions only 16- and 32-bit parameters): the
    # gradient of a freshly initialised model is a small difference of large terms, so float32
    # rounding alone moves it by ~1e-5; in float64 any real difference stands out.
    precision = getattr(torch, dtype)
    trainer = Trainer(cfg, accelerator, engine, RunDir(run_dir, accelerator), lambda: ChineseCLIP(cfg.model).to(precision),
                      make_loader=lambda *_: None, evaluate=None)
    trainer.run_dir.open(cfg, resumed_step=None)
    trainer.enter_stage(trainer.plan[0], trainer.new_model().state_dict())
    world, rank = accelerator.num_processes, accelerator.process_index
    dataset = SyntheticShapes("train", accum * b * world, cfg.model.vision.image_size)
    collate = build_collator(cfg.data, load_tokenizer(None, cfg.data.context_length))
    micro_batches = []
    for m in range(accum):
        start = (m * world + rank) * b
        batch = collate([dataset[i] for i in range(start, start + b)])
        micro_batches.append({k: v.to(accelerator.device) for k, v in batch.items()})
    log = ReductionLog(trainer)
    trainer.compute_gradients(micro_batches)
    grads = {}
    for name, param in engine.module.named_parameters():
        if not param.requires_grad:
            continue
        if engine.name == "deepspeed":
            from deepspeed.utils import safe_get_full_grad
            grad = safe_get_full_grad(param)  # collective under ZeRO-3: every rank asks for every tensor
        elif engine.name == "fsdp":
            grad = param.grad.full_tensor()  # collective: every rank's shard of the reduced gradient
        else:
            grad = param.grad
        grads[name] = grad.detach().double().cpu().clone()
    if accelerator.is_main_process:
        torch.save({"grads": grads, "reductions": log.events, "backward_passes": log.backward_calls}, out)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(*sys.argv[1:])
