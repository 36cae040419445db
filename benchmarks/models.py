"""Architectures for the benchmarks, written as configs in code (no Hub access): real sizes and tiny twins.

Real sizes are the public configs of SD-Turbo (the SD 2.1 UNet and VAE at 512 px, the OpenCLIP ViT-H text tower),
SDXL-Turbo (the SDXL UNet at 512 px, its VAE and two text towers), CLIP ViT-H/14 (the tower under PickScore and
HPSv2) and Qwen2-VL-7B (the backbone of HPSv3). Every builder takes a `device` and a `dtype`: on ``"meta"`` nothing
is allocated, which is how FLOPs are counted for multi-billion-parameter models on a laptop; on ``"cuda"`` the
weights are random-initialised directly on the GPU in `dtype` (no fp32 copy on the host). Tiny twins have the same
structure with a few hundred thousand parameters, so the same code paths run on a CPU in milliseconds.

The tokenizer of every pipeline is `trl_drpo.tiny_pipelines.tiny_clip_tokenizer` (byte-level, 77 tokens): the token
ids it produces are valid for the real vocabularies too, and FLOPs depend only on the sequence length, which is CLIP's
77.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    Qwen2VLConfig,
    Qwen2VLModel,
)

from trl_drpo.tiny_pipelines import TINY_RESOLUTION, tiny_clip_tokenizer, turbo_scheduler


PIPELINES = ("sd-turbo", "sdxl-turbo")
REWARDS = ("pickscore", "hpsv3")


@contextlib.contextmanager
def build_context(device: torch.device | str, dtype: torch.dtype) -> Iterator[None]:
    """Create modules directly on `device` with floating parameters in `dtype`.

    Setting the default dtype (rather than casting afterwards) keeps a 7B model from ever existing in fp32, and the
    default device makes random initialisation run where the weights live.
    """
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


# ----------------------------------------------------------------------------------------------------------------
# Generator pipelines
# ----------------------------------------------------------------------------------------------------------------


def _text_config(hidden: int, layers: int, heads: int, intermediate: int, act: str, projection: int, **kw: Any):
    return CLIPTextConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        hidden_act=act,
        projection_dim=projection,
        max_position_embeddings=77,
        **kw,
    )


def _tiny_text_config(projection: int) -> CLIPTextConfig:
    # The special ids of `tiny_clip_tokenizer`, so that pooling finds the end-of-text token.
    return _text_config(
        32, 2, 4, 37, "gelu", projection, vocab_size=1000, bos_token_id=0, eos_token_id=1, pad_token_id=1
    )


def _vae(tiny: bool, scaling_factor: float, force_upcast: bool):
    from diffusers import AutoencoderKL

    if tiny:
        widths, groups, sample = (8, 16, 16), 4, TINY_RESOLUTION
    else:
        widths, groups, sample = (128, 256, 512, 512), 32, 512
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=widths,
        down_block_types=("DownEncoderBlock2D",) * len(widths),
        up_block_types=("UpDecoderBlock2D",) * len(widths),
        latent_channels=4,
        layers_per_block=1 if tiny else 2,
        norm_num_groups=groups,
        sample_size=sample,
        scaling_factor=scaling_factor,
        force_upcast=force_upcast,
    )


def sd_turbo_pipeline(device: torch.device | str = "meta", dtype: torch.dtype = torch.float32, tiny: bool = False):
    """A `StableDiffusionPipeline` with SD-Turbo's architecture (SD 2.1 UNet, 512 px) and random weights."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    with build_context(device, dtype):
        if tiny:
            unet = UNet2DConditionModel(
                sample_size=TINY_RESOLUTION // 4,
                block_out_channels=(8, 16),
                layers_per_block=1,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                cross_attention_dim=32,
                attention_head_dim=4,
                norm_num_groups=4,
            )
            text = CLIPTextModel(_tiny_text_config(32))
        else:
            unet = UNet2DConditionModel(
                sample_size=64,
                in_channels=4,
                out_channels=4,
                layers_per_block=2,
                block_out_channels=(320, 640, 1280, 1280),
                attention_head_dim=(5, 10, 20, 20),
                cross_attention_dim=1024,
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                use_linear_projection=True,
            )
            # OpenCLIP ViT-H/14's text tower as diffusers ships it (23 of its 24 layers: SD 2.x uses the penultimate).
            text = CLIPTextModel(_text_config(1024, 23, 16, 4096, "gelu", 512, vocab_size=49408))
        vae = _vae(tiny, scaling_factor=0.18215, force_upcast=False)
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text,
        tokenizer=tiny_clip_tokenizer(),
        scheduler=turbo_scheduler(ancestral=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sdxl_turbo_pipeline(device: torch.device | str = "meta", dtype: torch.dtype = torch.float32, tiny: bool = False):
    """A `StableDiffusionXLPipeline` with SDXL-Turbo's architecture (SDXL UNet at 512 px) and random weights."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    with build_context(device, dtype):
        if tiny:
            unet = UNet2DConditionModel(
                sample_size=TINY_RESOLUTION // 4,
                block_out_channels=(8, 16),
                layers_per_block=1,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                attention_head_dim=(2, 4),
                use_linear_projection=True,
                addition_embed_type="text_time",
                addition_time_embed_dim=8,
                transformer_layers_per_block=(1, 1),
                projection_class_embeddings_input_dim=80,
                cross_attention_dim=64,
                norm_num_groups=4,
            )
            text = CLIPTextModel(_tiny_text_config(32))
            text_2 = CLIPTextModelWithProjection(_tiny_text_config(32))
        else:
            unet = UNet2DConditionModel(
                sample_size=64,
                in_channels=4,
                out_channels=4,
                layers_per_block=2,
                block_out_channels=(320, 640, 1280),
                attention_head_dim=(5, 10, 20),
                transformer_layers_per_block=(1, 2, 10),
                cross_attention_dim=2048,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                use_linear_projection=True,
                addition_embed_type="text_time",
                addition_time_embed_dim=256,
                projection_class_embeddings_input_dim=2816,
            )
            # CLIP ViT-L/14's and OpenCLIP ViT-bigG/14's text towers.
            text = CLIPTextModel(_text_config(768, 12, 12, 3072, "quick_gelu", 768, vocab_size=49408))
            text_2 = CLIPTextModelWithProjection(_text_config(1280, 32, 20, 5120, "gelu", 1280, vocab_size=49408))
        vae = _vae(tiny, scaling_factor=0.13025, force_upcast=True)
    pipe = StableDiffusionXLPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text,
        text_encoder_2=text_2,
        tokenizer=tiny_clip_tokenizer(),
        tokenizer_2=tiny_clip_tokenizer(),
        scheduler=turbo_scheduler(ancestral=True),
        force_zeros_for_empty_prompt=True,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_autoencoder(device: torch.device | str = "meta", dtype: torch.dtype = torch.float32, tiny: bool = False):
    """An `AutoencoderTiny` with TAESD's architecture (TAESDXL's is the same; 64 channels, 3/3/3/1 decoder blocks,
    8x upsampling), random weights, as `DrPOConfig.ranking_vae` loads it; the tiny twin decodes the tiny pipelines'
    latents (4x)."""
    from diffusers import AutoencoderTiny

    kwargs = {}
    if tiny:
        kwargs = {
            "encoder_block_out_channels": (8, 8, 8),
            "decoder_block_out_channels": (8, 8, 8),
            "num_encoder_blocks": (1, 1, 1),
            "num_decoder_blocks": (1, 1, 1),
        }
    with build_context(device, dtype):
        return AutoencoderTiny(**kwargs).eval().requires_grad_(False)


def build_pipeline(name: str, device: torch.device | str = "meta", dtype: torch.dtype = torch.float32, tiny=False):
    """`sd_turbo_pipeline` or `sdxl_turbo_pipeline` by name ("sd-turbo" / "sdxl-turbo")."""
    builders = {"sd-turbo": sd_turbo_pipeline, "sdxl-turbo": sdxl_turbo_pipeline}
    if name not in builders:
        raise ValueError(f"Unknown pipeline {name!r}; choose one of {PIPELINES}.")
    return builders[name](device=device, dtype=dtype, tiny=tiny)


# ----------------------------------------------------------------------------------------------------------------
# Reward backbones
# ----------------------------------------------------------------------------------------------------------------


def clip_vit_h14(device: torch.device | str = "meta", dtype: torch.dtype = torch.float32, tiny: bool = False):
    """A `CLIPModel` with ViT-H/14's shape (the backbone of PickScore and HPSv2), random weights, eval mode."""
    if tiny:
        config = CLIPConfig(
            text_config={**_tiny_text_config(16).to_dict()},
            vision_config={
                "hidden_size": 32,
                "intermediate_size": 37,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "patch_size": 8,
                "image_size": 32,
                "projection_dim": 16,
            },
            projection_dim=16,
        )
    else:
        config = CLIPConfig(
            text_config=_text_config(1024, 24, 16, 4096, "gelu", 1024, vocab_size=49408).to_dict(),
            vision_config={
                "hidden_size": 1280,
                "intermediate_size": 5120,
                "num_hidden_layers": 32,
                "num_attention_heads": 16,
                "patch_size": 14,
                "image_size": 224,
                "hidden_act": "gelu",
                "projection_dim": 1024,
            },
            projection_dim=1024,
        )
    config._attn_implementation = "sdpa"
    with build_context(device, dtype):
        model = CLIPModel(config)
    return model.eval().requires_grad_(False)


