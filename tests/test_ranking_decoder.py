"""Ranking for less: a tiny decoder and a smaller image for the rewards only (DrPOConfig.ranking_vae,
ranking_resolution), and the "fast" preset."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from trl_drpo import DrPOConfig, DrPOTrainer
from trl_drpo.features.latent import LatentMAEResNet
from trl_drpo.generators.adapters import adapters_enabled
from trl_drpo.generators.vae import unscale_latents
from trl_drpo.ranking_decoder import RankingDecoder
from trl_drpo.tiny_pipelines import tiny_sd_pipeline

from kit import mean_brightness, tiny_drpo_config, tiny_drpo_values


PROMPTS = ["a red apple", "a blue car", "a green tree", "a yellow bird"]
TINY_SCALING_FACTOR = 0.5  # not 1.0 and not the pipeline VAE's, so that a wrong unscaling shows


def save_tiny_autoencoder(path, latent_channels: int = 4, blocks: int = 3) -> str:
    """A random `AutoencoderTiny` decoding the tiny pipeline's latents (4 channels, 4x upsampling), saved to `path`."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(1)
    AutoencoderTiny(
        latent_channels=latent_channels,
        encoder_block_out_channels=(8,) * blocks,
        decoder_block_out_channels=(8,) * blocks,
        num_encoder_blocks=(1,) * blocks,
        num_decoder_blocks=(1,) * blocks,
        scaling_factor=TINY_SCALING_FACTOR,
    ).save_pretrained(path)
    return str(path)


def save_tiny_latent_mae(path) -> str:
    torch.manual_seed(0)
    LatentMAEResNet(in_channels=4, widths=(8, 16), layers=(1, 1), stem_width=8).save_pretrained(path)
    return str(path)


class RecordingReward:
    """Brightness on the tensors the trainer passes, remembering every batch it scored."""

    input_format = "pt"

    def __init__(self) -> None:
        self.batches: list[torch.Tensor] = []

    def __call__(self, images, prompts):
        self.batches.append(images.clone())
        return images.mean(dim=(1, 2, 3))


class DecoderCalls:
    """Counts the forward calls of a decoder module while installed."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.count = 0
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, *_):
        self.count += 1


def rollouts_of(trainer, monkeypatch) -> list:
    """Every rollout of `trainer`'s steps, recorded by wrapping the step the trainer calls."""
    import trl_drpo.drpo_trainer as module

    recorded, step = [], module.micro_step

    def recording_step(*args, **kwargs):
        loss, rollout = step(*args, **kwargs)
        recorded.append(rollout)
        return loss, rollout

    monkeypatch.setattr(module, "micro_step", recording_step)
    return recorded


def one_step(trainer) -> None:
    trainer.training_step(trainer.model, trainer.data_collator([{"prompt": p} for p in PROMPTS[:2]]))


