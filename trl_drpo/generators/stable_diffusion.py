"""Stable Diffusion (SD-Turbo, SD 1.x/2.x) and Stable Diffusion XL (SDXL-Turbo) adapters."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from transformers.utils import logging as transformers_logging

from .base import OneStepGenerator, register_generator
from .embeds import PromptEmbeds


# Importing diffusers' pipelines imports its IP-adapter loader, which asks transformers for image processors that want
# torchvision and logs a warning about it: one a DrPO user cannot act on (no image processor is used here).
_verbosity = transformers_logging.get_verbosity()
transformers_logging.set_verbosity_error()
try:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
finally:
    transformers_logging.set_verbosity(_verbosity)


# --------------------------------------------------------------------------------------------------------------------
# Adapters
# --------------------------------------------------------------------------------------------------------------------


def _timestep_cond(generator: OneStepGenerator, batch_size: int, latents: Tensor) -> Tensor | None:
    # Guidance-distilled UNets (LCM-style `time_cond_proj_dim`) get the embedding of `guidance_scale - 1` with the
    # guidance_scale=0.0 that one-step pipelines are called with.
    dim = generator.unwrapped_denoiser.config.time_cond_proj_dim
    if dim is None:
        return None
    w = torch.tensor(0.0 - 1).repeat(batch_size)
    return generator.pipeline.get_guidance_scale_embedding(w, embedding_dim=dim).to(latents.device, latents.dtype)


@register_generator(StableDiffusionPipeline)
class StableDiffusionGenerator(OneStepGenerator):
    """`StableDiffusionPipeline` (SD-Turbo, SD 1.x/2.x): one CLIP text encoder, max-length padding."""

    def _encode(self, prompts: list[str]) -> PromptEmbeds:
        prompt_embeds, _ = self.pipeline.encode_prompt(
            prompts, self.device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return PromptEmbeds(prompt_embeds=prompt_embeds)

    def denoiser_kwargs(self, embeds: PromptEmbeds, latents: Tensor) -> dict[str, Any]:
        return {
            "encoder_hidden_states": embeds.prompt_embeds,
            "timestep_cond": _timestep_cond(self, len(embeds), latents),
        }


@register_generator(StableDiffusionXLPipeline)
class StableDiffusionXLGenerator(OneStepGenerator):
    """`StableDiffusionXLPipeline` (SDXL-Turbo, SDXL): two text encoders, pooled embeddings, size time ids."""

    def _encode(self, prompts: list[str]) -> PromptEmbeds:
        prompt_embeds, _, pooled, _ = self.pipeline.encode_prompt(
            prompt=prompts, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return PromptEmbeds(prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled)

    def time_ids(self, latents: Tensor, pooled: Tensor) -> Tensor:
        """`(original_size, crop (0, 0), target_size)` for the latents' pixel size, as `pipe(height, width)` uses."""
        size = (latents.shape[-2] * self.vae_scale_factor, latents.shape[-1] * self.vae_scale_factor)
        text_encoder_2 = self.pipeline.text_encoder_2
        projection_dim = int(pooled.shape[-1]) if text_encoder_2 is None else int(text_encoder_2.config.projection_dim)
        # `_get_add_time_ids` also checks the UNet's expected embedding width, with a helpful message.
        time_ids = self.pipeline._get_add_time_ids(
            size, (0, 0), size, dtype=pooled.dtype, text_encoder_projection_dim=projection_dim
        )
        return time_ids.to(latents.device).repeat(latents.shape[0], 1)

    def denoiser_kwargs(self, embeds: PromptEmbeds, latents: Tensor) -> dict[str, Any]:
        if embeds.pooled_prompt_embeds is None:
            raise ValueError("SDXL denoisers need pooled prompt embeddings (PromptEmbeds.pooled_prompt_embeds).")
        time_ids = embeds.add_time_ids
        if time_ids is None:
            time_ids = self.time_ids(latents, embeds.pooled_prompt_embeds)
        return {
            "encoder_hidden_states": embeds.prompt_embeds,
            "timestep_cond": _timestep_cond(self, len(embeds), latents),
            "added_cond_kwargs": {"text_embeds": embeds.pooled_prompt_embeds, "time_ids": time_ids},
        }

    def _needs_vae_upcast(self) -> bool:
        return self.vae.dtype == torch.float16 and bool(getattr(self.vae.config, "force_upcast", False))
