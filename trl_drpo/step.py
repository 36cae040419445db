"""One DrPO micro-step on plain modules: the training step of `DrPOTrainer`, and what the benchmarks measure.

The step has two phases (docs/method.md §4):

- `rollout`, without gradient: K candidates per prompt from the same noise as their reference twins (when the
  reference weight is above 0), and any extra anchor candidates, decoded, scored by the rewards (used only to rank),
  anchors selected, features taken, and the drift-field targets computed;
- `gradient_pass`: the candidates' features are regressed onto those targets and back-propagated, either on the
  rollout's own graph (one graph over all K) or by regenerating the candidates chunk by chunk with gradient.

Everything a caller varies comes in through `StepHooks` (timing meters, autocast, the backward call, gradient
synchronisation, activation accounting), so the trainer and the benchmarks run this very code. `StepNoise` gives each
micro-step its noise, seeded so that a resumed run draws what the uninterrupted one would have.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .features import FeatureMap
from .generators import OneStepGenerator, PromptEmbeds, map_rows
from .objective import (
    DriftHyperparams,
    DrPOTargets,
    drpo_targets_from_anchors,
    drpo_targets_per_prompt,
    regression_loss,
)
from .ranking import AnchorSelection, select_anchors
from .ranking_decoder import RankingDecoder


Decoder = Callable[[Tensor, int | None], Tensor]
"""Decodes candidates for the rewards: `(latents (N, C, h, w), chunk size) -> images (N, 3, H, W)` in [0, 1], no
gradient (`trl_drpo.ranking_decoder.RankingDecoder`; by default the generator's full decode)."""

Scorer = Callable[[Tensor, list[str]], tuple[Tensor, Tensor]]
"""Rewards for ranking: `(images (B*K, 3, H, W) in [0, 1], prompts (B*K)) -> (scores, ranking)`, where `scores` is the
`(num_rewards, B*K)` raw scores (for logging) and `ranking` the `(B, K)` values the anchors are selected by. Never
differentiated."""


TIMING_PHASES = {
    "generation/text": "rollout",
    "generation/rollout": "rollout",
    "generation/reference": "rollout",
    "generation/anchor_candidates": "rollout",
    "decode": "rollout",
    "reward": "reward",
    "features/rollout": "field",
    "features/reference": "field",
    "features/anchors": "field",
    "features/anchor_candidates": "field",
    "field": "field",
    "generation/regenerate": "backward",
    "features/regenerate": "backward",
    "backward": "backward",
}
"""The step's components (the names `StepHooks.meter` is called with), summed into the phases the trainer logs as
`timing/<phase>`."""


@dataclass
class StepSettings:
    """The numbers of one micro-step (`DrPOConfig` names; `DrPOConfig.step_settings` builds one).

    Attributes:
        num_generations: K, candidates per prompt.
        num_positives, num_negatives: anchors per prompt.
        num_anchor_generations: extra candidates per prompt generated without gradient, ranked with the K and
            eligible as anchors, never trained (docs/method.md §8).
        anchor_selection: `trl_drpo.ranking.SELECTION_RULES` name; `selection_threshold` is the pass mark of
            ``"threshold"``.
        candidate_chunk_size: candidates per prompt in one graph; None means all K (one graph, reused by the
            gradient pass).
        decode_chunk_size: candidates per VAE decode call; None means one chunk of candidates.
        drift: the objective's numbers (`trl_drpo.objective.DriftHyperparams`).
        reuse_rollout_graph: with one chunk, let the gradient pass reuse the rollout's graph (False regenerates the
            candidates, which isolates the gradient pass for memory measurements).
    """

    num_generations: int = 24
    num_positives: int = 8
    num_negatives: int = 8
    num_anchor_generations: int = 0
    anchor_selection: str = "topk"
    selection_threshold: float = 0.5
    candidate_chunk_size: int | None = None
    decode_chunk_size: int | None = None
    drift: DriftHyperparams = field(default_factory=DriftHyperparams)
    reuse_rollout_graph: bool = True

    @property
    def chunk(self) -> int:
        """Candidates per prompt in one graph (`candidate_chunk_size`, or K when it is None)."""
        return min(self.candidate_chunk_size or self.num_generations, self.num_generations)

    @property
    def one_graph(self) -> bool:
        """Whether the rollout is built with gradient and its graph reused by the gradient pass."""
        return self.reuse_rollout_graph and self.chunk >= self.num_generations


def _no_context(*_: Any) -> AbstractContextManager:
    return nullcontext()


def _backward(loss: Tensor) -> None:
    loss.backward()


def _same(tensor: Tensor) -> Tensor:
    return tensor


@dataclass
class StepHooks:
    """What a caller of the step decides. Every hook defaults to plain PyTorch.

    Attributes:
        meter: `meter(name)` is a context around each component (``generation/text``, ``generation/rollout``,
            ``generation/reference``, ``generation/anchor_candidates``, ``decode``, ``reward``,
            ``features/rollout``, ``features/reference``, ``features/anchors`` (offline),
            ``features/anchor_candidates``, ``field``, ``generation/regenerate``, ``features/regenerate``,
            ``backward``), for timings and FLOPs.
        autocast: a context around every forward of a trained module (the trainer's mixed-precision context).
        backward: back-propagates a loss (`accelerator.backward` in the trainer).
        no_sync: a context around every regenerated chunk but the last, where gradients must not be all-reduced yet.
        graph: a context around each chunk the gradient pass regenerates (the benchmarks count its saved activations).
        materialize: applied to scores and detached features before ranking and the field (the benchmarks give
            `meta` tensors values there); the targets are moved back to the features' device.
    """

    meter: Callable[[str], AbstractContextManager] = _no_context
    autocast: Callable[[], AbstractContextManager] = _no_context
    backward: Callable[[Tensor], None] = _backward
    no_sync: Callable[[], AbstractContextManager] = _no_context
    graph: Callable[[], AbstractContextManager] = _no_context
    materialize: Callable[[Tensor], Tensor] = _same


@dataclass
class Rollout:
    """What `rollout` leaves for `gradient_pass`, and for logging.

    Attributes:
        embeds: prompt embeddings repeated K times (B*K rows, prompt-major).
        noise: `(B*K, C, h, w)` noise the candidates were generated from.
        targets: one `DrPOTargets` per prompt (None where skipped).
        images: `(B*(K+E), 3, H, W)` candidates in [0, 1] as the rewards saw them (the ranking decode), float, no
            gradient; per prompt its K trained candidates, then its E extra anchor candidates
            (`StepSettings.num_anchor_generations`).
        scores: `(num_rewards, B*(K+E))` raw reward scores (CPU float), in the order of `images`.
        selections: one `AnchorSelection` per prompt, indices into its K+E ranked candidates, or None where the
            prompt gives no preference.
        latents: the candidates' latents; with their graph in one-graph mode.
        graph_features: in one-graph mode the candidates' features with their graph, else None.
        call_seed: seeds the generator of every pipeline call of the step (see `call_generator`), so that the
            regenerated candidates see the randomness of the rollout's.
    """

    embeds: PromptEmbeds
    noise: Tensor
    targets: list[DrPOTargets | None]
    images: Tensor | None = None
    scores: Tensor | None = None
    selections: list[AnchorSelection | None] = field(default_factory=list)
    latents: Tensor | None = None
    graph_features: dict[str, Tensor] | None = None
    call_seed: int | None = None

    @property
    def num_prompts(self) -> int:
        return len(self.targets)

    @property
    def active(self) -> list[int]:
        """The prompts with targets (the others rank all candidates alike and give no preference)."""
        return [b for b, target in enumerate(self.targets) if target is not None]


def call_generator(seed: int | None) -> torch.Generator | None:
    """A fresh generator seeded with `seed` (None for None) for the randomness inside one pipeline call (ancestral
    and consistency schedulers): every call of a step gets one seeded alike, drawn from the step's noise generator, so
    runs and resumed runs are exact and the global RNG is never drawn from."""
    return None if seed is None else torch.Generator().manual_seed(seed)


class StepNoise:
    """The noise and selection generators of a run's micro-steps, each seeded by (seed, rank, update, draw): each rank
    samples its own noise, and a resumed run draws exactly what the uninterrupted run would have, since the draws
    are counted from 0 again at every update.

    Args:
        seed: the run's seed (`DrPOConfig.seed`).
        rank: the process index.
    """

    def __init__(self, seed: int, rank: int) -> None:
        self.seed, self.rank = seed, rank
        self._step, self._draws = -1, 0

    def next(self, step: int) -> torch.Generator:
        """A fresh CPU generator for the next draw of update `step` (the trainer's `global_step`)."""
        if self._step != step:
            self._step, self._draws = step, 0
        key = f"{self.seed}/{self.rank}/{step}/{self._draws}".encode()
        self._draws += 1
        return torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1)


