"""The VAE side of a one-step generator: moving latents between the denoiser's space and the VAE's, as the pipelines
do, and the frozen fp32 copy that decodes for a half-precision VAE.

`OneStepGenerator.decode` and `encode_images` use these; the packing of latents (Flux) is the family's and stays on
the generator.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn


def latent_statistics(vae: nn.Module, latents: Tensor) -> tuple[Tensor, Tensor] | None:
    """The per-channel `(mean, std)` that some VAEs declare in their config (the SDXL pipeline applies them), each
    shaped `(1, C, 1, 1)` to broadcast over `latents` `(B, C, h, w)` and on its device and dtype; None when the VAE
    declares none."""
    config = vae.config
    mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
    if mean is None or std is None:
        return None
    shape = (1, latents.shape[1], 1, 1)
    return tuple(torch.tensor(v).view(shape).to(latents.device, latents.dtype) for v in (mean, std))


def unscale_latents(vae: nn.Module, latents: Tensor) -> Tensor:
    """Denoiser-space latents `(B, C, h, w)` in the VAE's space, in the pipelines' own order of operations: the
    declared statistics (SDXL), else divided by the scaling factor with the shift factor added (SD3, Flux)."""
    statistics = latent_statistics(vae, latents)
    if statistics is not None:
        return latents * statistics[1] / vae.config.scaling_factor + statistics[0]
    latents = latents / vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None)
    return latents if shift is None else latents + shift


def scale_latents(vae: nn.Module, latents: Tensor) -> Tensor:
    """VAE-space latents `(B, C, h, w)` in the denoiser's space: the inverse of :func:`unscale_latents`."""
    statistics = latent_statistics(vae, latents)
    if statistics is not None:
        return (latents - statistics[0]) * vae.config.scaling_factor / statistics[1]
    shift = getattr(vae.config, "shift_factor", None)
    return (latents if shift is None else latents - shift) * vae.config.scaling_factor


def fp32_vae(vae: nn.Module, fp32_copy: nn.Module | None) -> nn.Module:
    """A frozen fp32 copy of `vae` on `vae`'s current device: `fp32_copy` (moved there if the pipeline was moved) or,
    when None, a new one.

    The pipeline upcasts its fp16 VAE in place for the call; a copy is kept instead, because flipping the dtype of
    shared weights between a forward and its backward would corrupt the gradient.
    """
    device = next(vae.parameters()).device
    if fp32_copy is None:
        fp32_copy = copy.deepcopy(vae).to(torch.float32).eval().requires_grad_(False)
    if next(fp32_copy.parameters()).device != device:  # follow the pipeline when it is moved
        fp32_copy.to(device)
    return fp32_copy


def decoder_input(vae: nn.Module, latents: Tensor) -> Tensor:
    """Denoiser-space latents `(B, C, h, w)` as the VAE decodes them: on its device, in its dtype, unscaled. Keeps
    the graph when grad is enabled."""
    param = next(vae.parameters())
    return unscale_latents(vae, latents.to(device=param.device, dtype=param.dtype))


def decode_pixels(vae: nn.Module, latents: Tensor) -> Tensor:
    """The VAE's decode of denoiser-space latents `(B, C, h, w)` (`decoder_input` first), in the VAE's device and
    dtype: `(B, 3, H, W)` in [-1, 1], before the pipeline's post-processing. Keeps the graph when grad is enabled."""
    return vae.decode(decoder_input(vae, latents), return_dict=False)[0]


def encode_pixels(vae: nn.Module, pixels: Tensor) -> Tensor:
    """Denoiser-space latents `(B, C, h, w)` of pre-processed images `(B, 3, H, W)` in [-1, 1]: the posterior's mode
    (a deterministic autoencoder's latent), scaled, in the VAE's device and dtype."""
    param = next(vae.parameters())
    encoded = vae.encode(pixels.to(device=param.device, dtype=param.dtype))
    latents = encoded.latent_dist.mode() if hasattr(encoded, "latent_dist") else encoded.latent
    return scale_latents(vae, latents)