@dataclass(frozen=True)
class VLMSpec:
    """How an HPSv3-style reward feeds one image to its Qwen2-VL backbone.

    Attributes:
        image_size: square side the image is resized to. HPSv3 caps images at 256 * 28 * 28 pixels (448 x 448), so
            the vision tower sees (448 / 14)^2 = 1024 patches and the language model 1024 / 2^2 = 256 image tokens.
        text_tokens: tokens of chat template + instruction + prompt around the image (an assumption: 128).
    """

    image_size: int = 448
    text_tokens: int = 128


REAL_VLM = VLMSpec()
TINY_VLM = VLMSpec(image_size=56, text_tokens=16)


def qwen2_vl_7b(device: torch.device | str = "meta", dtype: torch.dtype = torch.float32, tiny: bool = False):
    """A `Qwen2VLModel` (vision tower + language model, no LM head) with Qwen2-VL-7B's shape, random weights."""
    if tiny:
        text = {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": 1000,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
        }
        vision = {"depth": 2, "embed_dim": 32, "hidden_size": 64, "num_heads": 4}
        ids = {"image_token_id": 999, "vision_start_token_id": 997, "vision_end_token_id": 998, "video_token_id": 996}
    else:
        text = {
            "hidden_size": 3584,
            "intermediate_size": 18944,
            "num_hidden_layers": 28,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
            "vocab_size": 152064,
            "max_position_embeddings": 32768,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
        }
        vision = {"depth": 32, "embed_dim": 1280, "hidden_size": 3584, "num_heads": 16}
        ids = {
            "image_token_id": 151655,
            "vision_start_token_id": 151652,
            "vision_end_token_id": 151653,
            "video_token_id": 151656,
        }
    vision.update(mlp_ratio=4, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    config = Qwen2VLConfig(text_config=text, vision_config=vision, **ids)
    for part in (config, config.text_config, config.vision_config):
        part._attn_implementation = "sdpa"
    with build_context(device, dtype):
        model = Qwen2VLModel(config)
    return model.eval().requires_grad_(False)
