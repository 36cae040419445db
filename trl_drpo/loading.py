"""Loading a text-to-image pipeline by name, as `trl-drpo` and the example scripts do: a Hub id or local folder through
diffusers, or one of the offline models the package serves itself (`BUILTIN_MODELS`), in the dtype a name selects."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any


if TYPE_CHECKING:
    import torch


BUILTIN_MODELS = {
    "trl-drpo/tiny-sd": "trl_drpo.tiny_pipelines:tiny_sd_pipeline",
    "trl-drpo/tiny-sdxl": "trl_drpo.tiny_pipelines:tiny_sdxl_pipeline",
    "trl-drpo/tiny-flux": "trl_drpo.tiny_pipelines:tiny_flux_pipeline",
    "trl-drpo/tiny-sana": "trl_drpo.tiny_pipelines:tiny_sana_sprint_pipeline",
    "trl-drpo/digits": "trl_drpo.worlds.digits:load_pipeline",
}
"""Model names served offline by the package: the tiny random pipelines of `trl_drpo.tiny_pipelines` (tests and CPU
smoke runs) and the digit world's pretrained base (`trl_drpo.worlds.digits`). Values: the builders' import paths."""


def resolve_dtype(
    name: str | None, *, fp16: bool = False, bf16: bool = False, device: str | None = None
) -> torch.dtype:
    """A `torch.dtype` from a name; ``"auto"`` gives the mixed-precision dtype when `fp16` / `bf16` is set, else
    float16 on a CUDA `device` (for inference) and float32 otherwise."""
    import torch

    name = (name or "auto").lower().removeprefix("torch.")
    if name == "auto":
        if fp16:
            return torch.float16
        if bf16:
            return torch.bfloat16
        return torch.float16 if device is not None and str(device).startswith("cuda") else torch.float32
    from .devices import parse_dtype

    try:
        return parse_dtype(name)
    except ValueError:
        raise ValueError(f"Unknown torch_dtype {name!r}: use auto, float32, float16 or bfloat16.") from None


def load_pipeline(
    model_name_or_path: str,
    torch_dtype: torch.dtype | None = None,
    variant: str | None = None,
    revision: str | None = None,
) -> Any:
    """Load a diffusers text-to-image pipeline from a Hub id or a local folder, or the offline one a name of
    `BUILTIN_MODELS` selects. The progress bar is disabled: DrPO pipelines run a single step."""
    if model_name_or_path in BUILTIN_MODELS:
        import importlib

        import torch

        module, builder = BUILTIN_MODELS[model_name_or_path].split(":")
        pipe = getattr(importlib.import_module(module), builder)()  # float32 weights
        return pipe.to(dtype=torch_dtype) if torch_dtype not in (None, torch.float32) else pipe
    from diffusers import DiffusionPipeline

    kwargs: dict[str, Any] = {"dtype": torch_dtype, "revision": revision}
    if variant:
        kwargs["variant"] = variant
    pipe = DiffusionPipeline.from_pretrained(model_name_or_path, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe
