"""A differentiable surrogate of the digit world's verifier, for the DRaFT baseline of `benchmarks.world_comparison`.

DRaFT needs a reward it can differentiate; the verifier (connected components, a support-vector classifier, exact
checks) gives none. Like the paper's DRaFT, which optimises PickScore and is judged by metrics it never trained on,
DRaFT here optimises this surrogate and is measured by the verifier and the judge.

The surrogate reads a 32x32 scene as the world draws it, a 2x2 grid of 16-pixel cells, and a small CNN (shared
across cells) gives each cell a distribution over "empty or digit 0-9" and over the four colours. The caption's
checks (`trl_drpo.worlds.digits.verifier.CHECKS`) are then scored softly:

- ``count``: the probability that exactly as many cells are occupied as the caption names (occupancy independent
  per cell);
- ``digit`` / ``color``: the probability that the cell given to each named object holds its digit (and, for a
  coloured object, that it is occupied and has its colour);
- ``position``: whether the cells given to the two objects stand in the caption's relation (left/right: their
  columns; above/below: their rows), so relations steer which assignment scores best.

Cells are given to the caption's objects by the assignment (distinct cells) with the highest summed soft checks,
and the score is the mean of the checks, in [0, 1], like the verifier's. It is trained on scenes drawn from the
train-half glyphs only, with the world's colours and offsets plus pixel noise.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trl_drpo.worlds.digits.grammar import COLORS, parse
from trl_drpo.worlds.digits.scenes import CELL, GLYPH_SIZE, glyphs

from .reward_models import RewardTower


EMPTY = 10
"""Index of the "empty cell" class after the ten digits."""
_COLOR_NAMES = tuple(COLORS)
_PALETTE = np.asarray([COLORS[name] for name in _COLOR_NAMES], dtype=np.float32)


class CellClassifier(nn.Module):
    """A small CNN for one 16x16 RGB cell: logits over "digit 0-9 or empty" `(N, 11)` and over the colours `(N, 4)`."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.Flatten(),
            nn.Linear(2 * width * 16, 128),
            nn.SiLU(),
        )
        self.digit = nn.Linear(128, EMPTY + 1)
        self.color = nn.Linear(128, len(_COLOR_NAMES))

    def forward(self, cells: Tensor) -> tuple[Tensor, Tensor]:
        hidden = self.body(cells)
        return self.digit(hidden), self.color(hidden)


def split_cells(images: Tensor) -> Tensor:
    """`(N, 3, 32, 32)` scenes -> `(N * 4, 3, 16, 16)` cells, in the world's cell order (0 1 / 2 3) per scene."""
    n = images.shape[0]
    cells = images.unfold(2, CELL, CELL).unfold(3, CELL, CELL)  # (N, 3, 2, 2, 16, 16)
    return cells.permute(0, 2, 3, 1, 4, 5).reshape(n * 4, 3, CELL, CELL)


