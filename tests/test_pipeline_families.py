"""Specification of the pipeline families: for every family and scheduler set-up, the generator is the pipeline's own
call with gradient, and what it trains is what the pipeline serves.

Tolerances: samples and decoded images are compared with `atol=1e-6` in fp32. The generator runs the very call
`pipe(...)` runs, so most set-ups agree bit for bit; the margin covers the batched T5 attention of the tiny
PixArt-sigma set-up, whose result moves in the last bits (1e-10) with the order of a batch's reductions.
"""

from __future__ import annotations

import os

import pytest
import torch
from tiny_families import RESOLUTION, SETUPS

from trl_drpo import DrPOTrainer
from trl_drpo.features import build_feature_map
from trl_drpo.generators import GENERATORS, OneStepGenerator, registered_generator
from trl_drpo.generators.call import call_parameters
from trl_drpo.hub import LORA_WEIGHT_NAME, load_lora_into, save_adapter

from kit import CountingWrapper, mean_brightness, tiny_drpo_config


PROMPTS = ["a photo of a cat", "a red bicycle"]
ATOL = 1e-6

ONE_STEP_CALLS = {
    "StableDiffusionPipeline": {"num_inference_steps": 1, "guidance_scale": 0.0},
    "StableDiffusionXLPipeline": {"num_inference_steps": 1, "guidance_scale": 0.0},
    "StableDiffusion3Pipeline": {"num_inference_steps": 1, "guidance_scale": 0.0},
    "FluxPipeline": {"num_inference_steps": 1, "guidance_scale": 0.0, "max_sequence_length": 256},
    "PixArtAlphaPipeline": {
        "num_inference_steps": 1,
        "timesteps": [400],
        "guidance_scale": 1.0,
        "use_resolution_binning": False,
    },
    "PixArtSigmaPipeline": {
        "num_inference_steps": 1,
        "timesteps": [400],
        "guidance_scale": 1.0,
        "use_resolution_binning": False,
    },
    "SanaSprintPipeline": {
        "num_inference_steps": 1,
        "intermediate_timesteps": None,
        "guidance_scale": 4.5,
        "use_resolution_binning": False,
    },
}
"""The call each family serves by default: the published one-step models' own settings."""


def call_kwargs(name: str, pipe) -> dict:
    """The set-up's call settings, with short text sequences so that the tiny text encoders stay cheap."""
    kwargs = dict(SETUPS[name].call_kwargs or {})
    parameters = call_parameters(pipe)
    if "max_sequence_length" in parameters:
        kwargs["max_sequence_length"] = 16
    if "complex_human_instruction" in parameters:
        kwargs["complex_human_instruction"] = None
    return kwargs


def build(name: str):
    """The set-up's tiny pipeline and its generator at the tiny resolution."""
    pipe = SETUPS[name].build()
    return pipe, OneStepGenerator.from_pipeline(pipe, resolution=RESOLUTION, call_kwargs=call_kwargs(name, pipe))


def served(pipe, gen: OneStepGenerator, noise: torch.Tensor, output_type: str = "latent") -> torch.Tensor:
    """What the user's pipeline serves for `noise`: `pipe(prompts, **settings, latents=noise)`."""
    return pipe(PROMPTS, latents=noise.clone(), output_type=output_type, **gen.pipeline_call_kwargs()).images


def noise_for(gen: OneStepGenerator, seed: int = 0) -> torch.Tensor:
    return gen.make_noise(len(PROMPTS), torch.Generator().manual_seed(seed))


def perturb_lora(gen: OneStepGenerator) -> None:
    # PEFT initialises lora_B to zero, which would make any LoRA test vacuous.
    torch.manual_seed(1)
    for name, param in gen.unwrapped_denoiser.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0.0, 0.5)


@pytest.fixture(params=sorted(SETUPS))
def setup(request):
    return request.param


# --------------------------------------------------------------------------------------------------------------------


