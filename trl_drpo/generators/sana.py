"""The SANA-Sprint family: a Gemma-2 text encoder, a linear-attention DiT with a guidance embedding, a deep
compression autoencoder and the sCM scheduler."""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

from torch import Tensor

from .base import register_generator
from .diffusion_transformers import TransformerGenerator
from .embeds import PromptEmbeds


@register_generator("SanaSprintPipeline")
class SanaSprintGenerator(TransformerGenerator):
    """`SanaSprintPipeline`, served in one step: `pipe(prompt, num_inference_steps=1, intermediate_timesteps=None,
    guidance_scale=4.5, use_resolution_binning=False)` (the guidance scale feeds the transformer's guidance
    embedding; no classifier-free guidance is run). Resolution binning is off by default for the reason given for
    PixArt. Prompts are encoded once per step with the call's `complex_human_instruction` and
    `max_sequence_length`.
    """

    default_call_kwargs = MappingProxyType(
        {
            "num_inference_steps": 1,
            "intermediate_timesteps": None,
            "guidance_scale": 4.5,
            "use_resolution_binning": False,
        }
    )

    def _encode(self, prompts: list[str]) -> PromptEmbeds:
        prompt_embeds, mask = self.pipeline.encode_prompt(
            prompts, num_images_per_prompt=1, device=self.device, **self._encode_kwargs()
        )
        return PromptEmbeds(prompt_embeds=prompt_embeds, prompt_attention_mask=mask)

    def denoiser_inputs(self, embeds: PromptEmbeds, latents: Tensor, timestep: int) -> dict[str, Any]:
        # The sCM transformer takes its timestep in [0, 1] and the guidance scale times its embedding scale.
        scale = (
            float(self.call_kwargs.get("guidance_scale", 4.5)) * self.unwrapped_denoiser.config.guidance_embeds_scale
        )
        return {
            "hidden_states": latents,
            "encoder_hidden_states": embeds.prompt_embeds,
            "encoder_attention_mask": embeds.prompt_attention_mask,
            "guidance": self.batch_timestep(scale, latents).to(embeds.prompt_embeds.dtype),
            "timestep": self.batch_timestep(timestep / 1000, latents),
        }
