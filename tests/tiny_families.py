"""Tiny random pipelines of every supported family, built offline, and the one-step call each is served with.

Each builder returns a real diffusers pipeline (random weights, fp32, CPU) whose components are small enough that
one call takes milliseconds; the tokenizers are built in memory (a character-level T5 unigram and Gemma BPE, the CLIP
byte-level BPE of `trl_drpo.tiny_pipelines`). `SETUPS` names every family and scheduler set-up the tests cover, with
the pipeline it builds and the `pipe(...)` keyword arguments a user of the real model passes (README's table).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    Gemma2Config,
    Gemma2Model,
    GemmaTokenizerFast,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from trl_drpo.tiny_pipelines import bytes_to_unicode, tiny_clip_tokenizer, tiny_sd_pipeline, tiny_sdxl_pipeline


RESOLUTION = 32
_TEXT = 32
_VOCAB = 300


# --------------------------------------------------------------------------------------------------------------------
# Tokenizers and text encoders
# --------------------------------------------------------------------------------------------------------------------


def tiny_t5_tokenizer() -> T5TokenizerFast:
    """A T5 unigram tokenizer over printable ASCII (with and without the word-start marker), built in memory."""
    chars = [chr(c) for c in range(ord("!"), ord("~") + 1)]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    vocab += [(c, -2.0) for c in chars] + [("\u2581" + c, -1.5) for c in chars]
    return T5TokenizerFast(vocab=vocab, extra_ids=0)


def tiny_gemma_tokenizer() -> GemmaTokenizerFast:
    """A Gemma BPE tokenizer over single bytes (no merges), built in memory."""
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4, "\u2581": 5}
    for char in bytes_to_unicode():
        vocab.setdefault(char, len(vocab))
    return GemmaTokenizerFast(vocab=vocab, merges=[])


def tiny_t5(d_model: int = _TEXT) -> T5EncoderModel:
    return T5EncoderModel(
        T5Config(
            vocab_size=_VOCAB,
            d_model=d_model,
            d_ff=37,
            d_kv=8,
            num_layers=1,
            num_heads=4,
            relative_attention_num_buckets=8,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
        )
    )


def tiny_clip(projection: bool = True) -> CLIPTextModel | CLIPTextModelWithProjection:
    """A one-layer CLIP text encoder; with a projection head (SD3) or without (Flux reads its pooler output)."""
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(
        CLIPTextConfig(
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            hidden_size=_TEXT,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=1,
            vocab_size=1000,
            projection_dim=_TEXT,
        )
    )


def _kl_vae(latent_channels: int = 4, **kwargs: Any):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(8, 8),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=RESOLUTION,
        **kwargs,
    )


def _finish(pipe):
    # Eval mode, as `from_pretrained` leaves a pipeline: the tiny T5 has dropout.
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


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
        caption_projection_dim=_TEXT,
        joint_attention_dim=_TEXT,
        pooled_projection_dim=2 * _TEXT,
        out_channels=4,
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        vae=_kl_vae(shift_factor=0.0609, scaling_factor=1.5035),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        text_encoder=tiny_clip(),
        tokenizer=tiny_clip_tokenizer(),
        text_encoder_2=tiny_clip(),
        tokenizer_2=tiny_clip_tokenizer(),
        text_encoder_3=tiny_t5(),
        tokenizer_3=tiny_t5_tokenizer(),
    )
    return _finish(pipe)


def tiny_flux_pipeline(seed: int = 0):
    """`FluxPipeline`: CLIP and T5, a double- and single-stream transformer on packed latents (FLUX.1-schnell
    layout: no guidance embedding)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=_TEXT,
        pooled_projection_dim=_TEXT,
        axes_dims_rope=[4, 4, 8],
    )
    pipe = FluxPipeline(
        transformer=transformer,
        vae=_kl_vae(shift_factor=0.1159, scaling_factor=0.3611),
        scheduler=FlowMatchEulerDiscreteScheduler(),
        text_encoder=tiny_clip(projection=False),
        tokenizer=tiny_clip_tokenizer(),
        text_encoder_2=tiny_t5(),
        tokenizer_2=tiny_t5_tokenizer(),
    )
    return _finish(pipe)


def _pixart_transformer():
    from diffusers import PixArtTransformer2DModel

    return PixArtTransformer2DModel(
        sample_size=RESOLUTION // 2,
        num_layers=2,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=3,
        caption_channels=_TEXT,
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
        vae=_kl_vae(),
        scheduler=DDPMScheduler(),
        text_encoder=tiny_t5(),
        tokenizer=tiny_t5_tokenizer(),
    )
    return _finish(pipe)


def tiny_sana_sprint_pipeline(seed: int = 0):
    """`SanaSprintPipeline`: a Gemma-2 text encoder, a linear-attention DiT with a guidance embedding, a deep
    compression autoencoder and the sCM scheduler."""
    from diffusers import AutoencoderDC, SanaSprintPipeline, SanaTransformer2DModel, SCMScheduler

    torch.manual_seed(seed)
    transformer = SanaTransformer2DModel(
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        num_attention_heads=2,
        attention_head_dim=4,
        num_cross_attention_heads=2,
        cross_attention_head_dim=4,
        cross_attention_dim=8,
        caption_channels=8,
        sample_size=RESOLUTION // 2,
        qk_norm="rms_norm_across_heads",
        guidance_embeds=True,
    )
    vae = AutoencoderDC(
        in_channels=3,
        latent_channels=4,
        attention_head_dim=2,
        encoder_block_types=("ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8),
        encoder_qkv_multiscales=((), (5,)),
        decoder_qkv_multiscales=((), (5,)),
        encoder_layers_per_block=(1, 1),
        decoder_layers_per_block=[1, 1],
        downsample_block_type="conv",
        upsample_block_type="interpolate",
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        scaling_factor=0.41407,
    )
    text_encoder = Gemma2Model(
        Gemma2Config(
            head_dim=16,
            hidden_size=8,
            intermediate_size=64,
            num_attention_heads=2,
            num_hidden_layers=1,
            num_key_value_heads=2,
            vocab_size=_VOCAB,
            attn_implementation="eager",
        )
    )
    pipe = SanaSprintPipeline(
        transformer=transformer,
        vae=vae,
        scheduler=SCMScheduler(),
        text_encoder=text_encoder,
        tokenizer=tiny_gemma_tokenizer(),
    )
    return _finish(pipe)


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
