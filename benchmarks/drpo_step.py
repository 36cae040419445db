"""One DrPO micro-step, instrumented per component: the two phases of `DrPOTrainer.training_step`.

The trainer's step is a `transformers.Trainer` method (accelerator, logging, datasets); the benchmarks need the same
computation on bare modules, with a meter around each part and on the `meta` device. This module re-expresses it
with the same package calls in the same order -- `OneStepGenerator.encode_prompts / sample / reference / decode /
one_step`, the feature map, `ranking.top_bottom_k`, `drift.drpo_targets` and `DrPOTargets.loss` -- so a change of
cost in any of them shows up here. If `DrPOTrainer.training_step` changes its structure, update this file too.

Phase (a), without gradient: rollout of K candidates per prompt (and their reference twins when lambda > 0),
decode, reward (ranking only), features, drift-field targets. Phase (b): regenerate the candidates in chunks *with*
gradient from the same noise, regress their features on the stored targets, backward per chunk. With one chunk (one
graph over all K) the rollout and its features are computed with gradient and phase (b) reuses that graph, as the
trainer does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from trl_drpo.drift import DriftHyperparams, DrPOTargets, drpo_targets_from_anchors, regression_loss
from trl_drpo.features import FeatureMap
from trl_drpo.generators import OneStepGenerator, PromptEmbeds, map_rows
from trl_drpo.ranking import top_bottom_k

from .common import Meter, NullMeter, SavedTensorBytes, real_or_random


RankFn = Callable[[Tensor, Sequence[str]], Tensor]
"""A rank-only reward: `(images (B, 3, H, W) in [0, 1], prompts) -> (B,)` scores, no gradient."""


@dataclass
class DrPOStepConfig:
    """The knobs of one micro-step (`DrPOConfig` names). Defaults: the trainer's (paper SD-Turbo recipe)."""

    num_generations: int = 24
    num_positives: int = 8
    num_negatives: int = 8
    candidate_chunk_size: int | None = None
    decode_chunk_size: int | None = None
    accumulation_steps: int = 1
    drift: DriftHyperparams = field(default_factory=DriftHyperparams)
    reuse_rollout_graph: bool = True
    """With one chunk, phase (b) reuses the rollout's graph (the trainer's behaviour); False regenerates, which
    isolates the gradient pass for memory measurements."""

    @property
    def one_graph(self) -> bool:
        """Whether the rollout is built with gradient and reused by the gradient pass."""
        chunk = self.candidate_chunk_size or self.num_generations
        return self.reuse_rollout_graph and chunk >= self.num_generations


@dataclass
class DrPORollout:
    """What phase (a) leaves for phase (b): repeated prompt embeddings, the noise and the detached targets; in
    one-graph mode also the candidates' features with their graph."""

    embeds: PromptEmbeds
    noise: Tensor
    targets: list[DrPOTargets]
    num_prompts: int
    graph_features: dict[str, Tensor] | None = None


def targets_to_device(targets: DrPOTargets, device: torch.device) -> DrPOTargets:
    """Move the stored goals and scales of `targets` to `device` (in place; returns `targets`)."""
    for terms in targets.terms.values():
        for _, target in terms:
            target.goal = target.goal.to(device)
            target.sigma = target.sigma.to(device)
    return targets


