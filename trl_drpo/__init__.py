"""trl_drpo: Drifting Preference Optimization (DrPO) for one-step text-to-image generators."""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any


__version__ = "0.1.0.dev0"


class _Unactionable(logging.Filter):
    """Drops the one notice of a library's logger that a DrPO user cannot act on; every other record passes.

    - bitsandbytes' CPU backend, on import, that an optional 4-bit kernel package is missing: transformers' `Trainer`
      and peft import bitsandbytes wherever it is installed (for `optim="adamw_bnb_8bit"`), and DrPO uses no 4-bit
      kernel.
    - diffusers' LoRA loader, on every `load_lora_weights` of a DrPO adapter, that the text encoder got no LoRA keys:
      DrPO adapters hold the denoiser's only, and diffusers' own message calls it safe to ignore.
    - transformers, when diffusers' pipelines are first imported (their IP-adapter loaders ask for image
      processors), that an image processor falls back to PIL because torchvision is not installed: DrPO uses no
      image processor of a pipeline, and torchvision is not one of its dependencies.
    """

    def __init__(self, *fragments: str) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not all(fragment in message for fragment in self.fragments)


# A filter applies only to the logger a record is made on, so each sits on the emitting module's own logger.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_Unactionable("gemm_4bit_forward"))
logging.getLogger("diffusers.loaders.lora_base").addFilter(
    _Unactionable("No LoRA keys associated to", "text_encoder", "safe to ignore")
)
logging.getLogger("transformers.utils.import_utils").addFilter(
    _Unactionable("requires torchvision (not installed)", "ImageProcessor")
)

# Public names -> the module that holds them. They are imported on first use, as in transformers and TRL, so that
# `import trl_drpo.drift` or the CLI's `--help` does not pay for transformers' Trainer, diffusers and peft.
_EXPORTS = {
    "DrPOConfig": "drpo_config",
    "DrPOTrainer": "drpo_trainer",
    "OneStepGenerator": "generators",
    "register_generator": "generators",
    "build_feature_map": "features",
    "register_feature_map": "features",
    "drift_loss": "drift",
    "drpo_loss": "objective",
    "drpo_targets": "objective",
    "mean_split": "ranking",
    "reward_ensemble": "ranking",
    "select_anchors": "ranking",
    "threshold_split": "ranking",
    "top_bottom_k": "ranking",
}

__all__ = [
    "__version__",
    "DrPOConfig",
    "DrPOTrainer",
    "OneStepGenerator",
    "build_feature_map",
    "drift_loss",
    "drpo_loss",
    "drpo_targets",
    "mean_split",
    "register_feature_map",
    "register_generator",
    "reward_ensemble",
    "select_anchors",
    "threshold_split",
    "top_bottom_k",
]

if TYPE_CHECKING:
    from .drift import drift_loss
    from .drpo_config import DrPOConfig
    from .drpo_trainer import DrPOTrainer
    from .features import build_feature_map, register_feature_map
    from .generators import OneStepGenerator, register_generator
    from .objective import drpo_loss, drpo_targets
    from .ranking import mean_split, reward_ensemble, select_anchors, threshold_split, top_bottom_k


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
