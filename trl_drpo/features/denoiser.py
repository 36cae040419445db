"""Features of the base denoiser's own blocks, read with forward hooks (the default map, docs/method.md §5)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..generators import OneStepGenerator, PromptEmbeds
from .base import (
    FeatureMap,
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


class _StopForward(Exception):
    """Raised by the last needed hook so that the rest of the denoiser does not run."""


def _top_level_blocks(denoiser: nn.Module) -> list[str]:
    # Execution order of a diffusers UNet: down blocks, mid block, up blocks.
    names = [f"down_blocks.{i}" for i in range(len(getattr(denoiser, "down_blocks", [])))]
    if getattr(denoiser, "mid_block", None) is not None:
        names.append("mid_block")
    names += [f"up_blocks.{i}" for i in range(len(getattr(denoiser, "up_blocks", [])))]
    return names


@register_feature_map("denoiser")
class DenoiserFeatureMap(FeatureMap):
    """Block outputs of the frozen *base* denoiser, the default feature space (docs/method.md §5 and §8.5).

    The latents are perturbed with a fixed draw of `noise_scale * N(0, I)` (one draw of shape `(1, C, h, w)`
    from `seed`, shared by every row so that the features depend only on the latent, not on its batch position or
    on the call) and run through the denoiser at `timestep` with the prompt embeddings, the LoRA adapter disabled.
    Forward hooks capture the outputs of the chosen blocks (first element of tuple outputs), which are average-pooled
    with kernel = stride = `pool_size` (adaptive to 1x1 when a side is smaller) and flattened into one token per
    image, as the authors do; `spatial_tokens=True` keeps one token per pooled position instead.

    Keys are the block names (`down_blocks.{i}`, `mid_block`, `up_blocks.{i}`). The denoiser is not a submodule:
    it belongs to the generator, and this map never changes its trainable flags.
    """

    requires_embeds = True

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
        self._blocks = _top_level_blocks(generator.unwrapped_denoiser)
        self._noise_cache: dict[tuple, Tensor] = {}
        self._select_keys(keys)
        self._freeze()

    @classmethod
    def from_generator(cls, generator: OneStepGenerator, keys: Sequence[str] | None = None, **kwargs: Any):
        """On `generator`'s base denoiser; kwargs `timestep`, `noise_scale`, `seed`, `pool_size`, `spatial_tokens`."""
        return cls(generator, keys=keys, **kwargs)

    @property
    def available_keys(self) -> tuple[str, ...]:
        return tuple(self._blocks)

    @property
    def default_keys(self) -> tuple[str, ...]:
        downs = [b for b in self._blocks if b.startswith("down_blocks.")]
        defaults = [downs[-1]] if downs else []
        defaults += [b for b in ("mid_block", "up_blocks.0") if b in self._blocks]
        return tuple(defaults)

    def _noise(self, latents: Tensor) -> Tensor:
        key = (tuple(latents.shape[1:]), latents.device, latents.dtype)
        if key not in self._noise_cache:
            draw = torch.Generator(device="cpu").manual_seed(self.seed)
            noise = torch.randn((1, *latents.shape[1:]), generator=draw, dtype=torch.float32)
            self._noise_cache[key] = noise.to(device=latents.device, dtype=latents.dtype)
        return self._noise_cache[key]

    def _pool(self, x: Tensor) -> Tensor:
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
        captured: dict[str, Tensor] = {}
        last = max(self.keys, key=self._blocks.index)

        def hook_for(name: str):
            def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
                captured[name] = output[0] if isinstance(output, (tuple, list)) else output
                if name == last:
                    raise _StopForward

            return hook

        with generator.adapter_disabled() as base:
            dtype = base.dtype
            x = latents.to(dtype=dtype)
            x = x + self.noise_scale * self._noise(x)
            t = torch.tensor(self.timestep, device=x.device)
            kwargs = generator.denoiser_kwargs(embeds.to(x.device), x)
            handles = [base.get_submodule(name).register_forward_hook(hook_for(name)) for name in self.keys]
            try:
                with _without_gradient_checkpointing(base):
                    base(x, t, return_dict=False, **kwargs)
            except _StopForward:
                pass
            finally:
                for handle in handles:
                    handle.remove()
        return {name: self._pool(captured[name]).to(torch.float32) for name in self.keys}
