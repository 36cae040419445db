"""The Stable Diffusion 3 family (SD3.5 Large Turbo): two CLIP encoders and a T5, an MMDiT, flow matching."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from .base import register_generator
from .diffusion_transformers import TransformerGenerator
from .embeds import PromptEmbeds


@register_generator("StableDiffusion3Pipeline")
class StableDiffusion3Generator(TransformerGenerator):
    """`StableDiffusion3Pipeline`, served one step without guidance: `pipe(prompt, num_inference_steps=1,
    guidance_scale=0.0)`. Prompt embeddings and pooled projections are encoded once per step."""

    image_stream_last = True

    def _encode(self, prompts: list[str]) -> PromptEmbeds:
        prompt_embeds, _, pooled, _ = self.pipeline.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=self.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
            **self._encode_kwargs(),
        )
        return PromptEmbeds(prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled)

    def denoiser_inputs(self, embeds: PromptEmbeds, latents: Tensor, timestep: int) -> dict[str, Any]:
        # The pipeline passes the scheduler's timestep, sigma * 1000: the training scale itself.
        return {
            "hidden_states": latents,
            "encoder_hidden_states": embeds.prompt_embeds,
            "pooled_projections": embeds.pooled_prompt_embeds,
            "timestep": self.batch_timestep(timestep, latents),
        }
