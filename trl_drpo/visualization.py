"""Image grids and reward curves for logs, model cards and the demo. Pure torch + PIL."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from PIL import Image, ImageDraw


def image_grid(images: torch.Tensor, columns: int | None = None, padding: int = 2) -> torch.Tensor:
    """Tile ``(N, 3, H, W)`` images in [0, 1] into one ``(3, H', W')`` image, ``columns`` per row (default:
    about square), separated by ``padding`` white pixels."""
    if images.ndim != 4:
        raise ValueError(f"Images must be (N, C, H, W), got {tuple(images.shape)}.")
    n, c, h, w = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    grid = torch.ones(c, rows * (h + padding) + padding, columns * (w + padding) + padding, dtype=images.dtype)
    for i, image in enumerate(images.detach().cpu()):
        top, left = padding + (i // columns) * (h + padding), padding + (i % columns) * (w + padding)
        grid[:, top : top + h, left : left + w] = image
    return grid


def save_image_grid(images: torch.Tensor, path: str, columns: int | None = None, min_cell: int = 128) -> None:
    """Save ``image_grid(images)`` as a PNG, upscaling small images (nearest) so each cell is at least
    ``min_cell`` pixels wide."""
    from .scoring import to_pil

    scale = max(1, math.ceil(min_cell / images.shape[-1]))
    if scale > 1:
        images = torch.nn.functional.interpolate(images.float(), scale_factor=scale, mode="nearest")
    to_pil(image_grid(images, columns)[None])[0].save(path)


def plot_curve(
    series: dict[str, Sequence[tuple[float, float]]], path: str, title: str = "", size: tuple[int, int] = (640, 400)
) -> None:
    """Draw ``{label: [(x, y), ...]}`` as line plots into a PNG with PIL (no plotting library needed)."""
    width, height = size
    margin = 50
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    points = [p for values in series.values() for p in values]
    if not points:
        raise ValueError("Nothing to plot.")
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1

    def to_px(x: float, y: float) -> tuple[float, float]:
        return (
            margin + (x - x0) / (x1 - x0) * (width - 2 * margin),
            height - margin - (y - y0) / (y1 - y0) * (height - 2 * margin),
        )

    draw.rectangle([margin, margin, width - margin, height - margin], outline="black")
    draw.text((margin, 10), title, fill="black")
    draw.text((margin, height - margin + 8), f"{x0:g}", fill="black")
    draw.text((width - margin - 30, height - margin + 8), f"{x1:g}", fill="black")
    draw.text((4, height - margin - 10), f"{y0:.3g}", fill="black")
    draw.text((4, margin), f"{y1:.3g}", fill="black")
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"]
    for i, (label, values) in enumerate(series.items()):
        colour = colours[i % len(colours)]
        pixels = [to_px(x, y) for x, y in values]
        if len(pixels) > 1:
            draw.line(pixels, fill=colour, width=2)
        for px, py in pixels:
            draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=colour)
        draw.text((width - margin - 150, margin + 6 + 14 * i), label, fill=colour)
    image.save(path)
