"""Feature maps on decoded pixels through `transformers` image encoders: DINOv2, ViT-MAE, CLIP vision
(docs/method.md §5)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from ..generators import OneStepGenerator, PromptEmbeds
from .base import (
    FeatureMap,
    feature_std,
    register_feature_map,
)


# --------------------------------------------------------------------------------------------------------------------
# Pixel encoders through transformers
# --------------------------------------------------------------------------------------------------------------------


def _processor_settings(model_name_or_path: str | os.PathLike, **hub_kwargs: Any) -> dict[str, Any]:
    """The model's image-processor config as a dict, or `{}` when there is none.

    Read as plain JSON (no processor object): fast processors need torchvision, and only mean/std/size are used.
    """
    from transformers.image_processing_base import ImageProcessingMixin

    try:
        settings, _ = ImageProcessingMixin.get_image_processor_dict(str(model_name_or_path), **hub_kwargs)
    except (OSError, ValueError):
        return {}
    return settings


def _processor_size(settings: dict[str, Any]) -> int | None:
    for field in ("crop_size", "size"):
        size = settings.get(field)
        if isinstance(size, int):
            return size
        if isinstance(size, dict):
            for name in ("height", "shortest_edge"):
                if name in size:
                    return int(size[name])
    return None


class PixelEncoderFeatureMap(FeatureMap):
    """Features of a `transformers` vision transformer on the decoded images (docs/method.md §5).

    The latents are decoded *with gradient* by the generator (`decode_with_grad`, in chunks of
    `decode_chunk_size`), resized (bicubic, antialiased) to the encoder's input size, normalised with the model's
    image-processor mean/std (ImageNet or CLIP defaults when it has none), and encoded. For each transformer layer
    L (hidden state L, 1-based) the keys are `layer{L}_patch_mean`, `layer{L}_patch_std` (one token: mean / std
    over patch tokens) and `layer{L}_cls` (the CLS token).

    Subclasses set `model_class` (a `transformers` model class), the default mean/std and `default_layer_stride`.
    """

    takes_call_layout = True  # the generator decodes (and unpacks) the latents

    model_class: ClassVar[str] = ""
    default_mean: ClassVar[tuple[float, ...]] = tuple(IMAGENET_DEFAULT_MEAN)
    default_std: ClassVar[tuple[float, ...]] = tuple(IMAGENET_DEFAULT_STD)
    default_layer_stride: ClassVar[int | None] = None  # None: the last layer only

    def __init__(
        self,
        model: nn.Module,
        generator: OneStepGenerator | None,
        keys: Sequence[str] | None = None,
        image_size: int | None = None,
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
        layer_stride: int | None = None,
        decode_chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self._generator = generator
        self.num_layers = int(model.config.num_hidden_layers)
        self.native_image_size = int(model.config.image_size)
        self.image_size = int(image_size or self.native_image_size)
        self.layer_stride = layer_stride if layer_stride is not None else self.default_layer_stride
        self.decode_chunk_size = decode_chunk_size
        mean = torch.tensor(image_mean or self.default_mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(image_std or self.default_std, dtype=torch.float32).view(1, -1, 1, 1)
        self.register_buffer("image_mean", mean, persistent=False)
        self.register_buffer("image_std", std, persistent=False)
        self._select_keys(keys)
        self._freeze()

    @classmethod
    def load_model(cls, model_name_or_path: str | os.PathLike, **kwargs: Any) -> nn.Module:
        """`model_class.from_pretrained(model_name_or_path, **kwargs)`."""
        import transformers

        return getattr(transformers, cls.model_class).from_pretrained(str(model_name_or_path), **kwargs)

    @classmethod
    def from_generator(
        cls,
        generator: OneStepGenerator | None,
        keys: Sequence[str] | None = None,
        model_name_or_path: str | os.PathLike | None = None,
        model: nn.Module | None = None,
        image_size: int | None = None,
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
        layer_stride: int | None = None,
        decode_chunk_size: int | None = None,
        **model_kwargs: Any,
    ):
        """Load `model_name_or_path` (a Hub id or local directory) with `from_pretrained(**model_kwargs)`.

        Input size and mean/std come from the model's image-processor config unless given; `layer_stride` picks the
        layers that have keys by default (every `layer_stride`-th layer; default per encoder).
        """
        settings: dict[str, Any] = {}
        if model is None:
            if model_name_or_path is None:
                raise ValueError(f"{cls.__name__} needs `model_name_or_path` (a Hub id or a local directory).")
            model = cls.load_model(model_name_or_path, **model_kwargs)
            hub_kwargs = {k: v for k, v in model_kwargs.items() if k in ("local_files_only", "revision", "cache_dir")}
            settings = _processor_settings(model_name_or_path, **hub_kwargs)
        if generator is not None:
            model = model.to(generator.device)
        return cls(
            model,
            generator,
            keys=keys,
            image_size=image_size or _processor_size(settings),
            image_mean=image_mean or settings.get("image_mean"),
            image_std=image_std or settings.get("image_std"),
            layer_stride=layer_stride,
            decode_chunk_size=decode_chunk_size,
        )

    @property
    def available_keys(self) -> tuple[str, ...]:
        keys: list[str] = []
        for layer in range(1, self.num_layers + 1):
            keys += [f"layer{layer}_patch_mean", f"layer{layer}_patch_std", f"layer{layer}_cls"]
        return tuple(keys)

    @property
    def default_keys(self) -> tuple[str, ...]:
        stride = self.layer_stride or self.num_layers
        layers = list(range(stride, self.num_layers + 1, stride)) or [self.num_layers]
        return tuple(f"layer{layer}_{kind}" for layer in layers for kind in ("patch_mean", "patch_std", "cls"))

    def preprocess(self, images: Tensor) -> Tensor:
        """Images in [0, 1] -> the encoder's normalised input (differentiable)."""
        size = (self.image_size, self.image_size)
        if tuple(images.shape[-2:]) != size:
            images = F.interpolate(images, size=size, mode="bicubic", align_corners=False, antialias=True)
        mean = self.image_mean.to(images.device, images.dtype)
        std = self.image_std.to(images.device, images.dtype)
        return (images - mean) / std

    def _hidden_states(self, pixel_values: Tensor) -> Sequence[Tensor]:
        """Hidden states `[embeddings, layer 1, ..., layer N]`, each `(B, 1 + patches, D)`."""
        kwargs = {}
        if self.image_size != self.native_image_size:
            kwargs["interpolate_pos_encoding"] = True
        return self.model(pixel_values=pixel_values, output_hidden_states=True, **kwargs).hidden_states

    def encode_images(self, images: Tensor) -> dict[str, Tensor]:
        """Features of images `(B, 3, H, W)` in [0, 1]."""
        param = next(self.model.parameters())
        pixel_values = self.preprocess(images.to(param.device, torch.float32)).to(param.dtype)
        hidden_states = self._hidden_states(pixel_values)
        features: dict[str, Tensor] = {}
        for key in self.keys:
            layer, kind = key[len("layer") :].split("_", 1)
            hidden = hidden_states[int(layer)].float()
            if kind == "cls":
                features[key] = hidden[:, :1]
            elif kind == "patch_mean":
                features[key] = hidden[:, 1:].mean(dim=1, keepdim=True)
            else:
                features[key] = feature_std(hidden[:, 1:], dim=1).unsqueeze(1)
        return features

    def compute(self, latents: Tensor, embeds: PromptEmbeds | None) -> dict[str, Tensor]:
        if self._generator is None:
            raise ValueError(f"{type(self).__name__} was built without a generator, so it cannot decode latents.")
        images = self._generator.decode_with_grad(latents, chunk_size=self.decode_chunk_size)
        return self.encode_images(images)


