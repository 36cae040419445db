"""The diffusers pipeline classes the families serve, imported once without a warning a DrPO user cannot act on."""

import contextlib
from collections.abc import Iterator

from transformers.utils import logging as transformers_logging


@contextlib.contextmanager
def transformers_notices_off() -> Iterator[None]:
    """Only transformers' errors are logged inside the block (its verbosity restored after). Importing diffusers'
    pipelines imports its IP-adapter loader, which asks transformers for image processors that want torchvision and
    logs a notice about it; no image processor is used here, so a DrPO user could not act on it."""
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(verbosity)


with transformers_notices_off():
    from diffusers import (
        FluxPipeline,
        PixArtAlphaPipeline,
        PixArtSigmaPipeline,
        SanaSprintPipeline,
        StableDiffusion3Pipeline,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
    )

__all__ = [
    "transformers_notices_off",
    "FluxPipeline",
    "PixArtAlphaPipeline",
    "PixArtSigmaPipeline",
    "SanaSprintPipeline",
    "StableDiffusion3Pipeline",
    "StableDiffusionPipeline",
    "StableDiffusionXLPipeline",
]
