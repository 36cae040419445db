"""The DrPO drift field: kernel mean-shift targets in feature space.

Pure torch, no I/O and no diffusers. This is the estimator of docs/method.md, section 2 (the "double
normalised kernel dipole" of the Drifting-model paper), and the preference / reference combination of sections
2.4-2.6.

Shapes follow one convention: a *set* of features is ``(B, N, D)``; ``B`` independent sets (one per prompt in the
trainer) are processed in parallel and never interact. The public entry points are:

- `drift_field` -> `DriftTarget`: the stop-gradient goal ``sg(x/sigma + V)`` for one set, plus diagnostics
  (`DriftTarget.field_at` gives back ``V``);
- `drift_loss`: the estimator's loss for one set, ``mean_{i,d} (G/sigma - goal)^2`` per row;

The DrPO objective over feature keys, built on this estimator, lives in `trl_drpo.objective`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


KERNELS = ("laplacian", "rbf", "cosine")
_KERNEL_ALIASES = {"exponential": "laplacian", "gaussian": "rbf"}

# Constants of the reference implementation (docs/method.md §2), reproduced on purpose.
_DIST_EPS = 1e-8  # clamp of squared distances: no distance is below 1e-4
_SCALE_MIN = 1e-3  # floor of the feature scale s and of sigma
_RMS_EPS = 1e-8  # floor of the squared per-radius RMS

AnchorWeight = float | torch.Tensor


def canonical_kernel(kernel: str) -> str:
    """Return the canonical kernel name (``exponential`` is the paper's name for ``laplacian``)."""
    name = _KERNEL_ALIASES.get(kernel, kernel)
    if name not in KERNELS:
        raise ValueError(f"Unknown drift kernel {kernel!r}; choose one of {KERNELS} (or the alias 'exponential').")
    return name


def _check_set(name: str, x: torch.Tensor, batch: int | None = None, dim: int | None = None) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 3:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"`{name}` must be a (batch, samples, dim) tensor, got {shape}.")
    if batch is not None and x.shape[0] != batch:
        raise ValueError(f"`{name}` has batch size {x.shape[0]} but `generated` has {batch}.")
    if dim is not None and x.shape[2] != dim:
        raise ValueError(f"`{name}` has feature dim {x.shape[2]} but `generated` has {dim}.")
    if not torch.isfinite(x.detach()).all():
        raise ValueError(f"`{name}` contains NaN or infinite values; check the feature map and the generator output.")


def _anchor_weights(name: str, weight: AnchorWeight, batch: int, count: int, device: torch.device) -> torch.Tensor:
    """Broadcast a scalar, per-anchor ``(count,)`` or per-row ``(batch, count)`` weight to ``(batch, count)``."""
    w = torch.as_tensor(weight, dtype=torch.float32, device=device).detach()
    if w.ndim == 0:
        w = w.expand(batch, count)
    elif w.ndim == 1 and w.shape[0] == count:
        w = w.unsqueeze(0).expand(batch, count)
    elif w.shape != (batch, count):
        raise ValueError(
            f"`{name}` must be a float, a ({count},) tensor or a ({batch}, {count}) tensor, got {tuple(w.shape)}."
        )
    if not torch.isfinite(w).all() or (w < 0).any():
        raise ValueError(f"`{name}` must be finite and non-negative.")
    return w


