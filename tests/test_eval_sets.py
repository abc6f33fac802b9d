"""Evaluation sets as configs and the suite file: retrieval on our shards, cn_clip's ImageNet labels,
errors at start-up for every bad set, the suite run into one table beside the published numbers."""
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from chinese_clip.checkpoints import save_pretrained
from chinese_clip.config import Config, ConfigError, EvalSetConfig, load_config
from chinese_clip.data.images import encode_jpeg
from chinese_clip.data.readers import read_pairs
from chinese_clip.data.shards import SCHEMA, build_shards
from chinese_clip.data.synthetic import SyntheticShapes
from chinese_clip.evaluation.classification import digest, read_labelled_folder
from chinese_clip.evaluation.retrieval_set import read_shard_retrieval_set
from chinese_clip.evaluation.tasks import markdown_table, read_sets, sets_evaluator
from chinese_clip.model import ChineseCLIP
from tests.conftest import (CONFIGS, EVALUATE, PRETRAIN, TINY, TINY_CN_CLIP, cn_clip_checkpoint, write_class_folder,
                            write_retrieval_set)
from tests.tolerances import FEATURES, SCORES

SUITE = CONFIGS / "eval_suite_zh.yaml"


def test_shard_pairs_become_a_retrieval_set_of_distinct_images_and_captions(tmp_path):
    shapes = SyntheticShapes("train", 3, 32)
    one, two, three = (encode_jpeg(shapes[i]["image"]) for i in range(3))
    rows = [("a", "红色圆形", one), ("b", "一个圆", one), ("c", "红色圆形", two), ("d", "蓝色方块", three),
            ("e", "红色圆形", one)]  # e repeats pair a
    pq.write_table(pa.Table.from_pylist([{"id": i, "caption": c, "image": im, "width": 32, "height": 32, "source": i}
                                         for i, c, im in rows], schema=SCHEMA), tmp_path / "shard-00000.parquet")
    data = read_shard_retrieval_set(tmp_path)
    assert data.image_ids == ["a", "c", "d"] and data.text_ids == ["a", "b", "d"]
    assert data.texts == ["红色圆形", "一个圆", "蓝色方块"]
    assert data.text_to_images == [[0, 1], [0], [2]]


def test_cn_clips_imagenet_names_label_a_thousand_class_folders(tmp_path):
    for label in range(1000):
        (tmp_path / "test" / f"{label:03d}").mkdir(parents=True)
    SyntheticShapes("train", 1, 32)[0]["image"].save(tmp_path / "test" / "001" / "goldfish.png")
    data = read_labelled_folder(tmp_path / "test", "cn_clip")
    assert len(data.class_names) == 1000 and data.class_names[:2] == ["丁鲷", "金鱼"]
    assert data.labels == [1] and digest(data.class_names) == "e995c9fbc60a"
    (tmp_path / "test" / "999").rmdir()
    with pytest.raises(ValueError, match="999 class folders but cn_clip's imagenet_classnames names 1000"):
        read_labelled_folder(tmp_path / "test", "cn_clip")


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("sets")
    return {"retrieval": write_retrieval_set(root / "MUGE"), "classification": write_class_folder(root / "shapes")}


@pytest.mark.parametrize("change, message", [
    (dict(path="/nowhere"), "eval set s: /nowhere/valid_imgs.tsv: no such file"),
    (dict(path="${NO_SUCH_VARIABLE}/MUGE"), r"eval set s: \$\{NO_SUCH_VARIABLE\}/MUGE: an environment variable in it"),
    (dict(path="/nowhere/*.parquet"), r"eval set s: shards: /nowhere/\*.parquet matches no file"),
    (dict(split="test"), "test_imgs.tsv: no such file"),
    (dict(reference={"R@1": 50.0}), "reference metric R@1 is not one of t2i_R@1"),
    (dict(labels="x.txt"), "labels and templates apply to task: classification"),
    (dict(task="classification", labels="/none.txt"), "/none.txt: no such label file"),
    (dict(task="classification", templates="/none.txt"), "/none.txt: no such template file"),
    (dict(name=""), r"eval.sets\[0\]: give it a name and a path"),
])
def test_a_bad_set_is_a_config_error_naming_it(sets, change, message):
    entry = EvalSetConfig(name="s", path=str(sets[change.get("task", "retrieval")]))
    for key, value in change.items():
        setattr(entry, key, value)
    with pytest.raises(ConfigError, match=message):
        read_sets([entry])


