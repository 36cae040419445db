"""Decoding candidates for the rewards only: a tiny decoder and a smaller image for ranking.

DrPO uses the rewards only to rank each prompt's candidates (docs/method.md §3), so the images they score need only
be good enough to order the candidates the same way. `RankingDecoder` is what the step decodes candidates with before
scoring them: the pipeline's own VAE by default, or a diffusers `AutoencoderTiny` (TAESD-style,
`DrPOConfig.ranking_vae`), and optionally an antialiased resize to `DrPOConfig.ranking_resolution` pixels.
Evaluation, logged images, sample grids and the model card never go through it: they use the pipeline's full decode
(`OneStepGenerator.decode`).
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor


if TYPE_CHECKING:  # the config imports this module, and stays light to import
    from .generators import OneStepGenerator


TINY_VAE_CLASS = "AutoencoderTiny"

RANKING_VAE_FIX = (
    "Set ranking_vae to a folder written by `AutoencoderTiny.save_pretrained` or the Hub id of a diffusers "
    "AutoencoderTiny made for your pipeline's VAE (madebyollin/taesd for SD 1.x/2.x and SD-Turbo, madebyollin/taesdxl "
    "for SDXL and SDXL-Turbo), or to None to rank with the pipeline's own VAE."
)
"""What every `ranking_vae` error tells the user to do."""


def _looks_local(source: str) -> bool:
    # A Hub id is "name" or "owner/name"; anything else can only be meant as a local folder.
    return os.path.isabs(source) or source.startswith((".", "~")) or source.count("/") > 1 or "\\" in source


def check_ranking_vae_source(source: str) -> None:
    """Raise a `ValueError` naming the fix when `source` cannot be an `AutoencoderTiny`, as far as can be told without
    loading it: an empty name, a file, a local-looking path that does not exist, a folder without a diffusers config,
    or a folder holding another class. A name that may be a Hub id is checked when the trainer loads it."""
    if not isinstance(source, str) or not source.strip():
        raise ValueError(
            f"DrPOConfig: ranking_vae must be None or a non-empty path or Hub id, got {source!r}. {RANKING_VAE_FIX}"
        )
    path = os.path.expanduser(source)
    if os.path.isfile(path):
        raise ValueError(f"DrPOConfig: ranking_vae {source!r} is a file, not a model folder. {RANKING_VAE_FIX}")
    if os.path.isdir(path):
        config_file = os.path.join(path, "config.json")
        if not os.path.isfile(config_file):
            raise ValueError(f"DrPOConfig: ranking_vae folder {source!r} has no config.json. {RANKING_VAE_FIX}")
        with open(config_file, encoding="utf-8") as handle:
            class_name = json.load(handle).get("_class_name")
        if class_name != TINY_VAE_CLASS:
            raise ValueError(
                f"DrPOConfig: ranking_vae {source!r} holds a {class_name or 'model of unknown class'}, not an "
                f"{TINY_VAE_CLASS}. {RANKING_VAE_FIX}"
            )
        return
    if _looks_local(source):
        raise ValueError(f"DrPOConfig: ranking_vae folder {source!r} does not exist. {RANKING_VAE_FIX}")


def load_tiny_vae(source: str, generator: OneStepGenerator) -> torch.nn.Module:
    """The `AutoencoderTiny` at `source` (a local folder or a Hub id), frozen, on the pipeline VAE's device and in its
    dtype, after checking that it decodes this pipeline's latents: same latent channels and the same pixel scale.

    Raises:
        ValueError: naming the fix (`RANKING_VAE_FIX`) when it cannot be loaded, is another class, or does not fit.
    """
    from diffusers import AutoencoderTiny

    check_ranking_vae_source(source)
    try:
        config = AutoencoderTiny.load_config(source)
    except Exception as err:
        raise ValueError(f"ranking_vae {source!r} could not be loaded ({err}). {RANKING_VAE_FIX}") from err
    class_name = config.get("_class_name")
    if class_name != TINY_VAE_CLASS:
        raise ValueError(f"ranking_vae {source!r} holds a {class_name}, not an {TINY_VAE_CLASS}. {RANKING_VAE_FIX}")
    channels, expected = int(config["latent_channels"]), int(generator.vae.config.latent_channels)
    if channels != expected:
        raise ValueError(
            f"ranking_vae {source!r} decodes {channels}-channel latents; the pipeline's VAE makes {expected}. "
            f"{RANKING_VAE_FIX}"
        )
    blocks = config.get("decoder_block_out_channels") or config.get("block_out_channels")
    scale = int(config.get("upsampling_scaling_factor", 2)) ** (len(blocks) - 1)
    if scale != generator.vae_scale_factor:
        raise ValueError(
            f"ranking_vae {source!r} upsamples latents {scale}x; the pipeline's VAE {generator.vae_scale_factor}x. "
            f"{RANKING_VAE_FIX}"
        )
    param = next(generator.vae.parameters())
    try:
        vae = AutoencoderTiny.from_pretrained(source, dtype=param.dtype)
    except Exception as err:
        raise ValueError(f"ranking_vae {source!r} could not be loaded ({err}). {RANKING_VAE_FIX}") from err
    return vae.to(param.device).eval().requires_grad_(False)


def resize_for_ranking(images: Tensor, resolution: int | None) -> Tensor:
    """`(B, 3, H, W)` images in [0, 1] resized, antialiased (bilinear), to `resolution` pixels a side; unchanged when
    `resolution` is None or already their size."""
    if resolution is None or tuple(images.shape[-2:]) == (resolution, resolution):
        return images
    size = (resolution, resolution)
    return F.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)


class RankingDecoder:
    """Decodes candidates' UNet-space latents into the images the rewards rank, without gradient.

    Args:
        generator: the pipeline's generator (its full decode, its image post-processing).
        vae: an `AutoencoderTiny` decoding the pipeline's latents (`load_tiny_vae`), or None for the pipeline's VAE.
        resolution: the side, in pixels, the images are resized to (antialiased); None keeps the decoder's size.

    With a tiny VAE the latents are unscaled exactly as diffusers' SD and SDXL pipelines do when the tiny VAE is their
    `pipe.vae`: divided by the tiny VAE's own `scaling_factor` (1.0 for TAESD, which was trained on the scaled
    latents), never by the full VAE's, plus its `shift_factor` if it has one; packed (FLUX) latents are unpacked
    first. The output goes through the pipeline's image post-processing. The SDXL
    invisible watermark, a post-process that does not change a ranking, is not applied to ranking images.
    """

    def __init__(self, generator: OneStepGenerator, vae: torch.nn.Module | None = None, resolution: int | None = None):
        self.generator = generator
        self.vae = vae
        self.resolution = resolution

    @classmethod
    def from_config(cls, generator: OneStepGenerator, ranking_vae: str | None, ranking_resolution: int | None):
        """From `DrPOConfig.ranking_vae` and `DrPOConfig.ranking_resolution` (the tiny VAE loaded and checked)."""
        vae = None if ranking_vae is None else load_tiny_vae(ranking_vae, generator)
        return cls(generator, vae, ranking_resolution)

    @property
    def is_full(self) -> bool:
        """Whether the rewards see exactly the pipeline's full decode."""
        return self.vae is None and self.resolution is None

    def _decode_tiny(self, latents: Tensor) -> Tensor:
        param = next(self.vae.parameters())
        # Packed latents (FLUX) back on the VAE's grid first; then the tiny VAE's own scale and shift, as a pipeline
        # whose `vae` it were would apply them.
        latents = self.generator.unpack_latents(latents).to(device=param.device, dtype=param.dtype)
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        image = self.vae.decode(latents / self.vae.config.scaling_factor + shift, return_dict=False)[0]
        return self.generator.pipeline.image_processor.postprocess(image, output_type="pt").to(torch.float32)

    @torch.no_grad()
    def __call__(self, latents: Tensor, chunk_size: int | None = None) -> Tensor:
        """`(B, 3, H, W)` float32 images in [0, 1] for the rewards, `chunk_size` latents decoded at a time."""
        if self.vae is None:
            images = self.generator.decode(latents, chunk_size=chunk_size)
        else:
            images = torch.cat([self._decode_tiny(chunk) for chunk in latents.split(chunk_size or latents.shape[0])])
        return resize_for_ranking(images, self.resolution)
