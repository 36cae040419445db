"""ImageReward (Xu et al., 2023): BLIP's image-grounded text encoder plus an MLP head, trained on human rankings.

Design: the ``image-reward`` package is *not* used. Its loader downloads files from hard-coded URLs, builds a
``bert-base-uncased`` tokenizer at construction time, and needs ``timm``, ``fairscale`` and ``torchvision``. Instead,
the published weights (``THUDM/ImageReward``: ``ImageReward.pt``, a plain state dict, and ``med_config.json``, the
BERT config of the text encoder) are read with ``torch.load(weights_only=True)`` and mapped onto `transformers`'
BLIP modules (``BlipVisionModel`` for BLIP's ViT-L/16, ``BlipTextModel`` for its cross-attention BERT), the same
architecture `transformers` converts BLIP checkpoints to. Only the Hub (or a local directory) is touched, through
``hf_hub_download`` / ``from_pretrained``.

Scoring follows ImageReward's ``score``: prompt tokenised to 35 tokens, BLIP ViT features of the 224 px image
(bicubic resize, center crop, CLIP normalisation) cross-attended by the text encoder, the ``[CLS]`` state through the
MLP, then standardised with the published mean and standard deviation.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..checkpoints import load_state_dict_file
from .base import ClipStylePreprocessor, ImageBatch, PretrainedReward, load_json, resolve_file
from .clip import RewardMLP


# ImageReward's reward normalisation (``ImageReward.mean`` / ``ImageReward.std`` in the original code).
IMAGE_REWARD_MEAN = 0.16717362830052426
IMAGE_REWARD_STD = 1.0333394966054072

# BLIP "large" ViT of ImageReward: ViT-L/16 at 224 px, pre-norm, GELU, LayerNorm eps 1e-6 (timm's ViT default).
IMAGE_REWARD_VISION_CONFIG = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 224,
    "patch_size": 16,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-6,
}

_VISION_GLOBALS = {
    "cls_token": "embeddings.class_embedding",
    "pos_embed": "embeddings.position_embedding",
    "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
    "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
    "norm.weight": "post_layernorm.weight",
    "norm.bias": "post_layernorm.bias",
}
_VISION_BLOCK = re.compile(r"^blocks\.(\d+)\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)$")
_VISION_BLOCK_PARTS = {
    "norm1": "layer_norm1",
    "norm2": "layer_norm2",
    "attn.qkv": "self_attn.qkv",
    "attn.proj": "self_attn.projection",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}


def convert_image_reward_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map an original ImageReward state dict onto `ImageRewardModel` keys.

    ``blip.visual_encoder.*`` (BLIP's ViT) becomes ``vision_model.*``, ``blip.text_encoder.*`` (BLIP's BERT, already
    in the layout of `transformers`' ``BlipTextModel``) becomes ``text_encoder.*``, ``mlp.*`` is kept. The rest of
    BLIP (contrastive projections, decoder) is not used for scoring and is dropped.
    """
    converted: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        key = key[len("module.") :] if key.startswith("module.") else key
        if key.startswith("blip.visual_encoder."):
            rest = key[len("blip.visual_encoder.") :]
            if rest in _VISION_GLOBALS:
                converted["vision_model." + _VISION_GLOBALS[rest]] = value
            elif match := _VISION_BLOCK.match(rest):
                layer, part, leaf = match.groups()
                converted[f"vision_model.encoder.layers.{layer}.{_VISION_BLOCK_PARTS[part]}.{leaf}"] = value
            else:
                raise ValueError(f"Unrecognised BLIP vision key {key!r} in the ImageReward checkpoint.")
        elif key.startswith("blip.text_encoder."):
            if key.endswith("position_ids"):  # a buffer older transformers saved; rebuilt by the model
                continue
            converted["text_encoder." + key[len("blip.text_encoder.") :]] = value
        elif key.startswith("mlp."):
            converted[key] = value
    return converted


def blip_text_config_from_med_config(med_config: Mapping[str, Any], encoder_hidden_size: int) -> Any:
    """`transformers.BlipTextConfig` equivalent to BLIP's ``med_config.json`` (a BERT config with cross-attention).

    ``is_decoder=True`` only makes `transformers` build the cross-attention layers; the forward pass runs the encoder
    bidirectionally (``is_decoder=False``), as BLIP's text encoder does.
    """
    from transformers import BlipTextConfig

    keys = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "max_position_embeddings",
        "hidden_act",
        "layer_norm_eps",
        "hidden_dropout_prob",
        "attention_probs_dropout_prob",
        "pad_token_id",
    )
    values = {key: med_config[key] for key in keys if key in med_config}
    return BlipTextConfig(**values, encoder_hidden_size=encoder_hidden_size, is_decoder=True)


