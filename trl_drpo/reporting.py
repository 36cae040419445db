"""What the trainer hands to transformers' reporting integrations (TensorBoard, Weights & Biases): a view of the
denoiser whose config they can serialise, and grids of each prompt's candidates with their rewards."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from transformers.trainer_callback import CallbackHandler

from .visualization import image_grid


class _ConfigView(dict):
    """A diffusers model config with the two methods transformers' reporting callbacks call on `model.config`."""

    def to_dict(self) -> dict[str, Any]:
        return dict(self)

    def to_json_string(self) -> str:
        return json.dumps(self, indent=2, sort_keys=True, default=str)


class ReportingModel:
    """What reporting callbacks see as the model: the denoiser, with a `config` they can serialise (diffusers
    configs are FrozenDicts, which TensorBoard's and W&B's callbacks cannot)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self._model = model
        self.config = _ConfigView(getattr(model, "config", {}) or {})

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


class ReportingCallbackHandler(CallbackHandler):
    """Hands callbacks a `ReportingModel` whenever the trainer (re)assigns `model`.

    transformers offers no public hook for what callbacks receive as `model`, and its TensorBoard and W&B callbacks
    call `model.config.to_json_string()` / `to_dict()` at the start of training: this subclass of the (public)
    `CallbackHandler` is the narrowest place to adapt a diffusers denoiser to them.
    """

    @property
    def model(self) -> Any:
        return self._model_view

    @model.setter
    def model(self, value: Any) -> None:
        self._model_view = ReportingModel(value) if value is not None else None


def log_candidates(
    callbacks: Sequence[Any],
    report_to: Sequence[str],
    images: torch.Tensor,
    scores: torch.Tensor,
    reward_names: Sequence[str],
    prompt: str,
    step: int,
) -> None:
    """Log one prompt's candidates `(K, 3, H, W)` in [0, 1] as a grid, captioned with their rewards `(R, K)`, to
    the TensorBoard writers of `callbacks` and to the active W&B run (when `"wandb"` is in `report_to`)."""
    grid = image_grid(images)
    caption = f"{prompt} | " + ", ".join(
        f"{name}: " + " ".join(f"{s:.3g}" for s in row.tolist()) for name, row in zip(reward_names, scores)
    )
    for callback in callbacks:
        writer = getattr(callback, "tb_writer", None)
        if writer is not None:
            writer.add_image("train/candidates", np.asarray(grid), step, dataformats="HWC")
            writer.add_text("train/candidates_rewards", caption, step)
    if "wandb" in (report_to or []):
        import wandb

        if wandb.run is not None:
            wandb.log({"train/candidates": wandb.Image(grid, caption=caption)}, step=step)
