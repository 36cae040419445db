"""Scenes of the digit world: real handwritten digits (scikit-learn's copy of UCI optdigits) on a 32x32 canvas.

A scene is a black 32x32 RGB canvas split into a 2x2 grid of 16-pixel cells. Each glyph (an 8x8 optdigits digit,
upscaled to 12x12) sits in its own cell, offset by 2-3 pixels, coloured by multiplying its ink by an RGB colour.

Only *legible* glyphs are used: those that, drawn in a scene, form one connected glyph and are recognised by a
classifier that never saw them (10-fold cross-validation over the whole set); about 2% of optdigits' 1,797 glyphs
fail this. The legible glyphs are split once, with a fixed seed, into a train half (for the generator and the
verifier's classifier) and a held-out half (for the judge's classifier and ground-truth test scenes).
"""

from __future__ import annotations

import functools
import zlib
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .detection import SCENE_SIZE, detect
from .grammar import COLORS, parse


CELL = 16
GLYPH_SIZE = 12
_SPLIT_SEED = 0
_COLOR_NAMES = tuple(COLORS)


@functools.lru_cache(maxsize=1)
def _glyph_bank() -> tuple[np.ndarray, np.ndarray]:
    # All legible optdigits glyphs, upscaled: (N, 12, 12) ink in [0, 1] and (N,) labels.
    from sklearn.datasets import load_digits
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.svm import SVC

    data = load_digits()
    images = np.stack(
        [
            np.asarray(Image.fromarray(image).resize((GLYPH_SIZE, GLYPH_SIZE), Image.BILINEAR), dtype=np.float32)
            for image in data.images.astype(np.float32) / 16.0
        ]
    ).clip(0.0, 1.0)
    features, whole = [], []
    for image in images:
        scene = np.zeros((SCENE_SIZE, SCENE_SIZE, 3), dtype=np.float32)
        scene[CELL + 2 : CELL + 2 + GLYPH_SIZE, CELL + 2 : CELL + 2 + GLYPH_SIZE] = image[..., None]
        found = [detect(scene, threshold) for threshold in (0.25, 0.35)]
        whole.append(all(len(f) == 1 for f in found))
        features.append(found[1][0]["features"] if found[1] else np.zeros(64, dtype=np.float32))
    folds = StratifiedKFold(10, shuffle=True, random_state=_SPLIT_SEED)
    predicted = cross_val_predict(SVC(C=10.0, gamma=0.002), np.stack(features), data.target, cv=folds)
    legible = np.asarray(whole) & (predicted == data.target)
    return images[legible], data.target[legible].astype(np.int64)


@functools.lru_cache(maxsize=2)
def glyphs(half: str) -> tuple[np.ndarray, np.ndarray]:
    """One half of the legible optdigits glyphs, upscaled for scenes.

    Args:
        half: "train" or "test" (the held-out half).

    Returns:
        `(images, labels)`: float32 `(N, 12, 12)` ink in [0, 1] and int64 `(N,)` digits; N is about 880.

    Raises:
        ValueError: for another `half`.
    """
    if half not in ("train", "test"):
        raise ValueError(f"Unknown glyph half {half!r}; expected 'train' or 'test'.")
    images, labels = _glyph_bank()
    order = np.random.default_rng(_SPLIT_SEED).permutation(len(labels))
    index = np.sort(order[: len(order) // 2] if half == "train" else order[len(order) // 2 :])
    return images[index], labels[index]


def _cells_for(item: dict[str, Any], rng: np.random.Generator) -> list[int]:
    # Cells are numbered 0 1 / 2 3 (row-major). Relations fix the pair's cells; other layouts are random.
    relation, n = item.get("relation"), len(item["objects"])
    if relation is None:
        return [int(c) for c in rng.permutation(4)[:n]]
    line = int(rng.integers(2))
    if relation in ("to the left of", "to the right of"):
        left, right = 2 * line, 2 * line + 1
        return [left, right] if relation == "to the left of" else [right, left]
    top, bottom = line, line + 2
    return [top, bottom] if relation == "above" else [bottom, top]


def scene_array(item: dict[str, Any], rng: np.random.Generator, half: str) -> np.ndarray:
    """A scene for a caption item as a float32 `(32, 32, 3)` array in [0, 1], drawn with `rng` from a glyph half.

    Unnamed colours and the glyph of each digit are drawn at random, so one caption has many scenes.
    """
    images, labels = glyphs(half)
    canvas = np.zeros((SCENE_SIZE, SCENE_SIZE, 3), dtype=np.float32)
    for obj, cell in zip(item["objects"], _cells_for(item, rng)):
        choices = np.flatnonzero(labels == obj["digit"])
        glyph = images[choices[rng.integers(len(choices))]]
        color = obj["color"] or _COLOR_NAMES[rng.integers(len(_COLOR_NAMES))]
        top = (cell // 2) * CELL + 2 + int(rng.integers(2))
        left = (cell % 2) * CELL + 2 + int(rng.integers(2))
        canvas[top : top + GLYPH_SIZE, left : left + GLYPH_SIZE] = glyph[..., None] * np.asarray(COLORS[color])
    return canvas


def render(item: dict[str, Any] | str, seed: int = 0) -> Image.Image:
    """A ground-truth scene for a caption, deterministic in `(caption, seed)`.

    Args:
        item: an item of `prompts(...)` (its "split" picks the glyph half: test items use held-out glyphs), or a
            caption string (parsed, drawn from the held-out half).
        seed: any int; the same seed gives the same scene.

    Returns:
        A 32x32 RGB PIL image.

    Raises:
        ValueError: for a caption outside the grammar.
    """
    if isinstance(item, str):
        item = dict(parse(item), split="test")
    rng = np.random.default_rng([seed & 0xFFFFFFFF, zlib.crc32(item["prompt"].encode())])
    array = scene_array(item, rng, "train" if item.get("split") == "train" else "test")
    return Image.fromarray(np.round(array * 255).astype(np.uint8), "RGB")


def to_scene_array(image: torch.Tensor) -> np.ndarray:
    """A `(3, H, W)` float tensor in [0, 1] of any size -> a `(32, 32, 3)` float32 array (antialiased resampling)."""
    if image.shape[-2:] != (SCENE_SIZE, SCENE_SIZE):
        image = F.interpolate(image[None].float(), size=(SCENE_SIZE, SCENE_SIZE), mode="bilinear", antialias=True)[0]
    return image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()
