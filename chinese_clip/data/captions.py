"""Chinese captions from the web: normalised text, or the reason a caption cannot be used.

`normalise_caption` undoes what crawling leaves in alt texts (HTML tags and entities, URLs,
full-width Latin and digits, curly quotes, runs of whitespace); `caption_problem` says why a
normalised caption teaches nothing (emoji only, no Chinese at all, too few words, too long), counting words
with jieba as Chinese has no spaces.
"""
from __future__ import annotations

import html
import re
import unicodedata
from dataclasses import dataclass

import jieba

URL = re.compile(r"(?:https?://|www\.)\S+", re.IGNORECASE)
HTML_TAG = re.compile(r"<[^<>]{1,200}>")
CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
QUOTES = str.maketrans({"“": '"', "”": '"', "„": '"', "«": '"', "»": '"', "‘": "'", "’": "'", "「": '"', "」": '"',
                        "『": '"', "』": '"'})
# Pictographs, dingbats, flags, variation selectors and joiners: what an emoji-only caption is made of.
EMOJI = re.compile(r"[\U0001F000-\U0001FAFF\u2600-\u27BF\u2B00-\u2BFF\uFE0F\u200D\u20E3]")
WORD = re.compile(r"\w", re.UNICODE)  # a jieba token with a letter, digit or CJK character in it is a word

jieba.setLogLevel(60)  # its dictionary-loading chatter would fill every worker's log


@dataclass(frozen=True)
class CaptionRules:
    min_words: int = 2  # jieba words; fewer carries no description ("图片", "IMG_2041")
    max_chars: int = 300  # after normalisation; longer is an article, not a caption (the tokenizer keeps 50)
    require_cjk: bool = True  # a Chinese model learns nothing from captions without Chinese


def normalise_caption(text: str) -> str:
    """HTML unescaped and its tags dropped, URLs dropped, full-width ASCII to half-width (NFKC),
    quotes unified, whitespace collapsed and trimmed."""
    text = html.unescape(html.unescape(text))  # alt texts are often escaped twice
    text = HTML_TAG.sub(" ", text)
    text = URL.sub(" ", text)
    text = unicodedata.normalize("NFKC", text).translate(QUOTES)
    return " ".join(text.split())


def words(text: str) -> list[str]:
    return [token for token in jieba.lcut(text) if WORD.search(token)]


def caption_problem(text: str, rules: CaptionRules = CaptionRules()) -> str | None:
    """Why a normalised caption cannot be used, or None when it can."""
    if not text:
        return "empty caption"
    if len(text) > rules.max_chars:
        return f"too long: {len(text)} characters"
    if not EMOJI.sub("", text).strip():
        return "emoji only"
    if rules.require_cjk and not CJK.search(text):
        return "no Chinese characters"
    count = len(words(text))
    if count < rules.min_words:
        return f"too few words: {count}"
    return None
