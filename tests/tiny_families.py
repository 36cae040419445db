"""Tiny random pipelines of every supported family, built offline, and the one-step call each is served with.

Each builder returns a real diffusers pipeline (random weights, fp32, CPU, eval mode) whose components are small
enough that one call takes milliseconds. The components, the in-memory tokenizers and the SD, SDXL, FLUX.1-schnell and
SANA-Sprint pipelines (the CLI's `trl-drpo/tiny-*` models) are those of `trl_drpo.tiny_pipelines`; SD3 and PixArt are
built here. `SETUPS` names every family and scheduler set-up the tests cover, with the pipeline it builds and the
`pipe(...)` keyword arguments a user of the real model passes (README's table).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from trl_drpo.tiny_pipelines import (
    TINY_RESOLUTION,
    TINY_TEXT_HIDDEN,
    ready_pipeline,
    tiny_clip,
    tiny_clip_tokenizer,
    tiny_flux_pipeline,
    tiny_kl_vae,
    tiny_sana_sprint_pipeline,
    tiny_sd_pipeline,
    tiny_sdxl_pipeline,
    tiny_t5,
    tiny_t5_tokenizer,
)


RESOLUTION = TINY_RESOLUTION


# --------------------------------------------------------------------------------------------------------------------
# Pipelines
# --------------------------------------------------------------------------------------------------------------------


def tiny_sd3_pipeline(seed: int = 0):
    """`StableDiffusion3Pipeline`: two CLIP encoders and a T5, an MMDiT, flow-matching Euler (SD3.5 Turbo layout)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=RESOLUTION // 2,
        patch_size=1,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=TINY_TEXT_HIDDEN,
        joint_attention_dim=TINY_TEXT_HIDDEN,
        pooled_projection_dim=2 * TINY_TEXT_HIDDEN,
        out_channels=4,
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        vae=tiny_kl_vae(shift_factor=0.0609, scaling_factor=1.5035),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        text_encoder=tiny_clip(),
        tokenizer=tiny_clip_tokenizer(),
        text_encoder_2=tiny_clip(),
        tokenizer_2=tiny_clip_tokenizer(),
        text_encoder_3=tiny_t5(),
        tokenizer_3=tiny_t5_tokenizer(),
    )
    return ready_pipeline(pipe)


def _pixart_transformer():
    from diffusers import PixArtTransformer2DModel

    return PixArtTransformer2DModel(
        sample_size=RESOLUTION // 2,
        num_layers=2,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=3,
        caption_channels=TINY_TEXT_HIDDEN,
        in_channels=4,
        cross_attention_dim=24,
        out_channels=8,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    )


def tiny_pixart_pipeline(seed: int = 0, sigma: bool = False):
    """`PixArtAlphaPipeline` (or `PixArtSigmaPipeline`): a T5 and a DiT with learned variance, DDPM (the DMD
    one-step model's layout: `timesteps=[400]`)."""
    from diffusers import DDPMScheduler, PixArtAlphaPipeline, PixArtSigmaPipeline

    torch.manual_seed(seed)
    cls = PixArtSigmaPipeline if sigma else PixArtAlphaPipeline
    pipe = cls(
        transformer=_pixart_transformer(),
        vae=tiny_kl_vae(),
        scheduler=DDPMScheduler(),
        text_encoder=tiny_t5(),
        tokenizer=tiny_t5_tokenizer(),
    )
    return ready_pipeline(pipe)


def _with_scheduler(build: Callable[[], Any], scheduler: Callable[[Any], Any]) -> Callable[[], Any]:
    def builder():
        pipe = build()
        pipe.scheduler = scheduler(pipe.scheduler.config)
        return pipe

    return builder


def _lcm(config):
    from diffusers import LCMScheduler

    return LCMScheduler.from_config(config, timestep_spacing="trailing")


def _tcd(config):
    from diffusers import TCDScheduler

    return TCDScheduler.from_config(config, timestep_spacing="trailing")


def _lightning(config):
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler.from_config(config, timestep_spacing="trailing", prediction_type="sample")


# --------------------------------------------------------------------------------------------------------------------
# The set-ups under test
# --------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Setup:
    """A family and scheduler set-up: how to build its tiny pipeline, and the one-step call its users make."""

    build: Callable[[], Any]
    call_kwargs: dict[str, Any] | None  # None: the family's one-step defaults
    denoiser: str = "transformer"


SETUPS: dict[str, Setup] = {
    "sd-turbo": Setup(tiny_sd_pipeline, None, "unet"),
    "sdxl-turbo": Setup(tiny_sdxl_pipeline, None, "unet"),
    "sdxl-dmd2-lcm": Setup(
        _with_scheduler(tiny_sdxl_pipeline, _lcm),
        {"num_inference_steps": 1, "timesteps": [399], "guidance_scale": 0.0},
        "unet",
    ),
    "sd-lcm": Setup(
        _with_scheduler(tiny_sd_pipeline, _lcm), {"num_inference_steps": 1, "guidance_scale": 0.0}, "unet"
    ),
    "sdxl-tcd": Setup(
        _with_scheduler(tiny_sdxl_pipeline, _tcd),
        {"num_inference_steps": 1, "guidance_scale": 0.0, "eta": 0.3},
        "unet",
    ),
    "sdxl-lightning": Setup(
        _with_scheduler(tiny_sdxl_pipeline, _lightning), {"num_inference_steps": 1, "guidance_scale": 0.0}, "unet"
    ),
    "sd3-turbo": Setup(tiny_sd3_pipeline, None),
    "flux-schnell": Setup(tiny_flux_pipeline, None),
    "pixart-alpha-dmd": Setup(tiny_pixart_pipeline, None),
    "pixart-sigma": Setup(lambda: tiny_pixart_pipeline(sigma=True), None),
    "sana-sprint": Setup(tiny_sana_sprint_pipeline, None),
}
"""Every family / scheduler set-up that the tests of `test_pipeline_families.py` run."""
