"""Prompt embeddings of every pipeline family in one container, and row-chunked mapping."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor


# --------------------------------------------------------------------------------------------------------------------
# Prompt embeddings
# --------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class PromptEmbeds:
    """Encoded prompts, one row per sample, in the layout the denoiser consumes.

    Attributes:
        prompt_embeds: text-encoder hidden states, `(batch, sequence, dim)`.
        pooled_prompt_embeds: pooled text embedding (SDXL's `text_embeds`), `(batch, dim)`, or `None`.
        add_time_ids: SDXL micro-conditioning `(batch, 6)`, or `None` to derive it from the latent size at call time
            (`(h, w, 0, 0, h, w)`, what `pipe(height=h, width=w)` uses).
    """

    prompt_embeds: Tensor
    pooled_prompt_embeds: Tensor | None = None
    add_time_ids: Tensor | None = None

    def _map(self, fn: Callable[[Tensor], Tensor]) -> PromptEmbeds:
        return PromptEmbeds(**{f.name: _apply(fn, getattr(self, f.name)) for f in dataclasses.fields(self)})

    def __len__(self) -> int:
        return self.prompt_embeds.shape[0]

    def repeat_interleave(self, repeats: int) -> PromptEmbeds:
        """Each row repeated `repeats` times in place (`[a, b] -> [a, a, b, b]`), for K candidates per prompt."""
        return self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def select(self, index: int | slice | Sequence[int] | Tensor) -> PromptEmbeds:
        """Rows picked by an int (kept as a batch of one), a slice, a list of ints or an index/bool tensor."""
        if isinstance(index, int):
            index = slice(index, index + 1) if index != -1 else slice(-1, None)
        elif not isinstance(index, slice):
            index = torch.as_tensor(index)
            if index.dtype != torch.bool:
                index = index.long()
        return self._map(lambda t: t[index.to(t.device) if isinstance(index, Tensor) else index])

    __getitem__ = select

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> PromptEmbeds:
        """A copy on `device`; floating tensors are also cast to `dtype` when given."""
        return self._map(lambda t: t.to(device=device, dtype=dtype if t.is_floating_point() else None))

    @classmethod
    def cat(cls, items: Sequence[PromptEmbeds]) -> PromptEmbeds:
        """Concatenate along the batch dimension."""
        if not items:
            raise ValueError("PromptEmbeds.cat needs at least one item.")
        out = {}
        for f in dataclasses.fields(cls):
            values = [getattr(item, f.name) for item in items]
            if all(v is None for v in values):
                out[f.name] = None
            elif any(v is None for v in values):
                raise ValueError(f"Cannot concatenate PromptEmbeds where only some have `{f.name}`.")
            else:
                out[f.name] = torch.cat(values, dim=0)
        return cls(**out)


def map_rows(fn: Callable[[slice], Any], total: int, size: int) -> Any:
    """``fn`` over consecutive row slices of at most ``size`` rows, outputs concatenated along rows (tensors, or
    dicts of tensors)."""
    parts = [fn(slice(begin, min(begin + size, total))) for begin in range(0, total, size)]
    if isinstance(parts[0], dict):
        return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}
    return torch.cat(parts)


def _apply(fn: Callable[[Tensor], Tensor], value: Tensor | None) -> Tensor | None:
    return None if value is None else fn(value)
