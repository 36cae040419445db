"""LoRA on a denoiser: building and injecting the adapter, switching it off to compute the base model, and keeping its
weights in fp32. `OneStepGenerator.add_lora`, `adapter_disabled` and `upcast_trainable_parameters` are these, applied
to the generator's unwrapped denoiser.

The PEFT layers are switched directly (not through diffusers' `disable_adapters`), which serves denoisers with
diffusers' adapter methods and PEFT-injected ones (PixArt's transformer) alike.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn


def tuner_layers(denoiser: nn.Module) -> list[nn.Module]:
    """The PEFT tuner layers (LoRA layers) injected anywhere in `denoiser`; empty when it holds no adapter."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in denoiser.modules() if isinstance(m, BaseTunerLayer)]


def adapters_enabled(denoiser: nn.Module) -> bool:
    """Whether any adapter layer of `denoiser` is switched on (False when it holds none)."""
    return any(not layer.disable_adapters for layer in tuner_layers(denoiser))


def check_no_loaded_adapter(denoiser: nn.Module) -> None:
    """Raise a `ValueError` naming the fixes when `denoiser` already holds a PEFT adapter (e.g. from the pipeline's
    `load_lora_weights`): a second adapter would switch the loaded one off, and the pipeline would silently serve the
    bare base."""
    loaded = list(getattr(denoiser, "peft_config", None) or {})
    if loaded:
        raise ValueError(
            f"The pipeline's denoiser already holds LoRA adapter(s) {loaded} (e.g. from `load_lora_weights`). To "
            "keep what it learned and train on top of it, fuse it first: `pipe.fuse_lora(); "
            "pipe.unload_lora_weights()`. To resume a DrPO run, load the bare base and pass "
            "`resume_from_checkpoint` to `train()`. To start fresh, call `pipe.unload_lora_weights()`."
        )


def lora_config(rank: int, alpha: float, target_modules: Sequence[str], dropout: float, **lora_kwargs: Any) -> Any:
    """A `peft.LoraConfig` with `r=rank`, `lora_alpha=alpha`, `target_modules`, `lora_dropout=dropout` and any further
    `LoraConfig` arguments (e.g. `init_lora_weights="gaussian"`)."""
    from peft import LoraConfig

    return LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=list(target_modules), lora_dropout=dropout, **lora_kwargs
    )


def inject_lora(denoiser: nn.Module, config: Any, adapter_name: str = "default") -> None:
    """Freeze every weight of `denoiser`, then add the adapter `config` (a PEFT config) as `adapter_name`: through
    diffusers' PEFT integration (`add_adapter`) where the denoiser has it, else with PEFT's `inject_adapter_in_model`
    (PixArt's transformer). Either way `denoiser.peft_config` records it, as loaders and savers expect."""
    denoiser.requires_grad_(False)
    if hasattr(denoiser, "add_adapter"):
        denoiser.add_adapter(config, adapter_name=adapter_name)
        return
    from peft import inject_adapter_in_model

    inject_adapter_in_model(config, denoiser, adapter_name=adapter_name)
    denoiser.peft_config = {**getattr(denoiser, "peft_config", {}), adapter_name: config}


@contextlib.contextmanager
def adapters_disabled(denoiser: nn.Module) -> Iterator[None]:
    """Context in which the adapter layers of `denoiser` that were enabled on entry are switched off; exactly those
    are switched back on at exit (also on an exception). Without adapter layers it changes nothing."""
    enabled = [layer for layer in tuner_layers(denoiser) if not layer.disable_adapters]
    for layer in enabled:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in enabled:
            layer.enable_adapters(True)


def upcast_half_parameters(parameters: Iterable[nn.Parameter]) -> None:
    """Put fp16/bf16 `parameters` (and their gradients) in fp32, in place: the same `Parameter` objects, so an
    optimizer holding them keeps them. Training them in half precision would lose small updates to rounding."""
    for param in parameters:
        if param.dtype in (torch.float16, torch.bfloat16):
            param.data = param.data.float()
            if param.grad is not None:
                param.grad = param.grad.float()
