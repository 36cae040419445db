"""The example scripts: their YAML recipes, their Accelerate configs, and real runs under `accelerate launch`."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys

import pytest

from trl_drpo.drpo_config import PRESETS
from trl_drpo.hub import LORA_WEIGHT_NAME

from kit import REPO


EXAMPLES = os.path.join(REPO, "examples")
SCRIPTS = {
    "sd_turbo_paper": "train_sd_turbo.py",
    "sdxl_turbo_paper": "train_sdxl_turbo.py",
    "flux_schnell": "train_flux_schnell.py",
    "sana_sprint": "train_sana_sprint.py",
}
"""Each example script by the preset it defaults to (and whose YAML file, examples/configs/<preset>.yaml, it runs)."""
MODELS = {
    "sd_turbo_paper": "stabilityai/sd-turbo",
    "sdxl_turbo_paper": "stabilityai/sdxl-turbo",
    "flux_schnell": "black-forest-labs/FLUX.1-schnell",
    "sana_sprint": "Efficient-Large-Model/Sana_Sprint_1.6B_1024px_diffusers",
}
TINY = {
    "sd_turbo_paper": "trl-drpo/tiny-sd",
    "sdxl_turbo_paper": "trl-drpo/tiny-sdxl",
    "flux_schnell": "trl-drpo/tiny-flux",
    "sana_sprint": "trl-drpo/tiny-sana",
}


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
def test_yaml_config_reproduces_the_preset(preset, tmp_path):
    yaml_path = os.path.join(EXAMPLES, "configs", f"{preset}.yaml")
    script_args, config = parse(preset, "--config", yaml_path, "--output_dir", str(tmp_path))
    for name, value in PRESETS[preset].items():
        assert getattr(config, name) == value, name
    assert script_args.model_name_or_path == MODELS[preset]
    assert script_args.variant == ("fp16" if preset.endswith("_paper") else None)
    assert script_args.reward_funcs == ["pickscore"]
    assert config.dataset_name and config.eval_prompts


def test_the_flux_and_sana_sprint_recipes_are_the_sdxl_turbo_one_with_what_their_transformers_need():
    # Ours: the paper has no recipe for them. K, anchors, lr, the field and the features are its SDXL-Turbo recipe's.
    sdxl = PRESETS["sdxl_turbo_paper"]
    for preset in ("flux_schnell", "sana_sprint"):
        ours = {name for name, value in PRESETS[preset].items() if sdxl.get(name, object()) != value}
        assert ours <= {
            "max_steps",
            "resolution",
            "lora_target_modules",
            "candidate_chunk_size",
            "activation_checkpointing",
        }
        assert PRESETS[preset]["bf16"] and PRESETS[preset]["num_generations"] == 16
        assert PRESETS[preset]["learning_rate"] == 1e-5
    flux_targets = PRESETS["flux_schnell"]["lora_target_modules"]
    assert {"to_q", "add_q_proj", "to_add_out"} <= set(flux_targets)
    assert PRESETS["sana_sprint"]["resolution"] == 1024 and PRESETS["flux_schnell"]["resolution"] == 512


def test_fast_yaml_config_reproduces_the_fast_preset(tmp_path):
    yaml_path = os.path.join(EXAMPLES, "configs", "sd_turbo_fast.yaml")
    _, config = parse("sd_turbo_paper", "--config", yaml_path, "--output_dir", str(tmp_path))
    for name, value in PRESETS["fast"].items():
        assert getattr(config, name) == value, name


@pytest.mark.parametrize("preset", sorted(SCRIPTS))
def test_example_defaults_to_its_preset_and_model_without_a_config(preset, tmp_path):
    script_args, config = parse(preset, "--output_dir", str(tmp_path))
    for name, value in PRESETS[preset].items():
        assert getattr(config, name) == value, name
    assert script_args.model_name_or_path == MODELS[preset]


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


def shell_commands(text: str, marker: str) -> list[str]:
    """The shell commands of `text` that contain `marker`, one a line once continuation lines are joined, exactly
    as a reader would paste them (a trailing ``  # comment`` dropped)."""
    commands = []
    for command in text.replace("\\\n", " ").splitlines():
        command = re.sub(r"\s+", " ", command.split("  #")[0]).strip()
        if marker in command and command.startswith(("accelerate ", "trl-drpo ", "python ")):
            commands.append(command)
    return commands


def documented_commands(path: str, marker: str) -> list[str]:
    """The commands of a markdown file's ```bash blocks that contain `marker`."""
    text = open(path, encoding="utf-8").read()
    return [
        command
        for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S)
        for command in shell_commands(block, marker)
    ]


