"""Valid images of every kind pipelines/images.decode handles, written with PIL (and an ICC profile
written byte by byte): for the tests, `gammaray bench decode` and the docs. pipelines/faults.py has
the bad ones."""

from __future__ import annotations

import io
import struct

import numpy as np
from PIL import Image

HIDDEN = (95, 78, 62)   # the brown a real cut-out hid under alpha 0 (issue 13)
RED = (200, 30, 40)


def png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


def _scaled(a: np.ndarray, scale: int) -> np.ndarray:
    return np.repeat(np.repeat(a, scale, axis=0), scale, axis=1) if scale > 1 else a


def rgba_cutout(scale: int = 1) -> bytes:
    """A 16x16 cut-out (x scale): a red square on a fully transparent background whose hidden colour
    is brown, and one half-transparent column (alpha 128) at x = 15."""
    a = np.zeros((16, 16, 4), np.uint8)
    a[..., :3] = HIDDEN
    a[4:12, 4:12] = (*RED, 255)
    a[:, 15] = (*RED, 128)
    a = _scaled(a, scale)
    return png(Image.frombytes("RGBA", a.shape[1::-1], a.tobytes()))


def la_cutout() -> bytes:
    """Grey 60 at alpha 255 in the middle, grey 30 hidden under alpha 0 around it."""
    a = np.zeros((16, 16, 2), np.uint8)
    a[..., 0] = 30
    a[4:12, 4:12] = (60, 255)
    return png(Image.frombytes("LA", (16, 16), a.tobytes()))


def palette_trns(scale: int = 1) -> bytes:
    """A palette PNG with per-entry alpha in a tRNS chunk (PIL: transparency as bytes): index 0 =
    the hidden brown at alpha 0, 1 = red opaque, 2 = red at alpha 128."""
    idx = np.zeros((16, 16), np.uint8)
    idx[4:12, 4:12] = 1
    idx[:, 15] = 2
    idx = _scaled(idx, scale)
    img = Image.frombytes("P", idx.shape[1::-1], idx.tobytes())
    img.putpalette([*HIDDEN, *RED, *RED] + [0] * (256 * 3 - 9))
    return png(img, transparency=bytes([0, 255, 128]))


def gradient_16bit(rows: int = 4) -> bytes:
    """A 256 x rows greyscale PNG with 16-bit samples: column x holds x * 257 (0..65535)."""
    a = np.tile((np.arange(256, dtype=np.uint16) * 257), (rows, 1))
    return png(Image.frombytes("I;16", (256, rows), a.astype("<u2").tobytes()))


def float_tiff() -> bytes:
    """An 8x8 float32 TIFF with values 0..1 (column x holds x / 7)."""
    a = np.tile(np.arange(8, dtype=np.float32) / 7, (8, 1))
    buf = io.BytesIO()
    Image.frombytes("F", (8, 8), a.astype("<f4").tobytes()).save(buf, format="TIFF")
    return buf.getvalue()


def cmyk_jpeg(scale: int = 1) -> bytes:
    """A CMYK JPEG: left half pure cyan (C=255), right half white (all inks 0), bottom rows black (K=255)."""
    a = np.zeros((16, 16, 4), np.uint8)
    a[:, :8, 0] = 255
    a[12:, :, 3] = 255
    a = _scaled(a, scale)
    buf = io.BytesIO()
    Image.frombytes("CMYK", a.shape[1::-1], a.tobytes()).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def exif_rotated_jpeg(scale: int = 1) -> tuple[bytes, np.ndarray]:
    """A 32x16 JPEG (landscape as stored) tagged EXIF orientation 6 (rotate 90 degrees clockwise to
    view); left half red, right half blue as stored. Returns (bytes, the upright view as a PIL array)."""
    a = np.zeros((16, 32, 3), np.uint8)
    a[:, :16] = (220, 20, 20)
    a[:, 16:] = (20, 20, 220)
    a = _scaled(a, scale)
    img = Image.frombytes("RGB", a.shape[1::-1], a.tobytes())
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue(), np.asarray(img.transpose(Image.Transpose.ROTATE_270))


# --------------------------------------------------------------------------------------------
# an Adobe-RGB-like ICC profile, written byte by byte (ImageCms can only create sRGB/LAB/XYZ ones)

ADOBE_RGB_TO_XYZ_D65 = np.array([[0.5767309, 0.1855540, 0.1881852],
                                 [0.2973769, 0.6273491, 0.0752741],
                                 [0.0270343, 0.0706872, 0.9911085]])
XYZ_D65_TO_SRGB = np.array([[3.2404542, -1.5371385, -0.4985314],
                            [-0.9692660, 1.8760108, 0.0415560],
                            [0.0556434, -0.2040259, 1.0572252]])
BRADFORD_D65_TO_D50 = np.array([[1.0478112, 0.0228866, -0.0501270],
                                [0.0295424, 0.9904844, -0.0170491],
                                [-0.0092345, 0.0150436, 0.7521316]])
ADOBE_GAMMA = 563 / 256  # 2.19921875, as the Adobe RGB (1998) specification stores it


def _s15(v: float) -> bytes:
    return struct.pack(">i", int(round(v * 65536)))


def _xyz_tag(xyz) -> bytes:
    return b"XYZ " + b"\0" * 4 + b"".join(_s15(v) for v in xyz)


def adobe_rgb_like_icc() -> bytes:
    """An ICC v2 display profile with Adobe RGB (1998) primaries (Bradford-adapted to the D50
    connection space), D65 white and a pure 563/256 gamma curve."""
    colorants = BRADFORD_D65_TO_D50 @ ADOBE_RGB_TO_XYZ_D65
    desc_text = b"Adobe-RGB-like test profile\0"
    desc = (b"desc" + b"\0" * 4 + struct.pack(">I", len(desc_text)) + desc_text
            + struct.pack(">II", 0, 0) + struct.pack(">HB", 0, 0) + b"\0" * 67)
    curve = b"curv" + b"\0" * 4 + struct.pack(">IH", 1, int(round(ADOBE_GAMMA * 256))) + b"\0\0"
    tags = [(b"desc", desc), (b"wtpt", _xyz_tag((0.9642, 1.0, 0.8249))), (b"rXYZ", _xyz_tag(colorants[:, 0])),
            (b"gXYZ", _xyz_tag(colorants[:, 1])), (b"bXYZ", _xyz_tag(colorants[:, 2])),
            (b"rTRC", curve), (b"gTRC", curve), (b"bTRC", curve), (b"cprt", b"text" + b"\0" * 4 + b"none\0\0\0\0")]
    offset = 128 + 4 + 12 * len(tags)
    table, body = b"", b""
    for sig, data in tags:
        data += b"\0" * (-len(data) % 4)
        table += sig + struct.pack(">II", offset + len(body), len(data))
        body += data
    size = offset + len(body)
    header = (struct.pack(">I", size) + b"\0" * 4 + struct.pack(">I", 0x02100000) + b"mntrRGB XYZ " + b"\0" * 12
              + b"acsp" + b"\0" * 24 + struct.pack(">I", 0) + _s15(0.9642) + _s15(1.0) + _s15(0.8249) + b"\0" * 4)
    header += b"\0" * (128 - len(header))
    return header + struct.pack(">I", len(tags)) + table + body


def icc_tagged_png(colour: tuple[int, int, int], side: int = 4) -> bytes:
    """A side x side PNG of one colour, tagged with the Adobe-RGB-like profile."""
    return png(Image.new("RGB", (side, side), colour), icc_profile=adobe_rgb_like_icc())
