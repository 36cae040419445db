"""The paper's reward-gradient-free one-step baselines (its comparison tables: DPO1step and GRPO1step, the latter
being Neighbor-GRPO), as the authors' public code runs them, on the project's generator.

The losses are pure functions of tensors; `dpo1step_update` and `neighbor_grpo_update` run one micro-step of each
on a `trl_drpo.generators.OneStepGenerator` (gradients accumulate on its LoRA), timing each component with a
`benchmarks.common.Meter` under the names DrPO's step uses (generation, decode, reward, field, backward).

- **DPO1step** (Diffusion-DPO made one-step, online): K candidates per prompt generated *with* gradient, ranked by
  the reward; the top and bottom candidates (detached) are the preference sets. A pseudo log-likelihood of a set is
  the negative mean squared latent distance between the K current samples and the set's members; the same for the
  frozen reference's samples from the same noise. Loss `-log sigmoid(beta * [(s+ - s-) - (s_ref+ - s_ref-)])`, one
  term per prompt, beta = 30.
- **Neighbor-GRPO**: K noises in a neighbourhood of one base noise per prompt, `sqrt(1 - sigma^2) * base + sigma *
  delta` (sigma = 0.3), rolled out without gradient and scored; advantages are the group's centred rewards scaled by
  a p = 0.8 quasi-norm, `sqrt(K) * (r - mean) / ||r - mean||_p`, clipped to +-5. A few candidates (anchors) are
  regenerated with gradient; a softmax over negative mean squared distances from the K rollout latents to an anchor
  is the anchor's "policy" over the group, and the loss is PPO's clipped surrogate (clip 0.2, log-ratio clamped to
  +-10) of that distribution against the rollout-time one, plus an L2 pull (weight 0.02) of the anchors to the
  reference's samples.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from trl_drpo.generators import OneStepGenerator

from .common import Meter


RankFn = Callable[[Tensor, list[str]], Tensor]
"""A rank-only reward: `(images (N, 3, H, W) in [0, 1], prompts (N)) -> (N,)` scores, never differentiated."""


# ---------------------------------------------------------------------------------------------------- DPO1step


def set_log_likelihood(samples: Tensor, targets: Tensor) -> Tensor:
    """DPO1step's pseudo log-likelihood of a preference set: minus the mean, over all (sample, target) pairs, of the
    mean squared difference. `samples` `(K, ...)`, `targets` `(M, ...)` -> a scalar."""
    distances = (samples.flatten(1).float()[:, None] - targets.flatten(1).float()[None]).pow(2).mean(-1)
    return -distances.mean()


def dpo1step_loss(
    policy: Tensor, reference: Tensor, scores: Tensor, num_positives: int, num_negatives: int, beta: float = 30.0
) -> Tensor:
    """Online DPO1step loss, averaged over prompts.

    Args:
        policy: the current samples, with gradient, `(B, K, ...)` latents.
        reference: the frozen reference's samples from the same noise `(B, K, ...)`.
        scores: `(B, K)` rewards ranking each prompt's candidates (higher is better).
        num_positives, num_negatives: sizes of the preferred (top) and rejected (bottom) sets.
        beta: the logit scale (the authors' 30).

    Returns:
        A scalar, `mean_b -log sigmoid(beta * [(s_b+ - s_b-) - (s_ref,b+ - s_ref,b-)])`; log 2 while policy equals
        reference.
    """
    losses = []
    for samples, ref, ranked in zip(policy, reference, scores):
        order = torch.argsort(ranked, descending=True, stable=True)
        chosen, rejected = samples[order[:num_positives]].detach(), samples[order[-num_negatives:]].detach()
        policy_gap = set_log_likelihood(samples, chosen) - set_log_likelihood(samples, rejected)
        with torch.no_grad():
            ref_gap = set_log_likelihood(ref, chosen) - set_log_likelihood(ref, rejected)
        losses.append(-F.logsigmoid(beta * (policy_gap - ref_gap)))
    return torch.stack(losses).mean()


# ---------------------------------------------------------------------------------------------------- Neighbor-GRPO


def neighbor_noises(base: Tensor, deltas: Tensor, sigma: float) -> Tensor:
    """Noises in a neighbourhood of `base` `(B, ...)`: `sqrt(1 - sigma^2) * base + sigma * deltas` for `deltas`
    `(B, K, ...)` standard normal; still standard normal per sample. Returns `(B, K, ...)`."""
    if not 0.0 < sigma <= 1.0:
        raise ValueError(f"sigma must be in (0, 1], got {sigma}.")
    return math.sqrt(1.0 - sigma**2) * base[:, None] + sigma * deltas


def quasi_norm_advantages(rewards: Tensor, p: float = 0.8, clip: float = 5.0, eps: float = 1e-6) -> Tensor:
    """Neighbor-GRPO's group advantages: `sqrt(G) * (r - mean) / ||r - mean||_p`, clipped to `+-clip`; zeros for a
    group without spread. `rewards` `(..., G)` -> the same shape, float32."""
    centered = rewards.float() - rewards.float().mean(-1, keepdim=True)
    norm = centered.abs().pow(p).sum(-1, keepdim=True).pow(1.0 / p)
    advantages = math.sqrt(rewards.shape[-1]) * centered / norm.clamp_min(eps)
    return torch.where(norm > eps, advantages, torch.zeros_like(advantages)).clamp(-clip, clip)


def neighbor_grpo_loss(
    candidates: Tensor,
    anchors: Tensor,
    old_anchors: Tensor,
    advantages: Tensor,
    clip_range: float = 0.2,
    max_log_ratio: float = 10.0,
    temperature: float = 1.0,
) -> Tensor:
    """PPO-clip loss of the anchors' distance-softmax "policies" over their group.

    Args:
        candidates: rollout latents `(B, G, ...)` (no gradient needed).
        anchors: anchors regenerated with gradient `(B, A, ...)`.
        old_anchors: the same anchors as rolled out `(B, A, ...)`.
        advantages: `(B, G)`.

    Returns:
        A scalar: `-mean min(ratio * adv, clip(ratio) * adv)` over prompts, anchors and candidates, where `ratio` is
        `pi(g | anchor) / pi_old(g | old anchor)` and `pi(g | a) = softmax_g(-mean((x_g - a)^2) / temperature)`.
    """
    flat = candidates.detach().float().flatten(2)[:, None]  # (B, 1, G, D)

    def log_policy(anchor: Tensor) -> Tensor:
        distances = (flat - anchor.float().flatten(2)[:, :, None]).pow(2).mean(-1)  # (B, A, G)
        return torch.log_softmax(-distances / temperature, dim=-1)

    log_ratio = (log_policy(anchors) - log_policy(old_anchors.detach()).detach()).clamp(-max_log_ratio, max_log_ratio)
    ratio = log_ratio.exp()
    adv = advantages.detach().float()[:, None]
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - clip_range, 1 + clip_range) * adv)
    return -surrogate.mean()


# ---------------------------------------------------------------------------------------------------- updates


@dataclass
class BaselineSettings:
    """Numbers of the baselines (the authors' defaults; K and the preference set sizes come from the comparison)."""

    num_generations: int = 16
    num_positives: int = 4
    num_negatives: int = 4
    dpo_beta: float = 30.0
    neighbor_sigma: float = 0.3
    quasi_norm_p: float = 0.8
    advantage_clip: float = 5.0
    num_anchors: int = 4
    clip_range: float = 0.2
    anchor_ref_l2: float = 0.02


def _rank(rank_fn: RankFn, generator: OneStepGenerator, latents: Tensor, prompts: list[str], meter: Meter) -> Tensor:
    with meter("decode"):
        images = generator.decode(latents.detach())
    with meter("reward"):
        return rank_fn(images, prompts).float().cpu()


def dpo1step_update(
    generator: OneStepGenerator,
    rank_fn: RankFn,
    prompts: Sequence[str],
    settings: BaselineSettings,
    meter: Meter,
    noise_generator: torch.Generator,
) -> dict[str, float]:
    """One DPO1step micro-step (gradients accumulate on the LoRA); returns the loss and the candidates' mean score."""
    prompts, k = list(prompts), settings.num_generations
    repeated = [p for p in prompts for _ in range(k)]
    with torch.no_grad(), meter("generation/text"):
        embeds = generator.encode_prompts(prompts).repeat_interleave(k)
    noise = generator.make_noise(len(repeated), noise_generator)
    with meter("generation/rollout"):
        latents = generator.sample(embeds, noise)
    with torch.no_grad(), meter("generation/reference"):
        reference = generator.reference(embeds, noise)
    scores = _rank(rank_fn, generator, latents, repeated, meter).view(len(prompts), k)
    with meter("field"):
        shape = (len(prompts), k, *latents.shape[1:])
        loss = dpo1step_loss(
            latents.view(shape),
            reference.view(shape),
            scores,
            settings.num_positives,
            settings.num_negatives,
            settings.dpo_beta,
        )
    with meter("backward"):
        loss.backward()
    return {"loss": loss.item(), "reward": scores.mean().item()}


def neighbor_grpo_update(
    generator: OneStepGenerator,
    rank_fn: RankFn,
    prompts: Sequence[str],
    settings: BaselineSettings,
    meter: Meter,
    noise_generator: torch.Generator,
) -> dict[str, float]:
    """One Neighbor-GRPO micro-step (gradients accumulate on the LoRA); returns the loss and the group's mean score."""
    prompts, k, a = list(prompts), settings.num_generations, settings.num_anchors
    b = len(prompts)
    repeated = [p for p in prompts for _ in range(k)]
    with torch.no_grad(), meter("generation/text"):
        embeds = generator.encode_prompts(prompts).repeat_interleave(k)
    base, deltas = generator.make_noise(b, noise_generator), generator.make_noise(b * k, noise_generator)
    noise = neighbor_noises(base, deltas.view(b, k, *deltas.shape[1:]), settings.neighbor_sigma).flatten(0, 1)
    with torch.no_grad(), meter("generation/rollout"):
        rollout = generator.sample(embeds, noise)
    scores = _rank(rank_fn, generator, rollout, repeated, meter).view(b, k)
    with meter("field"):
        advantages = quasi_norm_advantages(scores, settings.quasi_norm_p, settings.advantage_clip)
        picks = torch.stack([torch.randperm(k, generator=noise_generator)[:a] for _ in range(b)])  # (B, A)
        rows = (torch.arange(b)[:, None] * k + picks).flatten()
    anchor_embeds, anchor_noise = embeds.select(rows), noise[rows]
    with meter("generation/regenerate"):
        anchors = generator.sample(anchor_embeds, anchor_noise)
    with torch.no_grad(), meter("generation/reference"):
        reference = generator.reference(anchor_embeds, anchor_noise)
    with meter("field"):
        shape = rollout.shape[1:]
        loss = neighbor_grpo_loss(
            rollout.view(b, k, *shape),
            anchors.view(b, a, *shape),
            rollout[rows].view(b, a, *shape),
            advantages,
            settings.clip_range,
        )
        loss = loss + settings.anchor_ref_l2 * F.mse_loss(anchors.float(), reference.float())
    with meter("backward"):
        loss.backward()
    return {"loss": loss.item(), "reward": scores.mean().item()}
