"""The diffusers pipeline classes the families serve, imported once without a warning a DrPO user cannot act on."""

from transformers.utils import logging as transformers_logging


# Importing diffusers' pipelines imports its IP-adapter loader, which asks transformers for image processors that want
# torchvision and logs a warning about it (no image processor is used here).
_verbosity = transformers_logging.get_verbosity()
transformers_logging.set_verbosity_error()
try:
    from diffusers import (
        FluxPipeline,
        PixArtAlphaPipeline,
        PixArtSigmaPipeline,
        SanaSprintPipeline,
        StableDiffusion3Pipeline,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
    )
finally:
    transformers_logging.set_verbosity(_verbosity)

__all__ = [
    "FluxPipeline",
    "PixArtAlphaPipeline",
    "PixArtSigmaPipeline",
    "SanaSprintPipeline",
    "StableDiffusion3Pipeline",
    "StableDiffusionPipeline",
    "StableDiffusionXLPipeline",
]
