"""Features of the base denoiser's own blocks, read with forward hooks (the default map, docs/method.md §5)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..generators import OneStepGenerator, PromptEmbeds
from .base import (
    FeatureMap,
    read_block_outputs,
    register_feature_map,
)


# --------------------------------------------------------------------------------------------------------------------
# Denoiser ("teacher") features
# --------------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _without_gradient_checkpointing(module: nn.Module) -> Iterator[None]:
    # A checkpointed block re-runs its forward during backward, which happens after the adapter is re-enabled: the
    # recomputation would see the LoRA and mismatch (or silently change) the base-model graph. Keep activations for
    # this forward instead, restoring each block's own flag afterwards.
    flagged = [m for m in module.modules() if getattr(m, "gradient_checkpointing", False) is True]
    for m in flagged:
        m.gradient_checkpointing = False
    try:
        yield
    finally:
        for m in flagged:
            m.gradient_checkpointing = True


@register_feature_map("denoiser")
class DenoiserFeatureMap(FeatureMap):
    """Block outputs of the frozen *base* denoiser, the default feature space (docs/method.md §5 and §8.5).

    The latents are perturbed with a fixed draw of `noise_scale * N(0, I)` (one draw of the shape of one latent
    from `seed`, shared by every row so that the features depend only on the latent, not on its batch position or
    on the call) and run through the denoiser at `timestep` (0-1000 training scale; each family converts it to its
    denoiser's convention, `OneStepGenerator.denoiser_inputs`) with the prompt embeddings, the LoRA adapter
    disabled. Forward hooks capture the image stream of the chosen blocks' outputs
    (`OneStepGenerator.block_image_features`: the first element of a UNet block's tuple, the second of an MMDiT
    block's); a transformer's `(B, tokens, D)` output is laid back on its square token grid. The maps are
    average-pooled with kernel = stride = `pool_size` (adaptive to 1x1 when a side is smaller) and flattened into one
    token per image, as the authors do; `spatial_tokens=True` keeps one token per pooled position instead.

    Keys are the block names (`down_blocks.{i}`, `mid_block`, `up_blocks.{i}` of a UNet; `transformer_blocks.{i}`
    and Flux's `single_transformer_blocks.{i}`). The denoiser is not a submodule: it belongs to the generator, and
    this map never changes its trainable flags.
    """

    requires_embeds = True
    takes_call_layout = True

    def __init__(
        self,
        generator: OneStepGenerator,
        keys: Sequence[str] | None = None,
        timestep: int = 100,
        noise_scale: float = 0.1,
        seed: int = 0,
        pool_size: int = 4,
        spatial_tokens: bool = False,
    ) -> None:
        super().__init__()
        self._generator = generator
        self.timestep = int(timestep)
        self.noise_scale = float(noise_scale)
        self.seed = int(seed)
        self.pool_size = int(pool_size)
        self.spatial_tokens = bool(spatial_tokens)
        self._blocks = generator.feature_blocks()
        self._noise_cache: dict[tuple, Tensor] = {}
        self._select_keys(keys)
        self._freeze()

    @property
    def available_keys(self) -> tuple[str, ...]:
        return tuple(self._blocks)

    @property
    def default_keys(self) -> tuple[str, ...]:
        downs = [b for b in self._blocks if b.startswith("down_blocks.")]
        if not downs:  # a transformer: its middle and last blocks
            return tuple(dict.fromkeys([self._blocks[len(self._blocks) // 2], self._blocks[-1]]))
        defaults = [downs[-1]]
        defaults += [b for b in ("mid_block", "up_blocks.0") if b in self._blocks]
        return tuple(defaults)

    def _noise(self, latents: Tensor) -> Tensor:
        key = (tuple(latents.shape[1:]), latents.device, latents.dtype)
        if key not in self._noise_cache:
            draw = torch.Generator(device="cpu").manual_seed(self.seed)
            noise = torch.randn((1, *latents.shape[1:]), generator=draw, dtype=torch.float32)
            self._noise_cache[key] = noise.to(device=latents.device, dtype=latents.dtype)
        return self._noise_cache[key]

    @staticmethod
    def _grid(x: Tensor) -> Tensor:
        # A transformer block's (B, tokens, D) output laid back on its square token grid as (B, D, side, side).
        if x.dim() != 3:
            return x
        side = math.isqrt(x.shape[1])
        if side * side != x.shape[1]:
            raise ValueError(f"{x.shape[1]} image tokens do not form a square grid; DrPO trains square images.")
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], side, side)

    def _pool(self, x: Tensor) -> Tensor:
        x = self._grid(x)
        if x.shape[-2] >= self.pool_size and x.shape[-1] >= self.pool_size:
            x = F.avg_pool2d(x, kernel_size=self.pool_size, stride=self.pool_size)
        else:
            x = F.adaptive_avg_pool2d(x, 1)
        if self.spatial_tokens:
            return x.flatten(2).transpose(1, 2)
        return x.flatten(1).unsqueeze(1)

    def compute(self, latents: Tensor, embeds: PromptEmbeds | None) -> dict[str, Tensor]:
        generator = self._generator
        if len(embeds) == 1 and latents.shape[0] > 1:
            embeds = embeds.repeat_interleave(latents.shape[0])
        if len(embeds) != latents.shape[0]:
            raise ValueError(f"{len(embeds)} prompt embeddings for {latents.shape[0]} latents.")
        with generator.adapter_disabled() as base:
            dtype = base.dtype
            x = latents.to(dtype=dtype)
            x = x + self.noise_scale * self._noise(x)
            kwargs = generator.denoiser_inputs(embeds.to(x.device), x, self.timestep)
            with _without_gradient_checkpointing(base):
                captured = read_block_outputs(
                    base, self.keys, lambda: base(return_dict=False, **kwargs), generator.block_image_features
                )
        return {name: self._pool(captured[name]).to(torch.float32) for name in self.keys}
