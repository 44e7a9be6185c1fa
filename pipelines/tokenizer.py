"""Tokenizers: load any Hugging Face tokenizer folder, or train a WordPiece one on a catalogue.

No hub is reachable from here, so a catalogue without a pretrained text tower gets its own
vocabulary, trained with the `tokenizers` library on its titles, descriptions and categories and
saved in Hugging Face format next to the shards.

The vocabulary is trained on a seeded sample of the catalogue (`sample` texts, default
`DEFAULT_SAMPLE`; `data.tokenizer_sample`, `prepare --tokenizer-sample`): whole row groups in a seeded
order until the sample is full, so its cost stops growing with the catalogue beyond the sample size.
A few million texts hold every frequent word piece of a catalogue; WordPiece only keeps the
`vocab_size` most useful ones. Training uses the `tokenizers` library's threads (its Rust word
count runs in parallel when TOKENIZERS_PARALLELISM allows it; `parallel=True` turns it on for the
training only).
"""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
from typing import Iterable, Iterator

import numpy as np
import pyarrow.parquet as pq

from gammaray.config import GammarayConfig, StorageConfig

from . import storage
from .storage import Store

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
DEFAULT_SAMPLE = 3_000_000
TEXT_COLUMNS = ("title", "description", "category")


def tokenizer_uri(cfg: GammarayConfig) -> str:
    """The run's tokenizer: data.tokenizer, else the `tokenizer` folder beside the training catalogue."""
    if cfg.data.tokenizer:
        return cfg.data.tokenizer
    assert cfg.data.train
    return storage.join(cfg.data.train.rstrip("/").rsplit("/", 1)[0], "tokenizer")


@contextlib.contextmanager
def _parallelism(on: bool) -> Iterator[None]:
    key = "TOKENIZERS_PARALLELISM"
    old = os.environ.get(key)
    if on:
        os.environ[key] = "true"
    try:
        yield
    finally:
        if on:
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


def _splits_words(c: str) -> bool:
    """BERT's pre-tokenizer makes this character a word of its own (whitespace, punctuation, CJK), so
    it never continues a word."""
    import unicodedata

    cp = ord(c)
    return (c.isspace() or 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126
            or unicodedata.category(c).startswith("P") or 0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF
            or 0xF900 <= cp <= 0xFAFF or 0x20000 <= cp <= 0x2FA1F)


def train_wordpiece(texts: Iterable[str], out_dir: str, vocab_size: int = 2000, parallel: bool = False) -> str:
    """A WordPiece tokenizer trained on `texts`; the same texts give the same tokenizer in every process.

    The `tokenizers` trainer alone does not: it numbers the continuing-subword pieces ("##e") in the
    order of a hash map, and those numbers break ties between equally frequent merges, so every process
    learned a slightly different vocabulary (measured: 6 trainings on the demo catalogue, 6
    vocabularies, 18 to 36 of 437 tokens different; huggingface/tokenizers#1794). So one pass first
    collects the characters that can continue a word, their pieces are handed to the trainer up front in
    sorted order (as special tokens, the only way to seed its vocabulary), and are made ordinary
    vocabulary entries again afterwards. The texts are spooled to a temporary file for the second pass."""
    import json

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    chars: set[str] = set()
    with tempfile.TemporaryFile("w+", encoding="utf-8") as spool:
        for text in texts:
            chars.update(tok.normalizer.normalize_str(text))
            spool.write(text.replace("\n", " ") + "\n")
        pieces = ["##" + c for c in sorted(chars) if not _splits_words(c)]
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS + pieces,
                                            min_frequency=1)
        spool.seek(0)
        with _parallelism(parallel):
            tok.train_from_iterator((line.rstrip("\n") for line in spool), trainer=trainer)
    state = json.loads(tok.to_str())
    state["added_tokens"] = [t for t in state["added_tokens"] if t["content"] in SPECIAL_TOKENS]
    tok = Tokenizer.from_str(json.dumps(state))
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]",
    )
    os.makedirs(out_dir, exist_ok=True)
    fast.save_pretrained(out_dir)
    return out_dir


def catalogue_texts(catalogue_uri: str, manifest: dict, storage_cfg: Store | StorageConfig | None = None,
                    sample: int | None = None, seed: int = 0) -> Iterable[str]:
    """The catalogue's non-empty titles, descriptions and categories; with `sample`, about that many
    of them from whole row groups taken in a seeded order (all of them when the catalogue has fewer)."""
    from .catalogue import unit_table

    store = Store.of(storage_cfg)
    units = unit_table(manifest)
    if sample is None or units.total_rows * len(TEXT_COLUMNS) <= sample:  # all of it, shard by shard
        for shard in units.shards:
            fs, path = store.resolve(storage.join(catalogue_uri, shard))
            t = pq.read_table(path, filesystem=fs, columns=list(TEXT_COLUMNS))
            for col in TEXT_COLUMNS:
                for v in t.column(col).to_pylist():
                    if v:
                        yield v
        return
    order = np.random.default_rng([seed, 13]).permutation(len(units))
    files: dict[str, pq.ParquetFile] = {}
    yielded = 0
    for u in order.tolist():
        if sample is not None and yielded >= sample:
            return
        shard = units.shards[int(units.shard_of[u])]
        if shard not in files:
            if len(files) > 16:
                files.clear()
            fs, path = store.resolve(storage.join(catalogue_uri, shard))
            files[shard] = pq.ParquetFile(fs.open_input_file(path))
        t = files[shard].read_row_group(int(units.row_group[u]), columns=list(TEXT_COLUMNS))
        for col in TEXT_COLUMNS:
            for v in t.column(col).to_pylist():
                if v:
                    yielded += 1
                    yield v


