"""The package surface: public names, and the pure math staying free of diffusers and transformers."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import trl_drpo

from kit import REPO, modules_after


def test_every_public_name_resolves():
    for name in trl_drpo.__all__:
        assert getattr(trl_drpo, name) is not None, name
    assert set(trl_drpo.__all__) - {"__version__"} == set(trl_drpo._EXPORTS)


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="DrPOTrainr"):
        trl_drpo.DrPOTrainr  # noqa: B018


def test_drift_objective_and_ranking_import_without_diffusers_or_transformers():
    modules = modules_after("import trl_drpo.drift, trl_drpo.objective, trl_drpo.ranking")
    assert not {"diffusers", "transformers", "peft"} & modules


@pytest.mark.parametrize(
    "args",
    [
        ["-c", "from trl_drpo import DrPOTrainer"],
        ["-c", "from trl_drpo.worlds import digits; digits.load_pipeline()"],
        ["-c", "from trl_drpo.loading import load_pipeline; load_pipeline('trl-drpo/tiny-flux')"],
        [
            "-c",
            "from trl_drpo import DrPOConfig; from trl_drpo.model_card import render_model_card; "
            "from trl_drpo.worlds import digits; "
            "render_model_card(digits.load_pipeline(), DrPOConfig(output_dir='card', report_to='none'), "
            "['r'], [1.0], [])",
        ],
        # An example script's own imports come first (third-party before first-party): they must not pull the noisy
        # libraries in before trl_drpo has filtered them.
        [os.path.join("examples", "train_digits.py"), "--help"],
    ],
    ids=["the trainer", "the digit world's base", "a pipeline loaded by name", "a model card", "the digits script"],
)
def test_importing_logs_no_warning_about_image_processors_or_kernels_it_does_not_use(args):
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "torchvision" not in result.stderr, result.stderr[-2000:]
    assert "gemm_4bit_forward" not in result.stderr, result.stderr[-2000:]  # bitsandbytes' unused-kernel notice


@pytest.mark.slow
def test_the_wheel_ships_every_subpackage_and_the_digit_worlds_weights(tmp_path):
    import shutil
    import zipfile

    source = tmp_path / "source"  # a copy, so that the build leaves nothing in the checkout
    source.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md", "LICENSE", "trl_drpo", "model_cards"):
        path = os.path.join(REPO, name)
        if os.path.isdir(path):
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(path, source / name)
    cmd = [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q"]
    result = subprocess.run([*cmd, "-w", str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    # Folders setuptools only picks up as data (with a deprecation warning) are dropped by newer setuptools.
    assert "absent from the `packages` configuration" not in result.stderr, result.stderr[-3000:]
    (wheel,) = tmp_path.glob("trl_drpo-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    package = os.path.join(REPO, "trl_drpo")
    for folder, _, files in os.walk(package):
        if "__init__.py" in files:
            init = os.path.relpath(os.path.join(folder, "__init__.py"), REPO).replace(os.sep, "/")
            assert init in names, f"{init} is not in the wheel: add its package to setup.cfg"
    assert "trl_drpo/worlds/digits/base/unet/diffusion_pytorch_model.safetensors" in names
    assert "trl_drpo/model_cards/drpo_lora.md" in names
