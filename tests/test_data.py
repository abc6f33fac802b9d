import torch

from chinese_clip.config import DataConfig
from chinese_clip.data.loaders import build_collator, build_train_loader
from chinese_clip.data.sampler import GlobalBatchSampler
from chinese_clip.data.synthetic import CLASSES, NOVEL_CLASSES, SyntheticShapes, class_names
from chinese_clip.tokenizer import load_tokenizer


def _take(sampler, n):
    it = iter(sampler)
    return [next(it) for _ in range(n)]


def test_global_batches_do_not_depend_on_the_number_of_ranks():
    one = _take(GlobalBatchSampler(100, 8, seed=3), 30)  # crosses 2 epoch boundaries (12 steps each)
    r0 = _take(GlobalBatchSampler(100, 4, rank=0, world_size=2, seed=3), 30)
    r1 = _take(GlobalBatchSampler(100, 4, rank=1, world_size=2, seed=3), 30)
    assert [a + b for a, b in zip(r0, r1)] == one


def test_each_epoch_is_a_permutation_and_epochs_differ():
    batches = _take(GlobalBatchSampler(100, 10, seed=0), 20)
    first, second = sum(batches[:10], []), sum(batches[10:], [])
    assert sorted(first) == sorted(second) == list(range(100))
    assert first != second


def test_starting_at_a_sample_continues_the_same_sequence():
    full = _take(GlobalBatchSampler(50, 4, rank=1, world_size=2, seed=1), 20)
    assert _take(GlobalBatchSampler(50, 4, rank=1, world_size=2, seed=1, start_sample=13 * 8), 7) == full[13:]


def test_the_stream_is_the_same_whatever_the_batch_size_along_the_way():
    """A stage that doubles the batch continues the stream where the previous stage left it."""
    stream = sum(_take(GlobalBatchSampler(30, 1, seed=2), 75), [])
    assert sorted(stream[:30]) == sorted(stream[30:60]) == list(range(30))  # epochs, run across by batches
    small = sum(_take(GlobalBatchSampler(30, 4, seed=2), 5), [])  # samples 0-19
    large = sum(_take(GlobalBatchSampler(30, 8, seed=2, start_sample=20), 5), [])  # samples 20-59
    assert small + large == stream[:60]


def test_synthetic_images_are_a_function_of_seed_and_index():
    a, b = SyntheticShapes("train", 10, 32, seed=0), SyntheticShapes("train", 10, 32, seed=0)
    assert list(a[3]["image"].getdata()) == list(b[3]["image"].getdata()) and a[3]["text"] == b[3]["text"]
    assert list(a[3]["image"].getdata()) != list(SyntheticShapes("train", 10, 32, seed=1)[3]["image"].getdata())
    assert a[3]["image"].size == (32, 32)


def test_novel_pairs_never_appear_in_training_and_captions_name_the_class():
    novel = {i for i, c in enumerate(CLASSES) if c in NOVEL_CLASSES}
    train = SyntheticShapes("train", 400, 16)
    labels = {train[i]["label"] for i in range(400)}
    assert labels == set(range(len(CLASSES))) - novel
    assert {SyntheticShapes("novel", 50, 16)[i]["label"] for i in range(50)} == novel
    for i in range(50):
        colour, shape = CLASSES[train[i]["label"]]
        assert colour in train[i]["text"] and shape in train[i]["text"]
    assert len(set(class_names())) == 24


def test_loader_yields_model_ready_batches():
    cfg = DataConfig(batch_size=6, num_workers=0, context_length=20)
    tok = load_tokenizer(None, 20)
    loader = build_train_loader(cfg, tok, 32, rank=0, world_size=1, seed=0)
    batch = next(iter(loader))
    assert batch["pixel_values"].shape == (6, 3, 32, 32) and batch["pixel_values"].dtype == torch.float32
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (6, 20)
    assert batch["label"].shape == batch["image_id"].shape == (6,)
    # Centred by CLIP's statistics: a mid-grey background sits near zero, so there are values either
    # side of it (raw pixels, 0..1 or 0..255, have none below)
    assert batch["pixel_values"].min() < 0 < batch["pixel_values"].max()
    collate = build_collator(cfg, tok)
    first = next(iter(GlobalBatchSampler(cfg.synthetic.train_size, 6, seed=0)))
    dataset = SyntheticShapes("train", cfg.synthetic.train_size, 32, seed=cfg.synthetic.seed)
    again = collate([dataset[i] for i in first])
    assert torch.equal(again["pixel_values"], batch["pixel_values"])
    assert loader.position == {"sample": 6}
