"""Tiny, offline diffusers pipelines with random weights: the CLI's `tiny-sd` / `tiny-sdxl` models, CPU smoke
runs, the benchmarks and the tests.

Nothing here touches the network: every model is built from a small config, and the CLIP tokenizer is built in
memory from a byte-level vocabulary. The pipelines are real `StableDiffusionPipeline` /
`StableDiffusionXLPipeline` objects with the Turbo scheduler set-up (Euler ancestral, trailing timestep spacing), so
`pipe(prompt, num_inference_steps=1, guidance_scale=0.0)` exercises exactly the code a user's SD-Turbo or SDXL-Turbo
runs, in a few milliseconds on a CPU.
"""

from __future__ import annotations

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer


TINY_RESOLUTION = 32
"""Default image size of the tiny pipelines, in pixels (latents are a quarter of it per side)."""

_TEXT_HIDDEN = 32
_VOCAB_SIZE = 1000


def bytes_to_unicode() -> list[str]:
    """GPT-2's reversible byte -> printable-character table (256 characters, in byte order), the alphabet of CLIP's
    byte-level BPE: a vocabulary that holds these characters can encode any text."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            chars.append(256 + n)
            n += 1
    return [chr(c) for c in chars]


def tiny_clip_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """A real byte-level BPE `CLIPTokenizer` built in memory.

    Every byte is a token, with and without CLIP's end-of-word marker, and a few merges for common English letter
    pairs so that the BPE path is exercised. Ids stay below the tiny text encoders' vocabulary size.
    """
    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in bytes_to_unicode():
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    merges = [("t", "h"), ("i", "n"), ("e", "r"), ("a", "n"), ("o", "n")]
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def _text_config(seed: int, projection_dim: int | None = None) -> CLIPTextConfig:
    kwargs = {"projection_dim": projection_dim} if projection_dim is not None else {}
    return CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_size=_TEXT_HIDDEN,
        intermediate_size=37,
        layer_norm_eps=1e-5,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=_VOCAB_SIZE,
        hidden_act="gelu",
        **kwargs,
    )


def _tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=[8, 16, 16],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=TINY_RESOLUTION,
    )


def _tiny_unet(**kwargs):
    """A two-level UNet with 4-channel latents of side TINY_RESOLUTION / 4; `kwargs` set the family's layout."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=TINY_RESOLUTION // 4,
        in_channels=4,
        out_channels=4,
        norm_num_groups=4,
        **kwargs,
    )


def turbo_scheduler(ancestral: bool = True):
    """The Turbo models' scheduler: Euler (SD-Turbo) or Euler ancestral (SDXL-Turbo), scaled-linear betas, epsilon
    prediction, trailing timestep spacing, so one step runs at t=999."""
    from diffusers import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler

    cls = EulerAncestralDiscreteScheduler if ancestral else EulerDiscreteScheduler
    return cls(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        prediction_type="epsilon",
        timestep_spacing="trailing",
        steps_offset=1,
    )


def _finish(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sd_pipeline(seed: int = 0):
    """A `StableDiffusionPipeline` with the SD-Turbo layout (one text encoder, epsilon prediction) and random
    weights, on CPU in fp32, with no safety checker."""
    from diffusers import StableDiffusionPipeline

    torch.manual_seed(seed)
    unet = _tiny_unet(
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=_TEXT_HIDDEN,
        attention_head_dim=4,
    )
    vae = _tiny_vae()
    text_encoder = CLIPTextModel(_text_config(seed))
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tiny_clip_tokenizer(),
        scheduler=turbo_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return _finish(pipe)


def tiny_sdxl_pipeline(seed: int = 0):
    """A `StableDiffusionXLPipeline` with the SDXL-Turbo layout (two text encoders, pooled embeddings, time ids)
    and random weights, on CPU in fp32."""
    from diffusers import StableDiffusionXLPipeline

    torch.manual_seed(seed)
    unet = _tiny_unet(
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=80,  # 6 time ids * 8 + pooled projection 32
        cross_attention_dim=2 * _TEXT_HIDDEN,
    )
    vae = _tiny_vae()
    pipe = StableDiffusionXLPipeline(
        unet=unet,
        vae=vae,
        text_encoder=CLIPTextModel(_text_config(seed)),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(seed, projection_dim=_TEXT_HIDDEN)),
        tokenizer=tiny_clip_tokenizer(),
        tokenizer_2=tiny_clip_tokenizer(),
        scheduler=turbo_scheduler(),
        force_zeros_for_empty_prompt=True,
    )
    return _finish(pipe)