def build_for_catalogue(catalogue_uri: str, out_uri: str, manifest: dict, vocab_size: int = 2000,
                        storage_cfg: Store | StorageConfig | None = None, sample: int | None = DEFAULT_SAMPLE,
                        seed: int = 0, parallel: bool = True) -> str:
    """Train a WordPiece tokenizer on (a seeded sample of) the catalogue's texts and save it at out_uri."""
    store = Store.of(storage_cfg)
    with tempfile.TemporaryDirectory() as tmp:
        train_wordpiece(catalogue_texts(catalogue_uri, manifest, store, sample, seed), tmp, vocab_size,
                        parallel=parallel)
        store.upload_dir(tmp, out_uri)
    return out_uri


@contextlib.contextmanager
def _local_copy(uri: str, store: Store | storage.S3Settings | None) -> Iterator[str]:
    """A local folder with the tokenizer's files for as long as it takes to load them: an s3://
    folder is downloaded into a temporary folder that is removed right after (the loaded tokenizer
    keeps everything in memory), so no process leaves a copy behind."""
    if not storage.is_remote(uri):
        yield uri
        return
    with tempfile.TemporaryDirectory(prefix="gammaray-tok-") as local:
        Store.of(store).download_dir(uri, local)
        yield local


@functools.lru_cache(maxsize=4)
def load(uri: str, store: Store | storage.S3Settings | None = None):
    """A transformers tokenizer from a local folder or an s3:// folder in `store` (cached per process)."""
    from transformers import AutoTokenizer

    with _local_copy(uri, store) as local:
        return AutoTokenizer.from_pretrained(local)


class FastTokenizer:
    """The part of a transformers fast tokenizer that preprocessing calls, on the `tokenizers`
    library alone: the same tokenizer.json, the same ids, but a Ray Data worker process starts in
    well under a second instead of importing transformers (seconds, tens of seconds under load)."""

    def __init__(self, path: str):
        import json

        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
        self.tok.no_truncation()
        self.tok.no_padding()
        with open(os.path.join(path, "tokenizer_config.json")) as f:
            conf = json.load(f)
        specials = {}
        if os.path.exists(os.path.join(path, "special_tokens_map.json")):
            with open(os.path.join(path, "special_tokens_map.json")) as f:
                specials.update({k: v for k, v in json.load(f).items() if isinstance(v, (str, dict))})
        specials.update({k: v for k, v in conf.items() if k.endswith("_token") and isinstance(v, (str, dict))})
        names = {k: (v["content"] if isinstance(v, dict) else v) for k, v in specials.items()}
        self.pad_token = names.get("pad_token")
        self.pad_token_id = self.tok.token_to_id(self.pad_token) if self.pad_token else None
        ids = {self.tok.token_to_id(t) for t in names.values()}
        ids |= {int(k) for k, v in (conf.get("added_tokens_decoder") or {}).items() if v.get("special")}
        self.all_special_ids = sorted(i for i in ids if i is not None)
        self.padding_side = conf.get("padding_side", "right")
        self._length: int | None = None

    def __len__(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def __call__(self, texts: list[str], max_length: int, truncation: bool = True, padding: str = "max_length",
                 return_tensors: str = "np") -> dict:
        import numpy as np

        if self._length != max_length:
            # the library's own truncation counts the post-processor's [CLS]/[SEP], as transformers does
            self.tok.enable_truncation(max_length)
            self.tok.enable_padding(length=max_length, pad_id=self.pad_token_id or 0, pad_token=self.pad_token or "[PAD]",
                                    direction=self.padding_side)
            self._length = max_length
        encs = self.tok.encode_batch(list(texts))
        ids = np.array([e.ids for e in encs], dtype=np.int64).reshape(len(encs), max_length)
        mask = np.array([e.attention_mask for e in encs], dtype=np.int64).reshape(len(encs), max_length)
        return {"input_ids": ids, "attention_mask": mask}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


@functools.lru_cache(maxsize=4)
def load_fast(uri: str, store: Store | storage.S3Settings | None = None):
    """`FastTokenizer` when the folder has a tokenizer.json, else the transformers tokenizer."""
    with _local_copy(uri, store) as local:
        if os.path.exists(os.path.join(local, "tokenizer.json")) and os.path.exists(os.path.join(local, "tokenizer_config.json")):
            return FastTokenizer(local)  # reads its files now
    return load(uri, store)
