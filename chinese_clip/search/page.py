"""The HTML of search results: a grid of the top-k images with their scores, as a gallery file
(`recipes/predict.py search --html`) and as the search app's page (with its query form)."""
from __future__ import annotations

import html
from typing import Callable, Sequence

from chinese_clip.search.index import Hit

STYLE = """
body { font-family: "PingFang SC", "Noto Sans CJK SC", "Microsoft YaHei", sans-serif; margin: 2em; color: #222; }
form { display: flex; gap: .5em; flex-wrap: wrap; align-items: center; margin-bottom: 1.5em; }
input[name=q] { font-size: 1.2em; padding: .4em; min-width: 20em; }
button { font-size: 1.1em; padding: .4em 1.2em; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(200px, 1fr)); gap: 1em; }
figure { margin: 0; border: 1px solid #ddd; border-radius: 6px; padding: .5em; background: #fafafa; }
figure img { width: 100%; height: 200px; object-fit: contain; background: #fff; }
figcaption { font-size: .85em; word-break: break-all; }
.score { font-weight: bold; } .error { color: #b00; } .summary { color: #666; }
"""


def results_html(hits: Sequence[Hit], image_url: Callable[[Hit], str]) -> str:
    figures = [f'<figure class="hit" data-key="{html.escape(hit.key)}">'
               f'<img src="{html.escape(image_url(hit))}" alt="{html.escape(hit.key)}" loading="lazy">'
               f'<figcaption><span class="rank">#{hit.rank}</span> <span class="score">{hit.score:.4f}</span> '
               f'<span class="key">{html.escape(hit.key)}</span>'
               + (f'<br><span class="caption">{html.escape(hit.caption)}</span>' if hit.caption else "")
               + "</figcaption></figure>" for hit in hits]
    return f'<div class="grid" id="results">{"".join(figures)}</div>'


def page(title: str, body: str) -> str:
    return (f'<!doctype html><html lang="zh"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{STYLE}</style></head><body>{body}</body></html>")


def gallery(query: str, hits: Sequence[Hit], image_url: Callable[[Hit], str]) -> str:
    """A standalone page of one query's results."""
    return page(f"{query}: top {len(hits)}", f"<h1>{html.escape(query)}</h1>"
                f'<p class="summary">top {len(hits)} by cosine similarity</p>{results_html(hits, image_url)}')


def search_form(query: str, k: int, images: int) -> str:
    return (f'<h1>图片搜索</h1><p class="summary">{images} images indexed</p>'
            '<form method="get" action="/search">'
            f'<input name="q" value="{html.escape(query)}" placeholder="用中文描述你要找的图片" autofocus>'
            f'<input name="k" type="number" min="1" max="200" value="{k}" aria-label="top k">'
            '<button type="submit" id="search">搜索</button></form>'
            '<form method="post" action="/search" enctype="multipart/form-data">'
            '<label>以图搜图: <input type="file" name="image" accept="image/*"></label>'
            f'<input type="hidden" name="k" value="{k}"><button type="submit" id="search-image">搜索相似图片</button></form>')