def docstring_commands(script: str, marker: str = "") -> list[str]:
    """The commands written in an example script's docstring (read without importing the script)."""
    with open(os.path.join(EXAMPLES, script), encoding="utf-8") as handle:
        return shell_commands(ast.get_docstring(ast.parse(handle.read())), marker)


EXAMPLES_README = os.path.join(EXAMPLES, "README.md")
SMOKE_COMMANDS = list(
    dict.fromkeys(
        documented_commands(EXAMPLES_README, "tiny_cpu.yaml")
        + [command for script in SCRIPTS.values() for command in docstring_commands(script, "tiny_cpu.yaml")]
    )
)
"""Every CPU smoke command of examples/README.md and of the example scripts' docstrings, once each."""

REAL_COMMANDS = [
    (preset, command)
    for preset in ("flux_schnell", "sana_sprint")
    for command in dict.fromkeys(
        docstring_commands(SCRIPTS[preset]) + documented_commands(EXAMPLES_README, SCRIPTS[preset])
    )
    if "trl-drpo/tiny-" not in command
]
"""The FLUX.1-schnell and SANA-Sprint commands on the real models, from the scripts' docstrings and the README."""


def test_the_documented_commands_are_found():
    assert len(SMOKE_COMMANDS) == 5  # the four example scripts under accelerate launch, and `trl-drpo train`
    for preset in ("flux_schnell", "sana_sprint"):
        documented = [command for name, command in REAL_COMMANDS if name == preset]
        assert f"accelerate launch examples/{SCRIPTS[preset]} --config examples/configs/{preset}.yaml" in documented
        assert any("multi_gpu.yaml --num_processes 4" in command for command in documented)


@pytest.mark.parametrize("preset, command", REAL_COMMANDS, ids=[f"{p}-{i}" for i, (p, _) in enumerate(REAL_COMMANDS)])
def test_the_documented_real_model_commands_parse_into_the_recipe(preset, command, monkeypatch):
    # The real checkpoints cannot be downloaded here: the command is parsed as `accelerate launch` and the script
    # would parse it, from the repository root, and must give the recipe on the real model in bf16.
    import torch
    from accelerate.commands.launch import launch_command_parser

    from trl_drpo.cli import resolve_dtype

    monkeypatch.chdir(REPO)
    argv = shlex.split(command)
    assert argv[:2] == ["accelerate", "launch"], command
    launch = launch_command_parser().parse_args(argv[2:])
    assert launch.training_script == f"examples/{SCRIPTS[preset]}"
    assert launch.config_file is None or os.path.isfile(launch.config_file)
    script_args, config = parse(preset, *launch.training_script_args)  # with --use_cpu: bf16 on this CPU
    assert script_args.model_name_or_path == MODELS[preset]
    assert resolve_dtype(script_args.torch_dtype, fp16=config.fp16, bf16=config.bf16) == torch.bfloat16
    for name, value in PRESETS[preset].items():
        assert getattr(config, name) == value, name


