"""Putting a model to work: the inference API against transformers' ChineseCLIPModel, recipes/predict.py's
classification and search, the incremental index, and the search page driven in a real headless Chromium."""
from __future__ import annotations

import html
import json
import runpy
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import unquote

import pytest
import torch
from PIL import Image

from chinese_clip.checkpoints import export_hf
from chinese_clip.data.synthetic import SyntheticShapes
from chinese_clip.inference import load_model
from chinese_clip.search import index as search_index
from chinese_clip.search.app import SearchService, _handler, make_server
from chinese_clip.search.index import ImageIndex, SearchIndexError, remove_index
from tests.conftest import (ROOT, TINY, animated, chromium_driver, decompression_bomb, peak_memory_growth, responsive_model,
                            write_shards)
from tests.tolerances import FEATURES

PREDICT = str(ROOT / "recipes" / "predict.py")
predict = runpy.run_path(PREDICT)["main"]  # in-process, where a launch would only add seconds of imports


def predict_error(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as stopped:
        predict(argv)
    return str(stopped.value.code)
LABELS = ["红色的圆形", "蓝色的正方形", "绿色的三角形"]
# The index stores features in float16 (11 significant bits): a score against it is within 2e-3 of
# the float32 one (1e-4 measured); an image searched by itself scored 1.0, the next one 0.991.
FP16_INDEX = 2e-3


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return responsive_model(tmp_path_factory.mktemp("model") / "model")


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Eight synthetic shapes as PNG files, two of them in a sub-folder."""
    folder = tmp_path_factory.mktemp("photos") / "photos"
    (folder / "more").mkdir(parents=True)
    shapes = SyntheticShapes("train", 8, 48)
    for i in range(8):
        shapes[i]["image"].save(folder / ("more" if i >= 6 else "") / f"shape{i}.png")
    return folder


def test_the_api_classifies_and_encodes_as_transformers_does(model_dir, photos, tmp_path):
    """The same weights through HF's ChineseCLIPModel and ChineseCLIPProcessor (PIL resizing): the same
    label probabilities for images given as paths, bytes and PIL images."""
    from transformers import ChineseCLIPModel, ChineseCLIPProcessor

    predictor = load_model(model_dir)
    hf_dir = export_hf(predictor.model, tmp_path / "hf")
    hf_model, processor = ChineseCLIPModel.from_pretrained(hf_dir).eval(), ChineseCLIPProcessor.from_pretrained(hf_dir)
    files = sorted(photos.rglob("*.png"))[:4]
    images = [Image.open(f).convert("RGB") for f in files]
    with torch.no_grad():
        inputs = processor(text=LABELS, images=images, return_tensors="pt", padding=True)
        outputs = hf_model(**inputs)
    theirs, their_texts = outputs.logits_per_image.softmax(dim=-1), outputs.text_embeds

    inputs_of_each_kind = [files[0], files[1].read_bytes(), images[2], str(files[3])]
    ours = predictor.classify(inputs_of_each_kind, LABELS, templates=["{}"])
    assert [list(row) for row in ours] == [LABELS] * 4
    # transformers' processor resizes with PIL, ours with torchvision: up to a grey level per pixel apart,
    # which moved these probabilities by 1e-6 and may move them by 1e-3 on photos; a wrong scale or label order by 0.1
    assert torch.tensor([list(row.values()) for row in ours]) == pytest.approx(theirs, abs=2e-3)
    assert theirs.max() > 0.6  # not uniform: a wrong scale or a swapped label would show
    assert predictor.encode_texts(LABELS) == pytest.approx(their_texts, abs=FEATURES)
    single = predictor.classify(files[0], LABELS, templates=["{}"])
    assert single == pytest.approx(ours[0], abs=FEATURES)  # a batch of one: other kernels
    features = predictor.encode_images(files)
    assert features.shape == (4, TINY.embed_dim) and features.norm(dim=1) == pytest.approx(torch.ones(4), abs=FEATURES)


def test_the_api_says_what_is_wrong_with_its_input(model_dir, tmp_path):
    predictor = load_model(model_dir)
    with pytest.raises(FileNotFoundError, match="nope.jpg: no such image file"):
        predictor.encode_images(tmp_path / "nope.jpg")
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="broken.jpg: not an image"):
        predictor.encode_images([tmp_path / "broken.jpg"])
    with pytest.raises(ValueError, match="labels repeat"):
        predictor.classifier(["猫", "猫"])
    with pytest.raises(ValueError, match="each with {}"):
        predictor.classifier(["猫", "狗"], templates=["一张照片"])


def test_bf16_encoding_stays_close_to_fp32(model_dir, photos):
    """precision="bf16" (what "auto" picks on GPUs with bf16) runs the towers under bf16 autocast."""
    fp32, bf16 = load_model(model_dir, precision="fp32"), load_model(model_dir, precision="bf16")
    files = sorted(photos.glob("*.png"))
    for encode in ("encode_images", "encode_texts"):
        inputs = files if encode == "encode_images" else LABELS
        exact, reduced = getattr(fp32, encode)(inputs), getattr(bf16, encode)(inputs)
        assert not torch.equal(exact, reduced)  # it did run in bf16
        # bf16 keeps 8 significant bits: the features stay within a cosine of 0.99 of fp32's (0.997
        # measured); a tower that breaks in bf16 (NaNs, overflow to zeros) falls far below
        assert (exact * reduced).sum(dim=1).min() > 0.99
    with pytest.raises(ValueError, match="precision must be auto, fp32 or bf16"):
        load_model(model_dir, precision="fp16")


def test_classify_recipe_prints_the_top_labels_and_writes_every_probability(model_dir, photos, tmp_path, capsys):
    out = tmp_path / "preds.json"
    predict(["classify", "--model", str(model_dir), str(photos / "more"), str(photos / "shape0.png"),
             "--labels", "，".join(LABELS), "--template", "{}", "--top-k", "2", "--out", str(out)])
    printed = capsys.readouterr().out
    written = json.loads(out.read_text(encoding="utf-8"))
    files = [str(photos / "more" / "shape6.png"), str(photos / "more" / "shape7.png"), str(photos / "shape0.png")]
    assert [p["image"] for p in written["predictions"]] == files and written["labels"] == LABELS
    expected = load_model(model_dir).classify(files, LABELS, templates=["{}"])
    for prediction, probabilities in zip(written["predictions"], expected):
        assert prediction["probabilities"] == pytest.approx(probabilities, abs=FEATURES)
        best = max(probabilities, key=probabilities.get)
        assert prediction["top"][0]["label"] == best and len(prediction["top"]) == 2
        assert f"{prediction['image']}\t{best} " in printed

    missing = predict_error(["classify", "--model", str(model_dir), str(tmp_path / "nope"), "--labels", "猫,狗"], capsys)
    assert missing == f"error: {tmp_path / 'nope'}: no such image file or folder"
    one_label = predict_error(["classify", "--model", str(model_dir), str(photos), "--labels", "猫"], capsys)
    assert one_label == "error: give at least two labels (--labels 猫,狗 or --labels-file, one per line)"


def test_an_index_encodes_only_what_changed_and_survives_an_interrupted_build(model_dir, photos, tmp_path, monkeypatch):
    folder = tmp_path / "photos"
    shutil.copytree(photos, folder)
    (folder / "broken.jpg").write_bytes(b"not an image")
    predictor = load_model(model_dir)
    calls = []
    encode = predictor.encode_readable
    monkeypatch.setattr(predictor, "encode_readable", lambda images: calls.append(len(images)) or encode(images))
    index = ImageIndex(tmp_path / "index")
    counts = index.build(str(folder), predictor, model_dir, say=lambda line: None)
    assert (counts["added"], counts["kept"], counts["removed"]) == (8, 0, 0)
    assert [Path(e.split(":")[0]).name for e in counts["unreadable"]] == ["broken.jpg"]

    (folder / "broken.jpg").unlink()
    (folder / "shape0.png").unlink()
    Image.new("RGB", (40, 40), (200, 10, 10)).save(folder / "more" / "shape6.png")  # changed in place
    SyntheticShapes("train", 10, 48)[9]["image"].save(folder / "new.png")
    calls.clear()
    counts = ImageIndex(tmp_path / "index").build(str(folder), predictor, model_dir, say=lambda line: None)
    assert (counts["added"], counts["kept"], counts["removed"]) == (2, 6, 2) and calls == [2]
    index = ImageIndex.open(tmp_path / "index")
    assert sorted(item["key"] for item in index.items) == sorted(
        p.relative_to(folder).as_posix() for p in folder.rglob("*.png"))

    # every hit is the brute-force answer of the current files
    query = predictor.encode_texts("红色的圆形")[0]
    hits = index.search(query, k=3)
    files = {item["key"]: index.image_path(item) for item in index.items}
    truth = sorted(files, key=lambda key: -(predictor.encode_images(files[key])[0] @ query).item())[:3]
    assert [hit.key for hit in hits] == truth
    assert [hit.score for hit in hits] == pytest.approx(
        [(predictor.encode_images(files[key])[0] @ query).item() for key in truth], abs=FP16_INDEX)

    # a build that dies after its first part keeps that part; the next one encodes only the rest
    monkeypatch.setattr(search_index, "PART_SIZE", 3)
    calls.clear()

    def dies_on_the_second_part(images):
        if calls:
            raise KeyboardInterrupt
        calls.append(len(images))
        return encode(images)

    monkeypatch.setattr(predictor, "encode_readable", dies_on_the_second_part)
    fresh = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        ImageIndex(fresh).build(str(folder), predictor, model_dir, say=lambda line: None)
    assert len(ImageIndex.open(fresh).items) == 3
    monkeypatch.setattr(predictor, "encode_readable", encode)
    counts = ImageIndex(fresh).build(str(folder), predictor, model_dir, say=lambda line: None)
    assert (counts["kept"], counts["added"], counts["images"]) == (3, 5, 8)

    with pytest.raises(SearchIndexError, match="indexes .* not .*give each source its own index"):
        ImageIndex(fresh).build(str(photos), predictor, model_dir, say=lambda line: None)
    other = tmp_path / "other_model"
    shutil.copytree(model_dir, other)
    with pytest.raises(SearchIndexError, match="was built with .*--rebuild"):
        ImageIndex(fresh).build(str(folder), predictor, other, say=lambda line: None)


def test_search_recipe_on_shards_and_folders_writes_json_and_a_gallery(model_dir, photos, tmp_path, capsys):
    shards = write_shards(tmp_path / "shards", pairs=12, rows_per_shard=5, image_size=48)
    index_dir = tmp_path / "shards.index"
    predict(["index", "--model", str(model_dir), "--source", str(shards), "--index", str(index_dir)])
    predict(["index", "--model", str(model_dir), "--source", str(shards), "--index", str(index_dir)])
    assert "12 images (0 added, 12 kept" in capsys.readouterr().out

    out, html = tmp_path / "hits.json", tmp_path / "pages" / "hits.html"
    predict(["search", "--index", str(index_dir), "一个红色的圆形", "--top-k", "4", "--out", str(out), "--html", str(html)])
    results = json.loads(out.read_text(encoding="utf-8"))["results"]
    assert [r["rank"] for r in results] == [1, 2, 3, 4] and all(r["caption"] for r in results)
    assert [r["score"] for r in results] == sorted((r["score"] for r in results), reverse=True)
    page = html.read_text(encoding="utf-8")
    shown = [line.split('"')[0] for line in page.split('<img src="')[1:]]
    assert len(shown) == 4 and all((html.parent / src).is_file() for src in shown)  # thumbnails, linked relatively

    # image to image: an indexed image finds itself first
    folder_index = tmp_path / "photos.index"
    predict(["index", "--model", str(model_dir), "--source", str(photos), "--index", str(folder_index)])
    capsys.readouterr()
    predict(["search", "--index", str(folder_index), "--image", str(photos / "shape3.png"), "--top-k", "2"])
    rank, score, key = capsys.readouterr().out.splitlines()[0].split("\t")
    assert (rank, key) == ("1", "shape3.png") and float(score) == pytest.approx(1.0, abs=FP16_INDEX)
    missing = predict_error(["search", "--index", str(tmp_path / "nowhere"), "猫"], capsys)
    assert missing == (f"error: {tmp_path / 'nowhere'}: not an image index (no index.json); build one with "
                       "`recipes/predict.py index`")


@pytest.mark.slow
def test_the_search_page_in_a_real_browser(model_dir, photos, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    index_dir = tmp_path / "photos.index"
    predict(["index", "--model", str(model_dir), "--source", str(photos), "--index", str(index_dir)])
    server = subprocess.Popen([sys.executable, PREDICT, "serve", "--index", str(index_dir), "--port", "0"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    browser = None
    try:
        line = server.stdout.readline()
        assert line.startswith("search page: http://127.0.0.1:"), line + server.stderr.read()
        url = line.split()[2]
        browser = chromium_driver()
        browser.get(url)
        box = browser.find_element(By.NAME, "q")
        box.clear()
        box.send_keys("蓝色的正方形")
        browser.find_element(By.NAME, "k").clear()
        browser.find_element(By.NAME, "k").send_keys("5")
        browser.find_element(By.ID, "search").click()
        WebDriverWait(browser, 30).until(expected_conditions.presence_of_all_elements_located((By.CSS_SELECTOR, "figure.hit")))
        figures = browser.find_elements(By.CSS_SELECTOR, "figure.hit")
        shown = [(f.get_attribute("data-key"), float(f.find_element(By.CLASS_NAME, "score").text)) for f in figures]

        predictor = load_model(model_dir)
        expected = ImageIndex.open(index_dir).search(predictor.encode_texts("蓝色的正方形")[0], k=5)
        assert [key for key, _ in shown] == [hit.key for hit in expected]
        assert [score for _, score in shown] == pytest.approx([hit.score for hit in expected], abs=1e-4)  # 4 decimals shown
        images = "Array.from(document.querySelectorAll('figure.hit img'))"
        # the figures are in the page before their images have arrived: wait for the browser to finish each
        WebDriverWait(browser, 30).until(lambda b: b.execute_script(f"return {images}.every(i => i.complete)"))
        loaded = browser.execute_script(f"return {images}.map(i => i.naturalWidth > 0)")
        assert loaded == [True] * 5  # every image was served and decoded by the browser
        assert browser.find_element(By.NAME, "q").get_attribute("value") == "蓝色的正方形"

        # image to image: upload an indexed photo, it comes back first
        browser.find_element(By.NAME, "image").send_keys(str(photos / "more" / "shape7.png"))
        browser.find_element(By.ID, "search-image").click()
        WebDriverWait(browser, 30).until(lambda b: b.find_elements(By.CSS_SELECTOR, "figure.hit")
                                         and b.find_elements(By.CSS_SELECTOR, "figure.hit")[0].get_attribute("data-key")
                                         == "more/shape7.png")
        top = browser.find_elements(By.CSS_SELECTOR, "figure.hit")[0]
        assert float(top.find_element(By.CLASS_NAME, "score").text) == pytest.approx(1.0, abs=FP16_INDEX)
    finally:
        if browser is not None:
            browser.quit()
        server.terminate()
        server.wait(timeout=30)


def test_an_index_never_overlaps_its_source_and_a_rebuild_removes_only_what_index_wrote(model_dir, photos, tmp_path,
                                                                                        capsys):
    folder = tmp_path / "photos"
    shutil.copytree(photos, folder)
    (folder / "animated.gif").write_bytes(animated())  # every frame decoded once crashed the whole index
    (folder / "bomb.png").write_bytes(decompression_bomb())
    shutil.copy(folder / "shape0.png", folder / 'a "quoted" #1?.png')  # a name that is not a URL as it stands
    before = sorted(folder.rglob("*"))
    for index_dir in (folder, folder / "photos.index", tmp_path):  # is, lies inside, holds the source
        error = predict_error(["index", "--model", str(model_dir), "--source", str(folder), "--index", str(index_dir)],
                              capsys)
        assert error == (f"error: --index {index_dir} overlaps --source {folder}: give the index a directory of its "
                         "own, outside the source and not holding it")
    shards = write_shards(tmp_path / "shards", pairs=4, rows_per_shard=2, image_size=48)
    assert "overlaps --source" in predict_error(["index", "--model", str(model_dir), "--source", str(shards / "*.parquet"),
                                                 "--index", str(shards / "index")], capsys)
    assert sorted(folder.rglob("*")) == before

    index_dir = tmp_path / "mine"  # a directory of the user's that already holds a file
    index_dir.mkdir()
    (index_dir / "notes.txt").write_text("mine")
    argv = ["index", "--model", str(model_dir), "--source", str(folder), "--index", str(index_dir), "--num-workers", "0"]
    with peak_memory_growth() as grown:
        counts = predict(argv)
    assert (counts["added"], counts["images"]) == (10, 10)  # 9 shapes and the GIF's first frame
    assert [error.split(": ", 1)[1] for error in counts["unreadable"]] == [
        "decompression bomb: Image size (400000000 pixels) exceeds limit of 178956970 pixels, could be decompression "
        "bomb DOS attack."]
    assert grown["MiB"] < 400, grown  # the model, the index and the images' tensors; decoding the bomb takes 1146
    predict([*argv, "--rebuild"])
    assert (index_dir / "notes.txt").read_text() == "mine" and len(ImageIndex.open(index_dir).items) == 10
    page = tmp_path / "hits.html"
    predict(["search", "--index", str(index_dir), "--image", str(folder / "shape0.png"), "--top-k", "10", "--html", str(page)])
    links = [src.split('"')[0] for src in page.read_text(encoding="utf-8").split('<img src="')[1:]]
    assert not any(set(' "#?') & set(html.unescape(link)) for link in links)  # else '#1?.png' is a fragment
    assert {unquote(html.unescape(link)) for link in links} == {
        f"photos/{p.relative_to(folder).as_posix()}" for p in before if p.suffix in (".png", ".gif") and p.name != "bomb.png"}
    remove_index(index_dir)
    assert sorted(p.name for p in index_dir.rglob("*")) == ["notes.txt"]


def http(port: int, request: bytes, then_close: bool = False) -> tuple[int | None, bytes]:
    """(status, body) of one raw request; status None when the server dropped the connection unanswered.
    `then_close` ends the sending side, as a client does after a body the server reads to its end."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        try:
            connection.sendall(request)
            if then_close:
                connection.shutdown(socket.SHUT_WR)
        except OSError:  # the server answered and closed before taking it all
            pass
        response = b""
        try:
            while chunk := connection.recv(65536):
                response += chunk
        except ConnectionResetError:
            pass
    head, _, body = response.partition(b"\r\n\r\n")
    return (int(head.split()[1]) if head.startswith(b"HTTP/") else None), body


def test_the_search_server_answers_hostile_requests_with_4xx_and_bounded_memory(model_dir, photos, tmp_path):
    index_dir = tmp_path / "photos.index"
    predict(["index", "--model", str(model_dir), "--source", str(photos), "--index", str(index_dir)])
    predictor = load_model(model_dir)
    server = make_server(SearchService(ImageIndex.open(index_dir), predictor, idle_timeout=1.0), "127.0.0.1", 0)
    port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    get = lambda path, host=b"127.0.0.1": http(port, b"GET " + path + b" HTTP/1.0\r\nHost: " + host + b"\r\n\r\n")  # noqa: E731

    def post(length: bytes, body: bytes = b"", **kwargs) -> tuple[int | None, bytes]:
        head = b"POST /search HTTP/1.0\r\nContent-Type: multipart/form-data; boundary=B\r\n"
        return http(port, head + (b"Content-Length: " + length + b"\r\n" if length else b"") + b"\r\n" + body, **kwargs)

    def form(image: bytes, k: bytes = b"3") -> bytes:
        return (b'--B\r\nContent-Disposition: form-data; name="k"\r\n\r\n' + k + b'\r\n--B\r\nContent-Disposition: '
                b'form-data; name="image"; filename="x.png"\r\nContent-Type: image/png\r\n\r\n' + image + b"\r\n--B--\r\n")

    try:
        status, body = get("/api/search?q=红色的圆形&k=3".encode())
        assert status == 200 and all(r["image"].startswith("/image/") for r in json.loads(body)["results"])
        assert get(b"/image/0") == (200, (photos / ImageIndex.open(index_dir).items[0]["key"]).read_bytes())
        assert get(b"/image/0", b"localhost:1")[0] == 200 and get(b"/image/0", b"evil.example")[0] == 421  # DNS rebinding
        assert get(b"/image/0", b"[::1")[0] == 421
        assert get(b"/image/\xb2")[0] == 404  # '²' is a digit to str.isdigit, not to int()
        assert get(b"/image/" + b"9" * 5000)[0] == 404  # int() refuses over 4300 digits
        assert post(b"abc")[0] == 400 and post(b"")[0] == 411
        assert post(b"-1")[0] == 400  # answered at once: it once read the stream to its end, however long
        assert post(str(len(form(b"x", b"\xff\xfe"))).encode(), form(b"x", b"\xff\xfe"))[0] == 400  # k not UTF-8
        upload = form((photos / "shape3.png").read_bytes())
        status, body = post(str(len(upload)).encode(), upload)
        assert status == 200 and body.split(b'<figure class="hit" ')[1].startswith(b'data-key="shape3.png"')

        bomb, endless = form(decompression_bomb()), b"x" * (48 << 20)
        with peak_memory_growth() as grown:
            assert post(str(len(bomb)).encode(), bomb)[0] == 400
            post(b"-1", endless, then_close=True)
        assert grown["MiB"] < 64, grown  # the bomb decoded took 1146 MiB; the 48 MiB once read whole, 670 MB for 60

        with socket.create_connection(("127.0.0.1", port), timeout=10) as idle:
            assert idle.recv(1) == b""  # closed by the server after its 1 s idle timeout, not held forever
        with socket.create_connection(("127.0.0.1", port), timeout=10) as stalled:
            stalled.sendall(b"POST /search HTTP/1.0\r\nContent-Length: 100\r\n\r\nonly part of it")
            assert stalled.recv(4096).startswith(b"HTTP/1.0 408")

        # an index edited (or downloaded) to name files outside its folder gets none of them served
        [part] = (index_dir / "parts").glob("*.jsonl")
        items = [json.loads(line) for line in part.read_text().splitlines()]
        for item, key in zip(items, ["../../../../../../etc/passwd", "/proc/self/environ", "more/../../shape0.png"]):
            item.update(key=key, image=key)
        part.write_text("".join(json.dumps(item) + "\n" for item in items))
        meta = json.loads((index_dir / "index.json").read_text())
        (index_dir / "index.json").write_text(json.dumps({**meta, "folder": "/etc"}))
        server.RequestHandlerClass = _handler(SearchService(ImageIndex.open(index_dir), predictor))
        for n in range(len(items)):
            status, body = get(f"/image/{n}".encode())
            assert status in (403, 404) and b"root:" not in body and b"PATH=" not in body
    finally:
        server.shutdown()
        server.server_close()