class ImageRewardModel(nn.Module):
    """BLIP ViT + BLIP cross-attention text encoder + MLP head: the scoring path of ImageReward."""

    def __init__(self, vision_config: Any, text_config: Any) -> None:
        super().__init__()
        from transformers import BlipTextModel, BlipVisionModel

        self.vision_model = BlipVisionModel(vision_config)
        self.text_encoder = BlipTextModel(text_config, add_pooling_layer=False)
        self.mlp = RewardMLP(in_features=text_config.hidden_size)

    def forward(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Raw (un-normalised) rewards, shape ``(B,)``."""
        image_embeds = self.vision_model(pixel_values=pixel_values).last_hidden_state
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        text = self.text_encoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_mask,
            is_decoder=False,
        ).last_hidden_state
        return self.mlp(text[:, 0].float())


class ImageReward(PretrainedReward):
    """ImageReward, without the ``image-reward`` package (see the module docstring).

    Args:
        model_name_or_path: Hub repository or local directory holding ``checkpoint_name`` and ``med_config.json``
            (or the checkpoint file itself, with ``med_config.json`` beside it); defaults to ``THUDM/ImageReward``.
        checkpoint_name: the state-dict file (``.pt`` read with ``weights_only=True``, or ``.safetensors``).
        tokenizer_name_or_path: BERT tokenizer of the text encoder (``bert-base-uncased``, as in BLIP).
        vision_config: overrides of the ViT-L/16 vision config (only for other BLIP sizes, or tests).
        max_length: prompt length in tokens (ImageReward uses 35).
        normalize: standardise with ImageReward's published mean and std (affine: rankings are unchanged).
        **kwargs: device, dtype, batch size and Hub options of `PretrainedReward`.
    """

    name = "image_reward"
    default_model_name_or_path = "THUDM/ImageReward"

    def __init__(
        self,
        model_name_or_path: str | os.PathLike | None = None,
        *,
        checkpoint_name: str = "ImageReward.pt",
        tokenizer_name_or_path: str | os.PathLike = "bert-base-uncased",
        vision_config: Mapping[str, Any] | None = None,
        max_length: int = 35,
        normalize: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(model_name_or_path, **kwargs)
        self.checkpoint_name = checkpoint_name
        self.tokenizer_name_or_path = os.fspath(tokenizer_name_or_path)
        self.vision_config = {**IMAGE_REWARD_VISION_CONFIG, **dict(vision_config or {})}
        self.max_length = int(max_length)
        self.normalize = bool(normalize)

    def _load(self) -> None:
        from transformers import AutoTokenizer, BlipVisionConfig

        checkpoint = resolve_file(self.model_name_or_path, (self.checkpoint_name,), self.hub_kwargs)
        state_dict = convert_image_reward_state_dict(load_state_dict_file(checkpoint))
        if os.path.isfile(self.model_name_or_path):  # a checkpoint file: its config sits beside it
            med_config_path = resolve_file(os.path.dirname(os.path.abspath(checkpoint)), ("med_config.json",))
        else:
            med_config_path = resolve_file(self.model_name_or_path, ("med_config.json",), self.hub_kwargs)

        vision_config = BlipVisionConfig(**self.vision_config)
        text_config = blip_text_config_from_med_config(load_json(med_config_path), vision_config.hidden_size)
        with torch.device("meta"):  # no random init of 450M parameters that the checkpoint overwrites anyway
            model = ImageRewardModel(vision_config, text_config)
        missing, unexpected = model.load_state_dict(state_dict, strict=False, assign=True)
        if missing or unexpected:
            raise ValueError(
                f"{checkpoint!r} does not match the ImageReward architecture: missing {missing[:8]}, "
                f"unexpected {unexpected[:8]}."
            )
        self._rebuild_buffers(model, text_config)
        # The MLP head is tiny and its input is cast to float32: keep it in float32 whatever the backbone's dtype.
        self.model = self._place(model)
        self.model.mlp.to(torch.float32)

        self.tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_name_or_path, **self.hub_kwargs)
        # ImageReward's _transform(224): bicubic resize of the short side, center crop, CLIP mean/std.
        self.preprocess = ClipStylePreprocessor(shortest_edge=vision_config.image_size)

    @staticmethod
    def _rebuild_buffers(model: ImageRewardModel, text_config: Any) -> None:
        # Non-persistent buffers are not in the checkpoint, so after a meta-device build they hold no data.
        embeddings = model.text_encoder.embeddings
        if embeddings.position_ids.is_meta:
            embeddings.position_ids = torch.arange(text_config.max_position_embeddings).expand(1, -1)
        leftover = [name for name, tensor in model.state_dict(keep_vars=True).items() if tensor.is_meta]
        leftover += [name for name, tensor in model.named_buffers() if tensor.is_meta]
        if leftover:
            raise RuntimeError(f"ImageReward tensors left uninitialised after loading: {sorted(set(leftover))}")

    def _score(self, images: ImageBatch, prompts: list[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        pixels = self.preprocess(images, device=device, dtype=self.dtype)
        tokens = self.tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        rewards = self.model(pixels, tokens["input_ids"].to(device), tokens["attention_mask"].to(device))
        if self.normalize:
            rewards = (rewards - IMAGE_REWARD_MEAN) / IMAGE_REWARD_STD
        return rewards
