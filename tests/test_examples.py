"""The example scripts: their YAML recipes, their Accelerate configs, and real runs under `accelerate launch`."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

from trl_drpo.drpo_config import PRESETS
from trl_drpo.hub import LORA_WEIGHT_NAME


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(REPO, "examples")
SCRIPTS = {"sd_turbo_paper": "train_sd_turbo.py", "sdxl_turbo_paper": "train_sdxl_turbo.py"}
TINY = {"sd_turbo_paper": "trl-drpo/tiny-sd", "sdxl_turbo_paper": "trl-drpo/tiny-sdxl"}


def load_example(script: str):
    spec = importlib.util.spec_from_file_location(script.removesuffix(".py"), os.path.join(EXAMPLES, script))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse(preset: str, *argv: str):
    """Parse an example's command line (CPU-safe: bf16 recipes are only accepted with use_cpu on a CPU)."""
    parser = load_example(SCRIPTS[preset]).make_parser()
    return parser.parse_args_and_config(["--use_cpu", "true", *argv])


@pytest.mark.parametrize("preset", sorted(SCRIPTS))
def test_yaml_config_reproduces_the_paper_preset(preset, tmp_path):
    yaml_path = os.path.join(EXAMPLES, "configs", f"{preset}.yaml")
    script_args, config = parse(preset, "--config", yaml_path, "--output_dir", str(tmp_path))
    for name, value in PRESETS[preset].items():
        assert getattr(config, name) == value, name
    assert script_args.model_name_or_path == {"sd_turbo_paper": "stabilityai/sd-turbo"}.get(
        preset, "stabilityai/sdxl-turbo"
    )
    assert script_args.variant == "fp16" and script_args.reward_funcs == ["pickscore"]
    assert config.dataset_name and config.eval_prompts


def test_fast_yaml_config_reproduces_the_fast_preset(tmp_path):
    yaml_path = os.path.join(EXAMPLES, "configs", "sd_turbo_fast.yaml")
    _, config = parse("sd_turbo_paper", "--config", yaml_path, "--output_dir", str(tmp_path))
    for name, value in PRESETS["fast"].items():
        assert getattr(config, name) == value, name


@pytest.mark.parametrize("preset", sorted(SCRIPTS))
def test_example_defaults_to_the_paper_preset_without_a_config(preset, tmp_path):
    _, config = parse(preset, "--output_dir", str(tmp_path))
    for name, value in PRESETS[preset].items():
        assert getattr(config, name) == value, name


def test_flags_override_the_yaml_config(tmp_path):
    yaml_path = os.path.join(EXAMPLES, "configs", "sd_turbo_paper.yaml")
    argv = ["--config", yaml_path, "--output_dir", str(tmp_path), "--learning_rate", "5e-5", "--max_steps", "10"]
    script_args, config = parse("sd_turbo_paper", *argv, "--reward_funcs", "pickscore", "aesthetic")
    assert (config.learning_rate, config.max_steps) == (5e-5, 10)
    assert config.num_generations == 24  # from the YAML
    assert script_args.reward_funcs == ["pickscore", "aesthetic"]


@pytest.mark.parametrize("name", ["single_gpu", "multi_gpu", "deepspeed_zero2"])
def test_accelerate_configs_load(name):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(os.path.join(EXAMPLES, "accelerate_configs", f"{name}.yaml"))
    expected = {"single_gpu": "NO", "multi_gpu": "MULTI_GPU", "deepspeed_zero2": "DEEPSPEED"}[name]
    assert config.distributed_type.value == expected
    if name == "deepspeed_zero2":
        assert config.deepspeed_config["zero_stage"] == 2


def test_readme_commands_name_files_that_exist():
    text = open(os.path.join(EXAMPLES, "README.md"), encoding="utf-8").read()
    assert "accelerate launch" in text and "deepspeed_zero2.yaml" in text and "multi_gpu.yaml" in text
    for script in SCRIPTS.values():
        assert script in text
    paths = set(re.findall(r"examples/[\w/.-]+\.(?:py|yaml|txt)", text))
    assert paths, "the README names the example files"
    for path in paths:
        assert os.path.isfile(os.path.join(REPO, path)), path


