"""JPEG (in)compressibility, the two toy rewards of DDPO (Black et al., 2023).

The score is the size of the image saved as a JPEG at quality 95, in kilobytes (1 kB = 1000 bytes): negated for
*compressibility* (flat, simple images score high) and as is for *incompressibility* (detailed, noisy images score
high). Pure PIL, no model, and inherently non-differentiable, which is exactly the kind of reward DrPO can use.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

from .base import ImageBatch, Reward, to_pil_images


def jpeg_size_kb(image, quality: int = 95) -> float:
    """Size in kB of ``image`` (a PIL image) encoded as a JPEG at ``quality``."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.tell() / 1000.0


class JpegIncompressibility(Reward):
    """JPEG size in kB: higher for images that compress badly (detail, texture, noise).

    Args:
        quality: JPEG quality used for the encoding (DDPO uses 95).
        batch_size: images per chunk (only bounds the PIL conversion of a tensor batch).
        name: name used in logs.
    """

    name = "jpeg_incompressibility"
    input_format = "pil"
    sign = 1.0

    def __init__(self, quality: int = 95, batch_size: int = 256, name: str | None = None) -> None:
        super().__init__(batch_size=batch_size, name=name)
        if not 1 <= quality <= 100:
            raise ValueError(f"JPEG quality must be in [1, 100], got {quality}.")
        self.quality = int(quality)

    def _score(self, images: ImageBatch, prompts: Sequence[str]) -> list[float]:
        return [self.sign * jpeg_size_kb(image, self.quality) for image in to_pil_images(images)]


class JpegCompressibility(JpegIncompressibility):
    """Negated JPEG size in kB: higher for images that compress well (flat colours, few edges)."""

    name = "jpeg_compressibility"
    sign = -1.0
