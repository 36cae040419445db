"""The DrPO objective over feature keys, built on the drift estimator of `trl_drpo.drift`.

Pure torch, no I/O and no diffusers (docs/method.md §2, §4). `drpo_targets` / `DrPOTargets.loss` compute the
preference and reference fields of every feature key once without gradient, then regress candidate features onto
them, over candidate chunks if need be (docs/method.md §4) with the same gradient as one pass.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .drift import DriftTarget, canonical_kernel, drift_field


@dataclass
class DriftHyperparams:
    """The numbers of the DrPO objective; `DrPOConfig` builds one. Defaults: the paper's SD-Turbo recipe.

    ``key_weights`` maps feature keys to loss weights (> 0; a key not named weighs 1), applied on top of
    ``aggregation`` (docs/method.md §2): each key's field has unit RMS per radius, so the weight is the key's share
    of the update's direction.
    """

    positive_weight: float = 3000.0
    negative_weight: float = 3000.0
    reference_weight: float = 3000.0
    reference_negative_weight: float = 3000.0
    reference_loss_weight: float = 0.2
    preference_radii: Sequence[float] = (0.02, 0.05, 0.2)
    reference_radii: Sequence[float] = (0.02, 0.05, 0.2)
    kernel: str = "laplacian"
    aggregation: str = "sum"
    key_weights: Mapping[str, float] | None = None
    drift_step: float = 1.0
    mask_anchor_copies: bool = False
    mask_reference_pairs: bool = False
    token_matching: str = "pooled"

    def __post_init__(self) -> None:
        self.preference_radii = tuple(float(r) for r in self.preference_radii)
        self.reference_radii = tuple(float(r) for r in self.reference_radii)
        self.kernel = canonical_kernel(self.kernel)
        if self.token_matching not in TOKEN_MATCHING:
            raise ValueError(f"`token_matching` must be one of {TOKEN_MATCHING}, got {self.token_matching!r}.")
        if self.aggregation not in ("sum", "mean"):
            raise ValueError(f"Feature-key aggregation must be 'sum' or 'mean', got {self.aggregation!r}.")
        self.key_weights = dict(self.key_weights or {})
        bad = invalid_key_weights(self.key_weights)
        if bad:
            raise ValueError(f"Feature-key weights must be finite and > 0 (leave a key out to drop it), got {bad}.")
        if self.reference_loss_weight < 0:
            raise ValueError("The reference loss weight (lambda) must be >= 0.")


TOKEN_MATCHING = ("pooled", "positional")


def invalid_key_weights(weights: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of a feature key -> loss weight mapping that are not finite numbers > 0 (booleans included),
    empty when every weight is valid."""

    def valid(weight: Any) -> bool:
        number = isinstance(weight, (int, float)) and not isinstance(weight, bool)
        return number and math.isfinite(weight) and weight > 0

    return {key: weight for key, weight in weights.items() if not valid(weight)}


def as_feature_set(features: torch.Tensor, token_matching: str = "pooled") -> torch.Tensor:
    """Arrange per-sample tokens ``(B, K, T, D)`` into particle sets (docs/method.md §2).

    ``"pooled"`` (the authors'): one set ``(B, K*T, D)`` per row, in which all tokens of all samples of a prompt
    interact, with no positional matching. ``"positional"``: one set ``(B*T, K, D)`` per row and token position, row
    ``b * T + t`` holding token ``t`` of every sample, so a token is compared only with the same position of other
    samples (docs/method.md §8).
    """
    if features.ndim != 4:
        raise ValueError(f"Per-sample features must be (batch, samples, tokens, dim), got {tuple(features.shape)}.")
    b, k, t, d = features.shape
    if token_matching == "positional":
        return features.transpose(1, 2).reshape(b * t, k, d)
    if token_matching != "pooled":
        raise ValueError(f"`token_matching` must be one of {TOKEN_MATCHING}, got {token_matching!r}.")
    return features.reshape(b, k * t, d)


