"""The digit world's verifier and judge: GenEval's recipe (detect, classify, check the caption) for digit scenes.

An image is brought to 32x32 RGB, its ink (brightest channel) thresholded, and glyphs found as connected components
of the ink mask (dilated by one pixel, so a glyph's broken strokes stay one component while glyphs in neighbouring
cells, at least 3 pixels apart, stay separate). Each glyph is cropped, centred on a square, reduced to 8x8 (the
optdigits format) and classified; its colour is the nearest named colour to its ink-weighted mean RGB, and its
position the ink-weighted centroid. The caption's atomic checks are then evaluated:

- ``count``: as many glyphs as the caption names (1, 2 or 3);
- ``digit``: each named digit has its own glyph;
- ``color``: each coloured digit's glyph has that colour;
- ``position``: the first digit's centroid lies at least 3 pixels to the left of / right of / above / below the
  second's.

Glyphs are assigned to the caption's objects by the assignment that satisfies the most checks. An image *passes* when
every check holds; its *score* is the fraction that hold. Nothing here is differentiable: like GenEval's detector, the
verifier can only rank.

Two classifiers exist. The **verifier** (the reward) uses a support-vector classifier trained on the train-half
glyphs; the **judge** (for measuring reward hacking) uses a k-nearest-neighbour classifier trained on the held-out
half and a lower ink threshold. Both are fitted at first use (about a second) from scikit-learn's offline data.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np

from ...rewards.base import ImageBatch, Reward, iter_pixel_tensors
from .detection import PALETTE, detect
from .grammar import parse
from .scenes import GLYPH_SIZE, SCENE_SIZE, glyphs, to_scene_array


CHECKS = ("count", "digit", "color", "position")
"""The kinds of atomic check, in the order they are reported."""
_POSITION_MARGIN = 3.0  # pixels, at 32x32


# ---------------------------------------------------------------------------------------------------- classifiers


def _training_features(half: str, threshold: float, copies: int) -> tuple[np.ndarray, np.ndarray]:
    # Each glyph drawn as in a scene (random offset and colour), then detected: the classifier sees what it will see.
    images, labels = glyphs(half)
    rng = np.random.default_rng(1)
    features, targets = [], []
    for _ in range(copies):
        for image, label in zip(images, labels):
            scene = np.zeros((SCENE_SIZE, SCENE_SIZE, 3), dtype=np.float32)
            top, left = rng.integers(0, SCENE_SIZE - GLYPH_SIZE, size=2)
            scene[top : top + GLYPH_SIZE, left : left + GLYPH_SIZE] = image[..., None] * PALETTE[rng.integers(4)]
            found = detect(scene, threshold)
            if len(found) == 1:
                features.append(found[0]["features"])
                targets.append(label)
    return np.stack(features), np.asarray(targets)


@functools.lru_cache(maxsize=2)
def classifier(judge: bool = False):
    """The fitted digit classifier of the verifier (SVC on the train half) or the judge (3-NN on the held-out half),
    with its ink threshold: `(model, threshold)`. Deterministic; fitted once per process."""
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.svm import SVC

    threshold = 0.25 if judge else 0.35
    features, targets = _training_features("test" if judge else "train", threshold, copies=2)
    model = KNeighborsClassifier(n_neighbors=3) if judge else SVC(C=10.0, gamma=0.002)
    return model.fit(features, targets), threshold


# ---------------------------------------------------------------------------------------------------- checks


def _evaluate(structure: dict[str, Any], found: list[dict[str, Any]]) -> dict[str, Any]:
    objects, relation = structure["objects"], structure["relation"]
    results: dict[str, list[bool]] = {"count": [len(found) == len(objects)]}
    best: dict[str, list[bool]] | None = None
    # Try every assignment of distinct glyphs to the caption's objects (None when glyphs run out), in a fixed order:
    # among assignments that satisfy as many checks, the first wins, so which check failed does not depend on the
    # process (a set of tuples holding None would iterate in an order that varies from one process to the next).
    slots = list(range(len(found))) + [None] * len(objects)
    for assignment in dict.fromkeys(itertools.permutations(slots, len(objects))):
        checks: dict[str, list[bool]] = {"digit": [], "color": [], "position": []}
        for obj, slot in zip(objects, assignment):
            glyph = found[slot] if slot is not None else None
            checks["digit"].append(glyph is not None and glyph["digit"] == obj["digit"])
            if obj["color"] is not None:
                checks["color"].append(glyph is not None and glyph["color"] == obj["color"])
        if relation is not None:
            a, b = (found[s] if s is not None else None for s in assignment)
            checks["position"].append(
                a is not None and b is not None and _relation_holds(relation, a["center"], b["center"])
            )
        if best is None or sum(map(sum, checks.values())) > sum(map(sum, best.values())):
            best = checks
    results.update({k: v for k, v in best.items() if v})
    flat = [v for values in results.values() for v in values]
    return {
        "passed": all(flat),
        "score": sum(flat) / len(flat),
        "checks": {k: sum(v) / len(v) for k, v in results.items()},
        "category": structure["category"],
    }


def _relation_holds(relation: str, a: tuple[float, float], b: tuple[float, float]) -> bool:
    (ax, ay), (bx, by) = a, b
    if relation == "to the left of":
        return ax < bx - _POSITION_MARGIN
    if relation == "to the right of":
        return ax > bx + _POSITION_MARGIN
    if relation == "above":
        return ay < by - _POSITION_MARGIN
    return ay > by + _POSITION_MARGIN


def verify(images: ImageBatch, prompts: Sequence[str] | str, judge: bool = False) -> list[dict[str, Any]]:
    """Check images against their captions.

    Args:
        images: PIL images of any size and mode, `(3, H, W)` tensors or `(H, W, 3)` arrays, or a `(B, 3, H, W)`
            float tensor in [0, 1]. Each is resampled to 32x32 RGB. A greyscale image keeps no colour, so colour
            checks fail on it, and glyphs of a dark colour (the world's blue is about 0.45 in luminance) may fall
            below the ink threshold and go undetected.
        prompts: one caption of the grammar per image (or one string for all).
        judge: use the independent judge instead of the verifier.

    Returns:
        One dict per image: "passed" (bool, every check holds), "score" (float in [0, 1], the fraction of checks
        that hold), "checks" (kind -> fraction in [0, 1], for the kinds in `CHECKS` the caption has) and "category".

    Raises:
        ValueError: for a caption outside the grammar (naming it), or a count mismatch between images and prompts.
    """
    scenes = [to_scene_array(image) for image in iter_pixel_tensors(images)]
    if isinstance(prompts, str):
        prompts = [prompts] * len(scenes)
    if len(prompts) != len(scenes):
        raise ValueError(f"verify got {len(scenes)} images but {len(prompts)} prompts; pass one prompt per image.")
    structures = [parse(prompt) for prompt in prompts]  # before any work: a bad caption fails at once
    model, threshold = classifier(judge)
    found = [detect(scene, threshold) for scene in scenes]
    features = [glyph["features"] for glyphs_ in found for glyph in glyphs_]
    digits = iter(model.predict(np.stack(features)).tolist() if features else [])
    for glyphs_ in found:
        for glyph in glyphs_:
            glyph["digit"] = int(next(digits))
    return [_evaluate(structure, glyphs_) for structure, glyphs_ in zip(structures, found)]


class DigitsReward(Reward):
    """The verifier as a DrPO reward: ``reward(images, prompts) -> list[float]``.

    Args:
        kind: "score" (fraction of the caption's checks that hold, in [0, 1]: dense) or "pass" (1.0 when every
            check holds, else 0.0: GenEval's binary verdict).
        judge: score with the independent judge instead (for evaluation, not training).
    """

    input_format = "pt"

    def __init__(self, kind: str = "score", judge: bool = False, batch_size: int = 256) -> None:
        if kind not in ("score", "pass"):
            raise ValueError(f"Unknown digits reward kind {kind!r}; expected 'score' or 'pass'.")
        super().__init__(batch_size=batch_size, name=f"digits_{'judge' if judge else 'verifier'}_{kind}")
        self.kind, self.judge = kind, judge

    def _score(self, images: ImageBatch, prompts: list[str]) -> list[float]:
        results = verify(images, prompts, judge=self.judge)
        return [float(r["passed"]) if self.kind == "pass" else r["score"] for r in results]


def summarize(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per-category pass rates (in %), their mean over GenEval's six categories ("overall"), the mean score and
    per-check rates (in %), from `verify`'s results."""
    from .grammar import CATEGORIES

    table: dict[str, Any] = {}
    for category in CATEGORIES:
        rows = [r for r in results if r["category"] == category]
        if rows:
            table[category] = 100.0 * float(np.mean([r["passed"] for r in rows]))
    table["overall"] = float(np.mean([table[c] for c in CATEGORIES if c in table]))
    table["score"] = float(np.mean([r["score"] for r in results]))
    for kind in CHECKS:
        values = [r["checks"][kind] for r in results if kind in r["checks"]]
        if values:
            table[f"check_{kind}"] = 100.0 * float(np.mean(values))
    return table
