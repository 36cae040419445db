"""An exponential moving average (EMA) of the trained weights, kept by diffusers' `EMAModel` (`DrPOConfig.use_ema`).

The average is updated after every optimizer update. Its decay follows `EMAModel`'s warm-up with power 1: after
``n`` updates it is ``min(1 - 1/n, ema_decay)``, so the average is the plain mean of the weights over the first
``1 / (1 - ema_decay)`` updates and an exponential one after (a horizon of about ``1 / (1 - ema_decay)`` updates,
100 at the default 0.99). It averages out the update-to-update jitter of the weights, which a rank-only reward makes
large. Evaluation during training uses the average, and the trained model holds it once training ends, so that
`save_model` and the model card describe it. Checkpoints keep the trained weights, from which training resumes,
and the average in their `EMA_DIR` subfolder, written the way `save_model` writes the model (for a LoRA adapter,
diffusers' format: ``pipe.load_lora_weights("checkpoint-N/ema")`` loads it).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
from transformers import TrainerCallback


logger = logging.getLogger(__name__)

EMA_DIR = "ema"
"""The checkpoint subfolder holding the moving average, saved as the model is saved, and `EMA_STATE_NAME`."""
EMA_STATE_NAME = "ema_state.json"
"""The average's update count (``{"num_updates": n}``), which sets its warm-up when training resumes."""

WeightsIO = Callable[[str], None]
"""Writes the model's current weights into a folder, or reads a folder's weights into the model in place."""


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
        self.in_model = False
        """Whether the model's parameters hold the average now (within `applied`, or after `copy_to_model`)."""

    @property
    def num_updates(self) -> int:
        """Optimizer updates averaged so far."""
        return int(self.ema.optimization_step)

    def step(self) -> None:
        """Take the parameters' current values into the average (call after each optimizer update)."""
        self.ema.step(self.parameters)
        self.in_model = False

    def copy_to_model(self) -> None:
        """Overwrite the model's trainable parameters with the average."""
        self.ema.copy_to(self.parameters)
        self.in_model = True

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Within this context the model holds the average; its own weights come back on exit. Nested in another
        `applied`, or after `copy_to_model`, it changes nothing."""
        if self.in_model:
            yield
            return
        self.ema.store(self.parameters)
        self.ema.copy_to(self.parameters)
        self.in_model = True
        try:
            yield
        finally:
            self.ema.restore(self.parameters)
            self.in_model = False

    def save(self, folder: str, write_weights: WeightsIO) -> None:
        """Write the average into ``folder/EMA_DIR``: the model's weights as `write_weights` writes them, taken while
        the model holds the average, and the update count (`EMA_STATE_NAME`)."""
        path = os.path.join(folder, EMA_DIR)
        os.makedirs(path, exist_ok=True)
        with self.applied():
            write_weights(path)
        with open(os.path.join(path, EMA_STATE_NAME), "w", encoding="utf-8") as handle:
            json.dump({"num_updates": self.num_updates}, handle)

    def load(self, folder: str, read_weights: WeightsIO) -> bool:
        """Read the average that `save` wrote into ``folder/EMA_DIR``: `read_weights` loads it into the model, from
        which it is taken, and the model's own weights are put back. False when the folder has none.

        Raises:
            whatever `read_weights` raises for weights that do not fit the model (another run's adapter).
        """
        path = os.path.join(folder, EMA_DIR)
        state_path = os.path.join(path, EMA_STATE_NAME)
        if not os.path.isfile(state_path):
            return False
        with self.applied(), torch.no_grad():  # the model's own weights come back on exit
            read_weights(path)
            for shadow, parameter in zip(self.ema.shadow_params, self.parameters):
                shadow.copy_(parameter)
        with open(state_path, encoding="utf-8") as handle:
            self.ema.optimization_step = int(json.load(handle)["num_updates"])
        return True


class EMACallback(TrainerCallback):
    """Keeps a `WeightAverage` of the trained model through `transformers.Trainer`'s public hooks: built when training
    begins (from `resume_folder`'s average when resuming), updated at the end of every optimizer update, and copied
    into the model when training ends. `write_weights` and `read_weights` save and load the model's weights the way
    the trainer does (see `WeightAverage.save` and `load`)."""

    def __init__(self, decay: float, write_weights: WeightsIO, read_weights: WeightsIO) -> None:
        self.decay = decay
        self.write_weights = write_weights
        self.read_weights = read_weights
        self.average: WeightAverage | None = None
        self.resume_folder: str | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self.average = WeightAverage(model, self.decay)
        if self.resume_folder is not None and not self.average.load(self.resume_folder, self.read_weights):
            logger.warning(
                "%s holds no %s/ (it was saved without use_ema): the moving average starts from the resumed weights.",
                self.resume_folder,
                EMA_DIR,
            )

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.average.step()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.average.copy_to_model()

    @property
    def holds_average(self) -> bool:
        """Whether the model holds the average now: within `applied()`, and once training has ended."""
        return self.average is not None and self.average.in_model

    def applied(self) -> AbstractContextManager[None]:
        """The average in the model within this context, once training has begun; otherwise nothing changes."""
        return nullcontext() if self.average is None else self.average.applied()

    def save(self, folder: str) -> None:
        """Write the average into a checkpoint `folder` (`WeightAverage.save`), once training has begun."""
        if self.average is not None:
            self.average.save(folder, self.write_weights)
