"""Caption normalisation and the reasons a caption is dropped."""
import pytest

from chinese_clip.data.captions import CaptionRules, caption_problem, normalise_caption, words


@pytest.mark.parametrize("raw, clean", [
    ("<p>一只&amp;quot;橘猫&amp;quot;在<b>沙发</b>上</p>", '一只"橘猫"在 沙发 上'),
    ("夏日海边 https://img.example.com/a.jpg?x=1 日落 www.shop.cn/item", "夏日海边 日落"),
    ("ＡＢＣ１２３ 的“新款”手机", 'ABC123 的"新款"手机'),
    ("  红色\t连衣裙 \n\n 夏季  ", "红色 连衣裙 夏季"),
    ("「故宫」的雪景", '"故宫"的雪景'),
])
def test_normalisation_undoes_what_crawling_leaves(raw, clean):
    assert normalise_caption(raw) == clean


@pytest.mark.parametrize("raw, problem", [
    ("", "empty caption"),
    ("<img src='x.jpg'>", "empty caption"),
    ("😀😀🎉", "emoji only"),
    ("IMG_2041.JPG", "no Chinese characters"),
    ("图片", "too few words: 1"),
    ("长城" * 5000, "too long: 10000 characters"),
])
def test_unusable_captions_are_named(raw, problem):
    assert caption_problem(normalise_caption(raw)) == problem


def test_a_real_caption_passes_and_is_counted_in_jieba_words():
    caption = normalise_caption("一只橘色的猫趴在窗台上晒太阳")
    assert caption_problem(caption) is None
    assert words(caption)[:3] == ["一只", "橘色", "的"]
    assert caption_problem("Eiffel Tower at night", CaptionRules(require_cjk=False)) is None
