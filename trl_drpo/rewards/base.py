"""Shared machinery of the built-in rewards: image conversion, safe checkpoint loading, lazy model placement.

Every built-in reward follows the trainer's call convention: ``reward(images, prompts) -> list[float]`` with one
finite score per image, where ``images`` is a list of PIL images or a float tensor ``(B, 3, H, W)`` in [0, 1]. Model
rewards set ``input_format = "pt"`` so the trainer can hand them the decoded tensor directly (no uint8 round trip, no
PIL conversion); they accept PIL images too. Rewards only rank candidates, so everything runs under
`torch.inference_mode` and nothing is ever differentiated.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from ..devices import default_device, parse_dtype
from ..scoring import to_pil


ImageBatch = Union[Sequence[Image.Image], Sequence[torch.Tensor], Sequence[np.ndarray], torch.Tensor, np.ndarray]
"""What a reward accepts: PIL images, (3, H, W) tensors, (H, W, 3) uint8 arrays, or a (B, 3, H, W) tensor in [0, 1]."""


# ---------------------------------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------------------------------


def _pil_to_tensor(image: Image.Image) -> torch.Tensor:
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


def _as_chw_float(image: Any) -> torch.Tensor:
    """One image of any accepted kind -> a float (3, H, W) tensor in [0, 1]."""
    if isinstance(image, Image.Image):
        return _pil_to_tensor(image)
    if isinstance(image, np.ndarray):
        # numpy images are (H, W, C), the PIL / diffusers "np" layout.
        tensor = torch.from_numpy(np.ascontiguousarray(image))
        tensor = tensor.permute(2, 0, 1) if tensor.ndim == 3 and tensor.shape[-1] in (1, 3, 4) else tensor
    elif isinstance(image, torch.Tensor):
        tensor = image
    else:
        raise TypeError(f"Unsupported image type {type(image).__name__}; pass PIL images or a (B, 3, H, W) tensor.")
    if tensor.ndim != 3:
        raise ValueError(f"Expected one image of shape (3, H, W), got shape {tuple(tensor.shape)}.")
    if tensor.dtype == torch.uint8:
        tensor = tensor.float() / 255.0
    tensor = tensor.float()
    if tensor.shape[0] == 1:
        tensor = tensor.expand(3, -1, -1)
    elif tensor.shape[0] == 4:
        tensor = tensor[:3]
    return tensor.clamp(0.0, 1.0)


def iter_pixel_tensors(images: ImageBatch) -> Iterator[torch.Tensor]:
    """Yield each image as a float ``(3, H, W)`` tensor in [0, 1], on the device it already lives on."""
    if isinstance(images, (torch.Tensor, np.ndarray)) and images.ndim == 4:
        if isinstance(images, np.ndarray):
            images = list(images)
        else:
            if images.dtype == torch.uint8:
                images = images.float() / 255.0
            for image in images.float().clamp(0.0, 1.0):
                yield image
            return
    for image in images:
        yield _as_chw_float(image)


def to_pil_images(images: ImageBatch) -> list[Image.Image]:
    """Images of any accepted kind -> RGB PIL images (uint8 rounding, as diffusers pipelines do)."""
    if isinstance(images, Sequence) and all(isinstance(image, Image.Image) for image in images):
        return [image.convert("RGB") for image in images]
    return [to_pil(tensor[None])[0] for tensor in iter_pixel_tensors(images)]


def num_images(images: ImageBatch) -> int:
    """Number of images in a batch of any accepted kind."""
    return int(images.shape[0]) if isinstance(images, (torch.Tensor, np.ndarray)) and images.ndim == 4 else len(images)


def slice_images(images: ImageBatch, start: int, stop: int) -> ImageBatch:
    """``images[start:stop]`` for every accepted kind (a tensor batch stays a tensor)."""
    if isinstance(images, (torch.Tensor, np.ndarray, list)):
        return images[start:stop]
    return list(images)[start:stop]


# PIL resampling filter ids (as stored in image processor configs) -> torch interpolation modes.
_RESAMPLE_MODES = {0: "nearest", 2: "bilinear", 3: "bicubic"}


def _interpolate(image: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    if mode == "nearest":
        return F.interpolate(image, size=size, mode="nearest")
    # Antialiased filters follow PIL's resampling; clamp because bicubic overshoots and PIL clips to uint8 too.
    return F.interpolate(image, size=size, mode=mode, align_corners=False, antialias=True).clamp(0.0, 1.0)


def resize_center_crop(
    image: torch.Tensor,
    shortest_edge: int | None,
    crop_size: tuple[int, int],
    mode: str = "bicubic",
) -> torch.Tensor:
    """CLIP-style geometry on a ``(B, 3, H, W)`` tensor: resize the short side to ``shortest_edge`` (keeping the
    aspect ratio, with the processor's floor rule for the long side), then center-crop to ``crop_size``. With
    ``shortest_edge=None`` the image is resized straight to ``crop_size`` (processors without a crop, e.g. SigLIP).

    Matches the `transformers` image processors up to interpolation round-off. It runs in torch so that the
    trainer's decoded GPU tensors are scored without a round trip through PIL (and without torchvision).
    """
    crop_h, crop_w = crop_size
    if shortest_edge is None:
        return _interpolate(image, (crop_h, crop_w), mode)
    height, width = image.shape[-2:]
    if height <= width:
        new_hw = (shortest_edge, int(shortest_edge * width / height))
    else:
        new_hw = (int(shortest_edge * height / width), shortest_edge)
    image = _interpolate(image, new_hw, mode)
    height, width = image.shape[-2:]
    if crop_h > height or crop_w > width:  # a crop larger than the image: pad with zeros, as the processors do
        pad_h, pad_w = max(crop_h - height, 0), max(crop_w - width, 0)
        image = F.pad(image, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        height, width = image.shape[-2:]
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    return image[..., top : top + crop_h, left : left + crop_w]


def _per_channel(values: Any) -> tuple[float, float, float]:
    values = [float(v) for v in (values if isinstance(values, (list, tuple)) else [values])]
    return tuple(values * 3) if len(values) == 1 else tuple(values)


class ClipStylePreprocessor:
    """Resize, center-crop and normalise images for a CLIP-like vision tower, entirely in torch.

    Args:
        shortest_edge: length of the image's short side before cropping; ``None`` resizes straight to
            ``crop_size``.
        crop_size: ``(height, width)`` of the output (defaults to a square of ``shortest_edge``).
        mean, std: per-channel normalisation.
        mode: interpolation, ``"bicubic"`` (CLIP, BLIP), ``"bilinear"`` or ``"nearest"``.
    """

    def __init__(
        self,
        shortest_edge: int | None = 224,
        crop_size: tuple[int, int] | None = None,
        mean: Sequence[float] | float = OPENAI_CLIP_MEAN,
        std: Sequence[float] | float = OPENAI_CLIP_STD,
        mode: str = "bicubic",
    ) -> None:
        if shortest_edge is None and crop_size is None:
            raise ValueError("Give shortest_edge, crop_size or both.")
        self.shortest_edge = int(shortest_edge) if shortest_edge is not None else None
        self.crop_size = tuple(crop_size) if crop_size is not None else (self.shortest_edge, self.shortest_edge)
        self.mean = torch.tensor(_per_channel(mean), dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(_per_channel(std), dtype=torch.float32).view(1, 3, 1, 1)
        self.mode = mode

    @classmethod
    def from_image_processor(cls, processor: Any) -> ClipStylePreprocessor:
        """Read the geometry, filter and normalisation of a `transformers` image processor (CLIP, BLIP, SigLIP)."""

        def field(container: Any, key: str) -> Any:
            if container is None or isinstance(container, int):
                return container if key == "shortest_edge" else None  # legacy configs store `size: 224`
            return container.get(key) if isinstance(container, Mapping) else getattr(container, key, None)

        size, crop = getattr(processor, "size", None), getattr(processor, "crop_size", None)
        shortest = field(size, "shortest_edge")
        crop_hw = None
        if getattr(processor, "do_center_crop", True) and crop is not None:
            crop_hw = (crop, crop) if isinstance(crop, int) else (field(crop, "height"), field(crop, "width"))
        if crop_hw is None or None in crop_hw:
            crop_hw = (field(size, "height") or shortest or 224, field(size, "width") or shortest or 224)
        resample = getattr(processor, "resample", 3)
        return cls(
            shortest_edge=shortest,
            crop_size=crop_hw,
            mean=getattr(processor, "image_mean", None) or OPENAI_CLIP_MEAN,
            std=getattr(processor, "image_std", None) or OPENAI_CLIP_STD,
            mode=_RESAMPLE_MODES.get(int(getattr(resample, "value", resample) or 3), "bicubic"),
        )

    def __call__(self, images: ImageBatch, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
        """Images of any accepted kind -> normalised ``pixel_values`` of shape ``(B, 3, crop_h, crop_w)``."""
        if isinstance(images, torch.Tensor) and images.ndim == 4:
            # One resize for the whole batch: the common case of the trainer's decoded tensor.
            batch = images.to(device=device)
            batch = (batch.float() / 255.0 if batch.dtype == torch.uint8 else batch.float()).clamp(0.0, 1.0)
            pixels = resize_center_crop(batch, self.shortest_edge, self.crop_size, self.mode)
        else:  # images may differ in size: bring each to the crop size, then stack
            pixels = torch.cat(
                [
                    resize_center_crop(image.to(device)[None], self.shortest_edge, self.crop_size, self.mode)
                    for image in iter_pixel_tensors(images)
                ]
            )
        pixels = (pixels - self.mean.to(pixels.device)) / self.std.to(pixels.device)
        return pixels.to(dtype=dtype)


# ---------------------------------------------------------------------------------------------------------------------
# Files and checkpoints
# ---------------------------------------------------------------------------------------------------------------------


def strip_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Remove ``prefix`` from every key that has it (e.g. ``"module."`` left by DistributedDataParallel)."""
    return {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in state_dict.items()}


def resolve_file(
    model_name_or_path: str | os.PathLike,
    filenames: Sequence[str],
    hub_kwargs: Mapping[str, Any] | None = None,
) -> str:
    """Find a weights/config file: a local file, a file named in ``filenames`` inside a local directory, or the
    first of ``filenames`` that exists in a Hugging Face Hub repository of that id (downloaded to the Hub cache).

    Raises:
        FileNotFoundError: none of the names exist there.
    """
    location = os.fspath(model_name_or_path)
    if os.path.isfile(location):
        return location
    if os.path.isdir(location):
        for filename in filenames:
            candidate = os.path.join(location, filename)
            if os.path.isfile(candidate):
                return candidate
        raise FileNotFoundError(f"None of {list(filenames)} found in the directory {location!r}.")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    last_error: Exception | None = None
    for filename in filenames:
        try:
            return hf_hub_download(location, filename, **dict(hub_kwargs or {}))
        except EntryNotFoundError as err:  # not in the repo (or not cached, offline): try the next candidate name
            last_error = err
    raise FileNotFoundError(
        f"None of {list(filenames)} found in the Hugging Face Hub repository {location!r} (last error: {last_error})."
    ) from last_error


def load_json(path: str) -> dict[str, Any]:
    """Read a JSON config file."""
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


# ---------------------------------------------------------------------------------------------------------------------
# Rewards
# ---------------------------------------------------------------------------------------------------------------------


class Reward:
    """Base of every built-in reward: ``reward(images, prompts) -> list[float]``, one score per image.

    Subclasses implement `_score` on a batch of at most `batch_size` images. Calls run under
    `torch.inference_mode`: rewards only rank, they are never differentiated.

    Args:
        batch_size: most images scored in one forward pass.
        name: name used in logs (defaults to the class's registry name).
    """

    name: str = "reward"
    input_format: str = "pil"

    def __init__(self, batch_size: int = 32, name: str | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
        self.batch_size = int(batch_size)
        if name is not None:
            self.name = name

    def load(self) -> Reward:
        """Load whatever the reward needs (no-op here); returns ``self`` so calls can be chained."""
        return self

    def _score(self, images: ImageBatch, prompts: list[str]) -> torch.Tensor | Sequence[float]:
        raise NotImplementedError

    def __call__(self, images: ImageBatch, prompts: Sequence[str] | str | None = None) -> list[float]:
        """Score ``images`` against ``prompts`` (one per image, or a single string for all)."""
        # Load outside inference mode: parameters created inside it would be inference tensors for good.
        self.load()
        with torch.inference_mode():
            return self._score_all(images, prompts)

    def _score_all(self, images: ImageBatch, prompts: Sequence[str] | str | None) -> list[float]:
        count = num_images(images)
        if prompts is None or isinstance(prompts, str):
            prompts = [prompts or ""] * count
        prompts = [str(p) for p in prompts]
        if len(prompts) != count:
            raise ValueError(f"{self.name}: got {count} images but {len(prompts)} prompts; pass one prompt per image.")
        scores: list[float] = []
        for start in range(0, count, self.batch_size):
            stop = min(start + self.batch_size, count)
            batch_scores = self._score(slice_images(images, start, stop), prompts[start:stop])
            if isinstance(batch_scores, torch.Tensor):
                batch_scores = batch_scores.detach().float().flatten().cpu().tolist()
            scores.extend(float(s) for s in batch_scores)
        return scores

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class PretrainedReward(Reward):
    """A reward backed by pretrained weights, loaded lazily from a Hub id or a local path.

    The model is loaded on the first call (or by `load`), put on `device` in `dtype` and set to eval mode. By
    default that is the first GPU in float16 (``gpu_dtype``), or the CPU in float32.

    Args:
        model_name_or_path: Hugging Face Hub repository id or local directory/file (each reward documents which).
        device: where to run; defaults to CUDA when available.
        dtype: parameter dtype; defaults to ``gpu_dtype`` on GPU and float32 on CPU.
        batch_size: most images per forward pass.
        revision, cache_dir, token, local_files_only: passed to the Hub download (as in ``from_pretrained``).
        model_kwargs: extra keyword arguments for the model's ``from_pretrained`` (e.g. ``attn_implementation``).
        name: name used in logs.
    """

    input_format = "pt"
    default_model_name_or_path: str = ""
    gpu_dtype: torch.dtype = torch.float16

    def __init__(
        self,
        model_name_or_path: str | os.PathLike | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        batch_size: int = 32,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        token: str | bool | None = None,
        local_files_only: bool = False,
        model_kwargs: Mapping[str, Any] | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(batch_size=batch_size, name=name)
        self.model_name_or_path = os.fspath(model_name_or_path or self.default_model_name_or_path)
        self.device = torch.device(device) if device is not None else default_device()
        if isinstance(dtype, str):
            dtype = parse_dtype(dtype)
        if dtype is None:
            dtype = self.gpu_dtype if self.device.type == "cuda" else torch.float32
        self.dtype: torch.dtype = dtype
        self.hub_kwargs: dict[str, Any] = {
            k: v
            for k, v in dict(
                revision=revision, cache_dir=cache_dir, token=token, local_files_only=local_files_only
            ).items()
            if v is not None and v is not False
        }
        self.model_kwargs = dict(model_kwargs or {})
        self._loaded = False

    def load(self) -> PretrainedReward:
        """Load the model now (otherwise it is loaded on the first call). Idempotent."""
        if not self._loaded:
            self._load()
            self._loaded = True
        return self

    @property
    def is_loaded(self) -> bool:
        return self._loaded

    def _load(self) -> None:
        raise NotImplementedError

    def _place(self, module: torch.nn.Module) -> torch.nn.Module:
        """Eval mode, frozen, on our device and dtype (unless ``from_pretrained`` already dispatched it)."""
        module.eval().requires_grad_(False)
        if "device_map" not in self.model_kwargs:
            module.to(device=self.device, dtype=self.dtype)
        return module

    def _from_pretrained_kwargs(self) -> dict[str, Any]:
        return {**self.hub_kwargs, "dtype": self.dtype, **self.model_kwargs}

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, model_name_or_path={self.model_name_or_path!r}, "
            f"device={str(self.device)!r}, dtype={self.dtype}, loaded={self._loaded})"
        )