def test_best_metric_must_name_a_metric_of_an_evaluated_set(sets):
    retrieval = EvalSetConfig(name="MUGE", path=str(sets["retrieval"]))
    read_sets([retrieval], "MUGE/t2i_mean_recall")
    read_sets([], "val/top1", {"val": "classification"})
    with pytest.raises(ConfigError, match="choose one of: MUGE/t2i_R@1, .*, MUGE/mean_recall"):
        read_sets([retrieval], "MUGE/top1")
    with pytest.raises(ConfigError, match="the name is used twice"):
        read_sets([retrieval, retrieval])


def test_a_training_config_with_a_bad_set_stops_before_training(sets, tmp_path, in_process):
    result = in_process(PRETRAIN, f"run.output_dir={tmp_path}",
                        f"eval.sets=[{{name: shapes, task: classification, path: {sets['classification']}, "
                        "labels: /none.txt}]")
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1] == \
        "error: eval set shapes: /none.txt: no such label file"
    assert not (tmp_path / "metrics.jsonl").exists()


def test_an_image_that_does_not_decode_stops_training_at_the_evaluation_with_one_line(tmp_path, in_process):
    import base64

    broken = write_retrieval_set(tmp_path / "MUGE")
    lines = (broken / "valid_imgs.tsv").read_text().splitlines()
    lines[2] = "102\t" + base64.b64encode(b"not an image at all").decode()
    (broken / "valid_imgs.tsv").write_text("\n".join(lines) + "\n")
    result = in_process(PRETRAIN, f"run.output_dir={tmp_path / 'run'}", "data.num_workers=0",
                        "data.synthetic.val_size=16", f"eval.sets=[{{name: M, path: {broken}}}]")
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith("error: eval set M: image 102: "), result.stderr[-2000:]


def test_the_table_puts_published_numbers_under_ours():
    result = {"task": "retrieval", "text_to_image": {"R@1": 10.0, "R@5": 20.0, "R@10": 30.0},
              "image_to_text": {"R@1": 40.0, "R@5": 50.0, "R@10": 60.0}, "mean_recall": 35.0}
    table = markdown_table({"MUGE": result}, {"MUGE": {"t2i_R@1": 52.1, "t2i_mean_recall": 71.1}}, "CN-CLIP")
    lines = table.splitlines()
    assert lines[0] == "| set | t2i R@1 | t2i R@5 | t2i R@10 | i2t R@1 | i2t R@5 | i2t R@10 | t2i MR | i2t MR | MR |"
    assert lines[2] == "| MUGE | 10.00 | 20.00 | 30.00 | 40.00 | 50.00 | 60.00 | 20.00 | 50.00 | 35.00 |"
    assert lines[3] == "| MUGE: CN-CLIP | 52.1 | – | – | – | – | – | 71.1 | – | – |"


def write_datapath(root: Path) -> Path:
    """${DATAPATH} as the suite expects it, with tiny sets (the suite's split names)."""
    datasets = root / "datasets"
    write_retrieval_set(datasets / "MUGE")
    for name in ("Flickr30k-CN", "COCO-CN"):
        write_retrieval_set(datasets / name, images=4, texts=6)
        for kind in ("imgs.tsv", "texts.jsonl"):
            (datasets / name / f"valid_{kind}").rename(datasets / name / f"test_{kind}")
    write_class_folder(datasets / "ImageNet-1K", per_class=(2, 1, 1))
    return root


