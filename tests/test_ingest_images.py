"""The one image decode path (pipelines/images.py) on real files of every kind it must handle, checked
pixel by pixel: transparency composited onto the configured background (never the colour hidden under
alpha 0), 16-bit and float scaled by their range, CMYK and ICC-tagged images in sRGB, EXIF
orientation applied; the training stream's preprocessing sees the same pixels; `gammaray prepare`
counts the conversions in its report and PIL's per-image palette warning is gone."""

from __future__ import annotations

import io
import json
import warnings

import numpy as np
import pytest
from PIL import Image, ImageOps

from gammaray.schema import BatchKeys as K
from pipelines.images import Conversion, decode
from tests import image_support as S

pytestmark = pytest.mark.ingest

BLACK = (0, 0, 0)


def _pixels(data: bytes, background=(255, 255, 255)) -> tuple[np.ndarray, tuple[str, ...]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        img, done = decode(data, 10**7, background=background)
    assert not [w for w in caught if "Transparency" in str(w.message)], [str(w.message) for w in caught]
    assert img.mode == "RGB"
    return np.asarray(img).astype(int), done


@pytest.mark.parametrize("kind", ["rgba", "la", "palette_trns"])
@pytest.mark.parametrize("background", [(255, 255, 255), (0, 0, 0), (0, 128, 255)])
def test_transparency_is_composited_onto_the_background_never_the_hidden_colour(kind, background):
    data = {"rgba": S.rgba_cutout, "la": S.la_cutout, "palette_trns": S.palette_trns}[kind]()
    px, done = _pixels(data, background)
    assert done == (Conversion.TRANSPARENCY,)
    fg = (60, 60, 60) if kind == "la" else S.RED
    assert tuple(px[0, 0]) == background        # alpha 0: the background, not the brown hidden there
    assert tuple(px[8, 8]) == fg                 # alpha 255: the pixel itself
    if kind != "la":                             # alpha 128: the straight-alpha blend
        want = [round((c * 128 + b * 127) / 255) for c, b in zip(fg, background)]
        assert np.abs(px[3, 15] - want).max() <= 1, (px[3, 15], want)
    # what PIL's plain convert("RGB") gives (the pre-fix behaviour) for the same file
    if kind == "rgba":
        assert tuple(np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))[0, 0]) == S.HIDDEN


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_a_single_colour_marked_transparent_by_trns_is_composited(mode):
    """tRNS without a palette: one RGB colour (or grey level) means 'transparent'."""
    key, fg = ((95, 78, 62), (200, 30, 40)) if mode == "RGB" else (95, 200)
    img = Image.new(mode, (8, 8), key)
    img.paste(fg, (2, 2, 6, 6))
    px, done = _pixels(S.png(img, transparency=key), BLACK)
    assert done == (Conversion.TRANSPARENCY,)
    assert tuple(px[0, 0]) == BLACK and tuple(px[4, 4]) == (fg if mode == "RGB" else (fg,) * 3)


def test_16_bit_png_is_scaled_by_its_range_not_clipped():
    data = S.gradient_16bit()
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    px, done = _pixels(data)
    assert done == (Conversion.HIGH_BIT_DEPTH,)
    # column x holds x * 257: exactly x in 8 bits, a full 0..255 ramp (PIL's convert: 99.6% at 255)
    assert (px[:, :, 0] == np.arange(256)).all() and (px[..., 0] == px[..., 2]).all()
    assert (np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))[..., 0] == 255).mean() > 0.99


def test_float_tiff_is_scaled_by_its_range():
    px, done = _pixels(S.float_tiff())
    assert done == (Conversion.HIGH_BIT_DEPTH,)
    assert px[4, :, 1].tolist() == [round(x / 7 * 255) for x in range(8)]


def test_cmyk_jpeg_comes_out_in_rgb():
    px, done = _pixels(S.cmyk_jpeg())
    assert done == (Conversion.CMYK,)
    assert np.abs(px[4, 2] - (0, 255, 255)).max() <= 8      # cyan ink
    assert np.abs(px[4, 12] - (255, 255, 255)).max() <= 8   # no ink: paper white
    assert np.abs(px[14, 4] - (0, 0, 0)).max() <= 8         # K = 255


