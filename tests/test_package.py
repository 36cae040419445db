"""The package surface: public names, and the pure math staying free of diffusers and transformers."""

from __future__ import annotations

import subprocess
import sys

import pytest

import trl_drpo


def test_every_public_name_resolves():
    for name in trl_drpo.__all__:
        assert getattr(trl_drpo, name) is not None, name
    assert set(trl_drpo.__all__) - {"__version__"} == set(trl_drpo._EXPORTS)


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="DrPOTrainr"):
        trl_drpo.DrPOTrainr  # noqa: B018


def test_drift_and_ranking_import_without_diffusers_or_transformers():
    code = (
        "import sys, trl_drpo.drift, trl_drpo.ranking; "
        "print(sorted(m for m in ('diffusers', 'transformers', 'peft') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_importing_the_trainer_logs_no_warning_about_image_processors_it_does_not_use():
    code = "from trl_drpo import DrPOTrainer"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "torchvision" not in result.stderr, result.stderr[-2000:]
