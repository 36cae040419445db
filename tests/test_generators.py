"""Specification of `trl_drpo.generators`: the one-step generator is the pipeline's own single step, with grad."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import DDIMScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, LCMScheduler

from trl_drpo.generators import (
    SUPPORTED_PIPELINES,
    OneStepGenerator,
    PromptEmbeds,
    StableDiffusionGenerator,
    StableDiffusionXLGenerator,
    register_generator,
    registered_generator,
    unwrap_module,
)
from trl_drpo.tiny_pipelines import tiny_sd_pipeline, tiny_sdxl_pipeline

from kit import BATCH_ROUNDING_ATOL, CountingWrapper, modules_after


PROMPTS = ["a photo of a cat", "a red bicycle"]
PIPELINES = {"sd": tiny_sd_pipeline, "sdxl": tiny_sdxl_pipeline}


@pytest.fixture(params=sorted(PIPELINES))
def pipe(request):
    return PIPELINES[request.param]()


@pytest.fixture
def sd_pipe():
    return tiny_sd_pipeline()


def _noise(gen: OneStepGenerator, n: int = len(PROMPTS), seed: int = 0) -> torch.Tensor:
    return gen.make_noise(n, torch.Generator().manual_seed(seed))


def _pipeline_output(pipe, noise: torch.Tensor, output_type: str = "latent") -> torch.Tensor:
    return pipe(
        PROMPTS, num_inference_steps=1, guidance_scale=0.0, latents=noise.clone(), output_type=output_type
    ).images


def _perturb_lora(gen: OneStepGenerator, scale: float = 0.5) -> None:
    # PEFT initialises lora_B to zero, which would make any LoRA test vacuous.
    torch.manual_seed(1)
    for name, param in gen.unwrapped_denoiser.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0.0, scale)


# ------------------------------------------------------------------------------------------------------------------


def test_from_pipeline_picks_the_adapter_registered_for_the_pipeline_class():
    assert type(OneStepGenerator.from_pipeline(tiny_sd_pipeline())) is StableDiffusionGenerator
    assert type(OneStepGenerator.from_pipeline(tiny_sdxl_pipeline())) is StableDiffusionXLGenerator
    assert {"StableDiffusionPipeline", "StableDiffusionXLPipeline"} <= set(SUPPORTED_PIPELINES)


def test_a_family_registered_by_name_matches_only_diffusers_class_of_that_name():
    class StableDiffusionPipeline:  # a user's class that happens to share the name
        pass

    assert registered_generator(StableDiffusionPipeline) is None
    assert registered_generator(type(tiny_sd_pipeline())) is StableDiffusionGenerator


def test_registering_the_families_imports_none_of_their_pipelines():
    modules = modules_after("import trl_drpo.generators")
    assert not {m for m in modules if m.startswith("diffusers.pipelines.") and m.count(".") >= 3}


def test_a_pipeline_whose_call_takes_no_latents_raises_naming_what_is_missing_and_registration():
    class MyPipeline:
        def __call__(self, prompt, output_type="pil"):
            pass

    with pytest.raises(TypeError, match="No one-step generator for MyPipeline: its call takes no latents") as info:
        OneStepGenerator.from_pipeline(MyPipeline())
    assert "StableDiffusionPipeline, StableDiffusionXLPipeline" in str(info.value)
    assert "@register_generator(MyPipeline)" in str(info.value)


def test_registered_adapter_serves_its_pipeline_class_and_subclasses_inherit_adapters(sd_pipe, monkeypatch):
    from trl_drpo.generators import base

    monkeypatch.setattr(base, "GENERATORS", dict(base.GENERATORS))  # keep the registration local

    class CustomSD(type(sd_pipe)):
        pass

    sd_pipe.__class__ = CustomSD
    assert type(OneStepGenerator.from_pipeline(sd_pipe)) is StableDiffusionGenerator

    @register_generator(CustomSD)
    class CustomGenerator(StableDiffusionGenerator):
        pass

    assert type(OneStepGenerator.from_pipeline(sd_pipe)) is CustomGenerator


def test_defaults_follow_the_pipeline(pipe):
    gen = OneStepGenerator.from_pipeline(pipe)
    assert gen.resolution == 32
    assert gen.device == torch.device("cpu") and gen.dtype == torch.float32
    assert gen.denoiser is pipe.unet and gen.vae is pipe.vae and gen.pipeline is pipe
    assert OneStepGenerator.from_pipeline(pipe, resolution=64).resolution == 64


def test_make_noise_has_the_latent_shape_and_is_reproducible_from_a_seed(sd_pipe):
    gen = OneStepGenerator.from_pipeline(sd_pipe)
    assert gen.make_noise(3).shape == (3, 4, 8, 8)
    assert gen.make_noise(2, resolution=64).shape == (2, 4, 16, 16)
    assert torch.equal(_noise(gen, seed=7), _noise(gen, seed=7))
    expected = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(7))
    assert torch.equal(_noise(gen, seed=7), expected)


def test_make_noise_rejects_a_resolution_the_vae_cannot_produce(sd_pipe):
    with pytest.raises(ValueError, match="multiple of the VAE scale factor"):
        OneStepGenerator.from_pipeline(sd_pipe).make_noise(1, resolution=30)


def test_sample_equals_the_one_step_pipeline_output(pipe):
    gen = OneStepGenerator.from_pipeline(pipe)
    noise = _noise(gen)
    expected = _pipeline_output(pipe, noise)
    latents = gen.sample(gen.encode_prompts(PROMPTS), noise)
    assert latents.shape == noise.shape
    torch.testing.assert_close(latents, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "scheduler_cls, prediction_type",
    [
        (EulerAncestralDiscreteScheduler, "v_prediction"),
        (EulerDiscreteScheduler, "epsilon"),
        (EulerDiscreteScheduler, "v_prediction"),
        (EulerDiscreteScheduler, "sample"),
        (DDIMScheduler, "epsilon"),
        (DDIMScheduler, "v_prediction"),
        (DDIMScheduler, "sample"),
    ],
)
def test_sample_reproduces_other_schedulers_and_prediction_types(sd_pipe, scheduler_cls, prediction_type):
    sd_pipe.scheduler = scheduler_cls.from_config(sd_pipe.scheduler.config, prediction_type=prediction_type)
    gen = OneStepGenerator.from_pipeline(sd_pipe)
    noise = _noise(gen)
    torch.testing.assert_close(
        gen.sample(gen.encode_prompts(PROMPTS), noise), _pipeline_output(sd_pipe, noise), atol=1e-5, rtol=0
    )


def test_a_scheduler_without_a_written_out_step_is_served_through_the_pipeline_call(sd_pipe):
    sd_pipe.scheduler = LCMScheduler.from_config(sd_pipe.scheduler.config)
    gen = OneStepGenerator.from_pipeline(sd_pipe)
    assert gen.fast_step(gen.device) is None
    noise = _noise(gen)
    torch.testing.assert_close(
        gen.sample(gen.encode_prompts(PROMPTS), noise), _pipeline_output(sd_pipe, noise), atol=0, rtol=0
    )


def test_sampling_and_multi_step_pipeline_calls_do_not_disturb_each_other(sd_pipe):
    gen = OneStepGenerator.from_pipeline(sd_pipe)
    embeds, noise = gen.encode_prompts(PROMPTS), _noise(gen)
    gen.sample(embeds, noise)
    sd_pipe(PROMPTS, num_inference_steps=2, guidance_scale=0.0, output_type="latent")
    assert len(sd_pipe.scheduler.timesteps) == 2
    torch.testing.assert_close(gen.sample(embeds, noise), _pipeline_output(sd_pipe, noise), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name, dtype", [("sd", torch.bfloat16), ("sdxl", torch.float16)])
def test_half_precision_samples_and_images_match_the_pipeline(name, dtype):
    # fp16 SDXL exercises the VAE upcast (force_upcast) that the pipeline applies before decoding.
    pipe = PIPELINES[name]().to(dtype=dtype)
    gen = OneStepGenerator.from_pipeline(pipe)
    noise = _noise(gen)
    assert noise.dtype == dtype
    latents = gen.sample(gen.encode_prompts(PROMPTS), noise)
    torch.testing.assert_close(latents, _pipeline_output(pipe, noise), atol=0, rtol=0)
    images = gen.decode(latents.detach())
    assert images.dtype == torch.float32 and pipe.vae.dtype == dtype
    torch.testing.assert_close(images, _pipeline_output(pipe, noise, "pt").float(), atol=1e-5, rtol=0)


def test_decode_matches_the_pipeline_pt_output(pipe):
    gen = OneStepGenerator.from_pipeline(pipe)
    noise = _noise(gen)
    images = gen.decode(gen.sample(gen.encode_prompts(PROMPTS), noise).detach())
    assert images.dtype == torch.float32 and images.shape == (2, 3, 32, 32)
    assert images.min() >= 0 and images.max() <= 1
    torch.testing.assert_close(images, _pipeline_output(pipe, noise, "pt"), atol=1e-5, rtol=0)


def test_decode_in_chunks_equals_decode_at_once(sd_pipe):
    gen = OneStepGenerator.from_pipeline(sd_pipe)
    latents = _noise(gen, n=3)
    chunked = gen.decode(latents, chunk_size=2)
    torch.testing.assert_close(chunked, gen.decode(latents), atol=BATCH_ROUNDING_ATOL, rtol=0)


def test_decode_to_pil_gives_images_of_the_resolution(sd_pipe):
    gen = OneStepGenerator.from_pipeline(sd_pipe)
    images = gen.decode(_noise(gen), output_type="pil")
    assert len(images) == 2 and images[0].size == (32, 32) and images[0].mode == "RGB"


def test_decode_has_no_gradient_unless_asked(sd_pipe):
    gen = OneStepGenerator.from_pipeline(sd_pipe)
    latents = _noise(gen).requires_grad_(True)
    assert not gen.decode(latents).requires_grad
    images = gen.decode_with_grad(latents, chunk_size=1)
    images.mean().backward()
    assert latents.grad is not None and latents.grad.abs().sum() > 0
    torch.testing.assert_close(images.detach(), gen.decode(latents.detach()), atol=1e-5, rtol=0)


def test_add_lora_makes_only_lora_weights_trainable(pipe):
    gen = OneStepGenerator.from_pipeline(pipe)
    params = gen.add_lora(rank=4, alpha=4)
    names = {name for name, p in gen.unwrapped_denoiser.named_parameters() if p.requires_grad}
    assert params and len(params) == len(names) == len(gen.trainable_parameters())
    assert all("lora_" in name for name in names)
    assert any(".to_q." in name for name in names) and any(".to_out.0." in name for name in names)
    assert not any(p.requires_grad for p in pipe.vae.parameters())
    assert not any(p.requires_grad for p in pipe.text_encoder.parameters())


def test_add_lora_accepts_a_ready_peft_config(sd_pipe):
    from peft import LoraConfig

    gen = OneStepGenerator.from_pipeline(sd_pipe)
    gen.add_lora(config=LoraConfig(r=2, lora_alpha=2, target_modules=["to_k"]))
    names = [name for name, p in sd_pipe.unet.named_parameters() if p.requires_grad]
    assert names and all(".to_k.lora_" in name for name in names)


def test_sample_gradients_reach_the_lora_weights_and_nothing_else(pipe):
    gen = OneStepGenerator.from_pipeline(pipe)
    gen.add_lora(rank=4, alpha=4)
    _perturb_lora(gen)
    latents = gen.sample(gen.encode_prompts(PROMPTS), _noise(gen))
    latents.square().mean().backward()
    named = dict(gen.unwrapped_denoiser.named_parameters())
    with_grad = {name for name, p in named.items() if p.grad is not None}
    assert with_grad == {name for name, p in named.items() if p.requires_grad}
    assert all(named[name].grad.abs().sum() > 0 for name in with_grad if "lora_A" in name)
    others = [*pipe.vae.parameters(), *pipe.text_encoder.parameters()]
    assert all(p.grad is None for p in others)


def test_reference_equals_the_pipeline_before_the_adapter_was_added(pipe):
    gen = OneStepGenerator.from_pipeline(pipe)
    noise = _noise(gen)
    base = _pipeline_output(pipe, noise)
    gen.add_lora(rank=4, alpha=4)
    _perturb_lora(gen)
    embeds = gen.encode_prompts(PROMPTS)
    tuned = gen.sample(embeds, noise)
    assert (tuned - base).abs().max() > 1e-3, "the perturbed LoRA must change the samples"
    reference = gen.reference(embeds, noise)
    assert not reference.requires_grad
    torch.testing.assert_close(reference, base, atol=1e-5, rtol=0)
    # The adapter is live again after the reference pass.
    torch.testing.assert_close(gen.sample(embeds, noise), tuned, atol=1e-6, rtol=0)


def test_reference_without_adapter_is_the_base_model(sd_pipe):
    gen = OneStepGenerator.from_pipeline(sd_pipe)
    noise = _noise(gen)
    embeds = gen.encode_prompts(PROMPTS)
    torch.testing.assert_close(gen.reference(embeds, noise), gen.sample(embeds, noise).detach(), atol=0, rtol=0)


def test_set_reference_denoiser_serves_references_for_full_fine_tuning(sd_pipe):
    gen = OneStepGenerator.from_pipeline(sd_pipe)
    noise = _noise(gen)
    base = _pipeline_output(sd_pipe, noise)
    gen.set_reference_denoiser(copy.deepcopy(sd_pipe.unet))
    with torch.no_grad():
        for p in sd_pipe.unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    embeds = gen.encode_prompts(PROMPTS)
    assert (gen.sample(embeds, noise) - base).abs().max() > 1e-3
    torch.testing.assert_close(gen.reference(embeds, noise), base, atol=1e-5, rtol=0)


def test_sample_calls_a_wrapped_denoiser_while_adapters_live_on_the_unwrapped_one(sd_pipe):
    gen = OneStepGenerator.from_pipeline(sd_pipe)
    gen.add_lora(rank=4, alpha=4)
    gen.denoiser = wrapper = CountingWrapper(sd_pipe.unet)
    assert unwrap_module(wrapper) is sd_pipe.unet and gen.unwrapped_denoiser is sd_pipe.unet
    embeds, noise = gen.encode_prompts(PROMPTS), _noise(gen)
    gen.sample(embeds, noise)
    gen.reference(embeds, noise)
    assert wrapper.calls == 1


def test_encode_prompts_gives_one_row_per_prompt_and_encodes_duplicates_identically(pipe):
    gen = OneStepGenerator.from_pipeline(pipe)
    embeds = gen.encode_prompts([PROMPTS[0], PROMPTS[1], PROMPTS[0]])
    assert len(embeds) == 3 and not embeds.prompt_embeds.requires_grad
    torch.testing.assert_close(embeds.prompt_embeds[0], embeds.prompt_embeds[2], atol=0, rtol=0)
    single = gen.encode_prompts([PROMPTS[1]])
    torch.testing.assert_close(embeds.prompt_embeds[1:2], single.prompt_embeds, atol=BATCH_ROUNDING_ATOL, rtol=0)
    assert (embeds.pooled_prompt_embeds is not None) == isinstance(gen, StableDiffusionXLGenerator)


def test_prompt_embeds_repeat_select_and_concatenate_rows():
    embeds = PromptEmbeds(torch.arange(2.0).view(2, 1, 1), pooled_prompt_embeds=torch.arange(2.0).view(2, 1))
    repeated = embeds.repeat_interleave(3)
    assert len(repeated) == 6
    assert repeated.prompt_embeds.flatten().tolist() == [0, 0, 0, 1, 1, 1]
    assert repeated.select([5, 0]).pooled_prompt_embeds.flatten().tolist() == [1, 0]
    assert repeated[4].prompt_embeds.shape == (1, 1, 1) and repeated[-1].prompt_embeds.item() == 1
    assert len(repeated[torch.tensor([True, False] * 3)]) == 3 and len(repeated[1:3]) == 2
    assert repeated.to("cpu", torch.float64).prompt_embeds.dtype == torch.float64
    assert len(PromptEmbeds.cat([embeds, repeated])) == 8 and embeds.add_time_ids is None


def test_sample_runs_on_the_meta_device_for_flop_counting():
    pipe = tiny_sd_pipeline().to("meta")
    gen = OneStepGenerator.from_pipeline(pipe)
    noise = torch.empty(2, 4, 8, 8, device="meta")
    latents = gen.sample(gen.encode_prompts(["a cat"]).repeat_interleave(2), noise)
    assert latents.device.type == "meta" and latents.shape == noise.shape
