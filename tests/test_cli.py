"""The `trl-drpo` command line: train, sample and evaluate on the tiny offline pipeline."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from trl_drpo import DrPOTrainer
from trl_drpo.cli import main, render_images
from trl_drpo.hub import LORA_WEIGHT_NAME
from trl_drpo.tiny_pipelines import tiny_sd_pipeline

from kit import BATCH_ROUNDING_ATOL, REPO, mean_brightness, tiny_drpo_config


PROMPTS = ["a red apple", "a blue car"]
SEEDS = [3, 4]


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A saved DrPO adapter (trained one step, then with visibly large LoRA weights) and its trainer."""
    out = tmp_path_factory.mktemp("adapter")
    config = tiny_drpo_config(out, max_steps=1)
    trainer = DrPOTrainer(tiny_sd_pipeline(), mean_brightness, config, train_dataset=PROMPTS)
    trainer.train()
    # One step barely moves 8-bit pixels; large LoRA weights make the adapter's effect visible in PNGs.
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        for name, param in trainer.generator.denoiser.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    trainer.save_model()
    return str(out), trainer


def pngs(folder) -> list[np.ndarray]:
    return [np.asarray(Image.open(os.path.join(folder, name))) for name in sorted(os.listdir(folder))]


def test_no_command_prints_the_usage_and_fails(capsys):
    assert main([]) == 2
    assert "train" in capsys.readouterr().out


def test_unknown_command_is_an_error(capsys):
    assert main(["fly"]) == 2
    assert "unknown command 'fly'" in capsys.readouterr().err


def test_a_setting_the_config_rejects_ends_in_a_two_line_error_naming_it(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["train", "--output_dir", str(tmp_path), "--ema_decay", "1.5"])
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("trl-drpo train: error: DrPOConfig: ema_decay") and len(error.splitlines()) == 2


def test_module_runs_as_a_script():
    result = subprocess.run(
        [sys.executable, "-m", "trl_drpo.cli", "--help"], capture_output=True, text=True, timeout=300, cwd=REPO
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "sample" in result.stdout and "evaluate" in result.stdout


def test_train_reads_a_yaml_config_and_flags_override_it(tmp_path):
    out = tmp_path / "out"
    argv = ["train", "--config", os.path.join(REPO, "examples", "configs", "tiny_cpu.yaml")]
    argv += ["--output_dir", str(out), "--max_steps", "1", "--num_generations", "4", "--disable_tqdm", "true"]
    argv += ["--dataset_name", os.path.join(REPO, "examples", "configs", "tiny_prompts.txt")]
    assert main(argv) == 0
    for name in (LORA_WEIGHT_NAME, "README.md", "drpo_config.json", "samples.png", "eval_results.json"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "drpo_config.json").read_text())
    assert saved["max_steps"] == 1 and saved["num_generations"] == 4  # flags
    assert saved["learning_rate"] == 3e-3 and saved["lora_rank"] == 8  # from the YAML
    assert "## Evaluation" in (out / "README.md").read_text()


def test_train_with_reward_none_learns_offline_from_a_preference_file(tmp_path, capsys):
    from PIL import Image

    (tmp_path / "img").mkdir()
    Image.new("RGB", (32, 32), (250, 250, 250)).save(tmp_path / "img" / "light.png")
    Image.new("RGB", (32, 32), (5, 5, 5)).save(tmp_path / "img" / "dark.png")
    rows = [{"prompt": p, "chosen": "img/light.png", "rejected": "img/dark.png"} for p in ("a cat", "a dog")]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    out = tmp_path / "out"
    argv = ["train", "--config", os.path.join(REPO, "examples", "configs", "tiny_cpu.yaml"), "--reward_funcs", "none"]
    argv += ["--dataset_name", str(tmp_path / "pairs.jsonl"), "--output_dir", str(out), "--max_steps", "1"]
    assert main([*argv, "--num_generations", "4", "--disable_tqdm", "true"]) == 0
    for name in (LORA_WEIGHT_NAME, "README.md", "drpo_config.json", "samples.png"):
        assert (out / name).is_file(), name
    assert not (out / "eval_results.json").exists()  # nothing to score the held-out prompts with
    written = capsys.readouterr().out.strip().splitlines()[-1]
    assert written == f"Written to {out}: {LORA_WEIGHT_NAME}, README.md, drpo_config.json, samples.png"


