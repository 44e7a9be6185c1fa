"""Real image files of every kind the decode path must handle (pipelines/image_kinds.py), plus
independent colour maths to check decoded ICC-managed pixels against."""

from __future__ import annotations

import numpy as np

from pipelines.image_kinds import *  # noqa: F401,F403 - the image builders
from pipelines.image_kinds import ADOBE_GAMMA, ADOBE_RGB_TO_XYZ_D65, XYZ_D65_TO_SRGB


def adobe_to_srgb(rgb8) -> np.ndarray:
    """Reference colour maths: Adobe RGB (1998) 8-bit values -> sRGB 8-bit values (clipped to gamut)."""
    lin = (np.asarray(rgb8, np.float64) / 255.0) ** ADOBE_GAMMA
    s = np.clip(XYZ_D65_TO_SRGB @ ADOBE_RGB_TO_XYZ_D65 @ lin, 0, 1)
    enc = np.where(s <= 0.0031308, 12.92 * s, 1.055 * s ** (1 / 2.4) - 0.055)
    return np.rint(enc * 255)
