"""Evaluation by the paper's protocol: image `(seed, i)` starts from the noise seeded ``seed * 10**6 + i``
(`trl_drpo.generators.evaluation_seed`), so images and their rewards compare across runs, checkpoints and the base
model. `DrPOTrainer.render` and `DrPOTrainer.evaluate` are built on these; `trl-drpo sample` renders the same noise
through the pipeline's own call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

from .generators import OneStepGenerator, evaluation_seed
from .scoring import RewardFunctions


def seed_major_pairs(seeds: Iterable[int], num_prompts: int) -> list[tuple[int, int]]:
    """``(seed, prompt index)`` for every seed and each of `num_prompts` prompts, seed-major."""
    return [(seed, i) for seed in seeds for i in range(num_prompts)]


@torch.no_grad()  # images only: a graph through the denoiser would cost memory for nothing
def render_pairs(
    generator: OneStepGenerator,
    prompts: Sequence[str],
    pairs: Sequence[tuple[int, int]],
    adapter: bool = True,
    chunk_size: int | None = None,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
) -> torch.Tensor:
    """Images for ``(seed, prompt index)`` pairs, in their order: float32 ``(len(pairs), 3, H, W)`` in [0, 1].

    Args:
        generator: what renders; its :meth:`~OneStepGenerator.sample` (the tuned model), or with `adapter=False` its
            :meth:`~OneStepGenerator.reference` (the base model).
        prompts: the prompts the pairs index into (each is encoded once).
        pairs: ``(seed, i)``: prompt `i` from the noise of :func:`~trl_drpo.generators.evaluation_seed`.
        chunk_size: sample and decode at most this many images at once; None renders all at once.
        autocast: the context the sampling runs in (the trainer's mixed precision); decoding runs outside it.
    """
    embeds = generator.encode_prompts(list(prompts))
    noise = torch.cat(
        [generator.make_noise(1, torch.Generator().manual_seed(evaluation_seed(seed, i))) for seed, i in pairs]
    )
    ids = torch.tensor([i for _, i in pairs])
    chunk = chunk_size or len(ids)
    images = []
    for begin in range(0, len(ids), chunk):
        sub = ids[begin : begin + chunk]
        with autocast():
            sampler = generator.sample if adapter else generator.reference
            latents = sampler(embeds.select(sub), noise[begin : begin + chunk])
        images.append(generator.decode(latents, chunk_size=chunk_size))
    return torch.cat(images)


def reward_means(reward_funcs: RewardFunctions, scores: torch.Tensor) -> dict[str, float]:
    """``reward``, the mean combined reward, and ``rewards/<name>/mean`` for each reward, of `(num_rewards, N)`
    scores."""
    out = {"reward": reward_funcs.combine(scores).mean().item()}
    for name, values in zip(reward_funcs.names, scores):
        out[f"rewards/{name}/mean"] = values.mean().item()
    return out


def last_eval_metrics(log_history: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """The `eval_*` entries of the last evaluation in a trainer's `state.log_history`; empty when none ran."""
    for entry in reversed(log_history):
        if any(key.startswith("eval_") for key in entry):
            return {key: value for key, value in entry.items() if key.startswith("eval_")}
    return {}
