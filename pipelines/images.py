"""Image bytes -> one checked 8-bit sRGB image, the same way everywhere.

`decode` is the one decode path: `prepare`'s check, the training stream, `embed` and `eval` (through
pipelines/preprocess.py) all call it, so the pixels a model sees never depend on who decoded them.
Each way an image can be bad is its own reason code. What it does to a valid image, in order:

- 16-bit (I;16, I) and float (F) greyscale is scaled to 8 bits by its range (0..65535 for 16-bit
  data; 0..1 for float data inside it; otherwise the image's own min..max), never clipped;
- colour is managed: an embedded ICC profile (RGB or CMYK) is converted to sRGB with littleCMS, and
  CMYK without a profile by PIL's formula;
- transparency of any kind (RGBA, LA, PA, a palette or a single colour marked transparent by tRNS)
  is composited onto `background` (white by default, `data.image_background`), so whatever colour
  hides under alpha 0 never reaches a model;
- the EXIF orientation tag is applied (a phone photo stored sideways comes out upright).

`decode` returns the names of the conversions it applied (`Conversion`), which `prepare` counts in its
report instead of warning once per image.
"""

from __future__ import annotations

import functools
import io
import re
import warnings

import numpy as np
from PIL import ExifTags, Image, ImageCms

from gammaray.schema import Invalid, Reason

WHITE = (255, 255, 255)


class Conversion:
    """Names of what `decode` changed in a valid image (counted by `prepare`)."""

    EXIF_ORIENTATION = "exif_orientation"
    TRANSPARENCY = "transparency"          # composited onto the background
    HIGH_BIT_DEPTH = "high_bit_depth"      # 16-bit / 32-bit / float scaled to 8 bits
    CMYK = "cmyk"
    ICC_PROFILE = "icc_profile"            # converted to sRGB
    ICC_PROFILE_IGNORED = "icc_profile_ignored"  # unreadable, or not for the image's colour space


def open_checked(data: bytes | None, max_pixels: int, draft: tuple[int, int] | None = None,
                 background: tuple[int, int, int] = WHITE) -> Image.Image:
    """`decode` without the list of conversions."""
    return decode(data, max_pixels, draft, background)[0]


