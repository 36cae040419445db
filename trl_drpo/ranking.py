"""Turning rewards into anchors: reward ensembles and positive / negative selection rules.

Pure torch. Scores are ``(B, K)``: ``K`` candidates for each of ``B`` prompts. A reward is only ever used to rank
candidates within one prompt's group (docs/method.md, section 3), so every rule here works per row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


SELECTION_RULES = ("topk", "mean_split", "threshold")


@dataclass
class AnchorSelection:
    """Indices, into one prompt's ``K`` candidates, of the positive and negative anchors (disjoint)."""

    positives: torch.Tensor
    negatives: torch.Tensor


def _check_scores(scores: torch.Tensor) -> torch.Tensor:
    scores = torch.as_tensor(scores, dtype=torch.float32)
    if scores.ndim != 2:
        raise ValueError(f"Scores must be (prompts, candidates), got shape {tuple(scores.shape)}.")
    if not torch.isfinite(scores).all():
        raise ValueError("Scores contain NaN or infinite values.")
    return scores


def zscore(scores: torch.Tensor, min_std: float = 1e-6) -> torch.Tensor:
    """Standardise each row (one prompt's candidates), dividing by ``max(std, min_std)`` as the authors do.

    A row whose spread is below ``min_std`` (a reward that barely tells its candidates apart) is scaled down instead
    of blown up to unit variance, so it cannot drown an informative reward in an ensemble; a constant row maps to
    zeros rather than to NaN.
    """
    scores = _check_scores(scores)
    centred = scores - scores.mean(dim=1, keepdim=True)
    std = centred.pow(2).mean(dim=1, keepdim=True).sqrt()
    return centred / std.clamp_min(min_std)


def reward_ensemble(
    scores: Sequence[torch.Tensor] | torch.Tensor, weights: Sequence[float] | None = None
) -> torch.Tensor:
    """Combine several rewards into one ranking score per candidate (docs/method.md §3, `score_reward_ensemble`).

    Each reward's ``(B, K)`` scores are z-scored within each prompt's group, then averaged with ``weights``
    normalised to sum to one. With a single reward the ranking is that reward's own.
    """
    if isinstance(scores, torch.Tensor):
        scores = list(scores) if scores.ndim == 3 else [scores]
    if not scores:
        raise ValueError("At least one reward is needed.")
    if weights is None:
        weights = [1.0] * len(scores)
    if len(weights) != len(scores):
        raise ValueError(f"Got {len(weights)} reward weights for {len(scores)} rewards.")
    w = torch.as_tensor(weights, dtype=torch.float32)
    if not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"Reward weights must be non-negative with a positive sum, got {list(weights)}.")
    w = w / w.sum()
    standardised = [zscore(s) for s in scores]
    shapes = {tuple(z.shape) for z in standardised}
    if len(shapes) > 1:
        raise ValueError(f"All rewards must score the same (prompts, candidates); got shapes {sorted(shapes)}.")
    return sum(wi * z for wi, z in zip(w.tolist(), standardised))


def top_bottom_k(scores: torch.Tensor, num_positives: int, num_negatives: int) -> list[AnchorSelection | None]:
    """Top ``num_positives`` candidates as positives and bottom ``num_negatives`` as negatives, per prompt.

    Ties are broken by candidate order (a stable sort), so the selection is deterministic. A prompt whose scores are
    all equal cannot be ranked: it yields None (skip it), as in every other rule.
    """
    scores = _check_scores(scores)
    k = scores.shape[1]
    if num_positives < 1 or num_negatives < 0 or num_positives + num_negatives > k:
        raise ValueError(
            f"Cannot pick {num_positives} positives and {num_negatives} negatives from {k} candidates: "
            "they must be disjoint (num_positives + num_negatives <= num_generations) with at least one positive."
        )
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    ranked = scores.amax(dim=1) > scores.amin(dim=1)
    return [
        AnchorSelection(positives=row[:num_positives], negatives=row[k - num_negatives :]) if usable else None
        for row, usable in zip(order, ranked.tolist())
    ]


def mean_split(scores: torch.Tensor) -> list[AnchorSelection | None]:
    """Candidates above their prompt's mean score are positives, those below are negatives.

    This is the sign of the advantage, with every anchor weighing the same. It is not the authors' "advsign"
    variant, which also weighs each anchor by a softmax of its score (advantage-weighted regression) and drops the
    reference term; here the anchor weights stay `positive_weight` / `negative_weight` and the reference term stays.
    A prompt whose scores are all equal carries no preference and yields None (skip it).
    """
    scores = _check_scores(scores)
    advantage = scores - scores.mean(dim=1, keepdim=True)
    out: list[AnchorSelection | None] = []
    for row in advantage:
        pos, neg = torch.nonzero(row > 0).flatten(), torch.nonzero(row < 0).flatten()
        out.append(AnchorSelection(pos, neg) if len(pos) and len(neg) else None)
    return out


def threshold_split(
    scores: torch.Tensor,
    threshold: float,
    num_positives: int,
    num_negatives: int,
    generator: torch.Generator | None = None,
) -> list[AnchorSelection | None]:
    """Pass/fail rule for binary rewards (GenEval-style, docs/method.md §3).

    Candidates scoring ``>= threshold`` pass. Up to ``num_positives`` positives and ``num_negatives`` negatives are
    drawn at random from the pass and fail pools (with ``generator`` for reproducibility). A prompt with an empty
    pool carries no preference and yields None (skip it).
    """
    scores = _check_scores(scores)
    out: list[AnchorSelection | None] = []
    for row in scores:
        passed, failed = torch.nonzero(row >= threshold).flatten(), torch.nonzero(row < threshold).flatten()
        if not len(passed) or not len(failed):
            out.append(None)
            continue
        passed = passed[torch.randperm(len(passed), generator=generator)[:num_positives]]
        failed = failed[torch.randperm(len(failed), generator=generator)[:num_negatives]]
        out.append(AnchorSelection(passed, failed))
    return out


def select_anchors(
    scores: torch.Tensor,
    rule: str,
    num_positives: int,
    num_negatives: int,
    threshold: float = 0.5,
    generator: torch.Generator | None = None,
) -> list[AnchorSelection | None]:
    """Dispatch to a selection rule by name: ``topk``, ``mean_split`` or ``threshold``."""
    if rule == "topk":
        return list(top_bottom_k(scores, num_positives, num_negatives))
    if rule == "mean_split":
        return mean_split(scores)
    if rule == "threshold":
        return threshold_split(scores, threshold, num_positives, num_negatives, generator)
    raise ValueError(f"Unknown anchor selection rule {rule!r}; choose one of {SELECTION_RULES}.")
