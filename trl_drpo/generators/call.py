"""The pipeline's own `__call__` without its `torch.no_grad()`, run with the trainer's denoiser swapped in.

A diffusers pipeline's `__call__` is decorated with `torch.no_grad()`; `functools.wraps` leaves the undecorated
function as `__wrapped__`. Calling that with `latents=noise` and `output_type="latent"` runs exactly the computation
`pipe(...)` serves (scheduler set-up, input scaling, guidance handling, the step) while autograd records it, so a
gradient reaches the LoRA weights with no step arithmetic re-written here.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from torch import nn


CALL_ARGUMENTS_SET_BY_THE_GENERATOR = frozenset(
    {
        "prompt",
        "prompt_2",
        "prompt_3",
        "prompt_embeds",
        "pooled_prompt_embeds",
        "prompt_attention_mask",
        "latents",
        "output_type",
        "return_dict",
        "generator",
        "height",
        "width",
    }
)
"""Arguments of the pipeline call that the generator fills in itself: the user's `pipeline_call_kwargs` may not set
them (the image size comes from `resolution`)."""

# Arguments of `encode_prompt` that the call itself owns: never copied from the call's settings.
_ENCODE_OWN = frozenset(
    {
        "self",
        "prompt",
        "prompt_2",
        "prompt_3",
        "device",
        "num_images_per_prompt",
        "do_classifier_free_guidance",
        "lora_scale",
        "prompt_embeds",
        "pooled_prompt_embeds",
        "prompt_attention_mask",
    }
)


def unwrap_module(module: nn.Module) -> nn.Module:
    """The model inside DDP/FSDP-style `.module` wrappers and `torch.compile`'s `_orig_mod`."""
    while True:
        if hasattr(module, "_orig_mod") and isinstance(module._orig_mod, nn.Module):
            module = module._orig_mod
        elif hasattr(module, "module") and isinstance(module.module, nn.Module):
            module = module.module
        else:
            return module


def undecorated_call(pipeline: Any) -> Callable[..., Any]:
    """`type(pipeline).__call__` without its `torch.no_grad()` decorator (the function itself when undecorated)."""
    call = type(pipeline).__call__
    return getattr(call, "__wrapped__", call)


def call_parameters(pipeline: Any) -> Mapping[str, inspect.Parameter]:
    """The parameters of the pipeline's call, by name."""
    return inspect.signature(undecorated_call(pipeline)).parameters


def missing_call_arguments(pipeline: Any) -> list[str]:
    """What a pipeline's call lacks for one-step training through it: `latents` and `output_type` ("latent")."""
    parameters = call_parameters(pipeline)
    return [name for name in ("latents", "output_type") if name not in parameters]


def check_call_kwargs(pipeline: Any, call_kwargs: Mapping[str, Any]) -> None:
    """Raise `ValueError` naming any key the pipeline's call does not take, or one the generator sets itself."""
    parameters = call_parameters(pipeline)
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    owned = sorted(CALL_ARGUMENTS_SET_BY_THE_GENERATOR & set(call_kwargs))
    if owned:
        raise ValueError(
            f"pipeline_call_kwargs may not set {owned}: the trainer passes the prompts' embeddings, the noise as "
            "`latents`, `output_type='latent'` and its own seeded `generator`; set the image size with `resolution`."
        )
    unknown = sorted(key for key in call_kwargs if key not in parameters)
    if unknown and not takes_any:
        raise ValueError(
            f"{type(pipeline).__name__}.__call__ takes no argument(s) {unknown}; remove them from "
            f"pipeline_call_kwargs. It takes: {', '.join(name for name in parameters if name != 'self')}."
        )


def encode_kwargs(pipeline: Any, call_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The arguments of `pipeline.encode_prompt` that the call would pass from its own settings (e.g.
    `max_sequence_length`, `clean_caption`, `complex_human_instruction`, `clip_skip`): each from `call_kwargs`, else
    the call's default, so that embeddings computed ahead equal those `pipe(prompt, ...)` computes."""
    encode = getattr(pipeline, "encode_prompt", None)
    if encode is None:
        return {}
    call = call_parameters(pipeline)
    out = {}
    for name, parameter in inspect.signature(encode).parameters.items():
        if name in _ENCODE_OWN or name.startswith("negative_") or name not in call:
            continue
        if name in call_kwargs:
            out[name] = call_kwargs[name]
        elif call[name].default is not inspect.Parameter.empty and call[name].default != parameter.default:
            out[name] = call[name].default
    return out


class _DenoiserView:
    """What the pipeline sees as its denoiser while a wrapped module (DDP, `torch.compile`) is swapped in: calls go
    to the wrapper (so that its gradient hooks run), attribute reads (`config`, `dtype`, `cache_context`, ...) to the
    model inside it, which wrappers do not expose."""

    def __init__(self, wrapper: nn.Module) -> None:
        self._wrapper = wrapper
        self._module = unwrap_module(wrapper)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._wrapper(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


@contextlib.contextmanager
def swapped_component(pipeline: Any, name: str, module: nn.Module) -> Iterator[None]:
    """`pipeline.<name>` is `module` for the duration, then the original again.

    Set through `object.__setattr__`: `DiffusionPipeline.__setattr__` would also rewrite the pipeline's registered
    config (and what `save_pretrained` writes) to the swapped-in module.
    """
    original = getattr(pipeline, name)
    if module is original:
        yield
        return
    stand_in = module if unwrap_module(module) is module else _DenoiserView(module)
    object.__setattr__(pipeline, name, stand_in)
    try:
        yield
    finally:
        object.__setattr__(pipeline, name, original)


@contextlib.contextmanager
def progress_bar_disabled(pipeline: Any) -> Iterator[None]:
    """No progress bar for the trainer's calls; the user's own setting is restored afterwards."""
    if not hasattr(pipeline, "set_progress_bar_config"):
        yield
        return
    # diffusers keeps the setting in this attribute and has no getter for it.
    saved = dict(getattr(pipeline, "_progress_bar_config", {}))
    pipeline.set_progress_bar_config(**{**saved, "disable": True})
    try:
        yield
    finally:
        pipeline.set_progress_bar_config(**saved)
