"""Differentiable reward towers the size of PickScore/HPSv2 (CLIP ViT-H/14) and HPSv3 (Qwen2-VL-7B).

DRaFT-style reward back-propagation needs `d reward / d image`, so these are plain `nn.Module`s whose forward keeps the
graph from the decoded image `(B, 3, H, W)` in [0, 1] to one score per image. DrPO uses the same towers through
:meth:`RewardTower.ranking_fn`, under `torch.no_grad`: both methods then pay for exactly the same reward forward.

The weights are random (the benchmarks measure cost, not quality); the CLIP tower reuses the package's torch
preprocessing and embedding helpers, so its forward is the one `trl_drpo.rewards.PickScore` runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from trl_drpo.rewards.base import ClipStylePreprocessor
from trl_drpo.rewards.clip import clip_image_embeddings, clip_text_embeddings
from trl_drpo.tiny_pipelines import tiny_clip_tokenizer

from .models import REAL_VLM, TINY_VLM, VLMSpec, clip_vit_h14, qwen2_vl_7b


class RewardTower(nn.Module):
    """A frozen, differentiable reward: `tower(images, prompts) -> (B,)` scores, with gradient to `images`."""

    def prompt_state(self, prompts: Sequence[str]) -> Any:
        """Per-prompt work done once per step, without gradient (text embeddings, token ids)."""
        raise NotImplementedError

    def select_state(self, state: Any, index: Tensor) -> Any:
        """The rows `index` of a prompt state (for streaming candidates through :meth:`score`)."""
        raise NotImplementedError

    def score(self, images: Tensor, state: Any) -> Tensor:
        """Scores of `images` (B, 3, H, W) in [0, 1] for the prompts `state` was built from (one per image)."""
        raise NotImplementedError

    def forward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        with torch.no_grad():
            state = self.prompt_state(prompts)
        return self.score(images, state)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute the backbone's activations in backward (what the paper's DRaFT profile did for HPSv3), or not."""
        backbone = self.backbone
        # transformers 5 renamed gradient_* to activation_checkpointing_*; older versions only have the former.
        new_api = hasattr(backbone, "activation_checkpointing_enable")
        if enabled:
            kwargs = {"use_reentrant": False}
            if new_api:
                backbone.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        elif new_api and backbone.is_activation_checkpointing:
            backbone.activation_checkpointing_disable()
        elif not new_api and backbone.is_gradient_checkpointing:
            backbone.gradient_checkpointing_disable()
        # transformers only checkpoints layers in training mode; these backbones have no dropout, so the mode
        # changes nothing else.
        backbone.train(enabled)

    @property
    def backbone(self) -> nn.Module:
        raise NotImplementedError

    def ranking_fn(self) -> Callable[[Tensor, Sequence[str]], Tensor]:
        """The tower as a rank-only reward for DrPO: same forward, no graph."""

        @torch.no_grad()
        def rank(images: Tensor, prompts: Sequence[str]) -> Tensor:
            return self(images, prompts).float()

        return rank


# ----------------------------------------------------------------------------------------------------------------
# CLIP ViT-H/14 (PickScore / HPSv2)
# ----------------------------------------------------------------------------------------------------------------


class CLIPRewardTower(RewardTower):
    """PickScore/HPSv2-style score: `scale * cos(image embedding, prompt embedding)` of a CLIP model.

    The image goes through the package's `ClipStylePreprocessor` (bicubic resize and crop to the tower's input size,
    CLIP normalisation; differentiable) and `clip_image_embeddings`. `scale` = 100 is CLIP's logit scale, which the
    DRaFT baseline of the paper differentiates.
    """

    def __init__(self, model: nn.Module, scale: float = 100.0) -> None:
        super().__init__()
        self.model = model
        self.scale = float(scale)
        size = int(model.config.vision_config.image_size)
        self.preprocess = ClipStylePreprocessor(shortest_edge=size)
        self.tokenizer = tiny_clip_tokenizer(int(model.config.text_config.max_position_embeddings))

    @property
    def backbone(self) -> nn.Module:
        return self.model

    @torch.no_grad()
    def prompt_state(self, prompts: Sequence[str]) -> Tensor:
        # No graph even when checkpointing is on: transformers then makes embedding outputs require grad.
        param = next(self.model.parameters())
        unique = list(dict.fromkeys(prompts))
        tokens = self.tokenizer(unique, padding="max_length", truncation=True, return_tensors="pt")
        # No padding mask: CLIP's text tower is causal and pools at the end-of-text token, which never attends to the
        # padding after it, so the embedding is the same; and a mask would need a data-dependent check on `meta`.
        embeds = clip_text_embeddings(self.model, tokens["input_ids"].to(param.device), None)
        index = torch.tensor([unique.index(p) for p in prompts])
        return embeds[index.to(embeds.device)]

    def select_state(self, state: Tensor, index: Tensor) -> Tensor:
        return state[index.to(state.device)]

    def score(self, images: Tensor, state: Tensor) -> Tensor:
        param = next(self.model.parameters())
        pixels = self.preprocess(images, device=param.device, dtype=param.dtype)
        return self.scale * (clip_image_embeddings(self.model, pixels) * state).sum(dim=-1)


