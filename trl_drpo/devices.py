"""Where models run and in what precision: the default device and dtype names, for the CLI and the rewards."""

from __future__ import annotations

import torch


DTYPE_ALIASES = {"fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp32": "float32", "float": "float32"}
"""Short names accepted for dtypes besides torch's own (``float16``, ``torch.bfloat16``, ...)."""


def default_device() -> torch.device:
    """The current CUDA device when there is one (each process's own under Accelerate), else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """A `torch.dtype` from its name (``"float16"``, ``"torch.bfloat16"``, or a `DTYPE_ALIASES` short name), or the
    dtype itself. Raises `ValueError` naming the accepted names for anything else."""
    if isinstance(name, torch.dtype):
        return name
    key = str(name).lower().removeprefix("torch.")
    dtype = getattr(torch, DTYPE_ALIASES.get(key, key), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"Unknown dtype {name!r}; use e.g. 'float32', 'float16' or 'bfloat16'.")
    return dtype
