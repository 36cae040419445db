"""The PixArt family (PixArt-alpha DMD, PixArt-sigma): a T5 and a DiT with cross-attention and AdaLN-single."""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor

from .base import register_generator
from .diffusion_transformers import TransformerGenerator
from .embeds import PromptEmbeds


@register_generator("PixArtSigmaPipeline")
@register_generator("PixArtAlphaPipeline")
class PixArtGenerator(TransformerGenerator):
    """`PixArtAlphaPipeline` and `PixArtSigmaPipeline`, served as PixArt-alpha DMD: `pipe(prompt,
    num_inference_steps=1, timesteps=[400], guidance_scale=1.0, use_resolution_binning=False)`.

    Resolution binning is off by default because it changes the size the transformer is conditioned on while the
    latents keep theirs; for a square side that is its own bin (512 for the 512 px model) the output is the same as
    with binning. The transformer has no diffusers adapter methods: LoRA is injected with PEFT, and an adapter is
    loaded back with `trl_drpo.hub.load_lora_into(pipe, folder)`.
    """

    default_call_kwargs = MappingProxyType(
        {"num_inference_steps": 1, "timesteps": [400], "guidance_scale": 1.0, "use_resolution_binning": False}
    )

    def _encode(self, prompts: list[str]) -> PromptEmbeds:
        prompt_embeds, mask, _, _ = self.pipeline.encode_prompt(
            prompts,
            do_classifier_free_guidance=False,
            num_images_per_prompt=1,
            device=self.device,
            **self._encode_kwargs(),
        )
        return PromptEmbeds(prompt_embeds=prompt_embeds, prompt_attention_mask=mask)

    def denoiser_inputs(self, embeds: PromptEmbeds, latents: Tensor, timestep: int) -> dict[str, Any]:
        added = {"resolution": None, "aspect_ratio": None}
        if self.unwrapped_denoiser.use_additional_conditions:
            size = self.resolution
            batch = latents.shape[0]
            added = {
                "resolution": torch.tensor([[size, size]], device=latents.device, dtype=latents.dtype).repeat(
                    batch, 1
                ),
                "aspect_ratio": torch.ones((batch, 1), device=latents.device, dtype=latents.dtype),
            }
        return {
            "hidden_states": latents,
            "encoder_hidden_states": embeds.prompt_embeds,
            "encoder_attention_mask": embeds.prompt_attention_mask,
            "timestep": self.batch_timestep(timestep, latents),
            "added_cond_kwargs": added,
        }