def test_tiny_decoder_images_are_autoencoder_tiny_decodes_of_latents_unscaled_by_its_own_scaling_factor(tmp_path):
    from diffusers import AutoencoderTiny

    from trl_drpo.generators import OneStepGenerator

    generator = OneStepGenerator.from_pipeline(tiny_sd_pipeline())
    path = save_tiny_autoencoder(tmp_path / "taesd")
    decoder = RankingDecoder.from_config(generator, path, None)
    latents = generator.sample(generator.encode_prompts(PROMPTS[:2]), generator.make_noise(2, torch.Generator()))

    tiny = AutoencoderTiny.from_pretrained(path)
    # What a diffusers pipeline with `pipe.vae = tiny` does: latents / tiny.config.scaling_factor; [-1, 1] -> [0, 1].
    expected = (tiny.decode(latents.detach() / TINY_SCALING_FACTOR).sample / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(decoder(latents), expected)
    wrongly_unscaled = (tiny.decode(unscale_latents(generator.vae, latents.detach())).sample / 2 + 0.5).clamp(0, 1)
    assert not torch.allclose(decoder(latents), wrongly_unscaled)


def test_rewards_receive_the_tiny_decoders_images_and_the_pipeline_vae_decodes_nothing(tmp_path, monkeypatch):
    reward = RecordingReward()
    config = tiny_drpo_config(tmp_path / "out", ranking_vae=save_tiny_autoencoder(tmp_path / "taesd"))
    trainer = DrPOTrainer(tiny_sd_pipeline(), reward, config, train_dataset=PROMPTS)
    rollouts = rollouts_of(trainer, monkeypatch)
    full = DecoderCalls(trainer.generator.vae.decoder)
    one_step(trainer)
    assert full.count == 0
    (rollout,) = rollouts
    expected = RankingDecoder(trainer.generator, trainer.ranking_decoder.vae)(rollout.latents.detach())
    torch.testing.assert_close(reward.batches[0], expected)
    assert not torch.allclose(reward.batches[0], trainer.generator.decode(rollout.latents.detach()))


def test_ranking_resolution_resizes_what_the_rewards_see_antialiased(tmp_path, monkeypatch):
    reward = RecordingReward()
    trainer = DrPOTrainer(
        tiny_sd_pipeline(), reward, tiny_drpo_config(tmp_path / "out", ranking_resolution=16), train_dataset=PROMPTS
    )
    rollouts = rollouts_of(trainer, monkeypatch)
    one_step(trainer)
    full = trainer.generator.decode(rollouts[0].latents.detach())
    assert full.shape[-1] == 32 and reward.batches[0].shape[-2:] == (16, 16)
    expected = F.interpolate(full, size=(16, 16), mode="bilinear", antialias=True, align_corners=False)
    torch.testing.assert_close(reward.batches[0], expected.clamp(0, 1))


def test_evaluation_logged_images_and_samples_are_full_decodes_when_ranking_for_less(tmp_path, monkeypatch):
    import trl_drpo.drpo_trainer as module

    config = tiny_drpo_config(
        tmp_path / "out",
        ranking_vae=save_tiny_autoencoder(tmp_path / "taesd"),
        ranking_resolution=16,
        log_images_steps=1,
        eval_prompts=PROMPTS[:2],
        eval_seeds=[1],
    )
    trainer = DrPOTrainer(tiny_sd_pipeline(), RecordingReward(), config, train_dataset=PROMPTS)
    rollouts = rollouts_of(trainer, monkeypatch)
    logged = []
    monkeypatch.setattr(module, "log_candidates", lambda callbacks, report_to, images, *rest: logged.append(images))
    one_step(trainer)
    (rollout,) = rollouts
    k = config.num_generations
    torch.testing.assert_close(logged[0], trainer.generator.decode(rollout.latents[:k].detach()))

    tiny = DecoderCalls(trainer.ranking_decoder.vae.decoder)
    trainer.evaluate()
    samples = trainer.render(PROMPTS[:2], seeds=[1])  # what save_sample_grid and the model card's grid show
    assert tiny.count == 0 and samples.shape[-1] == 32
    gen = trainer.generator
    noise = torch.cat([gen.make_noise(1, torch.Generator().manual_seed(1 * 10**6 + i)) for i in range(2)])
    expected = gen.decode(gen.sample(gen.encode_prompts(PROMPTS[:2]), noise))
    torch.testing.assert_close(samples, expected)


def test_a_ranking_vae_folder_that_does_not_exist_is_a_config_error_naming_the_fix(tmp_path):
    with pytest.raises(ValueError, match="ranking_vae folder .* does not exist.*AutoencoderTiny.*madebyollin/taesd"):
        tiny_drpo_config(tmp_path / "out", ranking_vae=str(tmp_path / "missing"))


def test_a_ranking_vae_that_is_not_an_autoencoder_tiny_is_a_config_error(tmp_path):
    tiny_sd_pipeline().vae.save_pretrained(tmp_path / "kl")
    with pytest.raises(ValueError, match="holds a AutoencoderKL, not an AutoencoderTiny"):
        tiny_drpo_config(tmp_path / "out", ranking_vae=str(tmp_path / "kl"))


def test_a_ranking_vae_without_weights_fails_at_trainer_construction(tmp_path):
    path = save_tiny_autoencoder(tmp_path / "taesd")
    (tmp_path / "taesd" / "diffusion_pytorch_model.safetensors").unlink()
    config = tiny_drpo_config(tmp_path / "out", ranking_vae=path)
    with pytest.raises(ValueError, match="could not be loaded.*ranking_vae to a folder"):
        DrPOTrainer(tiny_sd_pipeline(), mean_brightness, config, train_dataset=PROMPTS)


@pytest.mark.parametrize(
    ("channels", "blocks", "message"),
    [(8, 3, "decodes 8-channel latents; the pipeline's VAE makes 4"), (4, 4, "upsamples latents 8x")],
)
def test_a_ranking_vae_that_does_not_fit_the_pipelines_latents_fails_before_training(
    tmp_path, channels, blocks, message
):
    path = save_tiny_autoencoder(tmp_path / "taesd", channels, blocks)
    config = tiny_drpo_config(tmp_path / "out", ranking_vae=path)
    with pytest.raises(ValueError, match=message):
        DrPOTrainer(tiny_sd_pipeline(), mean_brightness, config, train_dataset=PROMPTS)


def fast_config(tmp_path, **overrides) -> DrPOConfig:
    """The "fast" preset on the tiny pipeline: its own ranking and features, tiny checkpoints, tiny sizes."""
    values = tiny_drpo_values(
        tmp_path / "out",
        ranking_vae=save_tiny_autoencoder(tmp_path / "taesd"),
        ranking_resolution=16,
        feature_map_kwargs={"model_name_or_path": save_tiny_latent_mae(tmp_path / "mae")},
        resolution=None,
        fp16=False,
        **overrides,
    )
    return DrPOConfig.from_preset("fast", **values)


def test_the_fast_preset_trains_two_steps_on_the_tiny_pipeline(tmp_path):
    pipe = tiny_sd_pipeline()
    trainer = DrPOTrainer(pipe, mean_brightness, fast_config(tmp_path, max_steps=2), train_dataset=PROMPTS)
    assert trainer.feature_map.__class__.__name__ == "LatentMAEFeatureMap" and trainer.ranking_decoder.vae is not None
    before = {n: p.detach().clone() for n, p in pipe.unet.named_parameters() if "lora" in n}
    trainer.train()
    assert trainer.state.global_step == 2
    assert any(not torch.equal(p.detach(), before[n]) for n, p in pipe.unet.named_parameters() if "lora" in n)


def test_without_a_reference_term_the_trainer_runs_no_reference_forward(tmp_path):
    trainer = DrPOTrainer(tiny_sd_pipeline(), mean_brightness, fast_config(tmp_path), train_dataset=PROMPTS)
    assert trainer.args.reference_loss_weight == 0.0
    generator = trainer.generator
    denoiser = generator.unwrapped_denoiser
    base_rows = []

    def count_base_rows(_module, args):
        if not adapters_enabled(denoiser):
            base_rows.append(args[0].shape[0])

    handle = denoiser.register_forward_pre_hook(count_base_rows)
    try:
        one_step(trainer)
    finally:
        handle.remove()
    assert base_rows == []