@pytest.mark.parametrize("colour", [(100, 180, 90), (220, 60, 30), (150, 100, 80)])
def test_icc_tagged_image_is_converted_to_srgb(colour):
    px, done = _pixels(S.icc_tagged_png(colour))
    assert done == (Conversion.ICC_PROFILE,)
    want = S.adobe_to_srgb(colour)  # independent colour maths: Adobe RGB -> XYZ -> sRGB
    assert np.abs(px[1, 1] - want).max() <= 2, (px[1, 1], want)
    assert np.abs(px[1, 1] - colour).max() >= 15  # the untagged reading would be visibly off


def test_unusable_icc_profile_is_ignored_and_counted():
    broken = S.png(Image.new("RGB", (4, 4), (10, 20, 30)), icc_profile=b"not an icc profile at all")
    px, done = _pixels(broken)
    assert done == (Conversion.ICC_PROFILE_IGNORED,) and tuple(px[0, 0]) == (10, 20, 30)


def test_exif_orientation_is_applied():
    data, upright = S.exif_rotated_jpeg()
    px, done = _pixels(data)
    assert done == (Conversion.EXIF_ORIENTATION,)
    assert px.shape == (32, 16, 3)  # stored 32 wide x 16 high, viewed upright: 16 x 32
    assert px[6, 8, 0] > 180 and px[6, 8, 2] < 60     # red on top (the stored left half)
    assert px[26, 8, 2] > 180 and px[26, 8, 0] < 60   # blue below
    assert (px == np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))))).all()


def test_plain_images_are_untouched():
    rgb = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    for img in (Image.frombytes("RGB", (8, 8), rgb.tobytes()), Image.frombytes("RGBA", (8, 8), np.dstack([rgb, np.full((8, 8), 255, np.uint8)]).tobytes())):
        px, done = _pixels(S.png(img))
        assert done == () and (px == rgb).all()  # an opaque alpha channel composites nothing


def test_the_stream_decodes_the_same_pixels_with_the_configured_background():
    """preprocess_batch (what Ray Data tasks, embed and eval run) goes through the same decode, with
    PreprocessSpec.image_background (data.image_background)."""
    from gammaray.config import AugmentConfig, GammarayConfig, apply_overrides
    from pipelines.preprocess import PreprocessSpec, preprocess_batch

    cutout = S.rgba_cutout()
    batch = {"product_id": ["A"], "sample_index": [0], "title": ["a red square"], "image": [cutout],
             "extra_images": [[S.palette_trns()]]}
    assert apply_overrides(GammarayConfig(), {"data.image_background": [0, 0, 0]}).data.image_background == BLACK
    for background in ((255, 255, 255), BLACK):
        spec = PreprocessSpec(image_size=16, max_image_pixels=10**6, max_text_tokens=8, max_text_chars=100,
                              augment=AugmentConfig(), tokenizer_uri="", seed=0, epoch=0, with_aug_views=False,
                              train=False, view_pair="image_image", pixels_uint8=True, image_background=background)
        out = preprocess_batch(batch, spec, tokenizer=None)
        assert out[K.REJECT].tolist() == [""]
        for key in (K.PIXELS, K.PIXELS_PAIR):
            assert tuple(out[key][0, 0, 0]) == background and tuple(out[key][0, 8, 8]) == S.RED


