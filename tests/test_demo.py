"""The embedded demo (`python -m trl_drpo.demo`, `make demo`), run with a few steps."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from huggingface_hub import ModelCard
from PIL import Image

from trl_drpo.demo import ARTEFACTS, HELD_OUT_PROMPTS


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "trl_drpo.demo", "--max_steps", "2", "--output_dir", str(out)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert result.returncode == 0, result.stderr[-4000:]
    return out, result


@pytest.mark.slow
def test_demo_writes_adapter_card_grid_curve_and_metrics(demo_run):
    out, _ = demo_run
    for name in ARTEFACTS:
        assert (out / name).is_file(), name
    metrics = json.loads((out / "eval_metrics.json").read_text())
    assert {"eval_reward", "eval_base_reward"} <= set(metrics)
    card = ModelCard.load(out / "README.md")
    assert card.data.to_dict()["library_name"] == "diffusers"
    assert "![samples](samples.png)" in card.text and "## Evaluation" in card.text


@pytest.mark.slow
def test_demo_images_are_pngs_with_base_and_tuned_rows(demo_run):
    out, _ = demo_run
    grid, curve = Image.open(out / "samples.png"), Image.open(out / "reward_curve.png")
    assert grid.format == curve.format == "PNG"
    # One column per held-out prompt; two seeds of base images above two seeds of tuned images (square cells).
    cell = (grid.width - 2) / len(HELD_OUT_PROMPTS)
    assert (grid.height - 2) / cell == 4


@pytest.mark.slow
def test_demo_shows_a_progress_bar_and_prints_the_reward_before_and_after(demo_run):
    _, result = demo_run
    assert re.search(r"2/2 \[", result.stderr), "tqdm progress bar"
    assert "reward=" in result.stderr, "the bar shows the current reward"
    match = re.search(r"base (-?\d+\.\d+) -> tuned (-?\d+\.\d+)", result.stdout)
    assert match, result.stdout
    assert "{'loss'" not in result.stdout + result.stderr, "no raw metric dicts on the console"
