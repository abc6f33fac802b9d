"""Token ids must equal Chinese-CLIP's own tokenizer for any text, or released weights read garbage."""
import random

import pytest
import torch
from cn_clip.clip import tokenize as cn_clip_tokenize

from chinese_clip.tokenizer import load_tokenizer

CASES = [
    "一只橘猫趴在窗台上晒太阳",
    "iPhone 15 Pro 手机壳，磨砂黑色 2024款",
    "Hello World 123 你好",
    "😀表情符号🎉和文字混排👍",
    "ＡＢＣ全角字母１２３，全角标点！",
    "",
    "   \t\n ",
    "长" * 100,  # over-long: truncated to context length
    "a" * 150 + " 中文",  # one 150-character word: Google's wordpiece still splits it
    "Ünïcödé café naïve",
    "中文，标点。！？“引号”《书名号》",
    "e.g. 3.14% $5 @user #话题",
    "控制\x00字符\u200b零宽\ufffd替换",
    "Москва 한국어 日本語のテキスト",
]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.mark.parametrize("context_length", [52, 24])
def test_matches_cn_clip_on_hard_cases(tok, context_length):
    ours = tok(CASES, context_length=context_length)
    ref = cn_clip_tokenize(CASES, context_length)
    assert ours["input_ids"].dtype == torch.long and ours["input_ids"].shape == (len(CASES), context_length)
    for text, a, b in zip(CASES, ours["input_ids"], ref):
        assert torch.equal(a, b), f"token ids differ for {text!r}"
    assert torch.equal(ours["attention_mask"], (ref != 0).long())


def test_matches_cn_clip_on_random_mixed_text(tok):
    rng = random.Random(0)
    alphabet = ([chr(c) for c in range(32, 127)] + [chr(c) for c in range(0x4E00, 0x4E00 + 400)]
                + [chr(c) for c in range(0xFF01, 0xFF5E)] + list("😀🎉。，、—éü\u3000\xa0\u0301가あア"))
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 90))) for _ in range(1000)]
    assert torch.equal(tok(texts)["input_ids"], cn_clip_tokenize(texts, 52))


def test_special_ids_and_padding(tok):
    ids = tok("猫")["input_ids"][0]
    assert ids[0].item() == 101 and ids[2].item() == 102 and ids[3:].eq(0).all()


def test_loads_vocab_from_a_checkpoint_directory(tok, tmp_path):
    tok.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert torch.equal(again(CASES)["input_ids"], tok(CASES)["input_ids"])


def test_missing_vocabulary_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="vocab.txt"):
        load_tokenizer(tmp_path)