def decode(data: bytes | None, max_pixels: int, draft: tuple[int, int] | None = None,
           background: tuple[int, int, int] = WHITE) -> tuple[Image.Image, tuple[str, ...]]:
    """Decode fully (so truncation shows now, not in a training step) into an RGB image, and name
    the conversions applied.

    The pixel limit is checked from the header, before any pixel is decoded: a decompression bomb
    costs a few bytes of reading, not gigabytes of memory. `draft=(w, h)`: a JPEG is decoded by
    libjpeg at the smallest 1/2, 1/4 or 1/8 scale that still covers (w, h) (every coefficient is
    still read, so truncation is still caught); a 1600x1067 photo bound for 64x64 decodes about
    30 times faster.
    """
    if data is None or len(data) == 0:
        raise Invalid(Reason.IMAGE_EMPTY, "zero-byte image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise Invalid(Reason.IMAGE_TOO_LARGE, str(err)) from None
    except Exception as err:  # noqa: BLE001 - PIL raises many types for garbage
        # without the address of PIL's in-memory file: the same bytes give the same quarantine entry
        raise Invalid(Reason.IMAGE_UNDECODABLE, re.sub(r" <_io\.BytesIO object at 0x[0-9a-f]+>", "",
                                                       f"{type(err).__name__}: {err}")) from None
    if w * h > max_pixels:
        raise Invalid(Reason.IMAGE_TOO_LARGE, f"{w}x{h} = {w * h} pixels > limit {max_pixels}")
    if w == 0 or h == 0:
        raise Invalid(Reason.IMAGE_UNDECODABLE, f"{w}x{h} image")
    if draft is not None and img.format == "JPEG":
        img.draft("RGB", draft)
    try:
        img.load()
    except OSError as err:
        text = str(err)
        if "truncated" in text or "broken data stream" in text or "premature end" in text.lower():
            raise Invalid(Reason.IMAGE_TRUNCATED, text) from None
        raise Invalid(Reason.IMAGE_UNDECODABLE, f"{type(err).__name__}: {text}") from None
    except Exception as err:  # noqa: BLE001
        raise Invalid(Reason.IMAGE_UNDECODABLE, f"{type(err).__name__}: {err}") from None
    done: list[str] = []
    try:
        orientation = _orientation(img)
        img = _to_8bit(img, done)
        img = _to_srgb(img, done)
        img = _composite(img, background, done)
        if img.mode != "RGB":
            img = img.convert("RGB")
        if orientation:
            img = img.transpose(_TRANSPOSE[orientation])  # ImageOps.exif_transpose's table, on the final RGB
            done.append(Conversion.EXIF_ORIENTATION)
    except Exception as err:  # noqa: BLE001 - an image PIL opened but cannot convert
        raise Invalid(Reason.IMAGE_UNDECODABLE, f"{img.mode} image: {type(err).__name__}: {err}") from None
    return img, tuple(done)


# --------------------------------------------------------------------------------------------
# the steps


_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation (2..8) that needs a transpose, else 0; unreadable EXIF counts as none."""
    try:
        value = img.getexif().get(ExifTags.Base.Orientation)
    except Exception:  # noqa: BLE001 - a damaged EXIF block must not sink a valid image
        return 0
    return value if value in _TRANSPOSE else 0


def _to_8bit(img: Image.Image, done: list[str]) -> Image.Image:
    """16-bit, 32-bit integer and float greyscale -> 8-bit L (LA when tRNS marks a grey value
    transparent). PIL's own conversion clips at 255: a 0..65535 gradient comes out 99.6% white."""
    if not (img.mode.startswith("I") or img.mode == "F"):
        return img
    a = np.asarray(img)
    if a.dtype.kind == "f":
        a = a.astype(np.float64)
        finite = a[np.isfinite(a)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        a = np.nan_to_num(a, nan=lo, posinf=hi, neginf=lo)
        if lo >= 0.0 and hi <= 1.0:
            lo, hi = 0.0, 1.0  # float data in [0, 1]: the usual convention
    else:
        a = a.astype(np.int64)
        lo, hi = int(a.min()), int(a.max())
        if lo >= 0 and hi <= 65535:
            lo, hi = 0, 65535  # 16-bit data (PNG, TIFF), whatever PIL's mode name
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    out = Image.fromarray(np.clip(np.rint((a - lo) * scale), 0, 255).astype(np.uint8), "L")
    trns = img.info.get("transparency")
    if isinstance(trns, int):
        alpha = Image.fromarray(np.where(np.asarray(img) == trns, 0, 255).astype(np.uint8), "L")
        out = Image.merge("LA", (out, alpha))
    done.append(Conversion.HIGH_BIT_DEPTH)
    return out


_ICC_MODES = {"RGB": ("RGB ", "RGB"), "RGBA": ("RGB ", "RGBA"), "CMYK": ("CMYK", "RGB")}  # mode -> (profile space, out mode)


def _to_srgb(img: Image.Image, done: list[str]) -> Image.Image:
    icc = img.info.get("icc_profile")
    if icc and img.mode in _ICC_MODES:
        try:
            transform = _icc_transform(bytes(icc), img.mode)
        except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
            transform = _UNUSABLE
        if transform is _UNUSABLE:
            done.append(Conversion.ICC_PROFILE_IGNORED)
        elif transform is not None:  # None: the profile is sRGB already
            img = ImageCms.applyTransform(img, transform)
            done.append(Conversion.ICC_PROFILE)
            return img
    if img.mode == "CMYK":
        done.append(Conversion.CMYK)
        return img.convert("RGB")
    return img


_UNUSABLE = object()


@functools.lru_cache(maxsize=32)
def _icc_transform(icc: bytes, mode: str):
    """A cached littleCMS transform from the embedded profile to sRGB; None when the profile is
    sRGB itself (most web images: nothing to do), _UNUSABLE when it does not fit the image's mode."""
    profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
    space, out_mode = _ICC_MODES[mode]
    if profile.profile.xcolor_space != space:
        return _UNUSABLE
    if space == "RGB " and "srgb" in (profile.profile.profile_description or "").lower():
        return None
    # NOCACHE: littleCMS's one-pixel cache is not safe when threads share a transform (prepare's checks)
    return ImageCms.buildTransform(profile, _SRGB, mode, out_mode, flags=ImageCms.Flags.NOCACHE)


_SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


def _composite(img: Image.Image, background: tuple[int, int, int], done: list[str]) -> Image.Image:
    """Any kind of transparency -> RGB over `background`: out = a * pixel + (1 - a) * background.

    Palette images go through RGBA (PIL's exact path; converting them straight to RGB is what
    prints "Palette images with Transparency expressed in bytes ..." and drops the alpha)."""
    if img.mode not in ("RGBA", "LA", "PA", "RGBa", "La") and "transparency" not in img.info:
        return img
    rgba = img.convert("RGBA")
    alpha = rgba.getchannel("A")
    if alpha.getextrema()[0] == 255:  # an alpha channel that is opaque everywhere: nothing to composite
        return rgba.convert("RGB")
    out = Image.new("RGB", rgba.size, tuple(background))
    out.paste(rgba, mask=alpha)
    done.append(Conversion.TRANSPARENCY)
    return out


# --------------------------------------------------------------------------------------------
# prepare --image-max-side: images stored at training size

RESIZED = "resized"  # a Conversion name: stored smaller by prepare --image-max-side


def resized_for_training(data: bytes, max_side: int, max_pixels: int,
                         background: tuple[int, int, int] = WHITE, quality: int = 90) -> tuple[bytes, tuple[str, ...]]:
    """`data` whose longer side is at most `max_side` pixels, as the stream will see it: an image within
    the limit comes back byte for byte; a larger one is decoded (every conversion of `decode` applied,
    transparency composited onto `background`), shrunk with a Lanczos filter to `max_side` on its longer
    side and stored as an RGB JPEG of `quality`. Raises `Invalid` like `decode`."""
    img, done = decode(data, max_pixels, (max_side, max_side), background)
    with Image.open(io.BytesIO(data)) as header:
        w, h = header.size
    if max(w, h) <= max_side:
        return data, done
    img.thumbnail((max_side, max_side), Image.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality, optimize=True)
    return buf.getvalue(), (*done, RESIZED)