@register_feature_map("dinov2")
class Dinov2FeatureMap(PixelEncoderFeatureMap):
    """DINOv2 (`Dinov2Model`) on decoded pixels (docs/method.md §5): default keys at every 3rd layer (3, 6, 9, 12)."""

    model_class = "Dinov2Model"
    default_layer_stride = 3

    def _hidden_states(self, pixel_values: Tensor) -> Sequence[Tensor]:
        # DINOv2 always interpolates its position embeddings.
        return self.model(pixel_values=pixel_values, output_hidden_states=True).hidden_states


@register_feature_map("vit_mae")
class ViTMAEFeatureMap(PixelEncoderFeatureMap):
    """ViT-MAE encoder (`ViTMAEModel`) on decoded pixels (docs/method.md §5): default keys of the last layer.

    Loaded with `mask_ratio=0.0` and run with a fixed, identity patch order (docs/method.md §8.4): the authors' path
    masks 75% of the patches at random on every call, so the same image got different features each time.
    """

    model_class = "ViTMAEModel"

    @classmethod
    def load_model(cls, model_name_or_path: str | os.PathLike, **kwargs: Any) -> nn.Module:
        kwargs["mask_ratio"] = 0.0
        return super().load_model(model_name_or_path, **kwargs)

    def __init__(self, model: nn.Module, *args: Any, **kwargs: Any) -> None:
        if float(getattr(model.config, "mask_ratio", 0.0)) != 0.0:
            raise ValueError("vit_mae features need a ViTMAEModel with mask_ratio=0.0 (see load_model).")
        super().__init__(model, *args, **kwargs)

    def _hidden_states(self, pixel_values: Tensor) -> Sequence[Tensor]:
        patch = self.model.config.patch_size
        num_patches = (pixel_values.shape[-2] // patch) * (pixel_values.shape[-1] // patch)
        # ViTMAE shuffles patches by argsort(noise) even with mask_ratio 0; ascending noise keeps the image order,
        # which makes every call bit-identical.
        noise = torch.arange(num_patches, device=pixel_values.device, dtype=torch.float32)
        noise = noise.expand(pixel_values.shape[0], num_patches)
        kwargs = {"interpolate_pos_encoding": True} if self.image_size != self.native_image_size else {}
        return self.model(pixel_values=pixel_values, noise=noise, output_hidden_states=True, **kwargs).hidden_states


@register_feature_map("clip_vision")
class CLIPVisionFeatureMap(PixelEncoderFeatureMap):
    """CLIP vision tower (`CLIPVisionModel`) on decoded pixels: default keys of the last layer."""

    model_class = "CLIPVisionModel"
    default_mean = tuple(OPENAI_CLIP_MEAN)
    default_std = tuple(OPENAI_CLIP_STD)