def test_sample_writes_a_png_per_prompt_and_seed_and_a_manifest(adapter, tmp_path):
    folder, _ = adapter
    out = tmp_path / "samples"
    argv = ["sample", "--model_name_or_path", "trl-drpo/tiny-sd", "--adapter", folder, "--output_dir", str(out)]
    assert main([*argv, "--prompts", *PROMPTS, "--seeds", *map(str, SEEDS), "--device", "cpu"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["images"]) == len(PROMPTS) * len(SEEDS) == len(os.listdir(out / "tuned"))
    assert not (out / "base").exists()
    first = manifest["images"][0]
    assert (first["prompt"], first["seed"], first["noise_seed"]) == (PROMPTS[0], SEEDS[0], SEEDS[0] * 10**6)
    assert (out / first["tuned"]).is_file() and (out / "grid.png").is_file()


def test_sample_with_compare_renders_the_base_with_the_same_noise_and_the_adapter_changes_it(adapter, tmp_path):
    folder, _ = adapter
    out = tmp_path / "samples"
    argv = ["sample", "--model_name_or_path", "trl-drpo/tiny-sd", "--adapter", folder, "--compare", "true"]
    assert main([*argv, "--output_dir", str(out), "--prompts", *PROMPTS, "--seeds", "3", "--device", "cpu"]) == 0
    base, tuned = pngs(out / "base"), pngs(out / "tuned")
    assert len(base) == len(tuned) == len(PROMPTS)
    assert all(np.abs(b.astype(int) - t.astype(int)).max() > 2 for b, t in zip(base, tuned))


def test_sample_reproduces_the_trainers_fixed_seed_images(adapter, tmp_path):
    folder, trainer = adapter
    out = tmp_path / "samples"
    argv = ["sample", "--model_name_or_path", "trl-drpo/tiny-sd", "--adapter", folder, "--output_dir", str(out)]
    assert main([*argv, "--prompts", *PROMPTS, "--seeds", *map(str, SEEDS), "--device", "cpu"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    expected = trainer.render(PROMPTS, SEEDS, adapter=True)  # seed-major, like the manifest
    for record, image in zip(manifest["images"], expected):
        png = np.asarray(Image.open(out / record["tuned"])).astype(np.float32) / 255
        assert np.abs(png - image.permute(1, 2, 0).numpy()).max() <= 1.5 / 255


def test_render_images_is_deterministic_for_fixed_seeds():
    pipe = tiny_sd_pipeline()
    first = render_images(pipe, PROMPTS, SEEDS, batch_size=3)
    assert first.shape == (len(PROMPTS) * len(SEEDS), 3, 32, 32)
    one_at_a_time = render_images(pipe, PROMPTS, SEEDS, batch_size=1)
    torch.testing.assert_close(one_at_a_time, first, rtol=0, atol=BATCH_ROUNDING_ATOL)
    assert (first[0] - first[len(PROMPTS)]).abs().max() > 1e-3, "different seeds give different images"


def test_evaluate_writes_base_and_tuned_rewards_as_json(adapter, tmp_path):
    folder, _ = adapter
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(PROMPTS) + "\n")
    output = tmp_path / "eval" / "results.json"
    argv = ["evaluate", "--model_name_or_path", "trl-drpo/tiny-sd", "--adapter", folder, "--device", "cpu"]
    argv += ["--prompts_file", str(prompts_file), "--seeds", *map(str, SEEDS), "--output_file", str(output)]
    # A registered name and an import path.
    argv += ["--reward_funcs", "jpeg_compressibility", "trl_drpo.rewards.jpeg:JpegIncompressibility"]
    argv += ["--reward_weights", "3", "1"]
    assert main(argv) == 0
    results = json.loads(output.read_text())
    assert results["num_images"] == len(PROMPTS) * len(SEEDS) == len(results["per_image"])
    assert results["rewards"] == {"jpeg_compressibility": 0.75, "jpeg_incompressibility": 0.25}
    for key in ("reward", "rewards/jpeg_compressibility/mean", "rewards/jpeg_incompressibility/mean"):
        assert results["delta"][key] == pytest.approx(results["tuned"][key] - results["base"][key])
    assert results["delta"]["rewards/jpeg_compressibility/mean"] != 0, "the adapter changes the images"
    weighted = 0.75 * results["base"]["rewards/jpeg_compressibility/mean"]
    weighted += 0.25 * results["base"]["rewards/jpeg_incompressibility/mean"]
    assert results["base"]["reward"] == pytest.approx(weighted, rel=1e-5)
    assert 0.0 <= results["win_rate"] <= 1.0


def test_evaluate_without_an_adapter_reports_the_base_only(tmp_path):
    output = tmp_path / "base.json"
    argv = ["evaluate", "--model_name_or_path", "trl-drpo/tiny-sd", "--prompts", "a cat", "--seeds", "1"]
    assert main([*argv, "--reward_funcs", "jpeg_compressibility", "--output_file", str(output)]) == 0
    results = json.loads(output.read_text())
    assert "base" in results and "tuned" not in results and results["num_images"] == 1


def test_an_offline_run_with_extra_anchor_candidates_fails_before_the_pipeline_loads(tmp_path, monkeypatch):
    from trl_drpo import cli

    monkeypatch.setattr(cli, "load_pipeline", lambda *args, **kwargs: pytest.fail("the pipeline was loaded first"))
    argv = ["train", "--config", os.path.join(REPO, "examples", "configs", "tiny_cpu.yaml"), "--reward_funcs", "none"]
    argv += ["--num_anchor_generations", "2", "--output_dir", str(tmp_path / "out")]
    with pytest.raises(ValueError, match="set num_anchor_generations=0 or pass a reward"):
        main(argv)


def test_evaluate_loads_its_rewards_before_the_pipeline(tmp_path, monkeypatch):
    from trl_drpo import cli

    monkeypatch.setattr(cli, "_load_for_generation", lambda args: pytest.fail("the pipeline was loaded first"))
    argv = ["evaluate", "--model_name_or_path", "trl-drpo/tiny-sd", "--prompts", "a cat"]
    with pytest.raises(RuntimeError, match="could not be loaded: OSError"):
        main([*argv, "--reward_funcs", "kit:UnloadableReward", "--output_file", str(tmp_path / "x.json")])


def test_unknown_reward_name_lists_the_available_ones(tmp_path):
    argv = ["evaluate", "--model_name_or_path", "trl-drpo/tiny-sd", "--prompts", "a cat", "--reward_funcs", "pickscor"]
    with pytest.raises(KeyError, match="Available rewards:.*pickscore"):
        main([*argv, "--output_file", str(tmp_path / "x.json")])


def test_the_digit_worlds_base_is_a_builtin_model_name():
    from trl_drpo.cli import load_pipeline
    from trl_drpo.worlds import digits

    pipe = load_pipeline("trl-drpo/digits")
    shipped = digits.load_pipeline()
    assert type(pipe) is type(shipped)
    assert torch.equal(pipe.unet.conv_in.weight, shipped.unet.conv_in.weight)


@pytest.mark.parametrize(
    "name, family", [("trl-drpo/tiny-flux", "FluxPipeline"), ("trl-drpo/tiny-sana", "SanaSprintPipeline")]
)
def test_the_tiny_flux_and_sana_sprint_pipelines_are_builtin_model_names_in_eval_mode(name, family):
    from trl_drpo.cli import load_pipeline

    pipe = load_pipeline(name)
    assert type(pipe).__name__ == family
    assert not any(module.training for module in pipe.components.values() if isinstance(module, torch.nn.Module))


@pytest.mark.parametrize("command", ["train", "sample", "evaluate"])
def test_each_commands_help_names_the_command(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    assert capsys.readouterr().out.startswith(f"usage: trl-drpo {command} ")
