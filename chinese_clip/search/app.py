"""The search page: a small web app over an image index. A Chinese query (or an uploaded image) is
encoded by the model and answered with the top-k images and their scores.

    GET  /                       the query form
    GET  /search?q=一只猫&k=12    the form and the results grid
    POST /search                 (multipart, field "image") image-to-image search
    GET  /api/search?q=...&k=..  the results as JSON
    GET  /image/N                the N-th indexed image (or its thumbnail); no other file is served

The standard library's threaded HTTP server: it serves one team on a local network or through a
tunnel, not the open internet.
"""
from __future__ import annotations

import email.parser
import email.policy
import json
import mimetypes
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from chinese_clip.inference import Predictor
from chinese_clip.search.index import Hit, ImageIndex
from chinese_clip.search.page import page, results_html, search_form

MAX_UPLOAD = 20 * 2**20
DEFAULT_K = 12


class SearchService:
    """Queries against one index; the model answers one query at a time."""

    def __init__(self, index: ImageIndex, predictor: Predictor):
        self.index, self.predictor = index, predictor
        self.position = {item["key"]: i for i, item in enumerate(index.items)}
        self._model = threading.Lock()

    def by_text(self, query: str, k: int) -> list[Hit]:
        with self._model:
            features = self.predictor.encode_texts(query)
        return self.index.search(features[0], k)

    def by_image(self, data: bytes, k: int) -> list[Hit]:
        with self._model:
            features = self.predictor.encode_images(data)
        return self.index.search(features[0], k)

    def image_url(self, hit: Hit) -> str:
        return f"/image/{self.position[hit.key]}"


def _k(values: dict[str, list[str]]) -> int:
    try:
        return max(1, min(200, int(values.get("k", [DEFAULT_K])[0])))
    except ValueError:
        return DEFAULT_K


def _handler(service: SearchService) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args) -> None:  # one quiet line per request, not stderr noise
            pass

        def _send(self, body: bytes, content_type: str, status: HTTPStatus = HTTPStatus.OK) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _page(self, query: str, k: int, hits: list[Hit] | None, error: str = "",
                  status: HTTPStatus = HTTPStatus.OK) -> None:
            body = search_form(query, k, len(service.index.items))
            if error:
                body += f'<p class="error">{error}</p>'
            if hits is not None:
                body += results_html(hits, service.image_url)
            self._send(page(f"{query or '图片搜索'}", body).encode(), "text/html; charset=utf-8", status)

        def do_GET(self) -> None:
            url = urlsplit(self.path)
            values = parse_qs(url.query)
            query = values.get("q", [""])[0].strip()
            if url.path == "/":
                self._page("", DEFAULT_K, None)
            elif url.path in ("/search", "/api/search"):
                hits = service.by_text(query, _k(values)) if query else None
                if url.path == "/api/search":
                    body = json.dumps({"query": query, "results": [h.to_dict() for h in hits or []]}, ensure_ascii=False)
                    self._send(body.encode(), "application/json; charset=utf-8")
                else:
                    self._page(query, _k(values), hits, "" if query else "请输入查询")
            elif url.path.startswith("/image/") and url.path[7:].isdigit() and int(url.path[7:]) < len(service.index.items):
                file = service.index.image_path(service.index.items[int(url.path[7:])])
                if not file.is_file():
                    self._send(b"image no longer there", "text/plain", HTTPStatus.NOT_FOUND)
                    return
                self._send(file.read_bytes(), mimetypes.guess_type(file.name)[0] or "application/octet-stream")
            else:
                self._send(b"not found", "text/plain", HTTPStatus.NOT_FOUND)

        def do_POST(self) -> None:
            if urlsplit(self.path).path != "/search":
                self._send(b"not found", "text/plain", HTTPStatus.NOT_FOUND)
                return
            length = int(self.headers.get("Content-Length", 0))
            if length > MAX_UPLOAD:
                self._page("", DEFAULT_K, None, f"图片太大 (over {MAX_UPLOAD >> 20} MiB)", HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
                return
            fields = _multipart(self.headers.get("Content-Type", ""), self.rfile.read(length))
            k = _k({"k": [fields.get("k", b"").decode() or str(DEFAULT_K)]})
            if not fields.get("image"):
                self._page("", k, None, "请选择一张图片", HTTPStatus.BAD_REQUEST)
                return
            try:
                hits = service.by_image(fields["image"], k)
            except ValueError as e:
                self._page("", k, None, f"无法读取图片: {e}", HTTPStatus.BAD_REQUEST)
                return
            self._page("", k, hits)

    return Handler


def _multipart(content_type: str, body: bytes) -> dict[str, bytes]:
    """The fields of a multipart/form-data body, by name."""
    if not content_type.startswith("multipart/form-data"):
        return {}
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    return {part.get_param("name", header="content-disposition"): part.get_payload(decode=True) or b""
            for part in message.iter_parts()}


def make_server(service: SearchService, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    return ThreadingHTTPServer((host, port), _handler(service))