def test_each_family_defaults_to_the_one_step_call_of_its_published_models():
    for name, setup_ in SETUPS.items():
        pipe = setup_.build()
        gen = OneStepGenerator.from_pipeline(pipe)
        assert gen.denoiser is getattr(pipe, setup_.denoiser), name
        assert gen.call_kwargs == ONE_STEP_CALLS[type(pipe).__name__], name
    assert all(registered_generator(setup_.build().__class__) is not None for setup_ in SETUPS.values())


def test_sample_equals_the_pipeline_call_for_the_same_noise(setup):
    pipe, gen = build(setup)
    noise = noise_for(gen)
    latents = gen.sample(gen.encode_prompts(PROMPTS), noise)
    assert latents.shape == noise.shape and latents.requires_grad
    torch.testing.assert_close(latents.detach(), served(pipe, gen, noise), atol=ATOL, rtol=0)


def test_decode_equals_the_pipeline_pt_output(setup):
    pipe, gen = build(setup)
    noise = noise_for(gen)
    images = gen.decode(gen.sample(gen.encode_prompts(PROMPTS), noise).detach())
    assert images.shape == (len(PROMPTS), 3, RESOLUTION, RESOLUTION) and images.dtype == torch.float32
    torch.testing.assert_close(images, served(pipe, gen, noise, "pt"), atol=ATOL, rtol=0)


