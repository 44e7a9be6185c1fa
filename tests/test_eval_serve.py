"""`gammaray serve` (real Ray Serve on the session's local Ray, real HTTP, real SeaweedFS): the vectors
it serves for catalogue records, texts, images and image URLs equal the ones `gammaray embed` wrote
for those records; /search finds the record; dynamic batching puts the items of a request in one
forward; bad input is answered with a 4xx and its reason while the replica goes on answering; an
index of another model is refused before anything is deployed."""

from __future__ import annotations

import base64
import functools
import http.server
import json
import socket
import threading
import urllib.error
import urllib.request

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.eval_support import make_checkpoint, read_catalogue

pytestmark = pytest.mark.eval

# The served vectors and embed's come from the same float32 weights and the same preprocessed inputs;
# only the batch composition (one forward over 48 records in embed's actor, over a request's items
# here) and the thread count differ, which reorders float32 sums: ~1e-7 per unit-norm component.
# 1e-5 is far above that and far below what any preprocessing difference moves (a different resize
# or token changes components by 1e-2 and more).
ATOL = 1e-5


def post(url: str, body: bytes | dict, timeout: float = 60.0) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def b64(data: bytes) -> dict:
    return {"base64": base64.b64encode(data).decode()}


def embedded_vectors(emb: str) -> dict[str, dict[str, np.ndarray]]:
    """product_id -> {"image": vector, "text": vector} as gammaray embed wrote them."""
    from pipelines import storage

    out = {}
    for f in storage.list_files(storage.join(emb, "embeddings"), ".parquet"):
        fs, path = storage.resolve(f)
        t = pq.read_table(path, filesystem=fs)
        cols = {c: np.asarray(t.column(f"{c}_embedding").to_pylist(), np.float32) for c in ("image", "text")}
        for i, pid in enumerate(t.column("product_id").to_pylist()):
            out[pid] = {c: cols[c][i] for c in cols}
    return out


def assert_same(served: list[float], expected: np.ndarray) -> None:
    v = np.asarray(served, np.float32)
    assert v.shape == expected.shape
    assert abs(float(np.linalg.norm(v)) - 1.0) < 1e-5  # L2-normalised
    np.testing.assert_allclose(v, expected, rtol=0, atol=ATOL)


