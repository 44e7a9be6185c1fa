"""`gammaray serve`: a checkpoint's encoder as an HTTP JSON service on Ray Serve.

    POST /embed    {"texts": [...], "images": [...], "records": [...]}  ->  L2-normalised vectors
    POST /search   {"text": ..., "image": ..., "k": 10}                  ->  the index's top products
    GET  /health   the model, its embedding outputs and the batching counters of the replica

Every replica loads the model once (workers/evaluation/query.py: the preprocessing of training in
evaluation mode), so a record's served vectors are the ones `gammaray embed` writes for it. The items
of all requests a replica holds (each text, image and record is one item) are embedded together by
Ray Serve's dynamic batching (`@serve.batch`, serve.max_batch_size / serve.batch_wait_timeout_s); a
bad item comes back from the batch as its own QueryError, so it fails its request only.

Bad input is answered with a 4xx and `{"error": {"status", "reason", "what", "detail"}}`, never by
a replica that dies: malformed JSON, a field the route does not know, a wrong type, an empty text, an
image that is not valid base64 or does not decode, an unreachable image URL (400), a request over
serve.max_request_bytes or serve.max_items (413), a route that does not exist (404). Image URLs are
read through pipelines/image_refs.py: http(s):// and s3:// always, local paths only under
serve.image_root, at most the checkpoint's data.max_image_bytes each.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import os
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from typing import Any

from ray import serve

from gammaray.config import GammarayConfig, ServeConfig
from gammaray.schema import Invalid, Reason
from pipelines import storage
from pipelines.storage import Store
from pipelines.image_refs import ImagePolicy, StorageFault, load_image
from workers.evaluation.query import Item, QueryEncoder, QueryError, mean_direction

EMBED_FIELDS = ("texts", "images", "records")
RECORD_FIELDS = ("product_id", "title", "description", "category", "image")
IMAGE_FIELDS = ("base64", "url")
SEARCH_FIELDS = ("text", "image", "k")


class RequestError(QueryError):
    """A request the service refuses, with its HTTP status (4xx)."""

    def __init__(self, status: int, what: str, reason: str, detail: str):
        super().__init__(what, reason, detail)
        self.status = status


def _bad(what: str, reason: str, detail: str, status: int = 400) -> RequestError:
    return RequestError(status, what, reason, detail)


def error_body(err: QueryError, status: int) -> dict:
    return {"error": {"status": status, "reason": err.reason, "what": err.what, "detail": err.detail,
                      "message": str(err)}}


# --------------------------------------------------------------------------------------------
# request parsing (pure functions: no model, no I/O)


def parse_json(body: bytes) -> dict:
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise _bad("request body", "malformed_json", f"not JSON: {err}") from None
    except RecursionError:
        raise _bad("request body", Reason.NESTING_TOO_DEEP, "JSON nested too deeply") from None
    if not isinstance(data, dict):
        raise _bad("request body", Reason.WRONG_TYPE, f"a JSON object is expected, got {type(data).__name__}")
    return data


def _known(obj: dict, allowed: tuple[str, ...], what: str) -> None:
    unknown = sorted(set(obj) - set(allowed))
    if unknown:
        raise _bad(what, "unknown_field", f"unknown field(s) {unknown}; known: {list(allowed)}")


def _optional_str(obj: dict, key: str, what: str) -> str | None:
    v = obj.get(key)
    if v is not None and not isinstance(v, str):
        raise _bad(f"{what}.{key}", Reason.WRONG_TYPE, f"a string is expected, got {type(v).__name__}")
    return v


def _list(data: dict, key: str) -> list:
    v = data.get(key, [])
    if not isinstance(v, list):
        raise _bad(key, Reason.WRONG_TYPE, f"a JSON list is expected, got {type(v).__name__}")
    return v


@dataclass(frozen=True)
class ImageRef:
    """An image of a request: inline base64 bytes or a URL to read."""

    what: str
    data: bytes | None = None
    url: str | None = None


def parse_image(v: Any, what: str, max_bytes: int) -> ImageRef:
    if not isinstance(v, dict):
        raise _bad(what, Reason.WRONG_TYPE, f'an object {{"base64": ...}} or {{"url": ...}} is expected, got '
                                            f"{type(v).__name__}")
    _known(v, IMAGE_FIELDS, what)
    if len(v) != 1:
        raise _bad(what, Reason.MISSING_FIELD, 'exactly one of "base64" and "url" is expected')
    (key, value), = v.items()
    if not isinstance(value, str):
        raise _bad(f"{what}.{key}", Reason.WRONG_TYPE, f"a string is expected, got {type(value).__name__}")
    if key == "url":
        return ImageRef(what, url=value)
    if len(value) > 4 * (max_bytes // 3 + 1):  # before decoding: no buffer for what will be refused
        raise _bad(what, Reason.IMAGE_TOO_LARGE, f"more than {max_bytes} bytes of image")
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as err:
        raise _bad(f"{what}.base64", "malformed_base64", str(err)) from None
    if len(data) > max_bytes:
        raise _bad(what, Reason.IMAGE_TOO_LARGE, f"{len(data)} bytes > data.max_image_bytes {max_bytes}")
    return ImageRef(what, data=data)


@dataclass
class EmbedRequest:
    texts: list[Item]
    images: list[tuple[Item, ImageRef]]
    records: list[tuple[Item, ImageRef | None, str | None]]  # item, its image, product_id

    @property
    def size(self) -> int:
        return len(self.texts) + len(self.images) + len(self.records)


def parse_embed(data: dict, cfg: ServeConfig, max_image_bytes: int) -> EmbedRequest:
    _known(data, EMBED_FIELDS, "request")
    texts, images, records = (_list(data, k) for k in EMBED_FIELDS)
    n = len(texts) + len(images) + len(records)
    if n == 0:
        raise _bad("request", Reason.MISSING_FIELD, 'nothing to embed: give "texts", "images" and/or "records"')
    if n > cfg.max_items:
        raise _bad("request", "too_many_items", f"{n} items > serve.max_items {cfg.max_items}", status=413)
    out = EmbedRequest([], [], [])
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise _bad(f"texts[{i}]", Reason.WRONG_TYPE, f"a string is expected, got {type(t).__name__}")
        out.texts.append(Item("text", title=t, what=f"texts[{i}]"))
    for i, v in enumerate(images):
        ref = parse_image(v, f"images[{i}]", max_image_bytes)
        out.images.append((Item("image", what=ref.what), ref))
    for i, r in enumerate(records):
        what = f"records[{i}]"
        if not isinstance(r, dict):
            raise _bad(what, Reason.WRONG_TYPE, f"a record object is expected, got {type(r).__name__}")
        _known(r, RECORD_FIELDS, what)
        if r.get("title") is None:
            raise _bad(f"{what}.title", Reason.MISSING_FIELD, "a record needs a title")
        fields = {k: _optional_str(r, k, what) for k in ("product_id", "title", "description", "category")}
        ref = parse_image(r["image"], f"{what}.image", max_image_bytes) if r.get("image") is not None else None
        item = Item("record", title=fields["title"], description=fields["description"], category=fields["category"],
                    what=what)
        out.records.append((item, ref, fields["product_id"]))
    return out


@dataclass
class SearchRequest:
    text: Item | None
    image: tuple[Item, ImageRef] | None
    k: int


def parse_search(data: dict, cfg: ServeConfig, max_image_bytes: int) -> SearchRequest:
    _known(data, SEARCH_FIELDS, "request")
    text = _optional_str(data, "text", "request")
    image = parse_image(data["image"], "image", max_image_bytes) if data.get("image") is not None else None
    if text is None and image is None:
        raise _bad("request", Reason.MISSING_FIELD, 'a search needs "text", "image" or both')
    k = data.get("k", 10)
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= cfg.max_k:
        raise _bad("k", Reason.WRONG_TYPE, f"an integer in [1, serve.max_k={cfg.max_k}] is expected, got {k!r}")
    return SearchRequest(text=Item("text", title=text, what="text") if text is not None else None,
                         image=(Item("image", what="image"), image) if image is not None else None, k=k)


async def read_body(request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it is known to pass `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _bad("request body", "request_too_large", f"{declared} bytes > serve.max_request_bytes {limit}", 413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _bad("request body", "request_too_large", f"more than serve.max_request_bytes {limit} bytes", 413)
        chunks.append(chunk)
    return b"".join(chunks)


# --------------------------------------------------------------------------------------------
# the deployment


@serve.deployment(name="encoder")
class EncoderService:
    """One replica: the model, the optional index, and the batch queue of its items."""

    def __init__(self, checkpoint: str, index: str | None, store: Store, serve_cfg: dict):
        import torch

        from workers.evaluation.embed import probe_outputs

        self.cfg = ServeConfig.model_validate(serve_cfg)
        self.store = store
        use_cuda = self.cfg.gpus_per_replica > 0 and torch.cuda.is_available()
        self.encoder = QueryEncoder(checkpoint, store, "cuda" if use_cuda else "cpu")
        self.checkpoint = checkpoint
        self.index = None
        if index:
            from workers.evaluation.index import OpenIndex

            self.index = OpenIndex(index, store)
            self.index.check_model(self.encoder.fingerprint, f"({checkpoint})")
        names, dims = probe_outputs(self.encoder.model, self.encoder.cfg, self.encoder.device)
        self.outputs = {n: dims[n] for n in names}
        self.max_image_bytes = self.encoder.cfg.data.max_image_bytes
        root = self.cfg.image_root
        root = os.path.realpath(root[len("file://"):] if root and root.startswith("file://") else root) if root else None
        self.policy = ImagePolicy(root=root, max_bytes=self.max_image_bytes)
        self.embed_item.set_max_batch_size(self.cfg.max_batch_size)
        self.embed_item.set_batch_wait_timeout_s(self.cfg.batch_wait_timeout_s)
        self.stats = {"requests": 0, "refused": 0, "batches": 0, "items": 0, "largest_batch": 0}

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def embed_item(self, items: list[Item]) -> list[dict | QueryError]:
        """[dynamic batching] the items of every waiting request in one forward; a rejected item is
        returned as its QueryError (raised here it would fail the whole batch's requests)."""
        self.stats["batches"] += 1
        self.stats["items"] += len(items)
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(items))
        # in a thread: the replica keeps accepting requests (and queueing the next batch) meanwhile
        return await asyncio.to_thread(self.encoder.encode_items, items)

    async def _embed(self, items: list[Item]) -> list[dict]:
        results = await asyncio.gather(*(self.embed_item(it) for it in items))
        for r in results:
            if isinstance(r, QueryError):
                raise r
        return results

    def _image_bytes(self, ref: ImageRef) -> bytes:
        if ref.data is not None:
            return ref.data
        url = ref.url.strip()
        if storage.protocol(url) == "file" and self.policy.root is None:
            raise _bad(ref.what, Reason.IMAGE_OUTSIDE_SOURCE, "the service reads no local files (serve.image_root is "
                                                              "not set): send the image inline or as an http(s)/s3 URL")
        try:
            # relative paths resolve against serve.image_root; without it only absolute URLs get here
            source = os.path.join(self.policy.root, "request") if self.policy.root else url
            return load_image(url, source, self.policy, self.store)
        except Invalid as bad:
            detail = bad.detail
            if bad.reason == Reason.IMAGE_OUTSIDE_SOURCE:
                detail = f"{url[:300]} is outside serve.image_root ({self.policy.root})"
            raise _bad(f"{ref.what}.url", bad.reason, detail) from None
        except StorageFault as err:  # the store failed, not the request: worth a retry later
            raise _bad(f"{ref.what}.url", "storage_unavailable", str(err)[:500], 503) from None

    async def _with_images(self, pairs: list[tuple[Item, ImageRef | None]]) -> list[Item]:
        out = []
        for item, ref in pairs:
            if ref is not None:
                data = await asyncio.to_thread(self._image_bytes, ref)
                item = Item(item.kind, item.title, item.description, item.category, data, item.what)
            out.append(item)
        return out

    async def embed(self, req: EmbedRequest) -> dict:
        images = await self._with_images(req.images)
        records = await self._with_images([(item, ref) for item, ref, _ in req.records])
        results = await self._embed(req.texts + images + records)
        t, i = len(req.texts), len(images)
        out: dict[str, Any] = {"model": self.encoder.fingerprint}
        if req.texts:
            out["texts"] = [r["text"].tolist() for r in results[:t]]
        if images:
            out["images"] = [r["image"].tolist() for r in results[t:t + i]]
        if records:
            out["records"] = [{"product_id": pid, **{k: v.tolist() for k, v in r.items()}}
                              for (_, _, pid), r in zip(req.records, results[t + i:])]
        return out

    async def search(self, req: SearchRequest) -> dict:
        if self.index is None:
            raise _bad("/search", "no_index", "the service was started without an index (gammaray serve --index URI)",
                       404)
        items = ([req.text] if req.text else []) + (await self._with_images([req.image]) if req.image else [])
        results = await self._embed(items)
        vector = mean_direction([r["text"] if it.kind == "text" else r["image"] for it, r in zip(items, results)])
        hits = await asyncio.to_thread(self.index.search, vector, req.k)
        return {"index": self.index.uri, "column": self.index.meta["column"], "model": self.encoder.fingerprint,
                "hits": [asdict(h) for h in hits[0]]}

    def health(self) -> dict:
        return {"status": "ok", "model": self.encoder.fingerprint, "checkpoint": self.checkpoint,
                "outputs": self.outputs, "index": self.index.uri if self.index else None,
                "device": str(self.encoder.device), "batching": dict(self.stats),
                "max_batch_size": self.cfg.max_batch_size, "batch_wait_timeout_s": self.cfg.batch_wait_timeout_s}

    async def __call__(self, request):
        from starlette.responses import JSONResponse

        from pipelines.storage import is_storage_fault

        path = "/" + request.url.path.strip("/")
        try:
            if path == "/health":
                return JSONResponse(self.health())
            if path not in ("/embed", "/search"):
                raise _bad(path, "unknown_route", "routes: POST /embed, POST /search, GET /health", 404)
            if request.method != "POST":
                raise _bad(path, "method_not_allowed", f"{request.method}: {path} takes POST with a JSON body", 405)
            self.stats["requests"] += 1
            data = parse_json(await read_body(request, self.cfg.max_request_bytes))
            if path == "/embed":
                return JSONResponse(await self.embed(parse_embed(data, self.cfg, self.max_image_bytes)))
            return JSONResponse(await self.search(parse_search(data, self.cfg, self.max_image_bytes)))
        except RequestError as err:
            self.stats["refused"] += 1
            return JSONResponse(error_body(err, err.status), status_code=err.status)
        except QueryError as err:  # an item the preprocessing rejects
            self.stats["refused"] += 1
            return JSONResponse(error_body(err, 400), status_code=400)
        except Exception as err:  # noqa: BLE001 - answered, never a dead replica
            if is_storage_fault(err):  # our own storage failing is not the request's fault
                return JSONResponse(error_body(QueryError("storage", "storage_unavailable", str(err)[:500]), 503),
                                    status_code=503)
            raise


