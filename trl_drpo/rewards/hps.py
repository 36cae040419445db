"""HPSv2 (Wu et al., 2023): an open_clip ViT-H/14 fine-tuned on human preference data, scored as the cosine of its
normalised image and prompt embeddings.

Design: ``open_clip`` is *not* needed. The published checkpoint (``xswu/HPSv2``: ``HPS_v2_compressed.pt`` or
``HPS_v2.1_compressed.pt``, an open_clip state dict under ``"state_dict"``) is read with
``torch.load(weights_only=True)``, its keys are converted to a `transformers.CLIPModel` whose architecture comes from
``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (the open_clip model HPSv2 was fine-tuned from, published in `transformers`
format with the same tokenizer and preprocessing), and the converted model then runs like any other CLIP reward. The
conversion takes seconds; save the result with ``reward.model.save_pretrained(dir)`` and pass ``dir`` as
``model_name_or_path`` to skip it next time.
"""

from __future__ import annotations

import html
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..checkpoints import load_state_dict_file
from .base import resolve_file, strip_prefix
from .clip import CLIPScore


HPS_CHECKPOINTS = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}

_LAYER = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")
_LAYER_PARTS = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
    "attn.out_proj": "self_attn.out_proj",
}
_GLOBALS = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "logit_scale": "logit_scale",
}
# open_clip multiplies by these projections (x @ P); transformers stores the nn.Linear weight, i.e. P transposed.
_PROJECTIONS = {"text_projection": "text_projection.weight", "visual.proj": "visual_projection.weight"}


def convert_open_clip_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert an open_clip ``CLIP`` (ViT image tower, standard text tower) state dict to `transformers.CLIPModel`
    keys.

    The fused attention input projection ``in_proj_{weight,bias}`` is split into ``q/k/v_proj`` (in that order), the
    two embedding projections are transposed, and buffers open_clip may save (``attn_mask``) are dropped.

    Raises:
        ValueError: a key this layout does not know (e.g. a timm or custom-text tower, which this does not support).
    """
    state_dict = strip_prefix(state_dict, "module.")
    converted: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state_dict.items():
        if key in _GLOBALS:
            converted[_GLOBALS[key]] = value
        elif key in _PROJECTIONS:
            converted[_PROJECTIONS[key]] = value.t().contiguous()
        elif key == "attn_mask" or key.endswith(".attn_mask"):
            continue
        elif match := _LAYER.match(key):
            tower = "vision_model" if match.group(1) else "text_model"
            prefix, rest = f"{tower}.encoder.layers.{match.group(2)}.", match.group(3)
            if rest.startswith("attn.in_proj_"):
                kind = rest[len("attn.in_proj_") :]  # "weight" or "bias"
                for name, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                    converted[f"{prefix}self_attn.{name}.{kind}"] = chunk.contiguous()
                continue
            part, _, leaf = rest.rpartition(".")
            if part not in _LAYER_PARTS:
                unknown.append(key)
                continue
            converted[f"{prefix}{_LAYER_PARTS[part]}.{leaf}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(
            f"Unrecognised open_clip keys {unknown[:8]}{' ...' if len(unknown) > 8 else ''}: only ViT image towers "
            "with the standard open_clip text tower (as in HPSv2's ViT-H-14) can be converted."
        )
    return converted


def open_clip_clean(text: str) -> str:
    """The text cleaning open_clip's tokenizer applies before BPE, which HPSv2 was trained with: mojibake, curly
    quotes and full-width characters fixed by `ftfy`, HTML entities unescaped (twice, as open_clip does), whitespace
    collapsed, lower case."""
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return re.sub(r"\s+", " ", text).strip().lower()


class HPSv2(CLIPScore):
    """Human Preference Score v2 (cosine of image and prompt embeddings, as HPSv2's own ``score``).

    Args:
        model_name_or_path: where the HPSv2 checkpoint is: a Hub repository (default ``xswu/HPSv2``), a local
            directory holding ``checkpoint_name``, the checkpoint file itself, or a directory with an already
            converted `transformers` CLIP model (``config.json``), which is then loaded directly.
        version: ``"v2.0"`` (the checkpoint the DrPO paper uses) or ``"v2.1"``; picks ``checkpoint_name``.
        checkpoint_name: file name of the open_clip checkpoint, overriding ``version``.
        config_name_or_path: the `transformers` CLIP config, tokenizer and image processor matching the
            checkpoint's architecture (open_clip ViT-H-14 = ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``).
        **kwargs: ``scale``, ``use_logit_scale``, device, dtype, batch size and Hub options of `CLIPScore`.
    """

    name = "hpsv2"
    default_model_name_or_path = "xswu/HPSv2"
    default_config_name_or_path = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"

    def __init__(
        self,
        model_name_or_path: str | os.PathLike | None = None,
        *,
        version: str = "v2.0",
        checkpoint_name: str | None = None,
        config_name_or_path: str | os.PathLike | None = None,
        **kwargs: Any,
    ) -> None:
        if checkpoint_name is None and version not in HPS_CHECKPOINTS:
            raise ValueError(f"Unknown HPSv2 version {version!r}; choose one of {sorted(HPS_CHECKPOINTS)}.")
        self.config_name_or_path = os.fspath(config_name_or_path or self.default_config_name_or_path)
        kwargs.setdefault("processor_name_or_path", self.config_name_or_path)
        super().__init__(model_name_or_path, **kwargs)
        self.checkpoint_name = checkpoint_name or HPS_CHECKPOINTS[version]

    def _embed_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        return super()._embed_prompts([open_clip_clean(prompt) for prompt in prompts])

    def _load_model(self) -> nn.Module:
        from transformers import CLIPConfig, CLIPModel

        if os.path.isfile(os.path.join(self.model_name_or_path, "config.json")):
            return CLIPModel.from_pretrained(self.model_name_or_path, **self._from_pretrained_kwargs())
        path = resolve_file(self.model_name_or_path, (self.checkpoint_name,), self.hub_kwargs)
        state_dict = convert_open_clip_state_dict(load_state_dict_file(path))
        config = CLIPConfig.from_pretrained(self.config_name_or_path, **self.hub_kwargs)
        model, info = CLIPModel.from_pretrained(
            None,
            config=config,
            state_dict=state_dict,
            output_loading_info=True,
            **{k: v for k, v in self._from_pretrained_kwargs().items() if k not in self.hub_kwargs},
        )
        # transformers would silently keep random weights for anything the checkpoint lacks; a reward must not.
        problems = {k: v for k, v in info.items() if k in ("missing_keys", "mismatched_keys") and v}
        if problems:
            raise ValueError(
                f"{path!r} does not match the CLIP architecture of {self.config_name_or_path!r}: {problems}"
            )
        return model