def test_the_suite_runs_every_set_into_one_table_beside_chinese_clips_numbers(tmp_path, in_process, monkeypatch):
    datapath = write_datapath(tmp_path / "data")
    shards = tmp_path / "shards"
    build_shards(read_pairs(datapath / "datasets" / "MUGE", "valid"), shards, rows_per_shard=4)
    torch.manual_seed(0)
    save_pretrained(ChineseCLIP(TINY).state_dict(), Config(model=TINY), tmp_path / "model")
    suite = [EVALUATE, "--model", str(tmp_path / "model"), "--config", str(SUITE), "eval.batch_size=4",
             "--retrieval", str(shards), "--out", str(tmp_path / "out")]
    monkeypatch.setenv("DATAPATH", str(datapath))
    result = in_process(*suite)
    assert result.returncode == 0, result.stderr[-2000:]
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert list(saved["results"]) == ["MUGE", "Flickr30K-CN", "COCO-CN", "ImageNet-CN", "shards"]
    assert (saved["results"]["COCO-CN"]["texts"], saved["results"]["ImageNet-CN"]["images"]) == (6, 4)
    # the shards hold MUGE's pairs: its 7 captions and 5 images (re-encoded, so the scores may differ)
    assert (saved["results"]["shards"]["texts"], saved["results"]["shards"]["images"]) == (7, 5)
    assert saved["reference"]["scores"]["ImageNet-CN"] == {"top1": 48.3}
    assert saved["results"]["ImageNet-CN"]["labels_from"] == str(datapath / "datasets" / "ImageNet-1K" / "label_cn.txt")
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| MUGE: CN-CLIP ViT-B/16 (published, zero-shot) | 52.1 | 76.7 | 84.4 | – | – | – | 71.1 | – | – |" in table
    assert "| ImageNet-CN: CN-CLIP ViT-B/16 (published, zero-shot) | 48.3 | – |" in table
    assert "| Flickr30K-CN |" in result.stdout and "batch size: 4  workers: 2" in result.stdout  # the config's

    monkeypatch.delenv("DATAPATH")
    unset = in_process(*suite)
    assert unset.returncode == 1 and unset.stderr.strip().splitlines()[-1] == (
        "error: eval set MUGE: ${DATAPATH}/datasets/MUGE: an environment variable in it is not set "
        "(export it, or override the set's path)")


def test_the_suite_file_is_a_config_of_four_sets():
    cfg = load_config(SUITE)
    assert [(s.name, s.task, s.split) for s in cfg.eval.sets] == [
        ("MUGE", "retrieval", "valid"), ("Flickr30K-CN", "retrieval", "test"), ("COCO-CN", "retrieval", "test"),
        ("ImageNet-CN", "classification", "valid")]


