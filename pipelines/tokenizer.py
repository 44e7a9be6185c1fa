"""Tokenizers: load any Hugging Face tokenizer folder, or train a WordPiece one on a catalogue.

No hub is reachable from here, so a catalogue without a pretrained text tower gets its own
vocabulary, trained with the `tokenizers` library on its titles, descriptions and categories and
saved in Hugging Face format next to the shards.
"""

from __future__ import annotations

import functools
import os
import tempfile
from typing import Iterable

import pyarrow.parquet as pq

from gammaray.config import StorageConfig

from . import storage

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def train_wordpiece(texts: Iterable[str], out_dir: str, vocab_size: int = 2000) -> str:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, min_frequency=1)
    tok.train_from_iterator(texts, trainer=trainer)
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


def catalogue_texts(catalogue_uri: str, manifest: dict, storage_cfg: StorageConfig | None = None) -> Iterable[str]:
    for shard in manifest["shards"]:
        fs, path = storage.resolve(storage.join(catalogue_uri, shard["path"]), storage_cfg)
        t = pq.read_table(path, filesystem=fs, columns=["title", "description", "category"])
        for col in ("title", "description", "category"):
            for v in t.column(col).to_pylist():
                if v:
                    yield v


def build_for_catalogue(catalogue_uri: str, out_uri: str, manifest: dict, vocab_size: int = 2000,
                        storage_cfg: StorageConfig | None = None) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        train_wordpiece(catalogue_texts(catalogue_uri, manifest, storage_cfg), tmp, vocab_size)
        storage.upload_dir(tmp, out_uri, storage_cfg)
    return out_uri


@functools.lru_cache(maxsize=4)
def load(uri: str, storage_settings: storage.S3Settings | None = None):
    """A transformers tokenizer from a local folder or an s3:// folder (cached per process)."""
    from transformers import AutoTokenizer

    local = uri
    if storage.is_remote(uri):
        local = tempfile.mkdtemp(prefix="gammaray-tok-")
        storage.download_dir(uri, local, storage_settings)
    return AutoTokenizer.from_pretrained(local)
