"""DrPOConfig: paper defaults, presets, validation and documentation."""

from __future__ import annotations

import dataclasses

import pytest
from transformers import TrainingArguments

from trl_drpo import DrPOConfig
from trl_drpo.drpo_config import PRESETS
from trl_drpo.features.base import check_feature_map_options


def make(tmp_path, **kwargs) -> DrPOConfig:
    return DrPOConfig(output_dir=str(tmp_path), **kwargs)


def test_defaults_are_the_papers_sd_turbo_recipe(tmp_path):
    config = make(tmp_path)
    assert (config.num_generations, config.num_positives, config.num_negatives) == (24, 8, 8)
    assert config.kernel == "laplacian" and config.preference_radii == config.reference_radii == [0.02, 0.05, 0.2]
    assert config.positive_weight == config.negative_weight == 3000.0
    assert config.reference_weight == config.reference_negative_weight == 3000.0
    assert config.reference_loss_weight == 0.2 and config.feature_aggregation == "sum"
    assert (config.lora_rank, config.lora_alpha) == (16, 16)
    assert config.lora_target_modules == ["to_q", "to_k", "to_v", "to_out.0"]
    assert (config.learning_rate, config.max_grad_norm, config.max_steps) == (1e-4, 1.0, 1000)
    assert config.gradient_accumulation_steps == 8 and config.per_device_train_batch_size == 1
    assert config.lr_scheduler_type == "constant_with_warmup" and config.warmup_steps == 0
    assert config.mask_anchor_copies is False  # the authors' estimator
    assert config.mask_reference_pairs is False


def test_the_objective_gets_the_anchor_copy_mask_setting(tmp_path):
    assert make(tmp_path, mask_anchor_copies=True).step_settings.drift.mask_anchor_copies is True
    assert make(tmp_path).step_settings.drift.mask_anchor_copies is False


def test_the_objective_gets_the_reference_pair_mask_setting(tmp_path):
    assert make(tmp_path, mask_reference_pairs=True).step_settings.drift.mask_reference_pairs is True
    assert make(tmp_path).step_settings.drift.mask_reference_pairs is False


def test_the_objective_gets_the_token_matching_setting(tmp_path):
    assert make(tmp_path).step_settings.drift.token_matching == "pooled"  # the authors' one set per prompt
    assert make(tmp_path, token_matching="positional").step_settings.drift.token_matching == "positional"


def test_sdxl_preset_reproduces_the_teacher_script(tmp_path):
    config = DrPOConfig.from_preset("sdxl_turbo_paper", output_dir=str(tmp_path), bf16=False)
    assert (config.num_generations, config.learning_rate, config.max_steps) == (16, 1e-5, 5000)
    assert (config.positive_weight, config.negative_weight) == (3000.0, 2000.0)
    assert (config.reference_weight, config.reference_negative_weight) == (3500.0, 5000.0)
    assert config.reference_loss_weight == 0.25 and config.feature_aggregation == "mean"


def test_sd_turbo_preset_uses_the_papers_latent_mae_features(tmp_path):
    config = DrPOConfig.from_preset("sd_turbo_paper", output_dir=str(tmp_path), fp16=False)
    assert config.feature_map == "latent_mae" and config.feature_keys is None  # the map's six layer4 keys
    assert config.feature_aggregation == "sum"


def test_latent_mae_without_its_checkpoint_says_where_to_get_it(tmp_path):
    config = DrPOConfig.from_preset("sd_turbo_paper", output_dir=str(tmp_path), fp16=False)
    with pytest.raises(ValueError, match="mae_latent_256_torch.pth.*ModelScope"):
        config.check_feature_map()
    DrPOConfig(output_dir=str(tmp_path), feature_map="latent_mae", feature_map_kwargs={"model_name_or_path": "x"})
    DrPOConfig(output_dir=str(tmp_path)).check_feature_map()  # the default denoiser features need no weights


def test_latent_mae_in_a_combination_without_its_checkpoint_says_where_to_get_it(tmp_path):
    config = DrPOConfig(output_dir=str(tmp_path), feature_map="denoiser+latent_mae")
    with pytest.raises(ValueError, match="needs its checkpoint"):
        config.check_feature_map()
    kwargs = {"denoiser": {}, "latent_mae": {"model_name_or_path": "x"}}
    given = DrPOConfig(output_dir=str(tmp_path), feature_map="denoiser+latent_mae", feature_map_kwargs=kwargs)
    given.check_feature_map()


def test_feature_keys_given_as_a_feature_map_option_say_to_set_feature_keys_before_any_model_loads(tmp_path):
    config = DrPOConfig(output_dir=str(tmp_path), feature_map_kwargs={"keys": ["mid_block"], "pool_size": 1})
    with pytest.raises(ValueError, match="set feature_keys instead"):
        config.check_feature_map()


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_presets_feature_map_options_are_ones_its_map_takes(name):
    preset = PRESETS[name]
    check_feature_map_options(preset.get("feature_map", "denoiser"), preset.get("feature_map_kwargs") or {})


