"""Test kit: a cheap reward and a small `DrPOConfig` for plumbing tests (the tiny pipelines themselves are in
`trl_drpo.tiny_pipelines`, which users also run)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch


def mean_brightness(images, prompts) -> list[float]:
    """A cheap non-differentiable reward for plumbing tests: each PIL image's mean pixel value (0-255)."""
    import numpy as np

    return [float(np.asarray(image).mean()) for image in images]


def tiny_drpo_config(output_dir: str, **overrides):
    """A `DrPOConfig` small enough for a CPU test step: K=4 with 1/1 anchors, two prompts per step, LoRA rank 4,
    no accumulation, no checkpoints or reporting. ``overrides`` win."""
    from trl_drpo import DrPOConfig

    return DrPOConfig(**tiny_drpo_values(output_dir, **overrides))


def tiny_drpo_values(output_dir: str, **overrides) -> dict:
    """The values of `tiny_drpo_config`, for `DrPOConfig.from_preset(name, **values)` (a preset's tiny twin)."""
    values = dict(
        output_dir=str(output_dir),
        max_steps=2,
        num_generations=4,
        num_positives=1,
        num_negatives=1,
        gradient_accumulation_steps=1,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        lora_rank=4,
        lora_alpha=4,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    values.update(overrides)
    return values


KIT_DIR = str(Path(__file__).resolve().parent)
"""This folder: put it on ``PYTHONPATH`` for a test's subprocess that imports the kit."""

REPO = os.path.dirname(KIT_DIR)
"""The repository's root: the working directory of tests that run its scripts and commands as a user would."""

BATCH_ROUNDING_ATOL = 1e-5
"""Absolute tolerance between float32 outputs of one computation run at different batch sizes (chunked or not):
kernels may sum in another order for another batch (about 1e-6 on unit-scale values, seen up to 1.1e-6), while a row
computed from the wrong input, or twice, differs by far more."""


def with_kit_on_path(env: dict[str, str]) -> dict[str, str]:
    """`env` with this folder prepended to ``PYTHONPATH``, for scripts a test runs in a fresh interpreter."""
    paths = [KIT_DIR, *filter(None, [env.get("PYTHONPATH")])]
    return {**env, "PYTHONPATH": os.pathsep.join(paths)}


def straight_and_resumed_runs(tmp_path: Path, prompts: list[str], **overrides) -> tuple:
    """Two tiny runs of 4 updates with a checkpoint every 2: one straight through (in ``tmp_path/a``), and one stopped
    after 2 updates and resumed from its ``checkpoint-2`` by a new trainer (in ``tmp_path/b``). Returns the trainers
    ``(straight, resumed)``, both finished."""
    from trl_drpo import DrPOTrainer
    from trl_drpo.tiny_pipelines import tiny_sd_pipeline

    common = dict(save_strategy="steps", save_steps=2, max_steps=4, **overrides)

    def trainer(folder: str) -> DrPOTrainer:
        config = tiny_drpo_config(tmp_path / folder / "out", **common)
        return DrPOTrainer(tiny_sd_pipeline(), mean_brightness, config, train_dataset=prompts)

    straight = trainer("a")
    straight.train()
    first = trainer("b")
    first.args.max_steps = 2
    first.train()
    resumed = trainer("b")
    resumed.train(resume_from_checkpoint=os.path.join(first.args.output_dir, "checkpoint-2"))
    return straight, resumed


class UnloadableReward:
    """A model reward whose weights cannot be found: `load()` raises, as a Hub reward does offline."""

    def load(self) -> None:
        raise OSError("no weights here")

    def __call__(self, images, prompts) -> list[float]:
        return [0.0] * len(images)


def lora_state(trainer) -> dict:
    """A detached copy of the trainer's LoRA weights, by parameter name."""
    return {name: p.detach().clone() for name, p in trainer.generator.denoiser.named_parameters() if "lora" in name}


class CountingWrapper(torch.nn.Module):
    """A DDP-style wrapper (the model as `.module`) that counts its forward calls."""

    def __init__(self, module):
        super().__init__()
        self.module = module
        self.calls = 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.module(*args, **kwargs)


def modules_after(statement: str) -> set[str]:
    """The names in `sys.modules` after a fresh interpreter runs `statement` (nothing imported by the test process)."""
    code = f"{statement}\nimport sys\nprint('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())