def _per_row(value: torch.Tensor, tokens: int, token_matching: str) -> torch.Tensor:
    """Per-set values ``(B*T,)`` of positional sets back to one value per row ``(B,)`` (the mean over positions)."""
    return value.view(-1, tokens).mean(dim=1) if token_matching == "positional" else value


def _row_values(
    target: DriftTarget, particles: torch.Tensor, tokens: int, token_matching: str
) -> dict[str, torch.Tensor]:
    """A drift estimate's loss at the current point (``"loss"``) and its diagnostics, one value per row ``(B,)``."""
    values = {"loss": target.loss(particles), **target.diagnostics}
    return {name: _per_row(value, tokens, token_matching) for name, value in values.items()}


@dataclass
class DrPOTargets:
    """Detached DrPO targets for every feature key, computed once per step without gradient.

    ``terms[key]`` holds ``(weight, DriftTarget)`` pairs: the preference term and, when lambda > 0, the reference
    term, with the key-aggregation factor and the key's weight folded into the weights.
    """

    terms: dict[str, list[tuple[float, DriftTarget]]]
    tokens: dict[str, int]
    num_candidates: int
    metrics: dict[str, torch.Tensor]
    token_matching: str = "pooled"

    def to(self, device: torch.device | str) -> DrPOTargets:
        """Move the stored goals and scales to `device`, in place (the regression runs where the features live);
        returns `self`."""
        for terms in self.terms.values():
            for _, term in terms:
                term.to(device)
        return self

    def loss(self, features: Mapping[str, torch.Tensor], start: int = 0) -> torch.Tensor:
        """DrPO loss per row for candidates ``start:start+k`` whose features are ``(B, k, T, D)`` per key.

        Summed over a partition of the candidates into chunks, this equals the loss of all candidates at once, and
        so does its gradient (docs/method.md §4).
        """
        missing = set(self.terms) - set(features)
        if missing:
            raise KeyError(f"Features are missing keys {sorted(missing)}.")
        total = None
        for key, terms in self.terms.items():
            feats = features[key]
            if feats.ndim != 4 or feats.shape[2] != self.tokens[key]:
                raise ValueError(f"Feature {key!r} must be (batch, chunk, {self.tokens[key]}, dim).")
            particles = as_feature_set(feats, self.token_matching)
            offset = start if self.token_matching == "positional" else start * self.tokens[key]
            for weight, target in terms:
                term = weight * _per_row(target.loss(particles, offset), self.tokens[key], self.token_matching)
                total = term if total is None else total + term
        return total


