"""`gammaray prepare` against the real S3 server (SeaweedFS): every raw format and image reference,
every bad input with its own reason, input = written + quarantined, idempotent, append-safe."""

from __future__ import annotations

import io
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gammaray.schema import Reason
from pipelines import faults, storage
from pipelines.prepare import PrepareOptions, load_manifest, prepare, read_quarantine
from pipelines.synthetic import describe_product, encode_jpeg, render_image, sample_products

pytestmark = pytest.mark.ingest

OPTS = dict(progress=False, max_records_per_shard=16, row_group_size=8)


def _products(n: int, seed: int = 5, prefix: str = "ING"):
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    for p in sample_products(n, seed, id_prefix=prefix):
        title, desc = describe_product(p, rng)
        out.append({"product_id": p.product_id, "title": title, "description": desc, "category": p.category,
                    "locale": "en_US", "attributes": p.attributes,
                    "jpeg": encode_jpeg(render_image(p, rng, 40))})
    return out


def _table(uri: str) -> list[dict]:
    m = load_manifest(uri)
    rows = []
    for s in m["shards"]:
        rows += pq.read_table(pa.BufferReader(storage.read_bytes(storage.join(uri, s["path"])))).to_pylist()
    return sorted(rows, key=lambda r: r["sample_index"])


# --------------------------------------------------------------------------------------------
# every format, every way to reference an image


