"""The model card (README.md) of a model directory: HF Hub front matter, then what the model is, what it
was trained on and how, how it scored, and how to use it. Everything comes from the run: its config,
its stage plan and its evaluations (eval.json's layout: before / during / after / best)."""
from __future__ import annotations

from pathlib import Path

import torch

from chinese_clip.config import Config
from chinese_clip.evaluation.tasks import scalar_metrics
from chinese_clip.model import ChineseCLIP, ParamPlace
from chinese_clip.redact import redact_url
from chinese_clip.stages import Stage, stage_lr_scales, tower_counts

CARD_FILE = "README.md"
# The front matter's `license:` is left empty on purpose: only the user knows what the weights may be
# released under (their data's terms, the released weights they started from).
FRONT_MATTER = """---
# license: fill in the license you release these weights under (e.g. apache-2.0, cc-by-4.0) before publishing
license:
library_name: transformers
pipeline_tag: zero-shot-image-classification
language: zh
tags:
- chinese-clip
- clip
- zero-shot-image-classification
- image-text-retrieval
---
"""
HEADLINE = {"retrieval": ("t2i_R@1", "i2t_R@1", "mean_recall"), "classification": ("top1", "top5")}


def write_model_card(directory: str | Path, cfg: Config, plan: list[Stage] | None = None,
                     results: dict | None = None, step: int | None = None, source: str | None = None) -> Path:
    """README.md in `directory`, for the weights of training step `step` (None: the run's end)."""
    path = Path(directory) / CARD_FILE
    path.write_text(model_card(cfg, plan, results, step, source), encoding="utf-8")
    return path


def model_card(cfg: Config, plan: list[Stage] | None = None, results: dict | None = None,
               step: int | None = None, source: str | None = None) -> str:
    """The card's text. `plan` is the run's stages (None for a model that was converted, not trained
    here), `results` its evaluations so far, `source` what a converted model was read from."""
    origin = (f"It was converted from `{source}`." if plan is None and source else
              f"It was trained by this recipe's run `{cfg.run.name}`"
              + (f"; these are its weights at step {step}." if step is not None else "; these are its final weights."))
    parts = [FRONT_MATTER, f"# {cfg.run.name}\n",
             "A Chinese CLIP model: a ViT image tower and a BERT-Chinese text tower that map images and "
             f"Chinese texts into one {cfg.model.embed_dim}-dimensional space, for zero-shot classification "
             f"and image-text retrieval. {origin}\n",
             architecture(cfg)]
    if plan is not None:
        parts += [training(cfg, plan, step), evaluation(results or {}, step)]
    parts.append(USAGE)
    return "\n".join(parts)


def architecture(cfg: Config) -> str:
    m = cfg.model
    layout, sizes = parameters(cfg)
    counts = {"vision": 0, "text": 0, "logit": 0}
    for name, place in layout.items():
        counts[place.tower] += sizes[name]
    v, t = m.vision, m.text
    return "\n".join([
        "## Architecture\n",
        "| | image tower | text tower |",
        "|---|---|---|",
        "| model | ViT (timm VisionTransformer) | BERT (transformers BertModel, [CLS] state) |",
        f"| width | {v.width} | {t.hidden_size} |",
        f"| layers | {v.layers} | {t.layers} |",
        f"| heads | {v.heads} | {t.heads} |",
        f"| MLP width | {round(v.width * v.mlp_ratio)} | {t.intermediate_size} |",
        f"| input | {v.image_size}x{v.image_size} pixels, {v.patch_size}x{v.patch_size} patches | "
        f"{cfg.data.context_length} tokens, vocabulary of {t.vocab_size:,} |",
        f"| parameters | {counts['vision']:,} | {counts['text']:,} |",
        "",
        f"Both towers end in a linear projection to the {m.embed_dim}-dimensional embedding; "
        f"{sum(counts.values()):,} parameters in all. Images are resized to the square input (bicubic, "
        "no crop) and normalised with the mean and std in `processor_config.json`.\n",
    ])


def parameters(cfg: Config) -> tuple[dict[str, ParamPlace], dict[str, int]]:
    """Every parameter's place (tower, layer) and size."""
    with torch.device("meta"):  # shapes only: no memory, no init
        model = ChineseCLIP(cfg.model)
    layout = model.parameter_layout()
    return layout, {name: model.get_parameter(name).numel() for name in layout}