# --------------------------------------------------------------------------------------------
# starting and stopping (the driver)


@dataclass
class Service:
    url: str
    name: str
    checkpoint: str
    index: str | None
    model: str
    replicas: int
    outputs: dict

    def summary(self) -> str:
        lines = [f"serving {self.checkpoint} (model {self.model}; outputs "
                 f"{', '.join(f'{k} {v}-d' for k, v in self.outputs.items())}) on {self.replicas} replica(s)",
                 f"  POST {self.url}/embed    texts, images (base64 or URL), records -> L2-normalised vectors"]
        if self.index:
            lines.append(f"  POST {self.url}/search   text and/or image -> top products of {self.index}")
        lines += [f"  GET  {self.url}/health",
                  "example:",
                  f"  curl -s {self.url}/embed -H 'content-type: application/json' "
                  "-d '{\"texts\": [\"red leather boots\"]}'"]
        if self.index:
            lines.append(f"  curl -s {self.url}/search -H 'content-type: application/json' "
                         "-d '{\"text\": \"red leather boots\", \"k\": 3}'")
        return "\n".join(lines)


def get_json(url: str, timeout: float = 5.0) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def start_service(checkpoint: str, index: str | None = None, cfg: GammarayConfig | None = None,
                  ready_timeout_s: float = 300.0) -> Service:
    """Deploy the service on the configured Ray cluster (a local one if none) and return once it answers.
    A checkpoint that does not open or an index of another model fails here, before anything is deployed."""
    from workers.evaluation.embed import model_fingerprint
    from workers.evaluation.export import open_checkpoint
    from workers.evaluation.index import check_index_model, read_index_meta
    from workers.cluster import ensure_ray

    cfg = cfg or GammarayConfig()
    sc = cfg.serve
    store = Store.of(cfg.storage)  # bound once: the replicas get it (it pickles as its settings)
    opened = open_checkpoint(checkpoint, store)  # kept while its (downloaded) folder is read
    fingerprint = model_fingerprint(opened.model_dir)
    del opened
    if index:
        check_index_model(read_index_meta(index, store), index, fingerprint, f"({checkpoint})")
        try:
            import faiss  # noqa: F401 - the replicas open the index with it
        except ImportError:
            raise ValueError("serve --index needs FAISS: pip install 'gammaray[search]'") from None
    ensure_ray(cfg)
    serve.start(http_options={"host": sc.host, "port": sc.port})
    app = EncoderService.options(
        num_replicas=sc.replicas, max_ongoing_requests=max(8, sc.max_batch_size),
        ray_actor_options={"num_cpus": sc.cpus_per_replica, "num_gpus": sc.gpus_per_replica},
    ).bind(checkpoint, index, store, sc.model_dump(mode="json"))
    serve.run(app, name=sc.name, route_prefix="/")
    host = "127.0.0.1" if sc.host in ("0.0.0.0", "::") else sc.host
    url = f"http://{host}:{sc.port}"
    deadline = time.monotonic() + ready_timeout_s
    while True:  # serve.run returns when the replicas run; the HTTP proxy may still be starting
        try:
            status, health = get_json(f"{url}/health", timeout=5.0)
            if status == 200 and health.get("model") == fingerprint:
                break
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"the service did not answer on {url}/health within {ready_timeout_s:.0f} s")
        time.sleep(0.2)
    return Service(url=url, name=sc.name, checkpoint=checkpoint, index=index, model=fingerprint,
                   replicas=sc.replicas, outputs=health["outputs"])


def stop_service(name: str = "gammaray") -> None:
    serve.delete(name)
