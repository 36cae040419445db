"""Glyph detection in a scene: ink threshold, connected components, 8x8 features, colour and centroid.

Shared by the verifier, the judge and the glyph bank's legibility filter, so all three see glyphs the same way.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .grammar import COLORS


SCENE_SIZE = 32
"""Side of a scene, in pixels."""
PALETTE = np.asarray(list(COLORS.values()), dtype=np.float32)
"""The named colours' RGB values in [0, 1], `(4, 3)`, in `COLORS` order."""
COLOR_NAMES = tuple(COLORS)
_MIN_INK = 3.0  # total ink (in pixels at full intensity) below which a component is noise


def glyph_features(ink: np.ndarray) -> np.ndarray:
    """An ink crop (any shape) -> 64 features: centred on a square, reduced to 8x8, scaled to optdigits' 0-16."""
    from PIL import Image

    h, w = ink.shape
    side = max(h, w)
    square = np.zeros((side, side), dtype=np.float32)
    top, left = (side - h) // 2, (side - w) // 2
    square[top : top + h, left : left + w] = ink
    small = np.asarray(Image.fromarray(square).resize((8, 8), Image.BOX), dtype=np.float32)
    peak = small.max()
    return (small / peak * 16.0 if peak > 0 else small).reshape(-1)


def detect(scene: np.ndarray, threshold: float) -> list[dict[str, Any]]:
    """Glyphs of a `(32, 32, 3)` scene: dicts with "features" (64,), "color" (name), "center" (x, y) in pixels."""
    from scipy import ndimage

    ink = scene.max(axis=2)
    mask = ink > threshold
    labels, count = ndimage.label(ndimage.binary_dilation(mask, structure=np.ones((3, 3))), np.ones((3, 3)))
    found = []
    for index in range(1, count + 1):
        pixels = mask & (labels == index)
        weights = np.where(pixels, ink, 0.0)
        if weights.sum() < _MIN_INK:
            continue
        rows, cols = np.nonzero(pixels)
        crop = weights[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        rgb = (scene * weights[..., None]).sum(axis=(0, 1)) / weights.sum()
        rgb = rgb / max(float(rgb.max()), 1e-6)
        color = COLOR_NAMES[int(np.argmin(((PALETTE - rgb) ** 2).sum(axis=1)))]
        center = (
            float((weights.sum(axis=0) * np.arange(SCENE_SIZE)).sum() / weights.sum()),
            float((weights.sum(axis=1) * np.arange(SCENE_SIZE)).sum() / weights.sum()),
        )
        found.append({"features": glyph_features(crop), "color": color, "center": center})
    return found
