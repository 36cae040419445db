"""An exponential moving average (EMA) of the trained weights, kept by diffusers' `EMAModel` (`DrPOConfig.use_ema`).

The average is updated after every optimizer update. Its decay follows `EMAModel`'s warm-up with power 1: after
``n`` updates it is ``min(1 - 1/n, ema_decay)``, so the average is the plain mean of the weights over the first
``1 / (1 - ema_decay)`` updates and an exponential one after (a horizon of about ``1 / (1 - ema_decay)`` updates,
100 at the default 0.99). It averages out the update-to-update jitter of the weights, which a rank-only reward makes
large. Evaluation during training uses the average, and the trained model holds it once training ends, so that
`save_model` and the model card describe it. Checkpoints keep the trained weights, from which training resumes,
and the average beside them (`EMA_WEIGHTS_NAME`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
from transformers import TrainerCallback


logger = logging.getLogger(__name__)

EMA_WEIGHTS_NAME = "ema_weights.safetensors"
"""The moving average in a checkpoint folder: one tensor per trained parameter, by its name in the model."""


class WeightAverage:
    """The moving average of `model`'s trainable parameters (those with ``requires_grad``), in their dtype and on
    their device."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        from diffusers.training_utils import EMAModel

        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("The model has no trainable parameters to average.")
        self.names = [name for name, _ in named]
        self.parameters = [p for _, p in named]
        self.ema = EMAModel(self.parameters, decay=decay, use_ema_warmup=True, inv_gamma=1.0, power=1.0)

    @property
    def num_updates(self) -> int:
        """Optimizer updates averaged so far."""
        return int(self.ema.optimization_step)

    def step(self) -> None:
        """Take the parameters' current values into the average (call after each optimizer update)."""
        self.ema.step(self.parameters)

    def copy_to_model(self) -> None:
        """Overwrite the model's trainable parameters with the average."""
        self.ema.copy_to(self.parameters)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Within this context the model holds the average; its own weights come back on exit."""
        self.ema.store(self.parameters)
        self.ema.copy_to(self.parameters)
        try:
            yield
        finally:
            self.ema.restore(self.parameters)

    def save(self, folder: str) -> None:
        """Write the average to ``folder/EMA_WEIGHTS_NAME`` (safetensors; the update count in its metadata)."""
        from safetensors.torch import save_file

        tensors = {name: s.detach().cpu().contiguous() for name, s in zip(self.names, self.ema.shadow_params)}
        save_file(tensors, os.path.join(folder, EMA_WEIGHTS_NAME), metadata={"num_updates": str(self.num_updates)})

    def load(self, folder: str) -> bool:
        """Read the average from ``folder/EMA_WEIGHTS_NAME``; False when the folder has none.

        Raises:
            ValueError: the file averages other parameters than the model's trainable ones (a checkpoint of another
                adapter).
        """
        from safetensors import safe_open

        path = os.path.join(folder, EMA_WEIGHTS_NAME)
        if not os.path.isfile(path):
            return False
        with safe_open(path, framework="pt") as handle:
            if sorted(handle.keys()) != sorted(self.names):
                raise ValueError(
                    f"{path} averages other parameters than this model trains: it belongs to another run's adapter."
                )
            for name, shadow in zip(self.names, self.ema.shadow_params):
                shadow.copy_(handle.get_tensor(name))
            self.ema.optimization_step = int((handle.metadata() or {}).get("num_updates", 0))
        return True


class EMACallback(TrainerCallback):
    """Keeps a `WeightAverage` of the trained model through `transformers.Trainer`'s public hooks: built when training
    begins (from `resume_folder`'s average when resuming), updated at the end of every optimizer update, and copied
    into the model when training ends."""

    def __init__(self, decay: float) -> None:
        self.decay = decay
        self.average: WeightAverage | None = None
        self.resume_folder: str | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self.average = WeightAverage(model, self.decay)
        if self.resume_folder is not None and not self.average.load(self.resume_folder):
            logger.warning(
                "%s holds no %s (it was saved without use_ema): the moving average starts from the resumed weights.",
                self.resume_folder,
                EMA_WEIGHTS_NAME,
            )

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.average.step()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.average.copy_to_model()

    def applied(self) -> AbstractContextManager[None]:
        """The average in the model within this context, once training has begun; otherwise nothing changes."""
        return nullcontext() if self.average is None else self.average.applied()

    def save(self, folder: str) -> None:
        """Write the average into a checkpoint `folder` (`WeightAverage.save`), once training has begun."""
        if self.average is not None:
            self.average.save(folder)
