"""The Flux family (FLUX.1-schnell): CLIP and T5, a double- and single-stream transformer on packed latents."""

from __future__ import annotations

import math
from types import MappingProxyType
from typing import Any

from torch import Tensor

from .base import register_generator
from .diffusion_transformers import TransformerGenerator
from .embeds import PromptEmbeds


@register_generator("FluxPipeline")
class FluxGenerator(TransformerGenerator):
    """`FluxPipeline`, served as FLUX.1-schnell in one step: `pipe(prompt, num_inference_steps=1,
    guidance_scale=0.0, max_sequence_length=256)` (schnell has no guidance embedding, so the scale is unused).

    The call's `latents=` are packed: `(batch, (h / 2) * (w / 2), 4 * channels)` for an `(h, w)` latent grid, each
    token a 2x2 patch. :meth:`make_noise` draws the grid and packs it, as the pipeline does with its own generator;
    :meth:`decode` unpacks. The MMDiT blocks return `(text stream, image stream)`.
    """

    default_call_kwargs = MappingProxyType(
        {"num_inference_steps": 1, "guidance_scale": 0.0, "max_sequence_length": 256}
    )
    image_stream_last = True

    @property
    def latent_channels(self) -> int:
        return int(self.unwrapped_denoiser.config.in_channels) // 4

    def _grid_side(self, resolution: int) -> int:
        if resolution % (2 * self.vae_scale_factor):
            raise ValueError(
                f"resolution {resolution} is not a multiple of {2 * self.vae_scale_factor}: Flux packs 2x2 patches "
                f"of the VAE's latent grid (VAE scale factor {self.vae_scale_factor})."
            )
        return resolution // self.vae_scale_factor

    def latent_shape(self, batch_size: int, resolution: int | None = None) -> tuple[int, ...]:
        side = self._grid_side(int(resolution or self.resolution))
        return (int(batch_size), (side // 2) ** 2, 4 * self.latent_channels)

    def grid_shape(self, batch_size: int, resolution: int | None = None) -> tuple[int, ...]:
        side = self._grid_side(int(resolution or self.resolution))
        return (int(batch_size), self.latent_channels, side, side)

    def noise_resolution(self, noise: Tensor) -> int:
        return math.isqrt(noise.shape[1]) * 2 * self.vae_scale_factor

    def pack_latents(self, latents: Tensor) -> Tensor:
        # The pipeline's own packing (a static method; diffusers has no public one).
        batch, channels, height, width = latents.shape
        return self.pipeline._pack_latents(latents, batch, channels, height, width)

    def unpack_latents(self, latents: Tensor) -> Tensor:
        side = self.noise_resolution(latents)
        return self.pipeline._unpack_latents(latents, side, side, self.vae_scale_factor)

    def _encode(self, prompts: list[str]) -> PromptEmbeds:
        prompt_embeds, pooled, _ = self.pipeline.encode_prompt(
            prompt=prompts, prompt_2=None, device=self.device, num_images_per_prompt=1, **self._encode_kwargs()
        )
        return PromptEmbeds(prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled)

    def denoiser_inputs(self, embeds: PromptEmbeds, latents: Tensor, timestep: int) -> dict[str, Any]:
        # The pipeline calls the transformer with the timestep / 1000, text ids of zeros and the packed grid's ids.
        side = math.isqrt(latents.shape[1])
        config = self.unwrapped_denoiser.config
        guidance = None
        if config.guidance_embeds:
            guidance = self.batch_timestep(self.call_kwargs.get("guidance_scale", 3.5), latents)
        text = embeds.prompt_embeds
        return {
            "hidden_states": latents,
            "timestep": self.batch_timestep(timestep / 1000, latents),
            "guidance": guidance,
            "pooled_projections": embeds.pooled_prompt_embeds,
            "encoder_hidden_states": text,
            "txt_ids": text.new_zeros(text.shape[1], 3),
            "img_ids": self.pipeline._prepare_latent_image_ids(
                latents.shape[0], side, side, latents.device, latents.dtype
            ),
        }
