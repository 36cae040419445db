"""trl_drpo: Drifting Preference Optimization (DrPO) for one-step text-to-image generators."""

__version__ = "0.1.0.dev0"

from .drift import drift_loss, drpo_loss  # noqa: E402
from .drpo_config import DrPOConfig  # noqa: E402
from .drpo_trainer import DrPOTrainer  # noqa: E402
from .ranking import mean_split, reward_ensemble, threshold_split, top_bottom_k  # noqa: E402


__all__ = [
    "__version__",
    "DrPOConfig",
    "DrPOTrainer",
    "drift_loss",
    "drpo_loss",
    "mean_split",
    "reward_ensemble",
    "threshold_split",
    "top_bottom_k",
]
