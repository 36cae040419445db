"""Specification of `trl_drpo.features`: frozen, deterministic feature maps `latents -> {key: (B, tokens, dim)}`."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel, Dinov2Config, Dinov2Model, ViTMAEConfig, ViTMAEModel

from trl_drpo.features import (
    FEATURE_MAPS,
    CombinedFeatureMap,
    DenoiserFeatureMap,
    LatentMAEResNet,
    VAEDecoderFeatureMap,
    build_feature_map,
)
from trl_drpo.generators import OneStepGenerator
from trl_drpo.generators.adapters import adapters_enabled
from trl_drpo.tiny_pipelines import tiny_sd_pipeline, tiny_sdxl_pipeline


PIPELINES = {"sd": tiny_sd_pipeline, "sdxl": tiny_sdxl_pipeline}


@pytest.fixture(params=sorted(PIPELINES))
def gen(request):
    return OneStepGenerator.from_pipeline(PIPELINES[request.param]())


@pytest.fixture
def sd_gen():
    return OneStepGenerator.from_pipeline(tiny_sd_pipeline())


def _latents(gen: OneStepGenerator, n: int = 3, seed: int = 0) -> torch.Tensor:
    return gen.make_noise(n, torch.Generator().manual_seed(seed)).requires_grad_(True)


def _assert_grad_reaches(latents: torch.Tensor, features: dict[str, torch.Tensor]) -> None:
    sum(v.square().mean() for v in features.values()).backward()
    assert latents.grad is not None and latents.grad.abs().sum() > 0


def _assert_frozen(fmap) -> None:
    fmap.train()
    assert not fmap.training and all(not m.training for m in fmap.modules())
    assert all(not p.requires_grad for p in fmap.parameters())


# --------------------------------------------------------------------------------------------------------- registry


def test_registry_lists_every_documented_map():
    assert {"denoiser", "vae_decoder", "latent_mae", "dinov2", "vit_mae", "clip_vision", "latent"} <= set(FEATURE_MAPS)


def test_unknown_feature_map_name_raises_listing_the_available_ones(sd_gen):
    with pytest.raises(ValueError, match=r"Unknown feature map 'dino'.*'denoiser'.*register_feature_map"):
        build_feature_map("dino", sd_gen)


def test_unknown_feature_key_raises_listing_the_available_ones(sd_gen):
    with pytest.raises(ValueError, match=r"Unknown feature keys \['layer9_mean'\].*latent_mean"):
        build_feature_map("latent", sd_gen, keys=["layer9_mean"])


# --------------------------------------------------------------------------------------------------------- denoiser


def test_denoiser_features_are_pooled_block_outputs_with_gradient(gen):
    fmap = build_feature_map("denoiser", gen)
    assert isinstance(fmap, DenoiserFeatureMap)
    assert fmap.available_keys == ("down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1")
    assert fmap.keys == fmap.default_keys == ("down_blocks.1", "mid_block", "up_blocks.0")
    latents = _latents(gen)
    features = fmap(latents, gen.encode_prompts(["a cat"]).repeat_interleave(3))
    # Tiny UNet: 16 channels at 4x4 (pooled to 1x1) for the last down block and the mid block; up_blocks.0
    # upsamples to 8x8, pooled with kernel 4 to 2x2; one flattened token per image.
    assert {k: tuple(v.shape) for k, v in features.items()} == {
        "down_blocks.1": (3, 1, 16),
        "mid_block": (3, 1, 16),
        "up_blocks.0": (3, 1, 64),
    }
    _assert_grad_reaches(latents, features)
    _assert_frozen(fmap)


def test_denoiser_spatial_tokens_keep_one_token_per_pooled_position(sd_gen):
    fmap = build_feature_map("denoiser", sd_gen, keys=["up_blocks.0"], spatial_tokens=True, pool_size=2)
    features = fmap(_latents(sd_gen), sd_gen.encode_prompts(["a cat"]))
    assert features["up_blocks.0"].shape == (3, 16, 16)


def test_denoiser_features_are_deterministic_and_do_not_depend_on_the_lora(gen):
    fmap = build_feature_map("denoiser", gen)
    latents = _latents(gen).detach()
    embeds = gen.encode_prompts(["a cat", "a dog", "a cow"])
    before = fmap(latents, embeds)
    gen.add_lora(rank=4, alpha=4)
    for name, param in gen.unwrapped_denoiser.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0.0, 0.5)
    after = fmap(latents, embeds)
    again = fmap(latents, embeds)
    for key in fmap.keys:
        torch.testing.assert_close(after[key], before[key], atol=1e-5, rtol=0)
        assert torch.equal(again[key], after[key])
    # The adapter is live again and no hook is left behind.
    assert adapters_enabled(gen.unwrapped_denoiser)
    assert all(not m._forward_hooks for m in gen.unwrapped_denoiser.modules())


def test_denoiser_feature_gradients_stay_those_of_the_base_model_under_gradient_checkpointing(sd_gen):
    fmap = build_feature_map("denoiser", sd_gen)
    embeds = sd_gen.encode_prompts(["a cat"])
    latents = _latents(sd_gen)
    _assert_grad_reaches(latents, fmap(latents, embeds))
    base_grad = latents.grad.clone()
    sd_gen.add_lora(rank=4, alpha=4)
    for name, param in sd_gen.unwrapped_denoiser.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0.0, 0.5)
    unet = sd_gen.unwrapped_denoiser.train()
    unet.enable_gradient_checkpointing()
    # Backward re-runs checkpointed blocks after the adapter is back on; the map must not let that happen.
    latents.grad = None
    _assert_grad_reaches(latents, fmap(latents, embeds))
    torch.testing.assert_close(latents.grad, base_grad, atol=1e-5, rtol=0)
    assert unet.is_gradient_checkpointing


def test_denoiser_features_of_a_latent_do_not_depend_on_its_batch_position(sd_gen):
    fmap = build_feature_map("denoiser", sd_gen)
    latents = _latents(sd_gen).detach()
    embeds = sd_gen.encode_prompts(["a cat"])
    batch = fmap(latents, embeds)
    alone = fmap(latents[2:], embeds)
    for key in fmap.keys:
        torch.testing.assert_close(batch[key][2:], alone[key], atol=1e-5, rtol=0)


def test_per_prompt_features_are_grouped_by_prompt_and_do_not_depend_on_the_chunk(sd_gen):
    fmap = build_feature_map("denoiser", sd_gen)
    latents = _latents(sd_gen, n=4).detach()
    embeds = sd_gen.encode_prompts(["a cat", "a dog"]).repeat_interleave(2)
    whole = fmap.per_prompt(latents, embeds, num_prompts=2)
    chunked = fmap.per_prompt(latents, embeds, num_prompts=2, rows=1)
    flat = fmap(latents, embeds)
    for key in fmap.keys:
        assert whole[key].shape == (2, 2, *flat[key].shape[1:])
        torch.testing.assert_close(whole[key].flatten(0, 1), flat[key].float())
        torch.testing.assert_close(chunked[key], whole[key], atol=1e-5, rtol=0)


def test_denoiser_features_need_the_prompt_embeddings(sd_gen):
    with pytest.raises(ValueError, match="needs the prompt embeddings"):
        build_feature_map("denoiser", sd_gen)(_latents(sd_gen))


# --------------------------------------------------------------------------------------------------------- latent-MAE


def _tiny_mae() -> LatentMAEResNet:
    torch.manual_seed(0)
    return LatentMAEResNet(in_channels=4, widths=(8, 8, 16, 16), layers=(1, 2, 1, 1), stem_width=8).eval()


LAYER4_KEYS = ("layer4_mean", "layer4_std", "layer4_mean_2", "layer4_std_2", "layer4_mean_4", "layer4_std_4")


def test_latent_mae_saved_and_loaded_from_a_directory_gives_the_layer4_statistics(sd_gen, tmp_path):
    _tiny_mae().save_pretrained(tmp_path)
    fmap = build_feature_map("latent_mae", sd_gen, model_name_or_path=tmp_path)
    assert fmap.keys == fmap.default_keys == LAYER4_KEYS
    assert "layer1_mean" in fmap.available_keys and "layer2_std_4" in fmap.available_keys
    # 32x32 latents (256 px with an 8x VAE): layer4 is 4x4 after three stride-2 stages.
    latents = torch.randn(2, 4, 32, 32, requires_grad=True)
    features = fmap(latents)
    shapes = {k: tuple(v.shape) for k, v in features.items()}
    assert shapes == {
        "layer4_mean": (2, 1, 16),
        "layer4_std": (2, 1, 16),
        "layer4_mean_2": (2, 4, 16),
        "layer4_std_2": (2, 4, 16),
        "layer4_mean_4": (2, 1, 16),
        "layer4_std_4": (2, 1, 16),
    }
    # The 4x4 patch of a 4x4 map is the whole map.
    torch.testing.assert_close(features["layer4_mean_4"], features["layer4_mean"])
    _assert_grad_reaches(latents, features)
    _assert_frozen(fmap)


def test_latent_mae_loads_the_published_flax_style_checkpoint_format(tmp_path):
    model = _tiny_mae()
    published = {}
    for key, value in model.state_dict().items():
        parts = key.split(".")
        if parts[0] == "stages":
            parts = [f"stages_{parts[1]}", f"layers_{parts[2]}", *parts[3:]]
        elif parts[0] == "norms":
            parts = [f"layer{int(parts[1]) + 1}_norm", *parts[2:]]
        if value.ndim == 4:  # conv kernels are exported as HWIO under flax's name
            value, parts[-1] = value.permute(2, 3, 1, 0).contiguous(), "kernel"
        elif parts[-1] == "weight":
            parts[-1] = "scale"
        published["module.encoder." + ".".join(parts)] = value
    published["decoder.head.kernel"] = torch.zeros(1)  # the rest of the MAE is ignored
    path = tmp_path / "mae_latent_256_torch.pth"
    torch.save({"model_state_dict": published, "metadata": {"model_config": {"layers": [1, 2, 1, 1]}}}, path)

    loaded = LatentMAEResNet.from_pretrained(path)
    assert loaded.config == model.config
    latents = torch.randn(1, 4, 16, 16)
    for key, value in model(latents).items():
        torch.testing.assert_close(loaded(latents)[key], value)


def test_latent_mae_rejects_a_chosen_key_the_input_is_too_small_for(sd_gen, tmp_path):
    _tiny_mae().save_pretrained(tmp_path)
    fmap = build_feature_map("latent_mae", sd_gen, model_name_or_path=tmp_path, keys=["layer4_mean_4"])
    with pytest.raises(ValueError, match="cannot be computed"):
        fmap(torch.randn(1, 4, 16, 16))  # layer4 is 2x2


def test_latent_mae_default_keys_skip_patch_statistics_the_input_is_too_small_for(sd_gen, tmp_path):
    _tiny_mae().save_pretrained(tmp_path)
    fmap = build_feature_map("latent_mae", sd_gen, model_name_or_path=tmp_path)
    features = fmap(torch.randn(1, 4, 16, 16))  # layer4 is 2x2
    assert tuple(features) == ("layer4_mean", "layer4_std", "layer4_mean_2", "layer4_std_2")


def test_latent_mae_needs_a_checkpoint_path(sd_gen, tmp_path):
    with pytest.raises(ValueError, match="model_name_or_path"):
        build_feature_map("latent_mae", sd_gen)
    with pytest.raises(FileNotFoundError):
        build_feature_map("latent_mae", sd_gen, model_name_or_path=tmp_path / "missing.pth")


# --------------------------------------------------------------------------------------------------------- vae decoder


def _decoder_mid_block(gen: OneStepGenerator, latents: torch.Tensor) -> torch.Tensor:
    # What AutoencoderKL's decoder computes up to its mid block, written out.
    vae = gen.vae
    z = vae.post_quant_conv(latents / vae.config.scaling_factor)
    return vae.decoder.mid_block(vae.decoder.conv_in(z))


def test_vae_decoder_features_are_patch_statistics_of_the_decoder_mid_block_with_gradient(gen):
    fmap = build_feature_map("vae_decoder", gen)
    assert isinstance(fmap, VAEDecoderFeatureMap) and fmap.keys == ("mid_block_mean_4", "mid_block_std_4")
    latents = _latents(gen, n=2)
    features = fmap(latents)
    mid = _decoder_mid_block(gen, latents.detach())  # (2, C, 8, 8): 4x4 patches give a 2x2 grid of tokens
    patch = mid[:, :, :4, 4:]  # the top-right patch, token 1 in row-major order
    torch.testing.assert_close(features["mid_block_mean_4"][:, 1], patch.mean(dim=(2, 3)))
    torch.testing.assert_close(
        features["mid_block_std_4"][:, 1], (patch.var(dim=(2, 3), unbiased=False) + 1e-6).sqrt()
    )
    assert features["mid_block_mean_4"].shape == (2, 4, mid.shape[1])
    _assert_grad_reaches(latents, features)
    _assert_frozen(fmap)


def test_vae_decoder_features_run_the_decoder_only_up_to_the_last_block_they_read(sd_gen):
    calls = []
    sd_gen.vae.decoder.conv_out.register_forward_hook(lambda *_: calls.append("conv_out"))
    sd_gen.vae.decoder.up_blocks[0].register_forward_hook(lambda *_: calls.append("up_blocks.0"))
    build_feature_map("vae_decoder", sd_gen)(_latents(sd_gen))
    assert calls == []
    build_feature_map("vae_decoder", sd_gen, keys=["up_blocks.0_mean"])(_latents(sd_gen))
    assert calls == ["up_blocks.0"]


def test_vae_decoder_features_of_a_batch_do_not_depend_on_the_vaes_slicing(sd_gen):
    latents = _latents(sd_gen).detach()
    whole = build_feature_map("vae_decoder", sd_gen)(latents)
    sd_gen.vae.enable_slicing()  # diffusers then decodes one latent at a time
    sliced = build_feature_map("vae_decoder", sd_gen)(latents)
    for key, value in whole.items():
        torch.testing.assert_close(sliced[key], value)


def test_vae_decoder_without_a_mid_block_asks_for_the_keys_of_its_up_blocks(sd_gen):
    sd_gen.vae.decoder.mid_block = None  # as SANA's AutoencoderDC
    with pytest.raises(ValueError, match=r"no mid_block.*choose feature_keys among \['up_blocks.0_mean'"):
        build_feature_map("vae_decoder", sd_gen)
    fmap = build_feature_map("vae_decoder", sd_gen, keys=["up_blocks.0_mean"])
    assert fmap.keys == ("up_blocks.0_mean",)


def test_vae_decoder_features_need_a_decoder_with_blocks(sd_gen):
    sd_gen.vae.decoder = torch.nn.Conv2d(4, 3, 1)  # a decoder without mid or up blocks, as AutoencoderTiny's
    with pytest.raises(ValueError, match="feature_map='denoiser' instead"):
        build_feature_map("vae_decoder", sd_gen)


# --------------------------------------------------------------------------------------------------------- combined


def test_a_combined_map_returns_each_maps_features_under_its_name(sd_gen):
    fmap = build_feature_map("denoiser+vae_decoder", sd_gen, denoiser={"pool_size": 2}, vae_decoder={})
    assert isinstance(fmap, CombinedFeatureMap) and fmap.requires_embeds and fmap.takes_call_layout
    assert fmap.keys == (
        "denoiser/down_blocks.1",
        "denoiser/mid_block",
        "denoiser/up_blocks.0",
        "vae_decoder/mid_block_mean_4",
        "vae_decoder/mid_block_std_4",
    )
    latents, embeds = _latents(sd_gen), sd_gen.encode_prompts(["a cat"])
    features = fmap(latents, embeds)
    parts = {
        "denoiser": build_feature_map("denoiser", sd_gen, pool_size=2)(latents, embeds),
        "vae_decoder": build_feature_map("vae_decoder", sd_gen)(latents),
    }
    assert list(features) == list(fmap.keys)
    for name, part in parts.items():
        for key, value in part.items():
            torch.testing.assert_close(features[f"{name}/{key}"], value)
    _assert_grad_reaches(latents, features)


def test_a_combined_map_reads_the_chosen_keys_of_each_map(sd_gen):
    keys = ["vae_decoder/up_blocks.0_std", "denoiser/mid_block"]
    fmap = build_feature_map("denoiser+vae_decoder", sd_gen, keys=keys)
    assert fmap.keys == ("denoiser/mid_block", "vae_decoder/up_blocks.0_std")


def test_a_combined_map_takes_its_kwargs_per_map(sd_gen):
    with pytest.raises(ValueError, match=r"per map, \{'denoiser': \{\.\.\.\}, 'vae_decoder'.*\['pool_size'\]"):
        build_feature_map("denoiser+vae_decoder", sd_gen, pool_size=2)


@pytest.mark.parametrize(
    "keys, message",
    [
        (["mid_block"], r"keys of feature_map='denoiser\+vae_decoder' are '<map>/<key>'"),
        (["denoiser/mid_block"], r"choose no key of \['vae_decoder'\]"),
        (["denoiser/mid_blok", "vae_decoder/mid_block_mean"], r"Unknown feature keys \['mid_blok'\]"),
    ],
)
def test_a_combined_maps_keys_must_name_a_key_of_each_of_its_maps(sd_gen, keys, message):
    with pytest.raises(ValueError, match=message):
        build_feature_map("denoiser+vae_decoder", sd_gen, keys=keys)


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("denoiser", {"pool": 1}, r"'denoiser' takes no option \['pool'\].*'pool_size'"),
        ("vae_decoder", {"patch_size": [4]}, r"'vae_decoder' takes no option \['patch_size'\].*'patch_sizes'"),
        ("denoiser+vae_decoder", {"denoiser": {"spatial_token": True}}, r"\['spatial_token'\].*'spatial_tokens'"),
        ("denoiser+vae_decoder", {"denoiser": {"keys": ["mid_block"]}}, "set feature_keys instead"),
    ],
)
def test_an_option_the_map_does_not_take_raises_naming_its_options(sd_gen, name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_feature_map(name, sd_gen, **kwargs)


def test_a_combination_names_distinct_registered_maps(sd_gen):
    with pytest.raises(ValueError, match="distinct map names"):
        build_feature_map("denoiser+denoiser", sd_gen)
    with pytest.raises(ValueError, match="Unknown feature map 'dino'"):
        build_feature_map("denoiser+dino", sd_gen)


# --------------------------------------------------------------------------------------------------------- latent


def test_latent_features_are_the_raw_latents_and_their_patch_statistics(sd_gen):
    fmap = build_feature_map("latent", sd_gen)
    latents = _latents(sd_gen, n=2)
    features = fmap(latents)
    assert {k: tuple(v.shape) for k, v in features.items()} == {
        "latent": (2, 64, 4),
        "latent_mean": (2, 1, 4),
        "latent_std": (2, 1, 4),
        "latent_mean_2": (2, 16, 4),
        "latent_std_2": (2, 16, 4),
        "latent_mean_4": (2, 4, 4),
        "latent_std_4": (2, 4, 4),
    }
    torch.testing.assert_close(features["latent"][:, 0], latents[:, :, 0, 0])
    torch.testing.assert_close(features["latent_std"][:, 0], (latents.var(dim=(2, 3), unbiased=False) + 1e-6).sqrt())
    _assert_grad_reaches(latents, features)


# --------------------------------------------------------------------------------------------------------- pixels

_VIT = {"image_size": 16, "patch_size": 4, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2}
PIXEL_ENCODERS = {
    "dinov2": (Dinov2Model, Dinov2Config(**_VIT, mlp_ratio=2)),
    "vit_mae": (ViTMAEModel, ViTMAEConfig(**_VIT, intermediate_size=32, mask_ratio=0.75)),
    "clip_vision": (CLIPVisionModel, CLIPVisionConfig(**_VIT, intermediate_size=32)),
}


def _save_pixel_encoder(name: str, path) -> None:
    model_cls, config = PIXEL_ENCODERS[name]
    torch.manual_seed(0)
    model_cls(config).save_pretrained(path)


@pytest.mark.parametrize("name", sorted(PIXEL_ENCODERS))
def test_pixel_encoder_features_of_decoded_images_have_gradient(sd_gen, tmp_path, name):
    _save_pixel_encoder(name, tmp_path)
    fmap = build_feature_map(name, sd_gen, model_name_or_path=tmp_path)
    # Two layers; the default keys are those of the last one (DINOv2's stride of 3 falls back to it).
    assert fmap.keys == fmap.default_keys == ("layer2_patch_mean", "layer2_patch_std", "layer2_cls")
    assert len(fmap.available_keys) == 6 and fmap.image_size == 16
    latents = _latents(sd_gen, n=2)
    features = fmap(latents)
    assert {k: tuple(v.shape) for k, v in features.items()} == dict.fromkeys(fmap.keys, (2, 1, 16))
    _assert_grad_reaches(latents, features)
    _assert_frozen(fmap)


def test_pixel_encoder_resizes_and_normalises_as_its_processor_config_says(sd_gen, tmp_path):
    _save_pixel_encoder("dinov2", tmp_path)
    processor = {"image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.2, 0.2], "crop_size": {"height": 8, "width": 8}}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(processor))
    fmap = build_feature_map("dinov2", sd_gen, model_name_or_path=tmp_path, keys=["layer1_cls"])
    assert fmap.image_size == 8
    images = torch.full((1, 3, 32, 32), 0.5)
    pixels = fmap.preprocess(images)
    assert pixels.shape == (1, 3, 8, 8)
    torch.testing.assert_close(pixels[0, :, 0, 0], torch.tensor([0.0, 0.5, 1.0]))
    assert fmap(_latents(sd_gen, n=1))["layer1_cls"].shape == (1, 1, 16)


def test_pixel_encoder_without_processor_config_uses_default_statistics(sd_gen, tmp_path):
    _save_pixel_encoder("clip_vision", tmp_path)
    fmap = build_feature_map("clip_vision", sd_gen, model_name_or_path=tmp_path)
    torch.testing.assert_close(fmap.image_mean.flatten(), torch.tensor([0.48145466, 0.4578275, 0.40821073]))


def test_vit_mae_is_loaded_unmasked_and_is_deterministic_across_calls(sd_gen, tmp_path):
    _save_pixel_encoder("vit_mae", tmp_path)
    fmap = build_feature_map("vit_mae", sd_gen, model_name_or_path=tmp_path, keys=["layer1_cls", "layer2_patch_std"])
    assert fmap.model.config.mask_ratio == 0.0
    latents = _latents(sd_gen, n=2).detach()
    first, second = fmap(latents), fmap(latents)
    for key in fmap.keys:
        assert torch.equal(first[key], second[key])