def drpo_rollout(
    generator: OneStepGenerator,
    feature_map: FeatureMap,
    rank_fn: RankFn,
    prompts: Sequence[str],
    config: DrPOStepConfig,
    meter: Meter | None = None,
    noise_generator: torch.Generator | None = None,
    saved: SavedTensorBytes | None = None,
) -> DrPORollout:
    """Phase (a), ending with the drift-field targets of every prompt: without gradient, except in one-graph mode,
    where the candidates and their features keep their graph (whose saved activations `saved` then records)."""
    meter = meter or NullMeter()
    prompts = list(prompts)
    num_prompts, k = len(prompts), config.num_generations
    params = config.drift
    stand_in = torch.Generator().manual_seed(0)  # values for meta tensors (see `real_or_random`)
    rows = (config.candidate_chunk_size or k) * num_prompts  # as the trainer: phase (a) in candidate chunks too
    one_graph = config.one_graph
    graph = saved.graph() if saved is not None and one_graph else contextlib.nullcontext()
    with graph:
        with torch.no_grad():
            with meter("generation/text"):
                embeds = generator.encode_prompts(prompts).repeat_interleave(k)
            noise = generator.make_noise(num_prompts * k, noise_generator)
        with meter("generation/rollout"), torch.set_grad_enabled(one_graph):
            latents = map_rows(lambda r: generator.sample(embeds.select(r), noise[r]), len(noise), rows)
        with torch.no_grad():
            reference = None
            if params.reference_loss_weight > 0:
                with meter("generation/reference"):
                    reference = map_rows(lambda r: generator.reference(embeds.select(r), noise[r]), len(noise), rows)
            with meter("decode"):
                images = generator.decode(latents.detach(), chunk_size=config.decode_chunk_size or rows)
            with meter("reward"):
                scores = rank_fn(images, [p for p in prompts for _ in range(k)])
            scores = torch.nan_to_num(real_or_random(scores, stand_in).float().cpu())  # random weights may overflow
            selections = top_bottom_k(scores.view(num_prompts, k), config.num_positives, config.num_negatives)
        with meter("features/rollout"), torch.set_grad_enabled(one_graph):
            graph_features = feature_map.per_prompt(latents, embeds, num_prompts, rows)
    with torch.no_grad():
        ref_features = None
        if reference is not None:
            with meter("features/reference"):
                ref_features = feature_map.per_prompt(reference, embeds, num_prompts, rows)

        device = latents.device
        features = {key: real_or_random(value.detach(), stand_in) for key, value in graph_features.items()}
        if ref_features is not None:
            ref_features = {key: real_or_random(value, stand_in) for key, value in ref_features.items()}
        with meter("field"):
            targets = drpo_targets_from_anchors(features, ref_features, selections, params)
        if device.type == "meta":
            targets = [targets_to_device(target, device) for target in targets]
    return DrPORollout(
        embeds=embeds,
        noise=noise,
        targets=targets,
        num_prompts=num_prompts,
        graph_features=graph_features if one_graph else None,
    )


def drpo_gradient_pass(
    generator: OneStepGenerator,
    feature_map: FeatureMap,
    rollout: DrPORollout,
    config: DrPOStepConfig,
    meter: Meter | None = None,
    saved: SavedTensorBytes | None = None,
) -> Tensor:
    """Phase (b): back-propagate the regression of the candidates' features on the targets: on the rollout's graph
    in one-graph mode, else regenerating the candidates chunk by chunk with gradient.

    `candidate_chunk_size=None` without a rollout graph regenerates all K candidates of every prompt in one graph.
    `saved`, if given, records the activation bytes of each regenerated chunk's graph. Returns the (detached) loss.
    """
    meter = meter or NullMeter()
    k = config.num_generations
    chunk = config.candidate_chunk_size or k
    rows = list(range(rollout.num_prompts))
    weight = 1.0 / (len(rows) * config.accumulation_steps)
    if rollout.graph_features is not None:
        loss = weight * regression_loss(rollout.targets, rollout.graph_features, rows)
        with meter("backward"):
            loss.backward()
        return loss.detach().cpu() if loss.device.type != "meta" else torch.zeros(())
    total = torch.zeros(())
    for begin in range(0, k, chunk):
        end = min(begin + chunk, k)
        ids = torch.tensor([b * k + j for b in rows for j in range(begin, end)])
        embeds = rollout.embeds.select(ids)
        graph = saved.graph() if saved is not None else contextlib.nullcontext()
        with graph:
            with meter("generation/regenerate"):
                latents = generator.one_step(generator.denoiser, embeds, rollout.noise[ids.to(rollout.noise.device)])
            with meter("features/regenerate"):
                feats = feature_map.per_prompt(latents, embeds, len(rows))
            loss = weight * regression_loss(rollout.targets, feats, rows, begin)
        with meter("backward"):
            loss.backward()
        if loss.device.type != "meta":
            total = total + loss.detach().cpu()
    return total


def drpo_step(
    generator: OneStepGenerator,
    feature_map: FeatureMap,
    rank_fn: RankFn,
    prompts: Sequence[str],
    config: DrPOStepConfig,
    meter: Meter | None = None,
    noise_generator: torch.Generator | None = None,
) -> Tensor:
    """One DrPO micro-step (both phases); gradients accumulate on the generator's trainable parameters."""
    rollout = drpo_rollout(generator, feature_map, rank_fn, prompts, config, meter, noise_generator)
    return drpo_gradient_pass(generator, feature_map, rollout, config, meter)
