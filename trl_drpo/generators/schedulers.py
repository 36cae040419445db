"""The single step of each supported scheduler, written out so that autograd sees it and no scheduler state
changes (docs/method.md §4)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


# --------------------------------------------------------------------------------------------------------------------
# Scheduler arithmetic of a single step
# --------------------------------------------------------------------------------------------------------------------


def _x0_from_sigma(prediction_type: str, sample: Tensor, model_output: Tensor, sigma: Tensor) -> Tensor:
    # Karras/Euler parametrisation: x_t = x0 + sigma * eps (no input scaling in `sample`).
    if prediction_type == "epsilon":
        return sample - sigma * model_output
    if prediction_type == "v_prediction":
        return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + sample / (sigma**2 + 1)
    return model_output  # "sample" / "original_sample"


def _euler_step(scheduler: Any, device: torch.device) -> Callable[[Tensor, Tensor], Tensor]:
    # EulerDiscreteScheduler.step (s_churn=0, the pipeline default) and EulerAncestralDiscreteScheduler.step (whose
    # noise term vanishes when the step ends at sigma 0), written out so that autograd sees it and no state changes.
    # The dtypes follow the scheduler's: `sample` is upcast to fp32 while `sigma * model_output` stays in the model's
    # dtype (a 0-d sigma does not promote), so fp16/bf16 results match the pipeline's bit for bit.
    sigma = scheduler.sigmas[0].to(device)
    sigma_next = scheduler.sigmas[1].to(device)
    if "Ancestral" in type(scheduler).__name__ and float(sigma_next) != 0.0:
        raise NotImplementedError(
            f"{type(scheduler).__name__} ends its single step at sigma={float(sigma_next)}, which adds fresh noise; "
            "a one-step generator needs a schedule that ends at sigma 0."
        )
    prediction_type = scheduler.config.prediction_type
    if prediction_type not in ("epsilon", "v_prediction", "sample", "original_sample"):
        raise ValueError(f"Unsupported prediction_type {prediction_type!r}; expected epsilon, v_prediction or sample.")

    def step(sample: Tensor, model_output: Tensor) -> Tensor:
        sample32 = sample.to(torch.float32)
        x0 = _x0_from_sigma(prediction_type, sample32, model_output, sigma)
        # With sigma_next = 0 this is x0 up to rounding; the derivative form is what the scheduler computes.
        prev_sample = sample32 + (sample32 - x0) / sigma * (sigma_next - sigma)
        return prev_sample.to(model_output.dtype)

    return step


def _ddim_step(scheduler: Any, device: torch.device) -> Callable[[Tensor, Tensor], Tensor]:
    # DDIMScheduler.step with eta=0 (the pipeline default) for the only step: x_t is projected onto the final
    # alpha (1, or alphas_cumprod[0] when set_alpha_to_one=False), the formula the authors hard-code for SD-Turbo.
    # Like the scheduler, it computes in the sample's dtype.
    config = scheduler.config
    if config.thresholding:
        raise NotImplementedError("DDIMScheduler with dynamic thresholding is not supported by OneStepGenerator.")
    if config.prediction_type not in ("epsilon", "v_prediction", "sample"):
        raise ValueError(f"Unsupported prediction_type {config.prediction_type!r}.")
    t = int(scheduler.timesteps[0])
    if t - config.num_train_timesteps // scheduler.num_inference_steps >= 0:
        raise NotImplementedError("DDIMScheduler's single step must end at t < 0 (the clean sample).")
    alpha = scheduler.alphas_cumprod[t].to(device)
    alpha_prev = scheduler.final_alpha_cumprod.to(device)
    beta = 1 - alpha

    def step(x: Tensor, out: Tensor) -> Tensor:
        if config.prediction_type == "epsilon":
            x0, eps = (x - beta**0.5 * out) / alpha**0.5, out
        elif config.prediction_type == "sample":
            x0, eps = out, (x - alpha**0.5 * out) / beta**0.5
        else:
            x0, eps = alpha**0.5 * x - beta**0.5 * out, alpha**0.5 * out + beta**0.5 * x
        if config.clip_sample:
            x0 = x0.clamp(-config.clip_sample_range, config.clip_sample_range)
        return alpha_prev**0.5 * x0 + (1 - alpha_prev) ** 0.5 * eps

    return step


SCHEDULER_STEPS: dict[str, Callable[[Any, torch.device], Callable[[Tensor, Tensor], Tensor]]] = {
    "EulerDiscreteScheduler": _euler_step,
    "EulerAncestralDiscreteScheduler": _euler_step,
    "DDIMScheduler": _ddim_step,
}
SUPPORTED_SCHEDULERS: tuple[str, ...] = tuple(SCHEDULER_STEPS)
"""Scheduler classes whose single step `OneStepGenerator.sample` reproduces differentiably."""


@dataclasses.dataclass
class SingleStep:
    """A private scheduler copy set to one step on a device, its timestep, and its differentiable step."""

    scheduler: Any
    timestep: Tensor
    step: Callable[[Tensor, Tensor], Tensor]

    @classmethod
    def build(cls, source: Any, device: torch.device) -> SingleStep:
        # A copy, because set_timesteps mutates the scheduler and the user's pipeline must keep working with
        # whatever number of steps they call it with.
        scheduler = type(source).from_config(source.config)
        if torch.device(device).type == "meta":
            # A meta denoiser (FLOP counting, shape checks) holds no values to read sigmas from; the schedule's 0-d
            # CPU tensors still act as scalars next to meta activations.
            device = torch.device("cpu")
        scheduler.set_timesteps(1, device=device)
        if hasattr(scheduler, "set_begin_index"):
            # Pins the step index to 0 so that scale_model_input never searches the timesteps (a device sync).
            scheduler.set_begin_index(0)
        step = SCHEDULER_STEPS[type(scheduler).__name__](scheduler, device)
        return cls(scheduler=scheduler, timestep=scheduler.timesteps[0], step=step)