def drpo_targets(
    generated: Mapping[str, torch.Tensor],
    positives: Mapping[str, torch.Tensor],
    negatives: Mapping[str, torch.Tensor],
    reference: Mapping[str, torch.Tensor] | None,
    params: DriftHyperparams,
    anchor_sources: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> DrPOTargets:
    """Build the DrPO targets of docs/method.md §2 for every feature key.

    Args:
        generated: key -> ``(B, K, T, D)`` features of the current candidates.
        positives: key -> ``(B, P, T, D)`` features of the positive anchors (detached copies of candidates).
        negatives: key -> ``(B, M, T, D)`` features of the negative anchors.
        reference: key -> ``(B, K, T, D)`` features of the reference (base generator) samples from the same noise,
            or None when ``params.reference_loss_weight == 0``.
        params: the objective's numbers.
        anchor_sources: ``(positives, negatives)`` index tensors ``(P,)`` and ``(M,)``: the candidate each anchor
            is a copy of, -1 for none. With ``params.mask_anchor_copies`` each candidate's own copy is masked (see
            `drift_field`).

    Returns:
        `DrPOTargets`; its ``metrics`` hold per-row diagnostics averaged over keys (``feature_scale``,
        ``drift_rms_{r}``, ``dist_pos``, ``dist_neg``, ``dist_ref``) and the per-row loss values ``loss_pref`` /
        ``loss_ref`` at the current point.
    """
    if not generated:
        raise ValueError("No feature keys: the feature map returned an empty dict.")
    use_reference = params.reference_loss_weight > 0
    if use_reference and reference is None:
        raise ValueError("Reference features are required when the reference loss weight is > 0.")
    keys = list(generated)
    for name, feats in (("positives", positives), ("negatives", negatives)) + (
        (("reference", reference),) if use_reference else ()
    ):
        missing = set(keys) - set(feats)
        if missing:
            raise KeyError(f"{name} features are missing keys {sorted(missing)}.")
    unknown = set(params.key_weights) - set(keys)
    if unknown:
        raise KeyError(f"Feature-key weights name keys the features do not have: {sorted(unknown)} (keys: {keys}).")
    aggregation_factor = 1.0 if params.aggregation == "sum" else 1.0 / len(keys)

    terms: dict[str, list[tuple[float, DriftTarget]]] = {}
    tokens: dict[str, int] = {}
    sums: dict[str, torch.Tensor] = {}

    matching = params.token_matching

    def accumulate(name: str, value: torch.Tensor) -> None:
        sums[name] = sums[name] + value / len(keys) if name in sums else value / len(keys)

    num_candidates = None
    for key in keys:
        key_factor = aggregation_factor * float(params.key_weights.get(key, 1.0))
        gen = generated[key].detach()
        if gen.ndim != 4:
            raise ValueError(f"Feature {key!r} must be (batch, samples, tokens, dim), got {tuple(gen.shape)}.")
        num_candidates = gen.shape[1] if num_candidates is None else num_candidates
        tokens[key] = gen.shape[2]
        gen_set = as_feature_set(gen, matching)
        sources = {}
        if params.mask_anchor_copies and anchor_sources is not None:
            for name, index in zip(("positive_sources", "negative_sources"), anchor_sources):
                index = index.cpu().long()
                if matching == "positional":  # each set holds one token of every sample: c's copy is particle c
                    sources[name] = index
                else:  # anchor token t of candidate c is a copy of generated particle c * T + t
                    particles = index[:, None] * tokens[key] + torch.arange(tokens[key])
                    sources[name] = torch.where(index[:, None] >= 0, particles, -1).flatten()
        pref = drift_field(
            gen_set,
            as_feature_set(positives[key], matching),
            as_feature_set(negatives[key], matching),
            positive_weight=params.positive_weight,
            negative_weight=params.negative_weight,
            radii=params.preference_radii,
            kernel=params.kernel,
            drift_step=params.drift_step,
            **sources,
        )
        terms[key] = [(key_factor, pref)]
        rows = _row_values(pref, gen_set, tokens[key], matching)
        accumulate("loss_pref", rows["loss"])
        accumulate("feature_scale", rows["feature_scale"])
        accumulate("dist_pos", rows["mean_dist_pos"])
        if "mean_dist_neg" in rows:
            accumulate("dist_neg", rows["mean_dist_neg"])
        for name, value in rows.items():
            if name.startswith("drift_rms_"):
                accumulate(name, value)
        if use_reference:
            ref = drift_field(
                gen_set,
                as_feature_set(reference[key], matching),
                gen_set,
                positive_weight=params.reference_weight,
                negative_weight=params.reference_negative_weight,
                radii=params.reference_radii,
                kernel=params.kernel,
                mask_self_negatives=True,
                # Reference sample c comes from candidate c's noise: masking that pair makes the field compare the
                # two sets without the sample itself, so it vanishes at the base instead of pushing samples apart.
                positive_sources=torch.arange(gen_set.shape[1]) if params.mask_reference_pairs else None,
                drift_step=params.drift_step,
            )
            terms[key].append((key_factor * params.reference_loss_weight, ref))
            rows = _row_values(ref, gen_set, tokens[key], matching)
            accumulate("loss_ref", rows["loss"])
            accumulate("dist_ref", rows["mean_dist_pos"])
            for name, value in rows.items():
                if name.startswith("drift_rms_"):
                    accumulate("ref_" + name, value)
    return DrPOTargets(
        terms=terms, tokens=tokens, num_candidates=num_candidates, metrics=sums, token_matching=matching
    )


def _prompt_row(features: Mapping[str, torch.Tensor], b: int) -> dict[str, torch.Tensor]:
    # Prompt b's features, keeping the batch dimension that `drpo_targets` reads as one prompt.
    return {key: value[b : b + 1] for key, value in features.items()}


def drpo_targets_from_anchors(
    generated: Mapping[str, torch.Tensor],
    reference: Mapping[str, torch.Tensor] | None,
    anchors: Sequence[Any],
    params: DriftHyperparams,
    extra: Mapping[str, torch.Tensor] | None = None,
) -> list[DrPOTargets | None]:
    """`drpo_targets` for each prompt, with anchors that are detached copies of its own candidates (docs/method.md §3).

    Args:
        generated: key -> ``(B, K, T, D)`` features of every prompt's candidates.
        reference: key -> ``(B, K, T, D)`` reference features, or None without the reference term.
        anchors: one entry per prompt: an object with ``positives`` and ``negatives`` index tensors into its K
            candidates, then its E extra ones (`trl_drpo.ranking.AnchorSelection`), or None to skip the prompt (its
            entry stays None).
        params: the objective's numbers.
        extra: key -> ``(B, E, T, D)`` features of extra anchor candidates (ranked with the K, not trained), or None.
            An anchor copied from one of them has no candidate of its own to mask.
    """
    targets: list[DrPOTargets | None] = []
    for b, selection in enumerate(anchors):
        if selection is None:
            targets.append(None)
            continue
        row = _prompt_row(generated, b)
        pool = row if extra is None else {k: torch.cat([v, extra[k][b : b + 1]], dim=1) for k, v in row.items()}
        num_candidates = next(iter(row.values())).shape[1]
        sources = tuple(
            torch.where(index < num_candidates, index, -1) for index in (selection.positives, selection.negatives)
        )
        targets.append(
            drpo_targets(
                row,
                {key: value[:, selection.positives] for key, value in pool.items()},
                {key: value[:, selection.negatives] for key, value in pool.items()},
                _prompt_row(reference, b) if reference else None,
                params,
                anchor_sources=sources,
            )
        )
    return targets


def drpo_targets_per_prompt(
    generated: Mapping[str, torch.Tensor],
    positives: Mapping[str, torch.Tensor],
    negatives: Mapping[str, torch.Tensor],
    reference: Mapping[str, torch.Tensor] | None,
    params: DriftHyperparams,
) -> list[DrPOTargets]:
    """`drpo_targets` for each prompt separately, with anchors given as feature sets (offline DrPO, docs/method.md §9:
    the encoded chosen and rejected images of each prompt). Shapes as in `drpo_targets`, row ``b`` = prompt ``b``."""
    batch = next(iter(generated.values())).shape[0]
    return [
        drpo_targets(
            _prompt_row(generated, b),
            _prompt_row(positives, b),
            _prompt_row(negatives, b),
            _prompt_row(reference, b) if reference else None,
            params,
        )
        for b in range(batch)
    ]


def regression_loss(
    targets: Sequence[DrPOTargets], features: Mapping[str, torch.Tensor], prompts: Sequence[int], begin: int = 0
) -> torch.Tensor:
    """Summed `DrPOTargets.loss` of a chunk of candidates of several prompts.

    Row ``n`` of every ``(len(prompts), chunk, T, D)`` tensor of `features` holds candidates ``begin, begin + 1, ...``
    of prompt ``prompts[n]``, whose targets are ``targets[prompts[n]]``.
    """
    losses = [
        targets[b].loss({key: value[n : n + 1] for key, value in features.items()}, begin).sum()
        for n, b in enumerate(prompts)
    ]
    return torch.stack(losses).sum()


def drpo_loss(
    generated: Mapping[str, torch.Tensor],
    positives: Mapping[str, torch.Tensor],
    negatives: Mapping[str, torch.Tensor],
    reference: Mapping[str, torch.Tensor] | None,
    params: DriftHyperparams | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The DrPO loss in one graph: ``agg_k L_pref,k + lambda * agg_k L_ref,k`` per row, plus its metrics.

    Inputs as in `drpo_targets`; ``generated`` carries the gradient.
    """
    targets = drpo_targets(generated, positives, negatives, reference, params or DriftHyperparams())
    return targets.loss(generated), targets.metrics
