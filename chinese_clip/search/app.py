"""The search page: a small web app over an image index. A Chinese query (or an uploaded image) is
encoded by the model and answered with the top-k images and their scores.

    GET  /                       the query form
    GET  /search?q=一只猫&k=12    the form and the results grid
    POST /search                 (multipart, field "image") image-to-image search
    GET  /api/search?q=...&k=..  the results as JSON
    GET  /image/N                the N-th indexed image (or its thumbnail); no other file is served

The standard library's threaded HTTP server: it serves one team on a local network or through a
tunnel, not the open internet. Still, every request is bounded: uploads by MAX_UPLOAD read in
chunks, images by the decoder's pixel limit, idle connections by IDLE_TIMEOUT; a malformed request
gets a 4xx; only names the server answers to are accepted as Host (DNS rebinding).
"""
from __future__ import annotations

import email.parser
import email.policy
import ipaddress
import json
import mimetypes
import re
import socket
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Sequence
from urllib.parse import parse_qs, urlsplit

from chinese_clip.inference import Predictor
from chinese_clip.search.index import Hit, ImageIndex, SearchIndexError
from chinese_clip.search.page import page, results_html, search_form

MAX_UPLOAD = 20 * 2**20
READ_CHUNK = 2**20  # an upload is read a MiB at a time, never in one allocation of a size the client names
IDLE_TIMEOUT = 30.0  # seconds a connection may send nothing before it is closed (a thread each, otherwise forever)
DEFAULT_K = 12
LOCAL_NAMES = {"localhost", "127.0.0.1", "::1"}


class SearchService:
    """Queries against one index; the model answers one query at a time."""

    def __init__(self, index: ImageIndex, predictor: Predictor, idle_timeout: float = IDLE_TIMEOUT):
        self.index, self.predictor, self.idle_timeout = index, predictor, idle_timeout
        self.allowed_hosts: set[str] = set(LOCAL_NAMES)
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

    def as_json(self, hit: Hit) -> dict:
        """A hit as the API gives it: the image as its URL here, never a path on the server."""
        return {**hit.to_dict(), "image": self.image_url(hit)}


class BadRequest(Exception):
    """A request to answer with `status` and the message, not with a dropped connection."""

    def __init__(self, message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST):
        super().__init__(message)
        self.status = status


def _k(values: dict[str, list[str]]) -> int:
    try:
        return max(1, min(200, int(values.get("k", [DEFAULT_K])[0])))
    except ValueError:
        return DEFAULT_K


def _image_number(path: str, count: int) -> int:
    """N of /image/N: ASCII digits only (str.isdigit takes '²', which int() refuses), and few of them."""
    number = path.removeprefix("/image/")
    if not re.fullmatch(r"[0-9]{1,12}", number) or int(number) >= count:
        raise BadRequest("no such image", HTTPStatus.NOT_FOUND)
    return int(number)


def _content_length(value: str | None) -> int:
    if value is None:
        raise BadRequest("Content-Length required", HTTPStatus.LENGTH_REQUIRED)
    if not re.fullmatch(r"[0-9]{1,12}", value.strip()):  # "-1" would read to the end of the stream, unbounded
        raise BadRequest(f"bad Content-Length {value[:40]!r}")
    if int(value) > MAX_UPLOAD:
        raise BadRequest(f"图片太大 (over {MAX_UPLOAD >> 20} MiB)", HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
    return int(value)


def _read_body(stream, length: int) -> bytes:
    body = bytearray()
    while len(body) < length:
        try:
            chunk = stream.read(min(READ_CHUNK, length - len(body)))
        except TimeoutError:  # the connection's idle timeout
            raise BadRequest("the request body stopped arriving", HTTPStatus.REQUEST_TIMEOUT) from None
        if not chunk:
            raise BadRequest("the request body ended before its Content-Length")
        body += chunk
    return bytes(body)


def _host_allowed(host_header: str | None, allowed: set[str]) -> bool:
    """DNS rebinding: a page on an attacker's domain that resolves to this machine reaches the server with
    the attacker's name as Host. Browsers always send Host; a name must be one we answer to, while an
    IP address is only ever a rebinding's target, never its vehicle."""
    if host_header is None:
        return True
    try:
        host = urlsplit(f"//{host_header}").hostname or ""
    except ValueError:  # "[::1" and the like
        return False
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return host.lower() in allowed


def _handler(service: SearchService) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        timeout = service.idle_timeout

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

        def _answer(self, respond) -> None:
            try:
                if not _host_allowed(self.headers.get("Host"), service.allowed_hosts):
                    raise BadRequest("unknown Host (start the server with --allow-host NAME to answer to it)",
                                     HTTPStatus.MISDIRECTED_REQUEST)
                respond()
            except BadRequest as e:
                self._send(str(e).encode(), "text/plain; charset=utf-8", e.status)

        def do_GET(self) -> None:
            self._answer(self._get)

        def do_POST(self) -> None:
            self._answer(self._post)

        def _get(self) -> None:
            url = urlsplit(self.path)
            values = parse_qs(url.query)
            query = values.get("q", [""])[0].strip()
            if url.path == "/":
                self._page("", DEFAULT_K, None)
            elif url.path in ("/search", "/api/search"):
                hits = service.by_text(query, _k(values)) if query else None
                if url.path == "/api/search":
                    body = json.dumps({"query": query, "results": [service.as_json(h) for h in hits or []]},
                                      ensure_ascii=False)
                    self._send(body.encode(), "application/json; charset=utf-8")
                else:
                    self._page(query, _k(values), hits, "" if query else "请输入查询")
            elif url.path.startswith("/image/"):
                item = service.index.items[_image_number(url.path, len(service.index.items))]
                try:
                    file = service.index.image_path(item)
                except SearchIndexError:
                    raise BadRequest("not an image this index may show", HTTPStatus.FORBIDDEN) from None
                if not file.is_file():
                    raise BadRequest("image no longer there", HTTPStatus.NOT_FOUND)
                self._send(file.read_bytes(), mimetypes.guess_type(file.name)[0] or "application/octet-stream")
            else:
                raise BadRequest("not found", HTTPStatus.NOT_FOUND)

        def _post(self) -> None:
            if urlsplit(self.path).path != "/search":
                raise BadRequest("not found", HTTPStatus.NOT_FOUND)
            try:
                length = _content_length(self.headers.get("Content-Length"))
            except BadRequest as e:
                if e.status != HTTPStatus.REQUEST_ENTITY_TOO_LARGE:
                    raise
                self._page("", DEFAULT_K, None, str(e), e.status)
                return
            fields = _multipart(self.headers.get("Content-Type", ""), _read_body(self.rfile, length))
            try:
                k = _k({"k": [fields.get("k", b"").decode() or str(DEFAULT_K)]})
            except UnicodeDecodeError:
                raise BadRequest("the form field k is not UTF-8") from None
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


def make_server(service: SearchService, host: str = "127.0.0.1", port: int = 8000,
                allow_hosts: Sequence[str] = ()) -> ThreadingHTTPServer:
    """The server, answering to `host`, localhost and the names in `allow_hosts` (and to the machine's own
    names when it listens on every interface)."""
    names = {host, *LOCAL_NAMES, *allow_hosts}
    if host in ("", "0.0.0.0", "::"):
        names |= {socket.gethostname(), socket.getfqdn()}
    service.allowed_hosts = {name.lower() for name in names}
    return ThreadingHTTPServer((host, port), _handler(service))