def test_fast_preset_ranks_with_a_tiny_decoder_at_224_px_on_latent_mae_features_without_reference(tmp_path):
    config = DrPOConfig.from_preset("fast", output_dir=str(tmp_path), fp16=False)
    assert (config.ranking_vae, config.ranking_resolution) == ("madebyollin/taesd", 224)
    assert config.feature_map == "latent_mae" and config.reference_loss_weight == 0.0
    paper = DrPOConfig.from_preset("sd_turbo_paper", output_dir=str(tmp_path), fp16=False)
    assert (config.num_generations, config.learning_rate) == (paper.num_generations, paper.learning_rate)
    with pytest.raises(ValueError, match="mae_latent_256_torch.pth.*ModelScope"):
        config.check_feature_map()


def test_preset_overrides_win(tmp_path):
    config = DrPOConfig.from_preset("sd_turbo_paper", output_dir=str(tmp_path), fp16=False, num_generations=32)
    assert config.num_generations == 32 and not config.fp16


def test_unknown_preset_lists_the_known_ones(tmp_path):
    with pytest.raises(ValueError, match="sd_turbo_paper"):
        DrPOConfig.from_preset("sd_turbo_pape", output_dir=str(tmp_path))


def test_every_preset_builds(tmp_path):
    for name in PRESETS:
        DrPOConfig.from_preset(name, output_dir=str(tmp_path), fp16=False, bf16=False)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_generations=1), "num_generations must be >= 2"),
        (dict(num_positives=20), "exceeds num_generations"),
        (dict(anchor_selection="best"), "anchor_selection must be one of"),
        (dict(token_matching="nearest"), "token_matching must be one of"),
        (dict(kernel="cauchy"), "Unknown drift kernel"),
        (dict(preference_radii=[]), "preference_radii must be a non-empty list"),
        (dict(reference_radii=[0.1, -1.0]), "reference_radii must be a non-empty list of positive numbers"),
        (dict(positive_weight=0.0), "positive_weight must be > 0"),
        (dict(negative_weight=float("nan")), "negative_weight must be a finite number"),
        (dict(reference_loss_weight=-0.1), "reference_loss_weight must be >= 0"),
        (dict(feature_aggregation="max"), "feature_aggregation must be 'sum' or 'mean'"),
        (dict(feature_weights={"mid_block": 0.0}), "feature_weights must map feature keys to finite numbers > 0"),
        (dict(feature_weights={"mid_block": "half"}), "feature_weights must map feature keys to finite numbers"),
        (dict(feature_weights="[0.5]"), "feature_weights must be a dict or a JSON object string"),
        (dict(candidate_chunk_size=0), "candidate_chunk_size must be None or >= 1"),
        (dict(resolution=500), "resolution must be a positive multiple of 8"),
        (dict(reward_weights=[1.0, -1.0]), "reward_weights must be finite and non-negative"),
        (dict(lora_rank=0), "lora_rank must be >= 1"),
        (dict(ranking_resolution=0), "ranking_resolution must be None \\(full size\\) or a positive pixel side"),
        (dict(ranking_vae=""), "ranking_vae must be None or a non-empty path or Hub id"),
    ],
)
def test_bad_values_are_rejected_with_a_message_naming_the_field(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make(tmp_path, **kwargs)


def test_mean_split_and_threshold_rules_do_not_need_disjoint_counts(tmp_path):
    make(tmp_path, anchor_selection="mean_split", num_generations=4)
    make(tmp_path, anchor_selection="threshold", num_generations=4)


def test_feature_weights_accept_a_json_string_and_reach_the_objective(tmp_path):
    config = make(tmp_path, feature_weights='{"vae_decoder/mid_block_mean_4": 0.5}')
    assert config.feature_weights == {"vae_decoder/mid_block_mean_4": 0.5}
    assert config.drift_hyperparams.key_weights == {"vae_decoder/mid_block_mean_4": 0.5}


def test_feature_map_kwargs_accept_a_json_string_from_the_command_line(tmp_path):
    config = make(tmp_path, feature_map_kwargs='{"timestep": 50}')
    assert config.feature_map_kwargs == {"timestep": 50}


def test_docstring_documents_every_drpo_parameter_with_its_default(tmp_path):
    base = {f.name for f in dataclasses.fields(TrainingArguments)}
    doc = DrPOConfig.__doc__
    for field in dataclasses.fields(DrPOConfig):
        if field.name in base or field.name.startswith("_"):
            continue
        assert f"\n        {field.name} (`" in doc, f"{field.name} is not documented"
        assert field.metadata.get("help"), f"{field.name} has no help text"


def test_config_round_trips_through_json(tmp_path):
    config = make(tmp_path, feature_map_kwargs={"timestep": 50}, reward_weights=[0.7, 0.3])
    values = config.to_dict()
    assert values["feature_map_kwargs"] == {"timestep": 50} and values["reward_weights"] == [0.7, 0.3]
    assert "<HUB_TOKEN>" in make(tmp_path, hub_token="hf_secret").to_json_string()


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--report_to", "tensorboard", "wandb"], ["tensorboard", "wandb"]),
        (["--report_to", "tensorboard"], ["tensorboard"]),
        (["--report_to", "none"], []),
        ([], []),
    ],
)
def test_report_to_takes_several_integrations_on_the_command_line(argv, expected, tmp_path):
    from trl_drpo.cli import make_train_parser

    _, config = make_train_parser().parse_args_and_config(["--output_dir", str(tmp_path), "--use_cpu", "true", *argv])
    assert config.report_to == expected