# ----------------------------------------------------------------------------------------------------------------
# Qwen2-VL (HPSv3)
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class _VLMPromptState:
    input_ids: Tensor  # (B, L), on the model's device
    position_ids: Tensor  # (3, B, L) M-RoPE positions, on the model's device
    image_slice: slice  # where the image tokens sit in the sequence


class VLMRewardTower(RewardTower):
    """HPSv3-style score: a linear head on the last hidden state of a Qwen2-VL backbone reading (image, prompt).

    The image is resized to `spec.image_size`, normalised and cut into Qwen2-VL's (temporal 2) x 14 x 14 patches in
    torch, so the score is differentiable in the pixels. The sequence is `[template] <vision_start> image tokens
    <vision_end> [instruction + prompt]`, `spec.text_tokens` text tokens in all, with token ids derived from the
    prompt (no Qwen tokenizer offline; costs depend only on the length). M-RoPE positions come from the model's own
    `get_rope_index`, computed on the CPU from token ids (they do not depend on the image), so the forward also runs
    on the `meta` device.
    """

    def __init__(self, model: nn.Module, spec: VLMSpec = REAL_VLM) -> None:
        super().__init__()
        self.model = model
        self.spec = spec
        hidden = int(model.config.text_config.hidden_size)
        param = next(model.parameters())
        # HPSv3's head predicts a mean and a spread; the score is the mean.
        self.head = nn.Linear(hidden, 2, device=param.device, dtype=param.dtype).requires_grad_(False)
        vision = model.config.vision_config
        self.patch = int(vision.patch_size)
        self.temporal = int(vision.temporal_patch_size)
        self.merge = int(vision.spatial_merge_size)
        grid = spec.image_size // self.patch
        if grid * self.patch != spec.image_size or grid % self.merge:
            raise ValueError(f"image_size {spec.image_size} must be a multiple of {self.patch * self.merge}.")
        self.grid = grid
        self.image_tokens = grid * grid // self.merge**2
        # An eighth of the text is the chat template before the image; the rest (instruction, prompt) follows it.
        self.prefix_tokens = spec.text_tokens // 8
        if spec.text_tokens - self.prefix_tokens < 3:
            raise ValueError(f"text_tokens={spec.text_tokens} is too short for a template around the image.")
        self.register_buffer("mean", torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def backbone(self) -> nn.Module:
        return self.model

    def _text_ids(self, prompt: str, count: int, salt: str) -> list[int]:
        # Deterministic stand-in token ids below the special-token range (ids only change embeddings, not cost).
        vocab = min(int(self.model.config.vision_start_token_id), int(self.model.config.text_config.vocab_size))
        digest = hashlib.sha256((salt + prompt).encode()).digest()
        return [(digest[i % len(digest)] * 131 + i * 7919) % (vocab - 1) + 1 for i in range(count)]

    @torch.no_grad()
    def prompt_state(self, prompts: Sequence[str]) -> _VLMPromptState:
        config = self.model.config
        suffix = self.spec.text_tokens - self.prefix_tokens - 2  # 2 = vision start/end markers
        rows = []
        for prompt in prompts:
            rows.append(
                self._text_ids("", self.prefix_tokens, "template")
                + [config.vision_start_token_id]
                + [config.image_token_id] * self.image_tokens
                + [config.vision_end_token_id]
                + self._text_ids(prompt, suffix, "prompt")
            )
        input_ids = torch.tensor(rows, dtype=torch.long)
        token_types = (input_ids == config.image_token_id).int()
        grid = torch.tensor([[1, self.grid, self.grid]] * len(prompts))
        positions, _ = self.model.get_rope_index(input_ids, token_types, image_grid_thw=grid)
        device = next(self.model.parameters()).device
        start = self.prefix_tokens + 1
        return _VLMPromptState(
            input_ids=input_ids.to(device),
            position_ids=positions.to(device),
            image_slice=slice(start, start + self.image_tokens),
        )

    def select_state(self, state: _VLMPromptState, index: Tensor) -> _VLMPromptState:
        index = index.to(state.input_ids.device)
        return _VLMPromptState(state.input_ids[index], state.position_ids[:, index], state.image_slice)

    def patches(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> Qwen2-VL `pixel_values` (B * grid^2, 3 * 2 * 14 * 14), differentiable.

        The layout is the image processor's: rows of 2 x 2 merge blocks, each block's patches contiguous, and each
        patch flattened as (channel, time, row, column) with the still image repeated over the 2 time steps.
        """
        size = self.spec.image_size
        x = images.float().clamp(0.0, 1.0)
        if tuple(x.shape[-2:]) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
        x = (x - self.mean.to(x.device)) / self.std.to(x.device)
        b, c = x.shape[:2]
        g, m, p, t = self.grid, self.merge, self.patch, self.temporal
        x = x.unsqueeze(2).expand(b, c, t, size, size)
        x = x.reshape(b, c, t, g // m, m, p, g // m, m, p)
        x = x.permute(0, 3, 6, 4, 7, 1, 2, 5, 8)  # (b, gh/m, gw/m, m, m, c, t, p, p)
        return x.reshape(b * g * g, c * t * p * p)

    def score(self, images: Tensor, state: _VLMPromptState) -> Tensor:
        from transformers.vision_utils import get_vision_position_ids

        param = next(self.model.parameters())
        batch = images.shape[0]
        pixel_values = self.patches(images.to(param.device)).to(param.dtype)
        # Grid and vision positions are built on the CPU from integers (no device sync, meta-safe).
        grid = torch.tensor([[1, self.grid, self.grid]] * batch)
        vision_positions = get_vision_position_ids(grid, self.merge).to(param.device)
        visual = self.model.visual(pixel_values, grid_thw=grid, position_ids=vision_positions).pooler_output
        text = self.model.language_model.embed_tokens(state.input_ids)
        s = state.image_slice
        embeds = torch.cat(
            [text[:, : s.start], visual.view(batch, self.image_tokens, -1).to(text.dtype), text[:, s.stop :]], 1
        )
        hidden = self.model.language_model(
            inputs_embeds=embeds, position_ids=state.position_ids, use_cache=False
        ).last_hidden_state
        return self.head(hidden[:, -1])[:, 0].float()


# ----------------------------------------------------------------------------------------------------------------
# Factory
# ----------------------------------------------------------------------------------------------------------------


def build_reward(
    name: str,
    device: torch.device | str = "meta",
    dtype: torch.dtype = torch.float32,
    tiny: bool = False,
    image_size: int | None = None,
) -> RewardTower:
    """`"pickscore"` (CLIP ViT-H/14, also HPSv2's size) or `"hpsv3"` (Qwen2-VL-7B), real-size or tiny.

    `image_size` is the side of the images the HPSv3 tower reads (default: its 448 px cap); HPSv3 takes images at
    their own size up to that cap, so a ranking made at 224 px costs it a quarter of the image tokens. CLIP towers
    always resize to their 224 px input, so for them it changes nothing.
    """
    if name == "pickscore":
        return CLIPRewardTower(clip_vit_h14(device, dtype, tiny=tiny))
    if name == "hpsv3":
        spec = TINY_VLM if tiny else REAL_VLM
        if image_size is not None and not tiny:
            spec = dataclasses.replace(spec, image_size=image_size)
        return VLMRewardTower(qwen2_vl_7b(device, dtype, tiny=tiny), spec)
    raise ValueError(f"Unknown reward {name!r}; choose 'pickscore' or 'hpsv3'.")