def training(cfg: Config, plan: list[Stage], step: int | None) -> str:
    """The data and the stages these weights went through: all of them, or those up to `step`."""
    end = plan[-1].end_step if step is None else step
    if cfg.data.source == "synthetic":
        data = "the recipe's embedded synthetic Chinese image-text pairs (`data.source: synthetic`)"
    else:
        data = ", ".join(f"`{redact_url(source.path)}` (weight {source.weight:g})" for source in cfg.data.shards)
    layout, sizes = parameters(cfg)
    rows = ["| stage | steps | samples | global batch | mask ratio | lr | what trains |", "|---|---|---|---|---|---|---|"]
    samples = 0
    for s in plan:
        if s.start_step >= end:
            break
        done = min(s.end_step, end) - s.start_step
        samples += done * s.global_batch
        steps = f"{s.start_step}-{s.start_step + done - 1} ({done}{'' if done == s.steps else f' of {s.steps}'})"
        towers = tower_counts(layout, sizes, stage_lr_scales(layout, s.cfg, cfg.loss.name, s.name))
        rows.append(f"| {s.name} | {steps} | {done * s.global_batch:,} | {s.global_batch} | {s.cfg.mask_ratio:g} | "
                    f"{s.cfg.lr:.2e} | {what_trains(towers)} |")
    loss = "SigLIP sigmoid" if cfg.loss.name == "siglip" else "InfoNCE (CLIP)"
    return "\n".join([
        "## Training\n",
        f"Data: {data}. Trained for {end:,} steps on {samples:,} samples (image-text pairs, repeats counted) "
        f"with the {loss} loss over each step's global batch, in these stages (the run's full config is its "
        "`config.yaml`):\n",
        *rows, "",
    ])


def what_trains(towers: dict[str, dict[float, int]]) -> str:
    described = []
    for tower in ("vision", "text"):
        by_scale = towers[tower]
        trained, total = sum(n for scale, n in by_scale.items() if scale > 0), sum(by_scale.values())
        amount = "frozen" if trained == 0 else "all" if trained == total else f"{trained:,} of {total:,}"
        scales = sorted({scale for scale in by_scale if scale > 0}, reverse=True)
        if scales and scales != [1.0]:
            amount += f" (lr x {', '.join(f'{scale:g}' for scale in scales[:3])}{', ...' if len(scales) > 3 else ''})"
        described.append(f"{tower}: {amount}")
    return "; ".join(described)


def evaluation(results: dict, step: int | None) -> str:
    columns = [(phase, results[phase]) for phase in ("before", "after") if results.get(phase)]
    best = results.get("best")
    if step is not None and str(step) in results.get("during", {}):
        columns.append((f"step {step} (these weights)", results["during"][str(step)]))
    if not columns:
        return "## Evaluation\n\nNo zero-shot evaluation was recorded for these weights.\n"
    lines = ["## Evaluation\n", "Zero-shot scores in % (this recipe's `eval.json`):\n",
             "| set | metric | " + " | ".join(name for name, _ in columns) + " |",
             "|---|---|" + "---|" * len(columns)]
    sets = dict.fromkeys(name for _, scores in columns for name in scores)
    for name in sets:
        task = next(scores[name].get("task") for _, scores in columns if name in scores)
        for metric in HEADLINE.get(task, HEADLINE["classification"]):
            cells = [f"{scalar_metrics(scores[name])[metric]:.2f}" if name in scores else "" for _, scores in columns]
            lines.append(f"| {name} | {metric} | " + " | ".join(cells) + " |")
    if best:
        lines += ["", f"Best on `{best['metric']}`: {best['value']:.2f} at step {best['step']} (the run's `best/`)."]
    return "\n".join(lines) + "\n"


USAGE = """## Usage

With transformers:

```python
import torch
from PIL import Image
from transformers import ChineseCLIPModel, ChineseCLIPProcessor

model = ChineseCLIPModel.from_pretrained("path/to/this/directory").eval()
processor = ChineseCLIPProcessor.from_pretrained("path/to/this/directory")
labels = ["猫", "狗", "汽车"]
inputs = processor(text=labels, images=Image.open("cat.jpg"), padding=True, truncation=True, return_tensors="pt")
with torch.no_grad():
    probs = model(**inputs).logits_per_image.softmax(dim=-1)
```

With this recipe (`chinese_clip`), which also prompts each label with Chinese-CLIP's templates:

```python
from chinese_clip.inference import load_model

model = load_model("path/to/this/directory")
model.classify("cat.jpg", ["猫", "狗", "汽车"])        # {label: probability}
images = model.encode_images(["a.jpg", "b.png"])     # [2, D], unit length
texts = model.encode_texts(["一只猫", "一辆红色的汽车"])  # [2, D]
similarity = texts @ images.T
```
"""
