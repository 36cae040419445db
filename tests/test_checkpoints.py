"""Resuming from checkpoints: incomplete ones are skipped, damaged files are named."""

from __future__ import annotations

import json
import logging
import os
import shutil

import pytest

from trl_drpo import DrPOTrainer
from trl_drpo.checkpoints import STAGING_DIR, checkpoint_problems, latest_complete_checkpoint
from trl_drpo.hub import LORA_WEIGHT_NAME
from trl_drpo.tiny_pipelines import tiny_sd_pipeline

from kit import mean_brightness, tiny_drpo_config


PROMPTS = ["a red apple", "a blue car"]


def run(output_dir, max_steps, resume=None):
    config = tiny_drpo_config(output_dir, max_steps=max_steps, save_strategy="steps", save_steps=2)
    trainer = DrPOTrainer(tiny_sd_pipeline(), mean_brightness, config, train_dataset=PROMPTS)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    run(out, 4)
    return out


def copy_run(finished, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    return out


def test_whole_checkpoints_have_no_problems(finished):
    assert checkpoint_problems(str(finished / "checkpoint-4"), LORA_WEIGHT_NAME) == []
    assert latest_complete_checkpoint(str(finished), LORA_WEIGHT_NAME) == (str(finished / "checkpoint-4"), [])


@pytest.mark.parametrize("left", [[], [LORA_WEIGHT_NAME], [LORA_WEIGHT_NAME, "optimizer.pt"]])
def test_resuming_from_the_latest_skips_a_checkpoint_a_crash_left_unfinished(finished, tmp_path, left, caplog):
    out = copy_run(finished, tmp_path)
    for name in os.listdir(out / "checkpoint-4"):
        if name not in left:
            os.remove(out / "checkpoint-4" / name)
    with caplog.at_level(logging.WARNING, logger="trl_drpo.drpo_trainer"):
        trainer = run(out, 4, resume=True)
    assert trainer.state.global_step == 4  # resumed from checkpoint-2, then trained steps 3 and 4
    assert "trainer_state.json is missing" in caplog.text


@pytest.mark.parametrize(
    "name, damage",
    [
        ("trainer_state.json", lambda data: data[: len(data) // 2]),
        (LORA_WEIGHT_NAME, lambda data: data[: len(data) - 100]),
        ("optimizer.pt", lambda data: data[: len(data) // 2]),
        ("rng_state.pth", lambda data: data[:10]),
        ("scheduler.pt", lambda data: b""),
    ],
)
def test_a_damaged_file_is_named_when_resuming_from_its_checkpoint(finished, tmp_path, name, damage):
    out = copy_run(finished, tmp_path)
    path = out / "checkpoint-4" / name
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ValueError, match=rf"Cannot resume from .*checkpoint-4: .*{name} is damaged"):
        run(out, 6, resume=str(out / "checkpoint-4"))
    assert latest_complete_checkpoint(str(out), LORA_WEIGHT_NAME)[0] == str(out / "checkpoint-2")


def test_no_complete_checkpoint_at_all_is_a_clear_error(finished, tmp_path):
    out = copy_run(finished, tmp_path)
    for step in (2, 4):
        os.remove(out / f"checkpoint-{step}" / "trainer_state.json")
    with pytest.raises(ValueError, match="No complete checkpoint to resume from"):
        run(out, 6, resume=True)


def test_a_crash_while_a_checkpoint_is_written_leaves_no_checkpoint_folder(tmp_path, monkeypatch):
    out = tmp_path / "out"
    save_rng_state = DrPOTrainer._save_rng_state

    def crash_at_step_four(self, output_dir):
        if self.state.global_step == 4:
            raise KeyboardInterrupt("killed while writing checkpoint-4")
        save_rng_state(self, output_dir)

    monkeypatch.setattr(DrPOTrainer, "_save_rng_state", crash_at_step_four)
    with pytest.raises(KeyboardInterrupt):
        run(out, 4)
    assert sorted(name for name in os.listdir(out) if name.startswith("checkpoint-")) == ["checkpoint-2"]

    monkeypatch.setattr(DrPOTrainer, "_save_rng_state", save_rng_state)
    trainer = run(out, 4, resume=True)  # from checkpoint-2; the staged leftovers of step 4 are replaced
    assert trainer.state.global_step == 4
    assert checkpoint_problems(str(out / "checkpoint-4"), LORA_WEIGHT_NAME) == []
    assert not (out / STAGING_DIR).exists()


def test_checkpoints_are_renamed_into_place_and_rotated_by_save_total_limit(tmp_path):
    out = tmp_path / "out"
    config = tiny_drpo_config(out, max_steps=6, save_strategy="steps", save_steps=2, save_total_limit=2)
    DrPOTrainer(tiny_sd_pipeline(), mean_brightness, config, train_dataset=PROMPTS).train()
    assert sorted(os.listdir(out / "checkpoint-6")) == sorted(os.listdir(out / "checkpoint-4"))
    assert sorted(name for name in os.listdir(out) if name.startswith("checkpoint-")) == [
        "checkpoint-4",
        "checkpoint-6",
    ]
    assert not (out / STAGING_DIR).exists()


def test_the_best_checkpoint_is_recorded_where_it_was_renamed_to(tmp_path):
    out = tmp_path / "out"
    config = tiny_drpo_config(
        out,
        max_steps=2,
        save_strategy="steps",
        save_steps=1,
        eval_strategy="steps",
        eval_steps=1,
        eval_prompts=["a house"],
        eval_seeds=[5],
        metric_for_best_model="reward",
        greater_is_better=True,
    )
    trainer = DrPOTrainer(tiny_sd_pipeline(), mean_brightness, config, train_dataset=PROMPTS)
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert os.path.dirname(best) == str(out) and os.path.isdir(best)
    for step in (1, 2):
        state = json.loads((out / f"checkpoint-{step}" / "trainer_state.json").read_text())
        assert STAGING_DIR not in json.dumps(state.get("best_model_checkpoint"))