def test_gradients_reach_the_lora_parameters_and_nothing_else(setup):
    pipe, gen = build(setup)
    gen.add_lora(rank=2, alpha=2)
    perturb_lora(gen)
    gen.sample(gen.encode_prompts(PROMPTS), noise_for(gen)).square().mean().backward()
    named = dict(gen.unwrapped_denoiser.named_parameters())
    trainable = {name for name, p in named.items() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    assert {name for name, p in named.items() if p.grad is not None} == trainable
    assert all(named[name].grad.abs().sum() > 0 for name in trainable if "lora_A" in name)
    others = [m for key, m in pipe.components.items() if isinstance(m, torch.nn.Module) and key != gen.denoiser_name]
    assert all(p.grad is None and not p.requires_grad for module in others for p in module.parameters())


def test_reference_equals_the_pipeline_before_the_adapter(setup):
    pipe, gen = build(setup)
    noise = noise_for(gen)
    base = served(pipe, gen, noise)
    gen.add_lora(rank=2, alpha=2)
    perturb_lora(gen)
    embeds = gen.encode_prompts(PROMPTS)
    tuned = gen.sample(embeds, noise).detach()
    assert (tuned - base).abs().max() > 1e-4, "the perturbed LoRA must change the samples"
    torch.testing.assert_close(gen.reference(embeds, noise), base, atol=ATOL, rtol=0)
    torch.testing.assert_close(gen.sample(embeds, noise).detach(), tuned, atol=0, rtol=0)  # adapter live again


def test_two_drpo_trainer_steps_run_with_the_denoiser_features(setup, tmp_path):
    pipe = SETUPS[setup].build()
    config = tiny_drpo_config(tmp_path, resolution=RESOLUTION, pipeline_call_kwargs=call_kwargs(setup, pipe))
    trainer = DrPOTrainer(pipe, mean_brightness, config, train_dataset=PROMPTS)
    before = {
        n: p.detach().clone() for n, p in trainer.generator.unwrapped_denoiser.named_parameters() if "lora_" in n
    }
    trainer.train()
    assert trainer.state.global_step == 2
    after = dict(trainer.generator.unwrapped_denoiser.named_parameters())
    assert any(not torch.equal(after[name], value) for name, value in before.items())


def test_the_vae_decoder_features_read_the_decoder_the_pipeline_decodes_with_and_reach_the_latents(setup):
    pipe, gen = build(setup)
    decoder = gen.vae.decoder
    # SANA's AutoencoderDC has no mid block and runs its up blocks from the last index down.
    first_up_block = f"up_blocks.{len(decoder.up_blocks) - 1}_mean"
    keys = None if getattr(decoder, "mid_block", None) is not None else [first_up_block]
    fmap = build_feature_map("vae_decoder", gen, keys=keys, patch_sizes=[2])
    noise = noise_for(gen).requires_grad_(True)
    features = fmap(noise)
    assert features and all(value.shape[0] == len(PROMPTS) for value in features.values())
    sum(value.square().mean() for value in features.values()).backward()
    assert noise.grad.abs().sum() > 0


def test_saved_adapter_loaded_into_a_fresh_pipeline_reproduces_the_tuned_images(setup, tmp_path):
    pipe, gen = build(setup)
    gen.add_lora(rank=2, alpha=2)
    perturb_lora(gen)
    noise = noise_for(gen)
    tuned = served(pipe, gen, noise, "pt")
    save_adapter(pipe, gen.unwrapped_denoiser, str(tmp_path))
    assert os.path.isfile(tmp_path / LORA_WEIGHT_NAME)
    fresh = SETUPS[setup].build()
    base = served(fresh, gen, noise, "pt")
    if hasattr(fresh, "load_lora_weights"):
        fresh.load_lora_weights(str(tmp_path))
    else:  # PixArt: diffusers has no LoRA loader for it
        load_lora_into(fresh, str(tmp_path))
    assert (tuned - base).abs().max() > 1e-4
    torch.testing.assert_close(served(fresh, gen, noise, "pt"), tuned, atol=1e-5, rtol=0)


@pytest.mark.parametrize("setup", ["pixart-alpha-dmd", "flux-schnell"])
def test_resumed_training_equals_uninterrupted_training(setup, tmp_path):
    # PixArt's DDPM step draws noise inside the call (weighed by zero at the last step): the trainer's seeded generator
    # must drive it, or the global RNG moves and the resumed run draws different candidates.
    def trainer(folder, max_steps):
        pipe = SETUPS[setup].build()
        kwargs = dict(save_strategy="steps", save_steps=1, max_steps=max_steps, resolution=RESOLUTION)
        config = tiny_drpo_config(tmp_path / folder, pipeline_call_kwargs=call_kwargs(setup, pipe), **kwargs)
        return DrPOTrainer(pipe, mean_brightness, config, train_dataset=PROMPTS)

    straight = trainer("a", 2)
    straight.train()
    first = trainer("b", 1)
    first.train()
    resumed = trainer("b", 2)
    resumed.train(resume_from_checkpoint=os.path.join(tmp_path, "b", "checkpoint-1"))
    expected = dict(straight.generator.unwrapped_denoiser.named_parameters())
    for name, value in resumed.generator.unwrapped_denoiser.named_parameters():
        if "lora_" in name:
            torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------------------------
# State changes after construction, wrapped denoisers, pipelines outside the registry, settings errors
# --------------------------------------------------------------------------------------------------------------------


def test_a_scheduler_swapped_after_construction_is_followed():
    pipe, gen = build("sd-turbo")
    assert gen.fast_step(gen.device) is not None
    embeds, noise = gen.encode_prompts(PROMPTS), noise_for(gen)
    gen.sample(embeds, noise)
    pipe.scheduler = SETUPS["sd-lcm"].build().scheduler
    assert gen.fast_step(gen.device) is None
    torch.testing.assert_close(gen.sample(embeds, noise).detach(), served(pipe, gen, noise), atol=0, rtol=0)


@pytest.mark.parametrize("setup", ["sd-turbo", "flux-schnell"])
def test_a_dtype_cast_after_construction_is_followed(setup):
    pipe, gen = build(setup)
    pipe.to(dtype=torch.bfloat16)
    noise = noise_for(gen)
    assert noise.dtype == torch.bfloat16
    latents = gen.sample(gen.encode_prompts(PROMPTS), noise)
    torch.testing.assert_close(latents.detach(), served(pipe, gen, noise), atol=0, rtol=0)


def flux_trainer(tmp_path) -> DrPOTrainer:
    """A one-update DrPOTrainer on the tiny FLUX.1-schnell pipeline, on the CPU."""
    pipe = SETUPS["flux-schnell"].build()
    config = tiny_drpo_config(
        tmp_path, max_steps=1, resolution=RESOLUTION, pipeline_call_kwargs=call_kwargs("flux-schnell", pipe)
    )
    return DrPOTrainer(pipe, mean_brightness, config, train_dataset=PROMPTS)


def test_a_half_precision_move_after_the_trainer_is_built_is_followed_with_the_trained_weights_kept_in_fp32(tmp_path):
    trainer = flux_trainer(tmp_path)
    gen = trainer.generator
    gen.pipeline.to("cpu", torch.bfloat16)  # the trainer's device, a new dtype: the cast reaches the LoRA weights too
    lora = {name: p for name, p in gen.unwrapped_denoiser.named_parameters() if "lora_" in name}
    before = {name: p.detach().float().clone() for name, p in lora.items()}
    trainer.train()
    assert gen.dtype == torch.bfloat16 and all(p.dtype == torch.float32 for p in lora.values())
    assert any(not torch.equal(p.detach(), before[name]) for name, p in lora.items())
    noise = noise_for(gen)
    assert noise.dtype == torch.bfloat16
    latents = gen.sample(gen.encode_prompts(PROMPTS), noise)
    torch.testing.assert_close(latents.detach(), served(gen.pipeline, gen, noise), atol=0, rtol=0)


def test_a_pipeline_moved_off_the_trainers_device_stops_the_next_step_naming_the_fix(tmp_path):
    trainer = flux_trainer(tmp_path)
    trainer.generator.pipeline.to("meta")  # any device other than the one the trainer placed it on (the CPU here)
    moved = r"moved after the trainer was built, which placed it on cpu.*'transformer': 'meta'.*pipe\.to\('cpu'\)"
    with pytest.raises(ValueError, match=moved):
        trainer.train()


def test_a_wrapped_denoiser_is_called_for_the_duration_of_the_call_only():
    pipe, gen = build("flux-schnell")
    transformer = pipe.transformer
    gen.denoiser = wrapper = CountingWrapper(transformer)
    noise = noise_for(gen)
    latents = gen.sample(gen.encode_prompts(PROMPTS), noise)
    assert wrapper.calls == 1 and pipe.transformer is transformer
    assert pipe.config.transformer[1] == type(transformer).__name__
    torch.testing.assert_close(latents.detach(), served(pipe, gen, noise), atol=0, rtol=0)


def test_a_pipeline_outside_the_registry_trains_through_its_call(monkeypatch):
    pipe = SETUPS["sd3-turbo"].build()
    monkeypatch.delitem(GENERATORS, type(pipe).__name__)
    gen = OneStepGenerator.from_pipeline(pipe, resolution=RESOLUTION, call_kwargs=call_kwargs("sd3-turbo", pipe))
    assert type(gen) is OneStepGenerator and gen.denoiser is pipe.transformer
    noise = noise_for(gen)
    latents = gen.sample(gen.encode_prompts(PROMPTS), noise)
    assert latents.requires_grad
    torch.testing.assert_close(latents.detach(), served(pipe, gen, noise), atol=ATOL, rtol=0)


def test_call_settings_the_call_does_not_take_or_the_trainer_sets_raise_naming_them():
    pipe = SETUPS["flux-schnell"].build()
    with pytest.raises(ValueError, match=r"takes no argument\(s\) \['eta'\]"):
        OneStepGenerator.from_pipeline(pipe, call_kwargs={"eta": 0.5})
    with pytest.raises(ValueError, match=r"may not set \['height', 'latents'\].*resolution"):
        OneStepGenerator.from_pipeline(pipe, call_kwargs={"latents": None, "height": 64})
