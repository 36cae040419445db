"""The digit world: a pretrained one-step text-to-image pipeline on real handwritten digits, with a black-box
verifier, small enough to train, align and evaluate on a CPU.

    from trl_drpo.worlds import digits

    pipe = digits.load_pipeline()                      # the shipped base, CPU, fp32
    items = digits.prompts(split="test")               # [{"prompt", "category", "objects", "relation", "split"}]
    image = digits.render(items[0], seed=0)            # a ground-truth scene (PIL), held-out glyphs for test items
    results = digits.verify([image], [items[0]["prompt"]])           # [{"passed", "score", "checks", "category"}]
    judged = digits.verify([image], [items[0]["prompt"]], judge=True)  # the independent judge, same format
    reward = digits.reward_fn(kind="score")             # a reward callable for DrPOTrainer ("score" or "pass")

Scenes are 32x32 RGB canvases with 1-3 coloured optdigits glyphs in a 2x2 grid; captions follow GenEval's six
categories (see `grammar`). See this folder's README.md for how the base was pretrained and what it scores.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from .grammar import CATEGORIES, COLORS, parse, prompts
from .scenes import render
from .verifier import CHECKS, DigitsReward, summarize, verify


BASE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "base")
"""The shipped base pipeline, a `StableDiffusionPipeline.save_pretrained` folder (safetensors)."""

__all__ = [
    "BASE_DIR",
    "CATEGORIES",
    "CHECKS",
    "COLORS",
    "DigitsReward",
    "load_pipeline",
    "parse",
    "prompts",
    "render",
    "reward_fn",
    "summarize",
    "verify",
]


def load_pipeline(device: str = "cpu", torch_dtype: Any = None, pretrained_model_name_or_path: str | None = None):
    """The shipped one-step base: a `StableDiffusionPipeline` served like SD-Turbo,
    `pipe(prompt, num_inference_steps=1, guidance_scale=0.0)`, 32x32 images. Loaded offline from `BASE_DIR`.

    Args:
        device: where to put it ("cpu" by default).
        torch_dtype: parameter dtype; float32 by default.
        pretrained_model_name_or_path: another local digit-world pipeline folder to load instead of the shipped base
            (for example the ``pipeline/`` folder of a `trl_drpo.worlds.digits.pretrain` run with other settings).

    Raises:
        OSError: from diffusers, when the folder holds no pipeline.
    """
    import torch
    from diffusers import StableDiffusionPipeline

    with _loading_bars_off():  # a few-MB local folder: loading bars would only clutter every run's output
        pipe = StableDiffusionPipeline.from_pretrained(
            pretrained_model_name_or_path or BASE_DIR, dtype=torch_dtype or torch.float32, local_files_only=True
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


@contextlib.contextmanager
def _loading_bars_off() -> Iterator[None]:
    """diffusers' and transformers' loading progress bars off for the block, each restored as it was."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    states = [(lib, lib.is_progress_bar_enabled()) for lib in (diffusers_logging, transformers_logging)]
    for lib, _ in states:
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, enabled in states:
            if enabled:
                lib.enable_progress_bar()


def reward_fn(kind: str = "score", judge: bool = False) -> DigitsReward:
    """The verifier as a reward for `DrPOTrainer`: "score" (fraction of the caption's checks that hold, in [0, 1])
    or "pass" (1.0 when all hold, else 0.0). `judge=True` scores with the independent judge (for evaluation)."""
    return DigitsReward(kind=kind, judge=judge)