def rollout(
    generator: OneStepGenerator,
    denoiser: torch.nn.Module,
    feature_map: FeatureMap,
    scorer: Scorer,
    prompts: Sequence[str],
    settings: StepSettings,
    hooks: StepHooks | None = None,
    noise_generator: torch.Generator | None = None,
    selection_generator: torch.Generator | None = None,
    preference_latents: tuple[Tensor, Tensor] | None = None,
    decoder: Decoder | None = None,
) -> Rollout:
    """Phase (a) of a micro-step, ending with every prompt's drift-field targets (docs/method.md §3-4).

    Without gradient, in chunks of `settings.chunk` candidates per prompt so that memory does not grow with K; in
    one-graph mode the candidates and their features are built once with gradient on `denoiser` (the trained module,
    possibly wrapped for distributed training) and that graph is reused by `gradient_pass`.

    Args:
        generator: the pipeline's `OneStepGenerator` (reference samples come from its adapter-free base).
        denoiser: the module the candidates are generated with (`generator.denoiser`, or its wrapped form).
        feature_map: the frozen feature map phi.
        scorer: the rewards (see `Scorer`).
        prompts: the B prompts of the micro-batch.
        settings: the step's numbers.
        hooks: see `StepHooks`.
        noise_generator: draws the candidates' noise; `selection_generator` draws random anchors (``threshold``).
        preference_latents: offline DrPO (docs/method.md §9): `(chosen, rejected)` UNet-space latents of each
            prompt's preferred and rejected images, `(B, P, C, h, w)` and `(B, M, C, h, w)`. Their features are the
            positive and negative anchors; nothing is decoded or scored (`scorer` may be None).
        decoder: decodes the candidates for the rewards (see `Decoder`): a `RankingDecoder` with a tiny VAE or a
            smaller size ranks for less; None uses the generator's full decode. Only the rewards see its images.
    """
    hooks = hooks or StepHooks()
    prompts = list(prompts)
    num_prompts, k = len(prompts), settings.num_generations
    rows = settings.chunk * num_prompts
    one_graph = settings.one_graph
    with torch.no_grad():
        with hooks.meter("generation/text"):
            prompt_embeds = generator.encode_prompts(prompts)
            embeds = prompt_embeds.repeat_interleave(k)
        noise = generator.make_noise(num_prompts * k, noise_generator)
        seed = None if noise_generator is None else int(torch.randint(2**62, (), generator=noise_generator))
        # Drawn after the candidates' noise and the call seed, so that a step without extra candidates is unchanged.
        extra = settings.num_anchor_generations if preference_latents is None else 0
        if extra:
            extra_embeds = prompt_embeds.repeat_interleave(extra)
            extra_noise = generator.make_noise(num_prompts * extra, noise_generator)
    with hooks.autocast():
        with hooks.meter("generation/rollout"):
            if one_graph:
                latents = generator.one_step(denoiser, embeds, noise, call_generator(seed))
            else:
                with torch.no_grad():
                    latents = map_rows(
                        lambda r: generator.sample(embeds.select(r), noise[r], call_generator(seed)), len(noise), rows
                    )
        reference = None
        if settings.drift.reference_loss_weight > 0:
            with hooks.meter("generation/reference"), torch.no_grad():
                reference = map_rows(
                    lambda r: generator.reference(embeds.select(r), noise[r], call_generator(seed)), len(noise), rows
                )
        if extra:
            with hooks.meter("generation/anchor_candidates"), torch.no_grad():
                extra_latents = map_rows(
                    lambda r: generator.sample(extra_embeds.select(r), extra_noise[r], call_generator(seed)),
                    len(extra_noise),
                    rows,
                )
    images = scores = None
    selections: list[AnchorSelection | None] = []
    if preference_latents is None:
        with torch.no_grad():
            ranked = latents.detach()
            if extra:  # per prompt: its K candidates, then its extra ones
                per_prompt = (ranked.unflatten(0, (num_prompts, k)), extra_latents.unflatten(0, (num_prompts, extra)))
                ranked = torch.cat(per_prompt, dim=1).flatten(0, 1)
            with hooks.meter("decode"):
                decode = decoder or RankingDecoder(generator)
                images = decode(ranked, settings.decode_chunk_size or rows)
            with hooks.meter("reward"):
                scores, ranking = scorer(images, [p for p in prompts for _ in range(k + extra)])
                ranking = hooks.materialize(ranking).view(num_prompts, k + extra)
                selections = select_anchors(
                    ranking,
                    settings.anchor_selection,
                    settings.num_positives,
                    settings.num_negatives,
                    settings.selection_threshold,
                    generator=selection_generator,
                )
    with hooks.autocast():
        with hooks.meter("features/rollout"), torch.set_grad_enabled(one_graph):
            graph_features = feature_map.per_prompt(latents, embeds, num_prompts, rows)
        ref_features = None
        if reference is not None:
            with hooks.meter("features/reference"), torch.no_grad():
                ref_features = feature_map.per_prompt(reference, embeds, num_prompts, rows)
        extra_features = None
        if extra:
            with hooks.meter("features/anchor_candidates"), torch.no_grad():
                extra_features = feature_map.per_prompt(extra_latents, extra_embeds, num_prompts, rows)
        anchors = None
        if preference_latents is not None:
            with hooks.meter("features/anchors"), torch.no_grad():
                anchors = [
                    feature_map.per_prompt(
                        sets.flatten(0, 1).to(latents.device, latents.dtype),
                        prompt_embeds.repeat_interleave(sets.shape[1]),
                        num_prompts,
                    )
                    for sets in preference_latents
                ]
    with hooks.meter("field"), torch.no_grad():
        features = {key: hooks.materialize(value.detach()) for key, value in graph_features.items()}
        if ref_features is not None:
            ref_features = {key: hooks.materialize(value) for key, value in ref_features.items()}
        if anchors is None:
            if extra_features is not None:
                extra_features = {key: hooks.materialize(value) for key, value in extra_features.items()}
            targets = drpo_targets_from_anchors(features, ref_features, selections, settings.drift, extra_features)
        else:
            targets = drpo_targets_per_prompt(features, anchors[0], anchors[1], ref_features, settings.drift)
        if latents.device != next(iter(features.values())).device:
            targets = [None if target is None else target.to(latents.device) for target in targets]
    return Rollout(
        embeds=embeds,
        noise=noise,
        targets=targets,
        images=images,
        scores=scores,
        selections=selections,
        latents=latents,
        graph_features=graph_features if one_graph else None,
        call_seed=seed,
    )


