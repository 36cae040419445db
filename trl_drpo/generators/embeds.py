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
    """Encoded prompts, one row per sample, in the layout the pipeline's call and the denoiser consume.

    Attributes:
        prompt_embeds: text-encoder hidden states, `(batch, sequence, dim)`; None only for a pipeline without a
            registered family, whose call encodes `texts` itself.
        pooled_prompt_embeds: pooled text embedding (SDXL's `text_embeds`, SD3's and Flux's pooled projections),
            `(batch, dim)`, or `None`.
        prompt_attention_mask: `(batch, sequence)` mask of the T5/Gemma tokens (PixArt, Sana), or `None`.
        add_time_ids: SDXL micro-conditioning `(batch, 6)`, or `None` to derive it from the latent size at call time
            (`(h, w, 0, 0, h, w)`, what `pipe(height=h, width=w)` uses).
        texts: the prompts themselves, one per row, when the call has to encode them (see `prompt_embeds`).
    """

    prompt_embeds: Tensor | None
    pooled_prompt_embeds: Tensor | None = None
    prompt_attention_mask: Tensor | None = None
    add_time_ids: Tensor | None = None
    texts: list[str] | None = None

    def __post_init__(self) -> None:
        if self.prompt_embeds is None and self.texts is None:
            raise ValueError("PromptEmbeds needs `prompt_embeds` or `texts`.")

    def _map(self, fn: Callable[[Tensor], Tensor], rows: Callable[[list[str]], list[str]]) -> PromptEmbeds:
        values = {f.name: _apply(fn, getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "texts"}
        return PromptEmbeds(**values, texts=None if self.texts is None else rows(self.texts))

    def __len__(self) -> int:
        return len(self.texts) if self.prompt_embeds is None else self.prompt_embeds.shape[0]

    def call_kwargs(self) -> dict[str, Any]:
        """The pipeline call's keyword arguments for these rows: `prompt_embeds` and the family's pooled embeddings
        and attention mask that are set, or `prompt` when only the texts are known."""
        if self.prompt_embeds is None:
            return {"prompt": list(self.texts)}
        names = ("prompt_embeds", "pooled_prompt_embeds", "prompt_attention_mask")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}

    def repeat_interleave(self, repeats: int) -> PromptEmbeds:
        """Each row repeated `repeats` times in place (`[a, b] -> [a, a, b, b]`), for K candidates per prompt."""
        return self._map(
            lambda t: t.repeat_interleave(repeats, dim=0), lambda xs: [x for x in xs for _ in range(repeats)]
        )

    def select(self, index: int | slice | Sequence[int] | Tensor) -> PromptEmbeds:
        """Rows picked by an int (kept as a batch of one), a slice, a list of ints or an index/bool tensor."""
        if isinstance(index, int):
            index = slice(index, index + 1) if index != -1 else slice(-1, None)
        elif not isinstance(index, slice):
            index = torch.as_tensor(index)
            if index.dtype != torch.bool:
                index = index.long()
        rows = torch.arange(len(self))[index.cpu() if isinstance(index, Tensor) else index].tolist()
        return self._map(
            lambda t: t[index.to(t.device) if isinstance(index, Tensor) else index], lambda xs: [xs[i] for i in rows]
        )

    __getitem__ = select

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> PromptEmbeds:
        """A copy on `device`; floating tensors are also cast to `dtype` when given."""
        return self._map(lambda t: t.to(device=device, dtype=dtype if t.is_floating_point() else None), list)

    @classmethod
    def cat(cls, items: Sequence[PromptEmbeds]) -> PromptEmbeds:
        """Concatenate along the batch dimension."""
        if not items:
            raise ValueError("PromptEmbeds.cat needs at least one item.")
        out: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            values = [getattr(item, f.name) for item in items]
            if all(v is None for v in values):
                out[f.name] = None
            elif any(v is None for v in values):
                raise ValueError(f"Cannot concatenate PromptEmbeds where only some have `{f.name}`.")
            elif f.name == "texts":
                out[f.name] = [text for value in values for text in value]
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
