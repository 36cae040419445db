"""Image grids for logs and model cards, built with diffusers' `make_image_grid`."""

from __future__ import annotations

import math

import torch
from PIL import Image


def image_grid(images: torch.Tensor, columns: int | None = None, min_cell: int = 0) -> Image.Image:
    """Tile ``(N, 3, H, W)`` float images in [0, 1] into one PIL image, ``columns`` per row (default: about square),
    the last row padded with black cells. Images narrower than ``min_cell`` pixels are upscaled (nearest, so that
    small images stay sharp) by a whole factor. Raises `ValueError` for anything but a batch of RGB images."""
    from diffusers.utils import make_image_grid

    from .scoring import to_pil

    if images.ndim != 4 or images.shape[1] != 3 or not len(images):
        raise ValueError(f"Images must be a non-empty (N, 3, H, W) batch, got {tuple(images.shape)}.")
    scale = max(1, math.ceil(min_cell / images.shape[-1]))
    if scale > 1:
        images = torch.nn.functional.interpolate(images.float(), scale_factor=scale, mode="nearest")
    n = len(images)
    columns = min(columns or math.ceil(math.sqrt(n)), n)
    rows = math.ceil(n / columns)
    cells = to_pil(images)
    cells += [Image.new("RGB", cells[0].size)] * (rows * columns - n)
    return make_image_grid(cells, rows=rows, cols=columns)


def save_image_grid(images: torch.Tensor, path: str, columns: int | None = None, min_cell: int = 128) -> None:
    """Save ``image_grid(images, columns, min_cell)`` as a PNG at `path`."""
    image_grid(images, columns, min_cell).save(path)