def gradient_pass(
    generator: OneStepGenerator,
    denoiser: torch.nn.Module,
    feature_map: FeatureMap,
    rollout: Rollout,
    settings: StepSettings,
    hooks: StepHooks | None = None,
    accumulation_steps: int = 1,
) -> Tensor:
    """Phase (b): back-propagate the regression of the candidates' features onto `rollout`'s targets.

    Each prompt with targets weighs ``1 / (prompts with targets * accumulation_steps)``, so an optimizer update
    averages over the prompts that gave a preference. On the rollout's graph in one-graph mode; otherwise the
    candidates are regenerated with gradient in chunks of `settings.chunk` per prompt (the gradient equals the
    one-graph gradient, docs/method.md §4). A micro-batch without any preference still runs one zero-weight backward,
    so that every process of a distributed run takes part in the gradient all-reduce.

    Returns the loss (detached, summed over chunks).
    """
    hooks = hooks or StepHooks()
    active = rollout.active
    weight = 1.0 / (len(active) * accumulation_steps) if active else 0.0
    if rollout.graph_features is not None:
        if active:
            index = torch.tensor(active, device=rollout.latents.device)
            feats = {key: value[index] for key, value in rollout.graph_features.items()}
            loss = weight * regression_loss(rollout.targets, feats, active)
        else:
            loss = 0.0 * rollout.latents.float().sum()
        with hooks.meter("backward"):
            hooks.backward(loss)
        return loss.detach()
    k, chunk = settings.num_generations, settings.chunk
    prompts = active or [0]
    starts = list(range(0, k, chunk))
    total = torch.zeros((), device=rollout.noise.device)
    for position, begin in enumerate(starts):
        ids = torch.tensor([b * k + j for b in prompts for j in range(begin, min(begin + chunk, k))])
        embeds = rollout.embeds.select(ids)
        with hooks.no_sync() if position < len(starts) - 1 else nullcontext():
            with hooks.graph(), hooks.autocast():
                with hooks.meter("generation/regenerate"):
                    noise = rollout.noise[ids.to(rollout.noise.device)]
                    latents = generator.one_step(denoiser, embeds, noise, call_generator(rollout.call_seed))
                with hooks.meter("features/regenerate"):
                    feats = feature_map.per_prompt(latents, embeds, len(prompts))
                if active:
                    loss = weight * regression_loss(rollout.targets, feats, prompts, begin)
                else:
                    loss = 0.0 * latents.float().sum()
            with hooks.meter("backward"):
                hooks.backward(loss)
        total = total + loss.detach()
    return total


def micro_step(
    generator: OneStepGenerator,
    denoiser: torch.nn.Module,
    feature_map: FeatureMap,
    scorer: Scorer,
    prompts: Sequence[str],
    settings: StepSettings,
    hooks: StepHooks | None = None,
    accumulation_steps: int = 1,
    **rollout_options: Any,
) -> tuple[Tensor, Rollout]:
    """One DrPO micro-step, both phases: gradients accumulate on the trainable parameters of `denoiser`.

    Arguments as in `rollout` and `gradient_pass`; `rollout_options` are `rollout`'s keyword arguments
    (`noise_generator`, `selection_generator`, `preference_latents`, `decoder`). Returns `(loss, rollout)`: the
    detached loss and what the rollout produced (images, scores, selections and targets, for logging).
    """
    result = rollout(generator, denoiser, feature_map, scorer, prompts, settings, hooks, **rollout_options)
    loss = gradient_pass(generator, denoiser, feature_map, result, settings, hooks, accumulation_steps)
    return loss, result
