"""BERT-Chinese tokenizer with Chinese-CLIP's exact token ids.

Chinese-CLIP tokenizes with Google's original BERT FullTokenizer (lower-casing, accents
stripped, every CJK character its own token) over the chinese-roberta-wwm-ext vocabulary. The
transformers BertTokenizer reproduces it once one default is aligned: Google's wordpiece gives
up on words longer than 200 characters, transformers' on words longer than 100.
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import BertTokenizer

GOOGLE_BERT_MAX_CHARS_PER_WORD = 200


def default_vocab_path() -> Path:
    """The 21128-entry vocabulary that ships with the cn_clip package."""
    import cn_clip.clip

    return Path(cn_clip.clip.__file__).parent / "vocab.txt"


def chinese_clip_text(text: str) -> str:
    """What Chinese-CLIP does to every text before tokenizing it (training captions, evaluation texts,
    zero-shot prompts): curly double quotes become straight ones. Its lower-casing is the tokenizer's."""
    return text.replace("“", '"').replace("”", '"')


class ChineseTokenizer:
    """`tok(texts, context_length)` -> {"input_ids", "attention_mask"}: LongTensors [N, context_length]."""

    def __init__(self, bert_tokenizer: BertTokenizer, context_length: int = 52):
        self.bert = bert_tokenizer
        self.context_length = context_length
        self.bert.backend_tokenizer.model.max_input_chars_per_word = GOOGLE_BERT_MAX_CHARS_PER_WORD

    @property
    def vocab_size(self) -> int:
        return len(self.bert)

    def __call__(self, texts: str | list[str], context_length: int | None = None) -> dict[str, torch.Tensor]:
        if isinstance(texts, str):
            texts = [texts]
        enc = self.bert(
            list(texts),
            padding="max_length",
            truncation=True,
            max_length=context_length or self.context_length,
            return_tensors="pt",
            return_token_type_ids=False,
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def save(self, out_dir: str | Path) -> None:
        """tokenizer.json for transformers, and the plain vocab.txt Chinese-CLIP's tools read."""
        self.bert.save_pretrained(str(out_dir))
        vocab = sorted(self.bert.get_vocab().items(), key=lambda item: item[1])
        (Path(out_dir) / "vocab.txt").write_text("".join(f"{token}\n" for token, _ in vocab), encoding="utf-8")


def load_tokenizer(path: str | Path | None = None, context_length: int = 52) -> ChineseTokenizer:
    """cn_clip's vocabulary by default; else a vocab.txt file or a directory holding one
    (a released checkpoint or an HF tokenizer directory)."""
    vocab = Path(path) if path is not None else default_vocab_path()
    if vocab.is_dir():
        vocab = vocab / "vocab.txt"
    if not vocab.is_file():
        raise FileNotFoundError(f"tokenizer vocabulary not found: {vocab} (expected a vocab.txt file or a directory with one)")
    # transformers 5 ignores a `vocab_file` keyword and maps every character to [UNK]: the argument is `vocab`.
    bert = BertTokenizer(vocab=str(vocab), do_lower_case=True, tokenize_chinese_chars=True)
    return ChineseTokenizer(bert, context_length)
