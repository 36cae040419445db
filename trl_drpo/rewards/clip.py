"""CLIP-embedding rewards: CLIP score, PickScore and the LAION aesthetic predictor.

All three embed images with a `transformers` CLIP model loaded by ``from_pretrained`` (a Hub id or a local
directory). Images are resized, center-cropped and normalised in torch with the geometry of the model's own image
processor, so the trainer's decoded GPU tensors are scored without a PIL round trip; PIL images are accepted too.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..checkpoints import load_state_dict_file
from .base import (
    ClipStylePreprocessor,
    ImageBatch,
    PretrainedReward,
    resolve_file,
)


logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------------
# Helpers shared by the CLIP-family rewards
# ---------------------------------------------------------------------------------------------------------------------


def _features(output: Any) -> torch.Tensor:
    # `get_image_features` returns a tensor in transformers 4.x and a ModelOutput whose pooler_output holds the
    # projected embedding in 5.x; accept both.
    if isinstance(output, torch.Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    return pooled if pooled is not None else output[0]


def clip_image_embeddings(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """L2-normalised, projected image embeddings of a CLIP-like model, in float32."""
    embeds = _features(model.get_image_features(pixel_values=pixel_values)).float()
    return embeds / embeds.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def clip_text_embeddings(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """L2-normalised, projected text embeddings of a CLIP-like model, in float32."""
    embeds = _features(model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)).float()
    return embeds / embeds.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def load_clip_preprocessor(
    processor_name_or_path: str, image_size: int, hub_kwargs: Mapping[str, Any]
) -> ClipStylePreprocessor:
    """Geometry and normalisation from the model's image processor; CLIP's defaults at ``image_size`` if absent."""
    from transformers import AutoImageProcessor

    try:
        processor = AutoImageProcessor.from_pretrained(processor_name_or_path, **hub_kwargs)
    except OSError:
        logger.warning(
            "No image processor config in %r; using CLIP's defaults (bicubic resize and center crop to %d, OpenAI "
            "mean/std).",
            processor_name_or_path,
            image_size,
        )
        return ClipStylePreprocessor(shortest_edge=image_size)
    return ClipStylePreprocessor.from_image_processor(processor)


class _ClipBackedReward(PretrainedReward):
    """Loads a CLIP model (``AutoModel``), its tokenizer and its image geometry; subclasses define the score."""

    uses_text = True

    def __init__(
        self,
        model_name_or_path: str | os.PathLike | None = None,
        *,
        processor_name_or_path: str | os.PathLike | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(model_name_or_path, **kwargs)
        self.processor_name_or_path = os.fspath(processor_name_or_path or self.model_name_or_path)

    def _load_model(self) -> nn.Module:
        from transformers import AutoModel

        return AutoModel.from_pretrained(self.model_name_or_path, **self._from_pretrained_kwargs())

    def _load(self) -> None:
        from transformers import AutoTokenizer

        self.model = self._place(self._load_model())
        if self.uses_text:
            self.tokenizer = AutoTokenizer.from_pretrained(self.processor_name_or_path, **self.hub_kwargs)
        vision_config = getattr(self.model.config, "vision_config", self.model.config)
        self.preprocess = load_clip_preprocessor(
            self.processor_name_or_path, int(getattr(vision_config, "image_size", 224)), self.hub_kwargs
        )

    @property
    def _model_device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _embed_images(self, images: ImageBatch) -> torch.Tensor:
        pixels = self.preprocess(images, device=self._model_device, dtype=self.dtype)
        return clip_image_embeddings(self.model, pixels)

    def _embed_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """One embedding per prompt; each distinct prompt is encoded once (the K candidates share theirs)."""
        unique = list(dict.fromkeys(prompts))
        text_config = getattr(self.model.config, "text_config", None)
        max_length = min(
            int(getattr(self.tokenizer, "model_max_length", 77) or 77),
            int(getattr(text_config, "max_position_embeddings", 77)),
        )
        tokens = self.tokenizer(unique, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        embeds = clip_text_embeddings(
            self.model, tokens["input_ids"].to(self._model_device), tokens["attention_mask"].to(self._model_device)
        )
        index = {prompt: i for i, prompt in enumerate(unique)}
        return embeds[torch.tensor([index[p] for p in prompts], device=embeds.device)]


# ---------------------------------------------------------------------------------------------------------------------
# CLIP score and PickScore
# ---------------------------------------------------------------------------------------------------------------------


class CLIPScore(_ClipBackedReward):
    """Prompt-image cosine similarity of any CLIP model.

    Args:
        model_name_or_path: a CLIP checkpoint (Hub id or local directory); defaults to OpenAI's ViT-L/14.
        processor_name_or_path: where the tokenizer and image processor live, if not beside the model.
        scale: multiplies the cosine (``100`` gives the usual "CLIP score" magnitude; rankings are unchanged).
        use_logit_scale: multiply by the model's learned temperature ``exp(logit_scale)`` instead of ``scale``.
        **kwargs: device, dtype, batch size and Hub options of `PretrainedReward`.
    """

    name = "clip_score"
    default_model_name_or_path = "openai/clip-vit-large-patch14"

    def __init__(
        self,
        model_name_or_path: str | os.PathLike | None = None,
        *,
        processor_name_or_path: str | os.PathLike | None = None,
        scale: float = 1.0,
        use_logit_scale: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(model_name_or_path, processor_name_or_path=processor_name_or_path, **kwargs)
        self.scale = float(scale)
        self.use_logit_scale = bool(use_logit_scale)

    def _score(self, images: ImageBatch, prompts: list[str]) -> torch.Tensor:
        cosine = (self._embed_images(images) * self._embed_prompts(prompts)).sum(dim=-1)
        if self.use_logit_scale:
            return cosine * self.model.logit_scale.float().exp()
        return cosine * self.scale


class PickScore(CLIPScore):
    """PickScore (Kirstain et al., 2023): a CLIP ViT-H/14 fine-tuned on Pick-a-Pic human preferences.

    Scored as the cosine of the normalised image and prompt embeddings *without* the learned temperature, as in the
    DrPO paper (``use_logit_scale=True`` gives the official magnitudes, about 100x; the ranking is identical). The
    checkpoint ``yuvalkirstain/PickScore_v1`` ships no processor: tokenizer and image geometry come from
    ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``.
    """

    name = "pickscore"
    default_model_name_or_path = "yuvalkirstain/PickScore_v1"
    default_processor_name_or_path = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"

    def __init__(
        self,
        model_name_or_path: str | os.PathLike | None = None,
        *,
        processor_name_or_path: str | os.PathLike | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            model_name_or_path,
            processor_name_or_path=processor_name_or_path or self.default_processor_name_or_path,
            **kwargs,
        )


# ---------------------------------------------------------------------------------------------------------------------
# LAION aesthetic predictor
# ---------------------------------------------------------------------------------------------------------------------


class RewardMLP(nn.Module):
    """The 5-layer linear head (``in``-1024-128-64-16-1, dropouts, no activations) of the LAION improved aesthetic
    predictor; ImageReward uses the same head. Parameter names match both checkpoints (``layers.{0,2,4,6,7}``)."""

    def __init__(self, in_features: int = 768) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(in_features, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    @property
    def in_features(self) -> int:
        return self.layers[0].in_features

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.layers(embeds).squeeze(-1)

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor]) -> RewardMLP:
        """Build the head from a checkpoint, whatever prefix it nests ``layers.*`` under (e.g. ``mlp.``)."""
        layers = {key[key.index("layers.") :]: value for key, value in state_dict.items() if "layers." in key}
        if "layers.0.weight" not in layers:
            raise ValueError(
                f"Not an aesthetic/ImageReward MLP checkpoint: no 'layers.0.weight' in {list(state_dict)}"
            )
        mlp = cls(in_features=layers["layers.0.weight"].shape[1])
        mlp.load_state_dict(layers, strict=True)
        return mlp


class AestheticScore(_ClipBackedReward):
    """LAION's improved aesthetic predictor ("sac+logos+ava1-l14-linearMSE"): a linear MLP over L2-normalised CLIP
    ViT-L/14 image embeddings, predicting a 1-10 rating. The prompt is ignored.

    Args:
        model_name_or_path: the MLP weights: a ``.safetensors`` or ``.pth`` file, a directory holding one, or a Hub
            repository; defaults to ``trl-lib/ddpo-aesthetic-predictor`` (the weights TRL's DDPO example uses).
            ``.pth`` files are read with ``torch.load(weights_only=True)``: pickled code is never executed.
        clip_model_name_or_path: the CLIP model whose image embeddings the MLP reads (OpenAI's ViT-L/14).
        weights_name: file name inside a directory / Hub repository, if not one of the usual names.
        **kwargs: device, dtype, batch size and Hub options of `PretrainedReward`.
    """

    name = "aesthetic"
    uses_text = False
    default_model_name_or_path = "trl-lib/ddpo-aesthetic-predictor"
    weights_names = (
        "aesthetic-model.safetensors",
        "aesthetic-model.pth",
        "sac+logos+ava1-l14-linearMSE.safetensors",
        "sac+logos+ava1-l14-linearMSE.pth",
        "model.safetensors",
    )

    def __init__(
        self,
        model_name_or_path: str | os.PathLike | None = None,
        *,
        clip_model_name_or_path: str | os.PathLike = "openai/clip-vit-large-patch14",
        weights_name: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(model_name_or_path, processor_name_or_path=clip_model_name_or_path, **kwargs)
        self.clip_model_name_or_path = os.fspath(clip_model_name_or_path)
        self.weights_name = weights_name

    def _load_model(self) -> nn.Module:
        from transformers import AutoModel

        return AutoModel.from_pretrained(self.clip_model_name_or_path, **self._from_pretrained_kwargs())

    def _load(self) -> None:
        # Read the (small) MLP first: a bad or unsafe file fails before the CLIP model is fetched.
        names = (self.weights_name,) if self.weights_name else self.weights_names
        path = resolve_file(self.model_name_or_path, names, self.hub_kwargs)
        mlp = RewardMLP.from_state_dict(load_state_dict_file(path))
        super()._load()
        projection_dim = int(getattr(self.model.config, "projection_dim", mlp.in_features))
        if projection_dim != mlp.in_features:
            raise ValueError(
                f"The aesthetic MLP in {path!r} reads {mlp.in_features}-d embeddings but the CLIP model "
                f"{self.clip_model_name_or_path!r} produces {projection_dim}-d ones; use the matching CLIP model."
            )
        # The head is tiny: keep it in float32 for precision, whatever the CLIP model's dtype.
        self.mlp = mlp.eval().requires_grad_(False).to(self._model_device, torch.float32)

    def _score(self, images: ImageBatch, prompts: list[str]) -> torch.Tensor:
        return self.mlp(self._embed_images(images))