def launch(script: str, argv: list[str], tmp_path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "true"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1", "--num_machines", "1"]
    cmd += ["--mixed_precision", "no", "--dynamo_backend", "no", os.path.join(EXAMPLES, script), *argv]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.mark.slow
@pytest.mark.parametrize("preset", sorted(SCRIPTS))
def test_example_trains_a_few_steps_under_accelerate_launch_and_writes_its_artefacts(preset, tmp_path):
    out = tmp_path / "out"
    argv = ["--config", os.path.join(EXAMPLES, "configs", f"{preset}.yaml"), "--model_name_or_path", TINY[preset]]
    # The paper's recipe at toy scale: tiny pipeline, K=4, two updates, fp32 on a CPU, a reward without a model.
    argv += ["--output_dir", str(out), "--max_steps", "2", "--num_generations", "4", "--num_positives", "1"]
    argv += ["--num_negatives", "1", "--gradient_accumulation_steps", "1", "--resolution", "32", "--use_cpu", "true"]
    argv += ["--fp16", "false", "--bf16", "false", "--report_to", "none", "--dataloader_num_workers", "0"]
    argv += [
        "--reward_funcs",
        "jpeg_compressibility",
        "--save_steps",
        "1",
        "--eval_seeds",
        "1",
        "--disable_tqdm",
        "true",
    ]
    argv += [
        "--dataset_name",
        os.path.join(EXAMPLES, "configs", "tiny_prompts.txt"),
        "--eval_prompts",
        "a house",
        "a tree",
    ]
    if PRESETS[preset].get("feature_map") == "latent_mae":
        # The paper's latent-MAE features, from a tiny checkpoint in the format LatentMAEResNet publishes.
        from trl_drpo.features import LatentMAEResNet

        mae = LatentMAEResNet(in_channels=4, widths=(8, 8, 16, 16), layers=(1, 1, 1, 1), stem_width=8)
        mae.save_pretrained(tmp_path / "mae")
        argv += ["--feature_map_kwargs", json.dumps({"model_name_or_path": str(tmp_path / "mae")})]
    launch(SCRIPTS[preset], argv, tmp_path)

    for name in (LORA_WEIGHT_NAME, "README.md", "drpo_config.json", "samples.png", "eval_results.json"):
        assert (out / name).is_file(), name
    assert (out / "checkpoint-2" / LORA_WEIGHT_NAME).is_file()
    saved = json.loads((out / "drpo_config.json").read_text())
    for name in ("learning_rate", "feature_aggregation", "reference_loss_weight"):
        assert saved[name] == PRESETS[preset][name], name  # the recipe, where the command line did not scale it
    card = (out / "README.md").read_text()
    assert "![samples](samples.png)" in card and "| `jpeg_compressibility` | 1 |" in card
    assert f"| reference_loss_weight | `{PRESETS[preset]['reference_loss_weight']}` |" in card


def documented_commands(path: str, marker: str) -> list[str]:
    """The shell commands of a markdown file's ```bash blocks that contain `marker`, with continuation lines
    joined, exactly as a reader would paste them."""
    text = open(path, encoding="utf-8").read()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for command in block.replace("\\\n", " ").splitlines():
            command = command.split("  #")[0].strip()
            if marker in command:
                commands.append(command)
    return commands


@pytest.mark.slow
@pytest.mark.parametrize("index", [0, 1, 2])
def test_the_documented_cpu_smoke_commands_run_as_written(index, tmp_path):
    commands = documented_commands(os.path.join(EXAMPLES, "README.md"), "tiny_cpu.yaml")
    assert len(commands) == 3  # the two example scripts under accelerate launch, and `trl-drpo train`
    # Run from a folder that looks like the repository root (the commands use repository-relative paths), so the
    # outputs land in the temporary folder.
    os.symlink(EXAMPLES, tmp_path / "examples")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    result = subprocess.run(
        commands[index], shell=True, env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-4000:]
    named = re.search(r"--output_dir (\S+)", commands[index])
    assert (tmp_path / (named.group(1) if named else "drpo-tiny") / LORA_WEIGHT_NAME).is_file()


def test_the_digits_yaml_reproduces_the_digits_preset(tmp_path):
    from trl import TrlParser

    from trl_drpo import DrPOConfig

    module = load_example("train_digits.py")
    parser = TrlParser((module.DigitsScriptArguments, DrPOConfig))
    parser.set_defaults(**PRESETS["digits"], output_dir="drpo-digits")
    yaml_path = os.path.join(EXAMPLES, "configs", "digits.yaml")
    _, config = parser.parse_args_and_config(["--config", yaml_path, "--output_dir", str(tmp_path)])
    for name, value in PRESETS["digits"].items():
        assert getattr(config, name) == value, name


@pytest.mark.slow
def test_the_digits_example_runs_its_documented_command_at_toy_length(tmp_path):
    script = os.path.join(EXAMPLES, "train_digits.py")
    docstring = open(script, encoding="utf-8").read()
    assert "python examples/train_digits.py --config examples/configs/digits.yaml" in docstring
    out = tmp_path / "out"
    cmd = [sys.executable, script, "--config", os.path.join(EXAMPLES, "configs", "digits.yaml")]
    # The documented run is 1500 updates (about 20 minutes); the same command, cut to two updates and a small eval.
    cmd += ["--output_dir", str(out), "--max_steps", "2", "--eval_per_category", "4", "--eval_every", "1"]
    cmd += ["--disable_tqdm", "true"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((out / "digits_report.json").read_text())
    assert {"base", "tuned", "best_of_k", "history", "table", "train_seconds"} <= set(report)
    assert [entry["step"] for entry in report["history"]] == [1, 2]
    assert (out / LORA_WEIGHT_NAME).is_file() and "| DrPO |" in (out / "digits_report.md").read_text()