def test_prepare_counts_the_conversions_in_its_report(tmp_path, capsys):
    from gammaray.app.cli import main

    files = {"rgba.png": S.rgba_cutout(), "la.png": S.la_cutout(), "palette.png": S.palette_trns(),
             "gradient16.png": S.gradient_16bit(), "float.tif": S.float_tiff(), "cmyk.jpg": S.cmyk_jpeg(),
             "adobe.png": S.icc_tagged_png((100, 180, 90)), "rotated.jpg": S.exif_rotated_jpeg()[0],
             "plain.png": S.png(Image.new("RGB", (8, 8), (1, 2, 3)))}
    src = tmp_path / "raw"
    (src / "img").mkdir(parents=True)
    with open(src / "items.jsonl", "w") as f:
        for i, (name, data) in enumerate(files.items()):
            (src / "img" / name).write_bytes(data)
            f.write(json.dumps({"product_id": f"P{i}", "title": f"product {name}", "image": f"img/{name}"}) + "\n")
    out = tmp_path / "counts.json"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc = main(["prepare", str(src), str(tmp_path / "catalog"), "--json", str(out), "--quiet"])
    assert rc == 0
    assert not [w for w in caught if "Transparency" in str(w.message)]
    want = {Conversion.TRANSPARENCY: 3, Conversion.HIGH_BIT_DEPTH: 2, Conversion.CMYK: 1, Conversion.ICC_PROFILE: 1,
            Conversion.EXIF_ORIENTATION: 1}
    counts = json.loads(out.read_text())
    assert counts["num_written"] == len(files) and counts["image_conversions"] == want
    text = capsys.readouterr().out
    assert "images converted" in text and "transparency           3" in text and "high_bit_depth         2" in text


def test_the_configured_background_reaches_the_training_stream():
    """data.image_background travels in the stream's spec (training, embed and eval decode with it)."""
    from gammaray.config import GammarayConfig, apply_overrides
    from pipelines.preprocess import PreprocessSpec

    cfg = apply_overrides(GammarayConfig(), {"data.image_background": [10, 20, 30], "data.tokenizer": "/tok"})
    spec = PreprocessSpec.from_config(cfg, epoch=0, train=False, with_aug=False)
    assert spec.image_background == (10, 20, 30)


def test_image_max_side_stores_training_size_images_and_leaves_the_source(tmp_path):
    """Issue 22 part 5: `prepare --image-max-side PX` stores a large photo shrunk to PX on its longer
    side (EXIF orientation and transparency applied as the stream would), a small one byte for byte,
    and never touches the source files."""
    from pipelines.images import RESIZED
    from pipelines.prepare import PrepareOptions, load_manifest, prepare
    from pipelines import storage
    import pyarrow.parquet as pq

    raw = tmp_path / "raw"
    raw.mkdir()
    rng = np.random.default_rng(0)
    photo = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (150, 240, 3), dtype=np.uint8)).save(photo, "JPEG", quality=85)
    small = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(small, "JPEG", quality=85)
    rgba = np.zeros((80, 100, 4), dtype=np.uint8)
    rgba[..., 0] = 255  # red hidden under alpha 0 on the left half
    rgba[:, 50:, 3] = 255
    cutout = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(cutout, "PNG")
    files = {"photo.jpg": photo.getvalue(), "small.jpg": small.getvalue(), "cutout.png": cutout.getvalue()}
    for name, data in files.items():
        (raw / name).write_bytes(data)
    (raw / "items.jsonl").write_text("\n".join(json.dumps({"product_id": n, "title": f"lamp {n}", "image": n})
                                               for n in files))
    res = prepare(str(raw / "items.jsonl"), str(tmp_path / "catalog"), PrepareOptions(image_max_side=64, progress=False))
    assert res.num_written == 3, res.summary()
    stored = {}
    for s in load_manifest(res.dst)["shards"]:
        stored.update({r["product_id"]: r["image"] for r in
                       pq.read_table(storage.join(res.dst, s["path"]), columns=["product_id", "image"]).to_pylist()})
    assert Image.open(io.BytesIO(stored["photo.jpg"])).size == (64, 40)
    assert stored["small.jpg"] == files["small.jpg"]  # within the limit: as it was
    cut = Image.open(io.BytesIO(stored["cutout.png"]))
    assert cut.mode == "RGB" and cut.size == (64, 51) and len(stored["photo.jpg"]) < len(files["photo.jpg"]) / 4
    assert np.asarray(cut)[25, 5].min() > 240  # alpha 0 composited onto white, not the hidden red
    assert res.image_conversions[RESIZED] == 2 and res.image_conversions[Conversion.TRANSPARENCY] == 1
    assert {n: (raw / n).read_bytes() for n in files} == files  # the source is untouched
