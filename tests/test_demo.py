"""The embedded demo (`python -m trl_drpo.demo`, `make demo`) on the digit world, run with a few steps."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from huggingface_hub import ModelCard
from PIL import Image

from trl_drpo.demo import ARTEFACTS
from trl_drpo.worlds.digits.grammar import CATEGORIES

from kit import REPO


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
    card = ModelCard.load(out / "README.md")
    assert card.data.to_dict()["library_name"] == "diffusers"
    assert "![samples](samples.png)" in card.text
    assert "| verifier/mean_of_six |" in card.text and "| judge/mean_of_six |" in card.text
    assert "Pass rates (%) of the digit world's verifier" in card.text  # not the trainer's mean rewards


@pytest.mark.slow
def test_demo_metrics_give_base_and_tuned_per_category_for_verifier_and_judge(demo_run):
    out, _ = demo_run
    metrics = json.loads((out / "eval_metrics.json").read_text())
    for scorer in ("verifier", "judge"):
        for key in (*CATEGORIES, "overall"):
            assert set(metrics[scorer][key]) == {"base", "tuned"}
            assert all(0.0 <= value <= 100.0 for value in metrics[scorer][key].values())
    assert metrics["eval_images"] >= 300 and metrics["steps"] == 2


@pytest.mark.slow
def test_demo_images_are_pngs(demo_run):
    out, _ = demo_run
    grid, curve = Image.open(out / "samples.png"), Image.open(out / "reward_curve.png")
    assert grid.format == curve.format == "PNG"
    assert grid.width > grid.height  # eight captioned columns, two rows


@pytest.mark.slow
def test_demo_shows_a_progress_bar_and_prints_the_per_category_table(demo_run):
    _, result = demo_run
    assert re.search(r"2/2 \[", result.stderr), "tqdm progress bar"
    assert "reward=" in result.stderr, "the bar shows the current reward"
    for category in (*CATEGORIES[:5], "mean (6)"):
        assert re.search(rf"{re.escape(category)}\s+\d+\.\d -> +\d+\.\d", result.stdout), (category, result.stdout)
    assert "{'loss'" not in result.stdout + result.stderr, "no raw metric dicts on the console"


@pytest.mark.slow
def test_the_demo_cards_quick_start_loads_the_shipped_base_and_runs_as_written(demo_run):
    out, _ = demo_run
    text = (out / "README.md").read_text()
    assert "a local folder" not in text and "path/to/" not in text
    assert "`trl-drpo/digits` (the digit world's base, shipped with trl_drpo)" in text
    assert "trl-drpo sample --model_name_or_path trl-drpo/digits --adapter out" in text
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    assert 'load_pipeline("trl-drpo/digits")' in code and 'pipe.load_lora_weights("out")' in code
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], cwd=out.parent, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "No LoRA keys associated" not in result.stderr  # diffusers' notice about the text encoder, unactionable


@pytest.mark.slow
def test_the_demo_cards_change_column_is_the_difference_of_the_unrounded_pass_rates(demo_run):
    out, _ = demo_run
    metrics = json.loads((out / "eval_metrics.json").read_text())
    text = (out / "README.md").read_text()
    for scorer in ("verifier", "judge"):
        for key in (*CATEGORIES, "overall"):
            rates = metrics[scorer][key]
            name = f"{scorer}/{'mean_of_six' if key == 'overall' else key}"
            row = re.search(rf"\| {re.escape(name)} \| [^|]+ \| [^|]+ \| ([^|]+) \|", text)
            assert row is not None, name
            assert float(row.group(1)) == pytest.approx(rates["tuned"] - rates["base"], abs=0.006), name