def test_zero_shot_classification_equals_chinese_clips_own_classifier_and_scoring(tmp_path, monkeypatch):
    """cn_clip's zeroshot_evaluation.py (text preprocessing, per-prompt normalisation, template mean,
    its default templates) on the same weights and pixels: the same class embeddings and top-1."""
    from types import SimpleNamespace

    from cn_clip.clip.model import CLIP
    from cn_clip.eval import zeroshot_evaluation
    from cn_clip.eval.cvinw_zeroshot_templates import openai_templates

    from chinese_clip.checkpoints import load_pretrained
    from chinese_clip.config import DataConfig
    from chinese_clip.data.loaders import build_collator
    from chinese_clip.data.transforms import decode, eval_transform
    from chinese_clip.evaluation.classification import (chinese_clip_templates, read_classification_set,
                                                        zero_shot_classification)
    from chinese_clip.evaluation.zeroshot import class_embeddings
    from chinese_clip.tokenizer import load_tokenizer

    checkpoint = cn_clip_checkpoint(tmp_path / "tiny.pt")
    theirs = CLIP(**TINY_CN_CLIP).float().eval()
    theirs.load_state_dict({k.removeprefix("module."): v for k, v in torch.load(checkpoint)["state_dict"].items()})
    ours = load_pretrained(checkpoint).eval()
    folder = write_class_folder(tmp_path / "set", per_class=(3, 2, 3))
    names = ["“红色”圆形", "Red 正方形", "蓝色三角形"]  # curly quotes and capitals: its preprocessing matters
    (tmp_path / "set" / "label_cn.txt").write_text("\n".join(names), encoding="utf-8")
    collator = build_collator(DataConfig(), load_tokenizer(None, 52))
    device = torch.device("cpu")

    args = SimpleNamespace(context_length=52, gpu=device)
    classifier = zeroshot_evaluation.zero_shot_classifier(theirs, names, openai_templates, args)  # [D, C]
    assert chinese_clip_templates() == [template("{}") for template in openai_templates]
    ours_classifier = class_embeddings(ours, collator.tokenizer, names, chinese_clip_templates(), device, 50)
    assert torch.allclose(ours_classifier.T, classifier, atol=FEATURES)

    # cn_clip 1.6.0's accuracy() calls float() on a 1-element array, which numpy 2 refuses.
    monkeypatch.setattr(zeroshot_evaluation, "float", lambda x: x.item() if hasattr(x, "item") else x, raising=False)
    data = read_labelled_folder(folder)
    transform = eval_transform(64)
    pixels = collator.pixel_batch([transform(decode(f.read_bytes())) for f in data.files])
    top1, _ = zeroshot_evaluation.run(theirs, classifier, [(pixels, torch.tensor(data.labels))], args)
    result = zero_shot_classification(ours, read_classification_set(folder), collator, device, batch_size=4)
    assert result["top1"] == pytest.approx(100 * top1, abs=SCORES) and result["images"] == 8


def test_every_evaluation_of_a_run_reuses_the_sets_read_at_start_up_and_runs_in_eval_mode(sets, tmp_path, monkeypatch):
    from collections import Counter
    from dataclasses import replace

    from chinese_clip.config import DataConfig
    from chinese_clip.data.loaders import build_collator
    from chinese_clip.evaluation import classification, tasks
    from chinese_clip.tokenizer import load_tokenizer

    shards = tmp_path / "shards"
    build_shards(read_pairs(sets["retrieval"], "valid"), shards, rows_per_shard=4)
    templates = tmp_path / "templates.txt"
    templates.write_text("一张{}的图片\n", encoding="utf-8")
    calls = Counter()

    def count(module, name):
        original = getattr(module, name)

        def counted(*args, **kwargs):
            calls[name] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)

    for module, name in [(tasks, "read_retrieval_set"), (tasks, "read_shard_retrieval_set"),
                         (classification, "read_labelled_folder"), (classification, "read_templates")]:
        count(module, name)
    configured = [EvalSetConfig(name="MUGE", path=str(sets["retrieval"])), EvalSetConfig(name="pairs", path=str(shards)),
                  EvalSetConfig(name="shapes", task="classification", path=str(sets["classification"]),
                                templates=str(templates))]
    evaluate = sets_evaluator(read_sets(configured), build_collator(DataConfig(), load_tokenizer(None, 16)),
                              torch.device("cpu"), batch_size=4)
    torch.manual_seed(0)
    model = ChineseCLIP(replace(TINY, vision=replace(TINY.vision, patch_drop_rate=0.5))).train()
    first, second = evaluate(model), evaluate(model)
    assert calls == {"read_retrieval_set": 1, "read_shard_retrieval_set": 1, "read_labelled_folder": 1,
                     "read_templates": 1}
    # FLIP masks half the patches in training: equal scores mean both ran unmasked, and training mode is back
    assert model.training and first == second and set(first) == {"MUGE", "pairs", "shapes"}