@pytest.mark.timeout(300)
def test_serve_matches_embed_searches_batches_and_refuses_bad_input(embedded_catalogue, s3, small_catalogue, tmp_path,
                                                                    capsys):
    from ray import serve

    from gammaray.app.cli import main
    from gammaray.config import GammarayConfig, apply_overrides
    from pipelines import storage
    from pipelines.preprocess import record_text
    from workers.evaluation.index import build_index
    from workers.evaluation.serve import get_json, start_service

    emb, ckpt = embedded_catalogue["embeddings"], embedded_catalogue["checkpoint"]
    index = str(tmp_path / "index-image")
    build_index(emb, index, field_name="image")
    expected = embedded_vectors(emb)
    rows = read_catalogue(small_catalogue["val"])
    pick = [i for i, pid in enumerate(rows["product_id"]) if pid in expected][:10]
    assert len(pick) == 10
    images = tmp_path / "images"
    images.mkdir()
    (images / "local.img").write_bytes(rows["image"][pick[1]])
    s3_image = s3.url("serve-test", "query.img")
    storage.write_bytes(s3_image, rows["image"][pick[2]])
    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(
        http.server.SimpleHTTPRequestHandler, directory=str(images)))  # an image host for http:// URLs
    threading.Thread(target=web.serve_forever, daemon=True).start()
    web_url = f"http://127.0.0.1:{web.server_address[1]}"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = [f"serve.port={port}", "serve.cpus_per_replica=0.5", "serve.max_request_bytes=200000",
                f"serve.image_root={images}", "serve.max_batch_size=16", "serve.batch_wait_timeout_s=0.05"]
    try:
        args = ["serve", "--checkpoint", ckpt, "--index", index, "--detach"]
        assert main(args + [x for s in settings for x in ("--set", s)]) == 0
        out = capsys.readouterr().out
        url = f"http://127.0.0.1:{port}"
        assert f"POST {url}/embed" in out and f"POST {url}/search" in out and f"curl -s {url}/embed" in out

        # whole records (inline images) -> embed's vectors for them; texts and images alone -> one of each
        records = [{"product_id": rows["product_id"][i], "title": rows["title"][i],
                    "description": rows["description"][i], "category": rows["category"][i],
                    "image": b64(rows["image"][i])} for i in pick]
        texts = [record_text(rows["title"][i], rows["description"][i], rows["category"][i]) for i in pick[:3]]
        status, res = post(f"{url}/embed", {"records": records, "texts": texts,
                                            "images": [b64(rows["image"][pick[0]]), {"url": str(images / "local.img")},
                                                       {"url": s3_image}, {"url": f"{web_url}/local.img"}]})
        assert status == 200, res
        assert [r["product_id"] for r in res["records"]] == [rows["product_id"][i] for i in pick]
        for r in res["records"]:
            assert_same(r["image"], expected[r["product_id"]]["image"])
            assert_same(r["text"], expected[r["product_id"]]["text"])
        for v, i in zip(res["texts"], pick[:3]):  # a text is the text view of a record whose title it is
            assert_same(v, expected[rows["product_id"][i]]["text"])
        # inline, a local file under serve.image_root, an s3:// URL, an http:// URL
        assert len(res["images"]) == 4
        for v, i in zip(res["images"], pick[:3] + [pick[1]]):
            assert_same(v, expected[rows["product_id"][i]]["image"])
        status, health = get_json(f"{url}/health")
        batching = health["batching"]
        # 17 items in one request: batches of several items (max_batch_size=16), not one forward per item
        assert batching["items"] >= 17 and batching["batches"] < batching["items"] and batching["largest_batch"] >= 2

        # search: a record's text finds that record's image among the held-out catalogue
        i = pick[4]
        status, res = post(f"{url}/search", {"image": b64(rows["image"][i]), "k": 3})
        assert status == 200, res
        assert res["column"] == "image_embedding" and [h["rank"] for h in res["hits"]] == [1, 2, 3]
        assert res["hits"][0]["product_id"] == rows["product_id"][i] and res["hits"][0]["title"] == rows["title"][i]
        assert res["hits"][0]["score"] == pytest.approx(1.0, abs=1e-4)

        # bad input: 4xx with the reason, item named
        cases = [
            (b"{not json", 400, "malformed_json", "request body"),
            (b"[1, 2]", 400, "wrong_type", "request body"),
            ({"texts": ["boots"], "colour": "red"}, 400, "unknown_field", "request"),
            ({"records": [{"title": "boots", "price": 3}]}, 400, "unknown_field", "records[0]"),
            ({"records": [{"description": "no title"}]}, 400, "missing_field", "records[0].title"),
            ({"texts": ["boots", "   "]}, 400, "empty_text", "texts[1]"),
            ({"texts": [7]}, 400, "wrong_type", "texts[0]"),
            ({"images": [b64(b"not an image at all")]}, 400, "image_undecodable", "images[0]"),
            ({"images": [{"base64": "%%%"}]}, 400, "malformed_base64", "images[0].base64"),
            ({"images": [{"url": "/etc/hostname"}]}, 400, "image_path_outside_source", "images[0].url"),
            ({"images": [{"url": s3.url("serve-test", "missing.img")}]}, 400, "image_not_found", "images[0].url"),
            ({"records": [{"title": "boots", "image": {"url": f"{web_url}/missing.img"}}]}, 400, "image_not_found",
             "records[0].image.url"),
            ({}, 400, "missing_field", "request"),
            (b'{"texts": ["' + b"x" * 250_000 + b'"]}', 413, "request_too_large", "request body"),
            ({"texts": ["x"] * 300}, 413, "too_many_items", "request"),
        ]
        for body, code, reason, what in cases:
            status, res = post(f"{url}/embed", body)
            assert (status, res["error"]["reason"], res["error"]["what"]) == (code, reason, what), (body, res)
        status, res = post(f"{url}/search", {"text": "boots", "k": 0})
        assert (status, res["error"]["reason"]) == (400, "wrong_type")
        status, res = post(f"{url}/nowhere", {"texts": ["boots"]})
        assert (status, res["error"]["reason"]) == (404, "unknown_route")

        # a bad request batched with good ones fails alone; the replica answers the next request
        results: dict[int, tuple[int, dict]] = {}

        def send(k: int) -> None:
            body = {"images": [b64(b"broken")]} if k == 0 else {"texts": [texts[k % 3]]}
            results[k] = post(f"{url}/embed", body)

        threads = [threading.Thread(target=send, args=(k,)) for k in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results[0][0] == 400
        for k in range(1, 6):
            assert results[k][0] == 200
            assert_same(results[k][1]["texts"][0], expected[rows["product_id"][pick[k % 3]]]["text"])
        status, health = get_json(f"{url}/health")
        assert status == 200 and health["batching"]["refused"] == len(cases) + 3

        # an index of another model: refused before anything is deployed
        other, _ = make_checkpoint(str(tmp_path), small_catalogue, seed=1, name="other")
        cfg = apply_overrides(GammarayConfig(), {"serve.port": port, "serve.name": "other"})
        with pytest.raises(ValueError, match="was built from embeddings of model"):
            start_service(other, index, cfg)
    finally:
        serve.shutdown()
        web.shutdown()
