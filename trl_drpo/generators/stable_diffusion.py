"""Stable Diffusion (SD-Turbo, SD 1.x/2.x, LCM, TCD) and Stable Diffusion XL (SDXL-Turbo, DMD2, Hyper-SD/TCD,
SDXL-Lightning) families, with a hand-written fast path for the plain one-step call with Euler/DDIM schedulers."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .base import OneStepGenerator, register_generator
from .embeds import PromptEmbeds
from .schedulers import SCHEDULER_STEPS, SingleStep


# --------------------------------------------------------------------------------------------------------------------
# The UNet families
# --------------------------------------------------------------------------------------------------------------------


class UNetGenerator(OneStepGenerator):
    """What the SD and SDXL families share: a UNet called as `unet(sample, t, encoder_hidden_states, ...)`, and a
    fast path for the plain one-step call.

    When the call's settings are only `num_inference_steps=1` and a `guidance_scale` that turns classifier-free
    guidance off, and the scheduler's single step is written out in `trl_drpo.generators.schedulers` (Euler, Euler
    ancestral, DDIM), :meth:`one_step` runs that step directly: the same numbers as the pipeline's call (tested
    against it) for a fraction of its overhead. Any other set-up (LCM, TCD, `timesteps=[...]`, extra arguments)
    goes through the call. The fast path is rebuilt when the pipeline's scheduler is swapped or its config changes,
    so it always follows what `pipe(...)` would run.
    """

    denoiser_attribute = "unet"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._fast: tuple[tuple, SingleStep | None] | None = None

    def _guidance_scale(self) -> float:
        return float(self.call_kwargs.get("guidance_scale", 0.0))

    def fast_step(self, device: torch.device) -> SingleStep | None:
        """The hand-written single step for the pipeline's current scheduler on `device`, or None when the call's
        settings or the scheduler need the pipeline's call."""
        scheduler = self.pipeline.scheduler
        key = (id(scheduler), type(scheduler), dict(scheduler.config), str(device), tuple(sorted(self.call_kwargs)))
        if self._fast is None or self._fast[0] != key:
            self._fast = (key, self._build_fast_step(scheduler, device))
        return self._fast[1]

    def _build_fast_step(self, scheduler: Any, device: torch.device) -> SingleStep | None:
        plain = set(self.call_kwargs) <= {"num_inference_steps", "guidance_scale"}
        plain = plain and self.call_kwargs.get("num_inference_steps") == 1 and self._guidance_scale() <= 1.0
        if not plain or type(scheduler).__name__ not in SCHEDULER_STEPS:
            return None
        try:
            return SingleStep.build(scheduler, device)
        except (NotImplementedError, ValueError):  # a set-up the written-out step does not cover: use the call
            return None

    def one_step(
        self, denoiser: nn.Module, embeds: PromptEmbeds, noise: Tensor, generator: torch.Generator | None = None
    ) -> Tensor:
        """The pipeline's call (see :meth:`OneStepGenerator.one_step`), through the hand-written step when it
        applies (see the class docstring); `generator` is unused there, since those steps draw no noise."""
        device = self.device
        single = self.fast_step(device)
        if single is None:
            return super().one_step(denoiser, embeds, noise, generator)
        if len(embeds) != noise.shape[0]:
            raise ValueError(f"{len(embeds)} prompt embeddings for {noise.shape[0]} noise samples.")
        latents = noise.to(device=device) * single.scheduler.init_noise_sigma
        model_input = single.scheduler.scale_model_input(latents, single.timestep)
        model_output = denoiser(
            model_input, single.timestep, return_dict=False, **self.denoiser_kwargs(embeds.to(device), latents)
        )[0]
        return single.step(latents, model_output)

    def _timestep_cond(self, batch_size: int, latents: Tensor) -> Tensor | None:
        # Guidance-distilled UNets (LCM-style `time_cond_proj_dim`) get the embedding of `guidance_scale - 1`, as the
        # pipelines compute it.
        dim = self.unwrapped_denoiser.config.time_cond_proj_dim
        if dim is None:
            return None
        w = torch.tensor(self._guidance_scale() - 1).repeat(batch_size)
        return self.pipeline.get_guidance_scale_embedding(w, embedding_dim=dim).to(latents.device, latents.dtype)

    def denoiser_kwargs(self, embeds: PromptEmbeds, latents: Tensor) -> dict[str, Any]:
        """Keyword arguments of the UNet call for `latents` (besides sample and timestep)."""
        return {
            "encoder_hidden_states": embeds.prompt_embeds,
            "timestep_cond": self._timestep_cond(len(embeds), latents),
        }

    def denoiser_inputs(self, embeds: PromptEmbeds, latents: Tensor, timestep: int) -> dict[str, Any]:
        t = torch.tensor(timestep, device=latents.device)
        return {"sample": latents, "timestep": t, **self.denoiser_kwargs(embeds, latents)}


@register_generator("StableDiffusionPipeline")
class StableDiffusionGenerator(UNetGenerator):
    """`StableDiffusionPipeline` (SD-Turbo, SD 1.x/2.x, LCM/TCD set-ups): one CLIP text encoder, max-length padding."""

    def _encode(self, prompts: list[str]) -> PromptEmbeds:
        prompt_embeds, _ = self.pipeline.encode_prompt(
            prompts, self.device, num_images_per_prompt=1, do_classifier_free_guidance=False, **self._encode_kwargs()
        )
        return PromptEmbeds(prompt_embeds=prompt_embeds)


@register_generator("StableDiffusionXLPipeline")
class StableDiffusionXLGenerator(UNetGenerator):
    """`StableDiffusionXLPipeline` (SDXL-Turbo, DMD2, Hyper-SD/TCD, SDXL-Lightning): two text encoders, pooled
    embeddings, size time ids."""

    def _encode(self, prompts: list[str]) -> PromptEmbeds:
        prompt_embeds, _, pooled, _ = self.pipeline.encode_prompt(
            prompt=prompts,
            device=self.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
            **self._encode_kwargs(),
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
            **super().denoiser_kwargs(embeds, latents),
            "added_cond_kwargs": {"text_embeds": embeds.pooled_prompt_embeds, "time_ids": time_ids},
        }

    def _needs_vae_upcast(self) -> bool:
        return self.vae.dtype == torch.float16 and bool(getattr(self.vae.config, "force_upcast", False))