@pytest.mark.slow
@pytest.mark.parametrize(
    "command",
    SMOKE_COMMANDS,
    ids=[re.search(r"train_\w+|trl-drpo train", c).group().replace(" ", "-") for c in SMOKE_COMMANDS],
)
def test_the_documented_cpu_smoke_commands_run_as_written_and_their_adapter_loads(command, tmp_path):
    import torch
    from safetensors.torch import load_file

    from trl_drpo.cli import load_pipeline

    # Run from a folder that looks like the repository root (the commands use repository-relative paths), so the
    # outputs land in the temporary folder; the commands import this tree.
    os.symlink(EXAMPLES, tmp_path / "examples")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = os.pathsep.join([REPO, *filter(None, [env.get("PYTHONPATH")])])
    result = subprocess.run(command, shell=True, env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    named = re.search(r"--output_dir (\S+)", command)
    adapter = tmp_path / (named.group(1) if named else "drpo-tiny")
    assert (adapter / LORA_WEIGHT_NAME).is_file()

    # The family's own loader (`pipe.load_lora_weights`) takes every tensor of the adapter, as saved.
    model = re.search(r"--model_name_or_path (\S+)", command)
    pipe = load_pipeline(model.group(1) if model else "trl-drpo/tiny-sd")
    pipe.load_lora_weights(str(adapter))
    (name,) = pipe.get_active_adapters()
    saved = load_file(adapter / LORA_WEIGHT_NAME)
    for key, tensor in saved.items():
        component, parameter = key.split(".", 1)
        loaded = getattr(pipe, component).get_parameter(parameter.replace(".weight", f".{name}.weight"))
        assert torch.equal(loaded, tensor), key
    assert any(tensor.abs().max() > 0 for key, tensor in saved.items() if "lora_B" in key)  # trained, not initial


def test_the_digits_yaml_reproduces_the_digits_preset(tmp_path):
    yaml_path = os.path.join(EXAMPLES, "configs", "digits.yaml")
    parser = load_example("train_digits.py").make_parser()
    _, config = parser.parse_args_and_config(["--config", yaml_path, "--output_dir", str(tmp_path)])
    for name, value in PRESETS["digits"].items():
        assert getattr(config, name) == value, name


def test_the_digits_runs_recorded_in_the_benchmarks_readme_parse_with_the_flags_they_name(tmp_path):
    text = open(os.path.join(REPO, "benchmarks", "README.md"), encoding="utf-8").read()
    recorded = [" ".join(span.split()) for span in re.findall(r"`(python examples/train_digits\.py [^`]*)`", text)]
    assert any("--use_ema true" in command for command in recorded)
    script = load_example("train_digits.py")
    parser, default_eval_every = script.make_parser(), script.DigitsScriptArguments().eval_every
    for command in recorded:
        args = shlex.split(command)[2:]
        script_args, config = parser.parse_args_and_config([*args, "--output_dir", str(tmp_path)])
        flags = dict(zip(args[::2], args[1::2]))
        preset_ema = PRESETS["digits"].get("use_ema", False)
        assert config.use_ema == {"true": True, "false": False}.get(flags.get("--use_ema"), preset_ema), command
        assert config.max_steps == int(flags.get("--max_steps", PRESETS["digits"]["max_steps"])), command
        assert script_args.eval_every == int(flags.get("--eval_every", default_eval_every)), command


def test_the_demo_is_the_digits_yaml_run_cut_short(tmp_path):
    from trl_drpo.demo import demo_config

    yaml_path = os.path.join(EXAMPLES, "configs", "digits.yaml")
    _, config = load_example("train_digits.py").make_parser().parse_args_and_config(["--config", yaml_path])
    demo = demo_config(str(tmp_path), max_steps=7)
    # The same method, seed and learning-rate schedule; only the length (and where it writes) differs.
    for name in (*PRESETS["digits"], "seed", "lr_scheduler_type", "warmup_steps"):
        if name != "max_steps":
            assert getattr(demo, name) == getattr(config, name), name
    assert demo.max_steps == 7 and demo.lr_scheduler_type == "constant_with_warmup" and demo.warmup_steps == 0


def yaml_commands(name: str) -> tuple[str, list[str]]:
    """A recipe's path under examples/configs and the commands written in its header comment (``#   command``)."""
    yaml_path = os.path.join(EXAMPLES, "configs", name)
    with open(yaml_path, encoding="utf-8") as handle:
        return yaml_path, [line.strip("# ").strip() for line in handle if line.startswith("#   ")]


def run_offline(commands: list[list[str]]) -> None:
    """Run each command in turn from the repository root, offline and on one thread, each one required to succeed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    for cmd in commands:
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=REPO)
        assert result.returncode == 0, result.stderr[-4000:]


@pytest.mark.slow
def test_the_digits_example_runs_its_documented_command_at_toy_length(tmp_path):
    from trl_drpo.worlds.digits import BASE_DIR

    script = os.path.join(EXAMPLES, "train_digits.py")
    docstring = open(script, encoding="utf-8").read()
    assert "python examples/train_digits.py --config examples/configs/digits.yaml" in docstring
    out = tmp_path / "out"
    cmd = [sys.executable, script, "--config", os.path.join(EXAMPLES, "configs", "digits.yaml")]
    # The documented run is 900 updates (about 20 minutes); the same command, cut to two updates and a small eval.
    cmd += ["--output_dir", str(out), "--max_steps", "2", "--eval_per_category", "4", "--eval_every", "1"]
    cmd += ["--disable_tqdm", "true"]
    # The flag that aligns another pretraining run's pipeline folder, given the shipped base's folder.
    cmd += ["--pretrained_model_name_or_path", BASE_DIR]
    run_offline([cmd])
    report = json.loads((out / "digits_report.json").read_text())
    assert {"base", "tuned", "best_of_k", "history", "table", "train_seconds"} <= set(report)
    assert [entry["step"] for entry in report["history"]] == [1, 2]
    assert (out / LORA_WEIGHT_NAME).is_file() and "| DrPO |" in (out / "digits_report.md").read_text()


@pytest.mark.slow
def test_the_digits_yaml_rebuilds_and_aligns_the_base_with_its_documented_commands_at_toy_length(tmp_path):
    yaml_path, documented = yaml_commands("digits.yaml")
    assert documented == [
        "python examples/train_digits.py --config examples/configs/digits.yaml",
        "python -m trl_drpo.worlds.digits.pretrain --output_dir digits-pretrain",
        "python examples/train_digits.py --config examples/configs/digits.yaml "
        "--pretrained_model_name_or_path digits-pretrain/pipeline",
    ]
    assert documented_commands(EXAMPLES_README, "digits-pretrain") == documented[1:]
    base, out = tmp_path / "digits-pretrain", tmp_path / "drpo-digits"
    # The documented commands, cut to a few steps of each pretraining stage, two updates and a small evaluation.
    toy = ["--vae_steps", "2", "--vae_batch_size", "8", "--pool_size", "256", "--teacher_steps", "2"]
    toy += ["--batch_size", "8", "--num_pairs", "16", "--teacher_steps_sample", "2", "--student_steps", "2"]
    commands = [
        [sys.executable, "-m", "trl_drpo.worlds.digits.pretrain", "--output_dir", str(base)]
        + toy
        + ["--stages", "vae", "teacher", "pairs", "student"],
        [sys.executable, os.path.join(EXAMPLES, "train_digits.py"), "--config", yaml_path]
        + ["--pretrained_model_name_or_path", str(base / "pipeline"), "--output_dir", str(out), "--max_steps", "2"]
        + ["--eval_per_category", "2", "--eval_every", "1", "--best_of_k", "false", "--disable_tqdm", "true"]
        + ["--per_device_train_batch_size", "2"],
    ]
    run_offline(commands)
    report = json.loads((out / "digits_report.json").read_text())
    assert [entry["step"] for entry in report["history"]] == [1, 2]
    assert json.loads((base / "pretrain_log.json").read_text())["settings"]["guidance"] == 1.0  # as the shipped base
    # The report records the preset's fields and every field the run set over them.
    assert report["settings"]["mask_anchor_copies"] is True and report["settings"]["per_device_train_batch_size"] == 2
    assert (out / LORA_WEIGHT_NAME).is_file()


@pytest.mark.slow
def test_the_offline_digits_recipe_runs_its_documented_commands_at_toy_length(tmp_path):
    yaml_path, documented = yaml_commands("digits_offline.yaml")
    assert documented == [
        "python -m trl_drpo.worlds.digits.preferences --output_dir digits-preferences",
        "trl-drpo train --config examples/configs/digits_offline.yaml",
        "python -m trl_drpo.worlds.digits.evaluation --lora drpo-digits-offline",
    ]
    data, out = tmp_path / "digits-preferences", tmp_path / "drpo-digits-offline"
    # The documented commands, cut to a few pairs, two updates and a small evaluation, writing under tmp_path.
    commands = [
        [sys.executable, "-m", "trl_drpo.worlds.digits.preferences", "--output_dir", str(data)]
        + ["--per_category", "1", "--candidates", "4"],
        [os.path.join(os.path.dirname(sys.executable), "trl-drpo"), "train", "--config", yaml_path]
        + ["--dataset_name", str(data / "train.parquet"), "--output_dir", str(out), "--max_steps", "2"],
        [sys.executable, "-m", "trl_drpo.worlds.digits.evaluation", "--lora", str(out), "--per_category", "2"]
        + ["--output_file", str(tmp_path / "eval.json")],
    ]
    run_offline(commands)
    assert (out / LORA_WEIGHT_NAME).is_file()
    tables = json.loads((tmp_path / "eval.json").read_text())
    assert set(tables) == {"base", "tuned"}
    assert {"verifier", "judge"} <= set(tables["tuned"]) and "overall" in tables["tuned"]["verifier"]