def synthetic_scenes(count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`count` labelled scenes from the train-half glyphs: images `(count, 3, 32, 32)` float32 in [0, 1], per-cell
    digit labels `(count, 4)` (10 for empty) and colour labels `(count, 4)` (-1 for empty). 0-3 glyphs per scene,
    placed as the world places them (2-3 pixels into their cell), with Gaussian pixel noise of random strength."""
    images, labels = glyphs("train")
    scenes = np.zeros((count, 32, 32, 3), dtype=np.float32)
    digit_labels = np.full((count, 4), EMPTY, dtype=np.int64)
    color_labels = np.full((count, 4), -1, dtype=np.int64)
    for i in range(count):
        for cell in rng.permutation(4)[: rng.integers(0, 4)]:
            glyph, color = rng.integers(len(labels)), rng.integers(len(_COLOR_NAMES))
            top = (cell // 2) * CELL + 2 + int(rng.integers(2))
            left = (cell % 2) * CELL + 2 + int(rng.integers(2))
            scenes[i, top : top + GLYPH_SIZE, left : left + GLYPH_SIZE] = images[glyph][..., None] * _PALETTE[color]
            digit_labels[i, cell], color_labels[i, cell] = labels[glyph], color
    noise = rng.normal(size=scenes.shape).astype(np.float32) * rng.uniform(0, 0.08, size=(count, 1, 1, 1))
    scenes = np.clip(scenes + noise, 0, 1).astype(np.float32)
    return scenes.transpose(0, 3, 1, 2).copy(), digit_labels, color_labels


def train_cell_classifier(steps: int = 600, batch_size: int = 128, seed: int = 0) -> CellClassifier:
    """Fit a `CellClassifier` on fresh synthetic scenes (`synthetic_scenes`), Adam at 2e-3; about 15 s on 2 cores.
    Deterministic for a `seed`; returned frozen, in eval mode."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = CellClassifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(steps):
        scenes, digits, colors = (torch.from_numpy(a) for a in synthetic_scenes(batch_size, rng))
        digit_logits, color_logits = model(split_cells(scenes))
        loss = F.cross_entropy(digit_logits, digits.flatten()) + F.cross_entropy(
            color_logits, colors.flatten(), ignore_index=-1
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval().requires_grad_(False)


@functools.lru_cache(maxsize=64)
def _caption_plan(prompt: str) -> dict[str, Any]:
    # Everything about a caption the soft checks need, as tensors: candidate assignments of distinct cells to its
    # objects, each object's digit and colour (-1: none), and which assignments satisfy its relation.
    structure = parse(prompt)
    objects, relation = structure["objects"], structure["relation"]
    assignments = torch.tensor(list(itertools.permutations(range(4), len(objects))))  # (A, n)
    relation_ok = torch.ones(len(assignments))
    if relation is not None:
        first, second = assignments[:, 0], assignments[:, 1]
        holds = {
            "to the left of": (first % 2 == 0) & (second % 2 == 1),
            "to the right of": (first % 2 == 1) & (second % 2 == 0),
            "above": (first // 2 == 0) & (second // 2 == 1),
            "below": (first // 2 == 1) & (second // 2 == 0),
        }[relation]
        relation_ok = holds.float()
    colors = [_COLOR_NAMES.index(o["color"]) if o["color"] else -1 for o in objects]
    return {
        "count": len(objects),
        "assignments": assignments,
        "digits": torch.tensor([o["digit"] for o in objects]),
        "colors": torch.tensor(colors),
        "relation_ok": relation_ok if relation is not None else None,
        "num_checks": 1 + len(objects) + sum(c >= 0 for c in colors) + (relation is not None),
    }


def exact_count_probability(occupied: Tensor, count: int) -> Tensor:
    """P(exactly `count` of the independent events happen), for probabilities `occupied` `(..., 4)`: the
    Poisson-binomial distribution computed by dynamic programming, differentiable."""
    distribution = torch.zeros(*occupied.shape[:-1], occupied.shape[-1] + 1, dtype=occupied.dtype)
    distribution[..., 0] = 1.0
    for i in range(occupied.shape[-1]):
        p = occupied[..., i : i + 1]
        shifted = torch.cat([torch.zeros_like(distribution[..., :1]), distribution[..., :-1]], dim=-1)
        distribution = distribution * (1 - p) + shifted * p
    return distribution[..., count]


def soft_caption_scores(digit_probs: Tensor, color_probs: Tensor, prompts: Sequence[str]) -> Tensor:
    """Soft verifier scores `(N,)` in [0, 1] from per-cell probabilities `digit_probs` `(N, 4, 11)` and `color_probs`
    `(N, 4, 4)`, one caption of the world's grammar per scene (see the module docstring)."""
    scores = []
    for n, prompt in enumerate(prompts):
        plan = _caption_plan(prompt)
        occupied = 1 - digit_probs[n, :, EMPTY]
        cells = plan["assignments"]  # (A, k)
        checks = digit_probs[n][cells, plan["digits"]].sum(dim=1)  # (A,)
        colored = plan["colors"] >= 0
        if colored.any():
            color_cells = cells[:, colored]
            checks = checks + (occupied[color_cells] * color_probs[n][color_cells, plan["colors"][colored]]).sum(1)
        if plan["relation_ok"] is not None:
            checks = checks + plan["relation_ok"]
        total = exact_count_probability(occupied, plan["count"]) + checks.max()
        scores.append(total / plan["num_checks"])
    return torch.stack(scores)


class SurrogateVerifier(RewardTower):
    """The surrogate as a differentiable reward for `benchmarks.draft_baseline.draft_step`:
    `score(images (N, 3, 32, 32) in [0, 1], prompts) -> (N,)` soft scores in [0, 1] with gradient to the images."""

    def __init__(self, classifier: CellClassifier) -> None:
        super().__init__()
        self.classifier = classifier

    def prompt_state(self, prompts: Sequence[str]) -> list[str]:
        return list(prompts)

    def select_state(self, state: list[str], index: Tensor) -> list[str]:
        return [state[int(i)] for i in index]

    def score(self, images: Tensor, state: list[str]) -> Tensor:
        if images.shape[-2:] != (32, 32):
            images = F.interpolate(images, size=(32, 32), mode="bilinear", antialias=True)
        digit_logits, color_logits = self.classifier(split_cells(images.float()))
        n = images.shape[0]
        return soft_caption_scores(
            digit_logits.softmax(-1).view(n, 4, -1), color_logits.softmax(-1).view(n, 4, -1), state
        )

    @property
    def backbone(self) -> nn.Module:
        return self.classifier
