"""What the transformer families share: the denoiser is `pipe.transformer`, and the `denoiser` feature map reads
image tokens."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import OneStepGenerator


class TransformerGenerator(OneStepGenerator):
    """A family whose denoiser is a diffusion transformer (`pipe.transformer`)."""

    denoiser_attribute = "transformer"
    image_stream_last: bool = False
    """Whether the blocks return `(text stream, image stream)` (MMDiT blocks of SD3 and Flux)."""

    def block_image_features(self, output: Any) -> Tensor:
        if isinstance(output, (tuple, list)):
            return output[-1] if self.image_stream_last else output[0]
        return output

    @staticmethod
    def batch_timestep(value: float, latents: Tensor) -> Tensor:
        """`value` as a float `(batch,)` tensor on the latents' device, the form the transformers take."""
        return torch.full((latents.shape[0],), float(value), device=latents.device, dtype=torch.float32)