@dataclass
class DriftTarget:
    """The stop-gradient regression target of one drift estimate.

    Attributes:
        goal: ``(B, N, D)`` detached goal ``x/sigma + V`` in scaled coordinates.
        sigma: ``(B,)`` per-row coordinate scale ``max(1e-3, s / sqrt(D))``.
        diagnostics: detached scalars per row, see `drift_field`.
    """

    goal: torch.Tensor
    sigma: torch.Tensor
    diagnostics: dict[str, torch.Tensor] = field(default_factory=dict)

    def to(self, device: torch.device | str) -> DriftTarget:
        """Move the goal and the scale to `device`, in place; returns `self`."""
        self.goal, self.sigma = self.goal.to(device), self.sigma.to(device)
        return self

    def field_at(self, generated: torch.Tensor) -> torch.Tensor:
        """The field ``drift_step * V`` at the features ``generated`` ``(B, N, D)`` it was estimated at: the goal
        minus the scaled point, ``(B, N, D)`` float32 in scaled coordinates (where each sample is sent)."""
        return self.goal - generated.detach().float() / self.sigma.view(-1, 1, 1)

    def loss(self, generated: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Regression loss of ``generated`` (particles ``start:start+n`` of the set) onto the goal, per row.

        The sum over a partition of the set into slices equals the loss of the whole set: each slice is normalised
        by the full set size ``N * D``, which is what lets the trainer back-propagate chunk by chunk.
        """
        batch, total, dim = self.goal.shape
        fits = generated.ndim == 3 and generated.shape[0] == batch and generated.shape[2] == dim
        n = generated.shape[1] if fits else 0
        if not fits or start < 0 or start + n > total:
            raise ValueError(
                f"Cannot regress a {tuple(generated.shape)} slice at {start} onto a {tuple(self.goal.shape)} target."
            )
        goal = self.goal[:, start : start + n]
        scaled = generated.float() / self.sigma.view(batch, 1, 1)
        return (scaled - goal).pow(2).sum(dim=(1, 2)) / (total * dim)


def drift_field(
    generated: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor,
    *,
    positive_weight: AnchorWeight,
    negative_weight: AnchorWeight,
    radii: Sequence[float],
    kernel: str = "laplacian",
    mask_self_negatives: bool = False,
    positive_sources: torch.Tensor | None = None,
    negative_sources: torch.Tensor | None = None,
    drift_step: float = 1.0,
    affinity_floor: float = 1e-6,
    self_mask_penalty: float = 100.0,
) -> DriftTarget:
    """Estimate the drift field ``V`` for a set of generated features and return its stop-gradient target.

    Args:
        generated: ``(B, N, D)`` current features; only their values are used here.
        positives: ``(B, P, D)`` positive anchors (attract).
        negatives: ``(B, M, D)`` negative anchors (repel). ``M`` may be 0.
        positive_weight: weight ``w+`` of every positive: a float, a ``(P,)`` or a ``(B, P)`` tensor.
        negative_weight: weight ``w-`` of every negative, likewise.
        radii: kernel temperatures, relative to the mean distance (e.g. ``(0.02, 0.05, 0.2)``).
        kernel: ``"laplacian"`` (alias ``"exponential"``), ``"rbf"`` or ``"cosine"``.
        mask_self_negatives: the negatives are the generated set itself (``M == N``, reference term); mask each
            sample's own copy among them.
        positive_sources: ``(P,)`` integer tensor: for each positive anchor that is a copy of a generated sample,
            that sample's index in ``[0, N)`` (-1 for none). The pair (sample, its own copy) is masked like a self
            pair, so that a candidate chosen as an anchor is not pulled by or pushed from itself (docs/method.md §2).
            None (the authors' estimator) masks nothing.
        negative_sources: ``(M,)``, likewise for the negative anchors.
        drift_step: multiplier on the normalised field (the paper's ``eta`` is the anchor weight; keep 1.0).
        affinity_floor: clamp of the product of the two softmaxes before the square root.
        self_mask_penalty: logit penalty ``penalty / r`` on masked self pairs.

    Returns:
        A `DriftTarget` whose ``goal`` is ``x/sigma + drift_step * V`` with ``V = sum_r F_r / rms(F_r)``, and
        diagnostics ``feature_scale`` (s), ``feature_scale_per_dim`` (sigma), ``drift_rms_{r}`` (the RMS of the
        raw force at each radius, before normalisation), ``mean_dist_pos`` and ``mean_dist_neg``.
    """
    _check_set("generated", generated)
    batch, n_gen, dim = generated.shape
    _check_set("positives", positives, batch, dim)
    _check_set("negatives", negatives, batch, dim)
    n_pos, n_neg = positives.shape[1], negatives.shape[1]
    if n_gen == 0 or n_pos == 0:
        raise ValueError(f"The drift needs at least one generated sample and one positive, got {n_gen} and {n_pos}.")
    if mask_self_negatives and n_neg != n_gen:
        raise ValueError(
            f"mask_self_negatives=True requires the negatives to be the generated set ({n_gen} samples), got {n_neg}."
        )
    for name, sources, count in (
        ("positive_sources", positive_sources, n_pos),
        ("negative_sources", negative_sources, n_neg),
    ):
        if sources is not None and (sources.shape != (count,) or bool(((sources < -1) | (sources >= n_gen)).any())):
            raise ValueError(
                f"`{name}` must hold one index in [-1, {n_gen}) per anchor ({count}), got {sources.tolist()}."
            )
    radii = [float(r) for r in radii]
    if not radii or any(not math.isfinite(r) or r <= 0 for r in radii):
        raise ValueError(f"`radii` must be a non-empty list of positive numbers, got {radii}.")
    kernel = canonical_kernel(kernel)
    device = generated.device

    with torch.no_grad():
        x = generated.detach().float()
        targets = torch.cat([x, negatives.detach().float(), positives.detach().float()], dim=1)
        weights = torch.cat(
            [
                torch.ones(batch, n_gen, device=device),
                _anchor_weights("negative_weight", negative_weight, batch, n_neg, device),
                _anchor_weights("positive_weight", positive_weight, batch, n_pos, device),
            ],
            dim=1,
        )
        if (weights[:, n_gen + n_neg :].sum(dim=1) <= 0).any():
            raise ValueError("At least one positive anchor must have a non-zero weight.")

        x_sq = x.pow(2).sum(-1, keepdim=True)
        t_sq = targets.pow(2).sum(-1).unsqueeze(1)
        dist = (x_sq + t_sq - 2 * x @ targets.transpose(1, 2)).clamp_min(_DIST_EPS).sqrt()

        scale = ((dist * weights.unsqueeze(1)).mean(dim=(1, 2)) / weights.mean(dim=1)).clamp_min(_SCALE_MIN)
        sigma = (scale / math.sqrt(dim)).clamp_min(_SCALE_MIN)
        x_scaled = x / sigma.view(batch, 1, 1)
        t_scaled = targets / sigma.view(batch, 1, 1)

        self_mask = torch.zeros(n_gen, n_gen + n_neg + n_pos, device=device)
        eye = torch.eye(n_gen, device=device)
        self_mask[:, :n_gen] = eye
        if mask_self_negatives:
            self_mask[:, n_gen : n_gen + n_neg] = eye
        for offset, sources in ((n_gen, negative_sources), (n_gen + n_neg, positive_sources)):
            if sources is not None:
                copies = torch.nonzero(sources >= 0).flatten()
                self_mask[sources[copies].to(device), offset + copies.to(device)] = 1.0

        if kernel == "cosine":
            unit_x = torch.nn.functional.normalize(x, dim=-1)
            cosine = unit_x @ torch.nn.functional.normalize(targets, dim=-1).transpose(1, 2)
        norm_dist = dist / scale.view(batch, 1, 1)

        n_neg_side = n_gen + n_neg
        field_sum = torch.zeros_like(x_scaled)
        diagnostics: dict[str, torch.Tensor] = {"feature_scale": scale, "feature_scale_per_dim": sigma}
        for radius in radii:
            if kernel == "laplacian":
                logits = -norm_dist / radius
            elif kernel == "rbf":
                logits = -0.5 * (norm_dist / radius).pow(2)
            else:
                logits = cosine / radius
            logits = logits - (self_mask_penalty / radius) * self_mask
            affinity = (logits.softmax(dim=-1) * logits.softmax(dim=-2)).clamp_min(affinity_floor).sqrt()
            affinity = affinity * weights.unsqueeze(1)
            a_neg, a_pos = affinity[..., :n_neg_side], affinity[..., n_neg_side:]
            mass_neg = a_neg.sum(-1, keepdim=True)
            mass_pos = a_pos.sum(-1, keepdim=True)
            # The displacement form (t - x) of the dipole force: identical to the reference's sum of
            # t-coefficients, which sum to zero.
            pull = a_pos @ t_scaled[:, n_neg_side:] - mass_pos * x_scaled
            push = a_neg @ t_scaled[:, :n_neg_side] - mass_neg * x_scaled
            force = mass_neg * pull - mass_pos * push
            rms = force.pow(2).mean(dim=(1, 2)).clamp_min(_RMS_EPS).sqrt()
            field_sum = field_sum + force / rms.view(batch, 1, 1)
            diagnostics[f"drift_rms_{radius:g}"] = rms

        diagnostics["mean_dist_pos"] = dist[..., n_neg_side:].mean(dim=(1, 2))
        if n_neg:
            diagnostics["mean_dist_neg"] = dist[..., n_gen:n_neg_side].mean(dim=(1, 2))
        goal = x_scaled + drift_step * field_sum
    return DriftTarget(goal=goal, sigma=sigma, diagnostics=diagnostics)


def drift_loss(
    generated: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor, **field_kwargs: Any
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The drift estimator's loss for one set of features (docs/method.md §2).

    Returns the per-row loss ``mean_{i,d} (generated/sigma - sg(x/sigma + V))^2`` of shape ``(B,)``, whose gradient
    with respect to ``generated`` is ``-2 V / (N D sigma)``, and the diagnostics of `drift_field`. The loss value is
    about the number of radii whatever the progress: it is a vehicle for the gradient, not a metric. The keyword
    arguments are `drift_field`'s (``positive_weight``, ``negative_weight`` and ``radii`` are required).
    """
    target = drift_field(generated, positives, negatives, **field_kwargs)
    return target.loss(generated), target.diagnostics
