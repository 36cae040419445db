"""Tiny, offline diffusers pipelines with random weights: the CLI's `trl-drpo/tiny-sd`, `tiny-sdxl`, `tiny-flux`
and `tiny-sana` models, CPU smoke runs, the benchmarks and the tests.

Nothing here touches the network: every model is built from a small config, and the tokenizers are built in memory
(CLIP's byte-level BPE, a character-level T5 unigram, a byte-level Gemma BPE). The pipelines are real
`StableDiffusionPipeline` / `StableDiffusionXLPipeline` objects with the Turbo scheduler set-up (Euler ancestral,
trailing timestep spacing), a `FluxPipeline` in the FLUX.1-schnell layout and a `SanaSprintPipeline`, so the one-step
call of each (`pipe(prompt, num_inference_steps=1, guidance_scale=0.0)` for the Turbo models) exercises exactly the
code a user's real model runs, in milliseconds on a CPU. They are in eval mode, as `from_pretrained` leaves a pipeline
(the tiny T5 has dropout).
"""

from __future__ import annotations

import torch
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    Gemma2Config,
    Gemma2Model,
    GemmaTokenizerFast,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)


TINY_RESOLUTION = 32
"""Default image size of the tiny pipelines, in pixels (latents are a quarter of it per side for SD and SDXL, half
for the others)."""

TINY_TEXT_HIDDEN = 32
"""Width of the tiny CLIP and T5 text encoders (the text inputs of the tiny denoisers)."""

_VOCAB_SIZE = 1000  # CLIP's
_SMALL_VOCAB_SIZE = 300  # T5's and Gemma's: their tokenizers use fewer ids


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


def _text_config(projection_dim: int | None = None, num_hidden_layers: int = 2, **kwargs) -> CLIPTextConfig:
    if projection_dim is not None:
        kwargs["projection_dim"] = projection_dim
    return CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_size=TINY_TEXT_HIDDEN,
        intermediate_size=37,
        layer_norm_eps=1e-5,
        num_attention_heads=4,
        num_hidden_layers=num_hidden_layers,
        vocab_size=_VOCAB_SIZE,
        **kwargs,
    )


def tiny_clip(projection: bool = True) -> CLIPTextModel | CLIPTextModelWithProjection:
    """A one-layer CLIP text encoder; with a projection head (SD3) or without (Flux reads its pooler output)."""
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(_text_config(projection_dim=TINY_TEXT_HIDDEN, num_hidden_layers=1))


def tiny_t5(d_model: int = TINY_TEXT_HIDDEN) -> T5EncoderModel:
    """A one-layer T5 encoder (with dropout, as T5's config has it: the pipelines are put in eval mode)."""
    return T5EncoderModel(
        T5Config(
            vocab_size=_SMALL_VOCAB_SIZE,
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


def tiny_kl_vae(block_out_channels: tuple[int, ...] = (8, 8), **kwargs):
    """An `AutoencoderKL` with 4 latent channels and one level per entry of `block_out_channels` (scale factor
    2 ** (levels - 1)); `kwargs` (e.g. `scaling_factor`, `shift_factor`) set the family's latent scaling."""
    from diffusers import AutoencoderKL

    levels = len(block_out_channels)
    return AutoencoderKL(
        block_out_channels=list(block_out_channels),
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=TINY_RESOLUTION,
        **kwargs,
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


def ready_pipeline(pipe):
    """`pipe` as `from_pretrained` leaves a pipeline, for a single step: every module in eval mode (the tiny T5 has
    dropout), the progress bar off."""
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
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
        cross_attention_dim=TINY_TEXT_HIDDEN,
        attention_head_dim=4,
    )
    vae = tiny_kl_vae((8, 16, 16))
    text_encoder = CLIPTextModel(_text_config(hidden_act="gelu"))
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
    return ready_pipeline(pipe)


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
        cross_attention_dim=2 * TINY_TEXT_HIDDEN,
    )
    vae = tiny_kl_vae((8, 16, 16))
    pipe = StableDiffusionXLPipeline(
        unet=unet,
        vae=vae,
        text_encoder=CLIPTextModel(_text_config(hidden_act="gelu")),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(projection_dim=TINY_TEXT_HIDDEN, hidden_act="gelu")),
        tokenizer=tiny_clip_tokenizer(),
        tokenizer_2=tiny_clip_tokenizer(),
        scheduler=turbo_scheduler(),
        force_zeros_for_empty_prompt=True,
    )
    return ready_pipeline(pipe)


def tiny_flux_pipeline(seed: int = 0):
    """A `FluxPipeline` with the FLUX.1-schnell layout (CLIP and T5, a double- and single-stream transformer on packed
    latents, no guidance embedding, flow-matching Euler) and random weights, on CPU in fp32."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TINY_TEXT_HIDDEN,
        pooled_projection_dim=TINY_TEXT_HIDDEN,
        axes_dims_rope=[4, 4, 8],
    )
    pipe = FluxPipeline(
        transformer=transformer,
        vae=tiny_kl_vae(shift_factor=0.1159, scaling_factor=0.3611),
        scheduler=FlowMatchEulerDiscreteScheduler(),
        text_encoder=tiny_clip(projection=False),
        tokenizer=tiny_clip_tokenizer(),
        text_encoder_2=tiny_t5(),
        tokenizer_2=tiny_t5_tokenizer(),
    )
    return ready_pipeline(pipe)


def tiny_sana_sprint_pipeline(seed: int = 0):
    """A `SanaSprintPipeline` (a Gemma-2 text encoder, a linear-attention DiT with a guidance embedding, a deep
    compression autoencoder, the sCM scheduler) with random weights, on CPU in fp32."""
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
        sample_size=TINY_RESOLUTION // 2,
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
            vocab_size=_SMALL_VOCAB_SIZE,
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
    return ready_pipeline(pipe)
