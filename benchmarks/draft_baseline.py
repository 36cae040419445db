"""A minimal, real DRaFT-style reward back-propagation step (the paper's DRaFT baseline): loss = -reward.

The candidates are generated with gradient by the same `OneStepGenerator` DrPO uses (same pipeline, noise, batch and
precision), decoded *with* gradient (`decode_with_grad`), scored by a differentiable reward tower
(`benchmarks.reward_models`), and `-mean(reward)` is back-propagated through the reward model, the VAE decoder and
the denoiser into the LoRA. Candidates are streamed in chunks of `chunk_size` with one backward per chunk, as the
paper's profiled DRaFT did (one image at a time for HPSv3); the gradient is the same for any chunking.

Left out on purpose (the paper's DRaFT defaults that its profile disabled or that do not change the cost class):
the `ref_l2` latent regulariser and the `std` bonus. `reference_forward=True` adds the frozen-reference forward the
profiled script still ran although its weight was 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from trl_drpo.generators import OneStepGenerator

from .common import Meter, NullMeter
from .reward_models import RewardTower


@dataclass
class DraftStepConfig:
    """One DRaFT micro-step: `num_generations` candidates per prompt, streamed `chunk_size` at a time."""

    num_generations: int = 24
    chunk_size: int | None = 1
    decode_chunk_size: int | None = None
    accumulation_steps: int = 1
    reference_forward: bool = False


def draft_step(
    generator: OneStepGenerator,
    reward: RewardTower,
    prompts: Sequence[str],
    config: DraftStepConfig,
    meter: Meter | None = None,
    noise_generator: torch.Generator | None = None,
) -> Tensor:
    """Back-propagate `-mean reward` of K fresh candidates per prompt; returns the (detached) loss.

    Gradients accumulate on the generator's trainable parameters (the LoRA); the reward and VAE are frozen.
    """
    meter = meter or NullMeter()
    prompts = list(prompts)
    num_prompts, k = len(prompts), config.num_generations
    chunk = config.chunk_size or k
    with torch.no_grad():
        with meter("generation/text"):
            embeds = generator.encode_prompts(prompts).repeat_interleave(k)
        noise = generator.make_noise(num_prompts * k, noise_generator)
        with meter("reward/text"):
            # Per-prompt reward inputs (CLIP text embeddings, VLM token ids) do not depend on the generator: built
            # once per step, each distinct prompt encoded once, as DrPO's ranking call does.
            state = reward.prompt_state([p for p in prompts for _ in range(k)])
    # Each candidate's loss weight: the mean over all candidates of the update.
    weight = 1.0 / (num_prompts * k * config.accumulation_steps)
    total = torch.zeros(())
    order = torch.arange(num_prompts * k)
    for begin in range(0, num_prompts * k, chunk):
        ids = order[begin : begin + chunk]
        sub_embeds = embeds.select(ids)
        sub_noise = noise[ids.to(noise.device)]
        with meter("generation/sample"):
            latents = generator.sample(sub_embeds, sub_noise)
        if config.reference_forward:
            with meter("generation/reference"):
                generator.reference(sub_embeds, sub_noise)
        with meter("decode"):
            images = generator.decode_with_grad(latents, chunk_size=config.decode_chunk_size)
        with meter("reward"):
            scores = reward.score(images, reward.select_state(state, ids))
        loss = -weight * scores.float().sum()
        with meter("backward"):
            loss.backward()
        if loss.device.type != "meta":
            total = total + loss.detach().cpu()
    return total