def test_every_format_and_image_reference_gives_the_same_records(s3, tmp_path):
    prods = _products(12)
    base = s3.url("ingest", "formats")
    # images in S3 (relative to the source file, and as absolute s3:// URIs), in memory://, inline bytes
    for p in prods:
        storage.write_bytes(f"{base}/raw/img/{p['product_id']}.jpg", p["jpeg"])
        storage.write_bytes(f"memory://ingest-formats/img/{p['product_id']}.jpg", p["jpeg"])

    def rec(p, image):
        return {k: v for k, v in p.items() if k != "jpeg"} | {"image": image}

    lines = [json.dumps(rec(p, f"img/{p['product_id']}.jpg" if i % 2 else f"{base}/raw/img/{p['product_id']}.jpg"))
             for i, p in enumerate(prods)]
    storage.write_bytes(f"{base}/raw/catalog.jsonl", ("\n".join(lines) + "\n").encode())
    storage.write_bytes("memory://ingest-formats/catalog.jsonl",
                        "\n".join(json.dumps(rec(p, f"img/{p['product_id']}.jpg")) for p in prods).encode())
    # CSV with space-padded headers and its own column names, mapped
    csv_lines = ["sku       ,name                 ,text ,cat  ,picture  ,locale,attributes"]
    for p in prods:
        attrs = json.dumps(p["attributes"]).replace('"', '""')
        csv_lines.append(f'{p["product_id"]},"{p["title"]}","{p["description"]}",{p["category"]},'
                         f'{base}/raw/img/{p["product_id"]}.jpg,en_US,"{attrs}"')
    storage.write_bytes(f"{base}/raw-csv/catalog.csv", ("\n".join(csv_lines) + "\n").encode())
    csv_map = {"product_id": "sku", "title": "name", "description": "text", "category": "cat", "image": "picture"}
    # Parquet with inline image bytes and other column names, mapped
    t = pa.table({"id": [p["product_id"] for p in prods], "name": [p["title"] for p in prods],
                  "description": [p["description"] for p in prods], "category": [p["category"] for p in prods],
                  "img": [p["jpeg"] for p in prods], "locale": ["en_US"] * 12,
                  "attributes": [list(p["attributes"].items()) for p in prods]},
                 schema=pa.schema([("id", pa.string()), ("name", pa.string()), ("description", pa.string()),
                                   ("category", pa.string()), ("img", pa.binary()), ("locale", pa.string()),
                                   ("attributes", pa.map_(pa.string(), pa.string()))]))
    buf = io.BytesIO()
    pq.write_table(t, buf, row_group_size=5)
    storage.write_bytes(f"{base}/raw-parquet/part-0.parquet", buf.getvalue())
    pq_map = {"product_id": "id", "title": "name", "image": "img"}
    # WebDataset shards in img2dataset's layout: key.jpg / key.txt / key.json, two shards
    for shard in range(2):
        tb = io.BytesIO()
        with tarfile.open(fileobj=tb, mode="w") as tar:
            for i, p in enumerate(prods[shard * 6:(shard + 1) * 6]):
                key = f"{shard:05d}{i:04d}"
                meta = {"product_id": p["product_id"], "url": f"https://shop.example/{p['product_id']}.jpg",
                        "key": key, "status": "success", "description": p["description"],
                        "category": p["category"], "locale": "en_US", "attributes": p["attributes"]}
                for ext, data in (("jpg", p["jpeg"]), ("txt", p["title"].encode()), ("json", json.dumps(meta).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        storage.write_bytes(f"{base}/raw-wds/{shard:05d}.tar", tb.getvalue())

    sources = {
        "jsonl-s3": (f"{base}/raw/catalog.jsonl", {}),
        "jsonl-memory": ("memory://ingest-formats/catalog.jsonl", {}),
        "csv-s3-mapped": (f"{base}/raw-csv", csv_map),
        "parquet-bytes-mapped": (f"{base}/raw-parquet", pq_map),
        "webdataset": (f"{base}/raw-wds", {}),
    }
    results = {}
    for name, (src, cmap) in sources.items():
        res = prepare(src, f"{base}/out/{name}", PrepareOptions(column_map=cmap, **OPTS))
        assert (res.num_input, res.num_written, res.num_quarantined) == (12, 12, 0), (name, res.summary())
        results[name] = _table(f"{base}/out/{name}")
    want = [(p["product_id"], p["title"], p["jpeg"], p["category"], sorted(p["attributes"].items())) for p in prods]
    for name, rows in results.items():
        got = [(r["product_id"], r["title"], r["image"], r["category"], r["attributes"]) for r in rows]
        assert got == want, name
        assert [r["sample_index"] for r in rows] == list(range(12)), name
    m = load_manifest(f"{base}/out/jsonl-s3")
    assert m["schema_version"] == 2 and m["num_records"] == 12 and m["locales"] == ["en_US"]
    assert [s["row_groups"] for s in m["shards"]] == [[8, 4]]


# --------------------------------------------------------------------------------------------
# every bad input, each with its own reason, nothing lost


def _bad_source(s3, prefix: str, n_good: int = 20) -> tuple[str, dict[str, int], int]:
    """A raw catalogue in S3 with every bad input of the issue; returns (src, reasons, n_good)."""
    base = s3.url("ingest", prefix, "raw")
    prods = _products(n_good, seed=11, prefix=prefix.upper())
    lines: list[bytes] = []
    for p in prods:
        storage.write_bytes(f"{base}/img/{p['product_id']}.jpg", p["jpeg"])
        lines.append(json.dumps({k: v for k, v in p.items() if k != "jpeg"} | {"image": f"img/{p['product_id']}.jpg"}).encode())
    template = {k: v for k, v in prods[0].items() if k != "jpeg"}

    def bad(pid: str, image: str | None = None, **change) -> bytes:
        return json.dumps(template | {"product_id": pid, "image": image or f"img/{prods[0]['product_id']}.jpg"} | change).encode()

    for name, data in (("garbage", faults.undecodable_bytes()), ("truncated", faults.truncated_jpeg()),
                       ("bomb", faults.decompression_bomb()), ("zero", b"")):
        storage.write_bytes(f"{base}/img/{name}.jpg", data)
    lines += [
        bad("B-undecodable", "img/garbage.jpg"),
        bad("B-truncated", "img/truncated.jpg"),
        bad("B-bomb", "img/bomb.jpg"),
        bad("B-zero", "img/zero.jpg"),
        bad("B-wrongtype", title=12345),
        bad("B-nulltitle", title=None),
        bad("B-emptytitle", title="   "),
        bad(prods[0]["product_id"]),                               # duplicate product_id
        bad("B-nouri", s3.url("ingest", prefix, "raw", "img", "does-not-exist.jpg")),
        faults.non_utf8_line(template | {"product_id": "B-latin1", "image": f"img/{prods[0]['product_id']}.jpg"}),
        bad("B-oversized", description="word " * 2000),
    ]
    storage.write_bytes(f"{base}/a-records.jsonl", b"\n".join(lines) + b"\n")
    # a Parquet file without the (required) title column
    t = pa.table({"product_id": ["M-1", "M-2", "M-3"], "image": [prods[1]["jpeg"]] * 3})
    buf = io.BytesIO()
    pq.write_table(t, buf)
    storage.write_bytes(f"{base}/b-missing-title.parquet", buf.getvalue())
    # a Parquet file with one damaged row group (footer intact: 4 records known lost) and a good one
    t = pa.table({"product_id": [f"D-{i}" for i in range(8)], "title": [f"damaged shard item {i}" for i in range(8)],
                  "image": [prods[2]["jpeg"]] * 8})
    buf = io.BytesIO()
    pq.write_table(t, buf, row_group_size=4)
    storage.write_bytes(f"{base}/c-damaged.parquet", faults.corrupt_row_group(buf.getvalue(), 0))
    reasons = {Reason.IMAGE_UNDECODABLE: 1, Reason.IMAGE_TRUNCATED: 1, Reason.IMAGE_TOO_LARGE: 1,
               Reason.IMAGE_EMPTY: 1, Reason.WRONG_TYPE: 1, Reason.EMPTY_TEXT: 2, Reason.DUPLICATE_ID: 1,
               Reason.IMAGE_NOT_FOUND: 1, Reason.NON_UTF8_TEXT: 1, Reason.OVERSIZED_TEXT: 1,
               Reason.MISSING_COLUMN: 3, Reason.UNREADABLE_SHARD: 4}
    return base, reasons, n_good + 4


def test_every_bad_input_is_quarantined_with_its_own_reason(s3):
    src, reasons, n_good = _bad_source(s3, "bad")
    dst = s3.url("ingest", "bad", "catalog")
    res = prepare(src, dst, PrepareOptions(max_text_chars=4000, **OPTS))
    assert res.quarantine_by_reason == reasons, res.summary()
    assert res.num_written == n_good
    assert res.num_input == res.num_written + res.num_quarantined == n_good + sum(reasons.values())
    q = read_quarantine(dst).to_pylist()
    assert len(q) == res.num_quarantined
    by_id = {r["product_id"]: r for r in q}
    assert by_id["B-bomb"]["reason"] == Reason.IMAGE_TOO_LARGE
    assert by_id["B-nouri"]["reason"] == Reason.IMAGE_NOT_FOUND and "does-not-exist" in by_id["B-nouri"]["detail"]
    assert by_id["B-latin1"]["reason"] == Reason.NON_UTF8_TEXT
    assert all(r["source"].startswith("s3://") and r["stage"] == "prepare" for r in q)
    damaged = [r for r in q if r["reason"] == Reason.UNREADABLE_SHARD]
    assert sorted(r["row"] for r in damaged) == [0, 1, 2, 3] and "row group 0" in damaged[0]["detail"]
    m = load_manifest(dst)
    assert m["quarantine"]["by_reason"] == reasons and m["num_records"] == n_good
    # the good half of the damaged file made it
    assert {r["product_id"] for r in _table(dst)} >= {"D-4", "D-5", "D-6", "D-7"}


def test_a_file_that_is_not_parquet_at_all_is_one_quarantined_entry(s3):
    base = s3.url("ingest", "garbage")
    storage.write_bytes(f"{base}/raw/x.parquet", faults.garbage_parquet())
    res = prepare(f"{base}/raw", f"{base}/catalog", PrepareOptions(**OPTS))
    assert (res.num_input, res.num_written, res.quarantine_by_reason) == (1, 0, {Reason.UNREADABLE_SHARD: 1})
    assert read_quarantine(f"{base}/catalog").to_pylist()[0]["row"] == -1


# --------------------------------------------------------------------------------------------
# idempotent, append-safe, shard sizes


def _write_jsonl(uri: str, prods: list[dict]) -> None:
    for p in prods:
        storage.write_bytes(storage.join(storage.parent(uri), "img", f"{p['product_id']}.jpg"), p["jpeg"])
    storage.write_bytes(uri, "\n".join(json.dumps({k: v for k, v in p.items() if k != "jpeg"}
                                                  | {"image": f"img/{p['product_id']}.jpg"}) for p in prods).encode())


def _shard_bytes(uri: str) -> dict[str, bytes]:
    return {s["path"]: storage.read_bytes(storage.join(uri, s["path"])) for s in load_manifest(uri)["shards"]}


def test_prepare_is_idempotent_and_append_safe(s3):
    base = s3.url("ingest", "append")
    prods = _products(40, seed=2)
    _write_jsonl(f"{base}/v1/catalog.jsonl", prods[:30])
    dst = f"{base}/catalog"
    first = prepare(f"{base}/v1/catalog.jsonl", dst, PrepareOptions(**OPTS))
    assert first.num_written == 30 and len(first.shards_written) == 2
    shards_1 = _shard_bytes(dst)
    manifest_1 = storage.read_bytes(f"{dst}/manifest.json")

    again = prepare(f"{base}/v1/catalog.jsonl", dst, PrepareOptions(**OPTS))
    assert (again.num_written, again.num_already_present, again.shards_written) == (0, 30, [])
    assert storage.read_bytes(f"{dst}/manifest.json") == manifest_1
    assert _shard_bytes(dst) == shards_1

    # the same source into an empty destination: byte-identical shards
    fresh = prepare(f"{base}/v1/catalog.jsonl", f"{base}/catalog-fresh", PrepareOptions(**OPTS))
    assert _shard_bytes(f"{base}/catalog-fresh") == shards_1
    assert [s["sha256"] for s in fresh.manifest["shards"]] == [s["sha256"] for s in first.manifest["shards"]]

    # append: the source grew (old records + 10 new, shuffled in); old indices never move
    grown = prods[35:] + prods[:30] + prods[30:35]
    _write_jsonl(f"{base}/v2/catalog.jsonl", grown)
    more = prepare(f"{base}/v2/catalog.jsonl", dst, PrepareOptions(**OPTS))
    assert (more.num_written, more.num_already_present) == (10, 30)
    after = _shard_bytes(dst)
    assert {k: after[k] for k in shards_1} == shards_1  # old shards untouched
    rows = _table(dst)
    index = {r["product_id"]: r["sample_index"] for r in rows}
    assert [index[p["product_id"]] for p in prods[:30]] == list(range(30))
    assert sorted(index[p["product_id"]] for p in prods[30:]) == list(range(30, 40))
    assert [index[p["product_id"]] for p in prods[35:]] == list(range(30, 35))  # in source order
    m = load_manifest(dst)
    assert m["num_records"] == 40 and m["next_sample_index"] == 40 and len(m["sources"]) == 2


def test_shards_are_cut_at_the_target_size(s3):
    base = s3.url("ingest", "sizes")
    prods = _products(30, seed=3)
    _write_jsonl(f"{base}/raw/c.jsonl", prods)
    per_record = sum(len(p["jpeg"]) for p in prods) / len(prods)
    target = int(per_record * 7)
    res = prepare(f"{base}/raw/c.jsonl", f"{base}/catalog",
                  PrepareOptions(progress=False, target_shard_bytes=target, max_records_per_shard=1000, row_group_size=4))
    sizes = [s["num_rows"] for s in res.manifest["shards"]]
    assert sum(sizes) == 30 and len(sizes) >= 4
    assert all(5 <= n <= 9 for n in sizes[:-1]), sizes


def test_prepare_command_with_column_map_progress_and_summary(s3, tmp_path, capsys):
    from gammaray.app.cli import main

    prods = _products(6, seed=4)
    src = tmp_path / "raw"
    (src / "pics").mkdir(parents=True)
    with open(src / "items.jsonl", "w") as f:
        for p in prods:
            (src / "pics" / f"{p['product_id']}.jpg").write_bytes(p["jpeg"])
            f.write(json.dumps({"sku": p["product_id"], "name": p["title"], "pic": f"pics/{p['product_id']}.jpg"}) + "\n")
        f.write(json.dumps({"sku": "X", "name": "", "pic": f"pics/{prods[0]['product_id']}.jpg"}) + "\n")
    out = tmp_path / "counts.json"
    dst = s3.url("ingest", "cli", "catalog")
    rc = main(["prepare", f"file://{src}", dst, "--map", "product_id=sku", "--map", "title=name",
               "--map", "image=pic", "--json", str(out), "--shard-size", "1MB", "--build-tokenizer", "200"])
    assert rc == 0
    text = capsys.readouterr()
    assert "input records      7" in text.out and "empty_text" in text.out and "tokenizer ->" in text.out
    assert "prepare" in text.err  # the progress bar
    counts = json.loads(out.read_text())
    assert counts["num_input"] == counts["num_written"] + counts["num_quarantined"] == 7
    assert storage.exists(s3.url("ingest", "cli", "tokenizer", "tokenizer_config.json"))
    # a column map naming an unknown field is a clear error
    assert main(["prepare", str(src), dst, "--map", "titel=name"]) == 1
    assert "unknown record field(s) ['titel']" in capsys.readouterr().err
