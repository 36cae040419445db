"""Calling user rewards: the convention, concurrency and checks.

A reward is any callable ``reward(images, prompts, **columns)`` returning one finite score per image (a sequence,
numpy array or tensor). ``images`` is a list of PIL images, or a float tensor ``(N, 3, H, W)`` in [0, 1] when the
callable has ``input_format = "pt"``. Extra dataset columns are passed as keyword arguments only to callables that
accept them. ``async def`` rewards (or objects with an ``async def __call__``) run concurrently with each other.
Rewards are only used to rank candidates: they never receive gradients.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .ranking import reward_ensemble


def to_pil(images: torch.Tensor) -> list:
    """``(N, 3, H, W)`` float images in [0, 1] -> uint8 PIL images, the way diffusers pipelines return them."""
    from diffusers.image_processor import VaeImageProcessor

    return VaeImageProcessor.numpy_to_pil(VaeImageProcessor.pt_to_numpy(images.detach().float().cpu()))


def _run_coroutine(coroutine: Any) -> Any:
    """Run a coroutine to completion from synchronous code, also when an event loop is already running in this
    thread (a Jupyter cell, an async application calling `trainer.train()`): then it runs on a loop of its own in a
    worker thread, since `asyncio.run` refuses to nest."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


def reward_name(fn: Callable) -> str:
    """Name used in logs: the ``name`` attribute, else ``__name__``, else the class name."""
    name = getattr(fn, "name", None) or getattr(fn, "__name__", None) or type(fn).__name__
    return str(name)


def _is_async(fn: Callable) -> bool:
    # An object whose __call__ is `async def` is awaitable too; `callable()` cannot tell.
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(type(fn).__call__)


def _accepted_columns(fn: Callable, columns: Sequence[str]) -> list[str]:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return []
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return list(columns)
    names = {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    return [c for c in columns if c in names]


@dataclass
class RewardFunctions:
    """The rewards of a run, with their weights, called with the convention above and checked.

    Args:
        funcs: one callable or a list of them.
        weights: one non-negative weight per callable, or None for equal weights.
    """

    funcs: list[Callable]
    weights: list[float]
    names: list[str]

    @classmethod
    def build(cls, funcs: Callable | Sequence[Callable], weights: Sequence[float] | None = None) -> RewardFunctions:
        funcs = list(funcs) if isinstance(funcs, (list, tuple)) else [funcs]
        if not funcs:
            raise ValueError("DrPOTrainer needs at least one reward function.")
        for fn in funcs:
            if not callable(fn):
                raise TypeError(
                    f"Reward {fn!r} is not callable. Pass a function `reward(images, prompts) -> list[float]`, or a "
                    "built-in reward from `trl_drpo.rewards`."
                )
        weights = [1.0] * len(funcs) if weights is None else [float(w) for w in weights]
        if len(weights) != len(funcs):
            raise ValueError(f"Got {len(weights)} reward_weights for {len(funcs)} reward functions; give one each.")
        if any(not np.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"reward_weights must be non-negative with a positive sum, got {weights}.")
        names = [reward_name(fn) for fn in funcs]
        seen: dict[str, int] = {}
        for i, name in enumerate(names):  # duplicated names would merge their metrics
            if name in seen:
                seen[name] += 1
                names[i] = f"{name}_{seen[name]}"
            else:
                seen[name] = 0
        return cls(funcs=funcs, weights=weights, names=names)

    def load(self) -> None:
        """Load every reward that has a ``load()`` method (the built-in model rewards), raising a `RuntimeError`
        naming the reward and the cause when one cannot load."""
        for name, fn in zip(self.names, self.funcs):
            load = getattr(fn, "load", None)
            if not callable(load):
                continue
            try:
                load()
            except Exception as err:
                raise RuntimeError(
                    f"Reward {name!r} could not be loaded: {err!r}. Check its model path or Hub id (and your network "
                    "or HF_HUB_OFFLINE), or pass another reward."
                ) from err

    def combine(self, scores: torch.Tensor) -> torch.Tensor:
        """The raw scores ``(num_rewards, N)`` weighted into one value per image (weights normalised to sum to one):
        the logged `reward`. Ranking uses z-scored scores instead (`trl_drpo.ranking.reward_ensemble`)."""
        weights = torch.tensor(self.normalized_weights, dtype=scores.dtype)
        return (weights[:, None] * scores).sum(0)

    @property
    def normalized_weights(self) -> list[float]:
        """The reward weights scaled to sum to one (the weights of `combine`, the card and the CLI report)."""
        total = sum(self.weights)
        return [weight / total for weight in self.weights]

    def ranking(self, scores: torch.Tensor, num_prompts: int, raw: bool = False) -> torch.Tensor:
        """The ``(num_prompts, K)`` values each prompt's K candidates are ranked by, from ``(num_rewards,
        num_prompts * K)`` raw scores (prompt-major): the weighted sum of per-prompt z-scores
        (`trl_drpo.ranking.reward_ensemble`, docs/method.md §3), or with ``raw=True`` the weighted raw scores
        (`combine`), as a pass mark needs: z-scores would move it with each group's spread."""
        if raw:
            return self.combine(scores).view(num_prompts, -1)
        return reward_ensemble([row.view(num_prompts, -1) for row in scores], self.weights)

    @property
    def wants_pil(self) -> bool:
        return any(getattr(fn, "input_format", "pil") != "pt" for fn in self.funcs)

    def __call__(
        self,
        images: torch.Tensor,
        prompts: Sequence[str],
        columns: Mapping[str, Sequence[Any]] | None = None,
        pil_images: list | None = None,
    ) -> torch.Tensor:
        """Score ``images`` (a ``(N, 3, H, W)`` tensor in [0, 1]) for ``prompts`` with every reward.

        Returns a ``(num_rewards, N)`` float tensor on the CPU. Raises a `ValueError` naming the reward and the
        prompt when a reward returns the wrong number of scores or a non-finite score, and a `RuntimeError` with
        the same context when a reward raises.
        """
        columns = dict(columns or {})
        if pil_images is None and self.wants_pil:
            pil_images = to_pil(images)

        def call_args(fn: Callable) -> tuple[tuple, dict]:
            batch = images if getattr(fn, "input_format", "pil") == "pt" else pil_images
            return (batch, list(prompts)), {c: list(columns[c]) for c in _accepted_columns(fn, list(columns))}

        results: list[Any] = [None] * len(self.funcs)
        async_jobs = []
        for i, fn in enumerate(self.funcs):
            args, kwargs = call_args(fn)
            if _is_async(fn):
                async_jobs.append((i, fn, args, kwargs))
                continue
            try:
                results[i] = fn(*args, **kwargs)
            except Exception as err:
                raise RuntimeError(self._context(i, prompts, "raised " + repr(err))) from err
        if async_jobs:

            async def gather() -> list[Any]:
                return await asyncio.gather(
                    *(fn(*args, **kwargs) for _, fn, args, kwargs in async_jobs), return_exceptions=True
                )

            for (i, _, _, _), value in zip(async_jobs, _run_coroutine(gather())):
                if isinstance(value, BaseException):
                    raise RuntimeError(self._context(i, prompts, "raised " + repr(value))) from value
                results[i] = value
        return torch.stack([self._check(i, value, prompts) for i, value in enumerate(results)])

    def _context(self, index: int, prompts: Sequence[str], what: str, prompt: str | None = None) -> str:
        prompt = prompt if prompt is not None else (prompts[0] if prompts else "")
        return f"Reward {self.names[index]!r} {what} (prompt {prompt!r}, {len(prompts)} images in the call)."

    def _check(self, index: int, value: Any, prompts: Sequence[str]) -> torch.Tensor:
        n = len(prompts)
        if value is None:
            raise ValueError(
                self._context(index, prompts, f"returned None for {n} images") + " Return one float per image."
            )
        try:
            if isinstance(value, torch.Tensor):
                # Any dtype (bfloat16 has no numpy twin) on any device.
                value = value.detach().to(device="cpu", dtype=torch.float64).numpy()
            elif isinstance(value, (list, tuple)):
                value = [v.detach().cpu().double().item() if isinstance(v, torch.Tensor) else v for v in value]
            scores = torch.as_tensor(np.asarray(value, dtype=np.float64)).float()
        except (TypeError, ValueError, RuntimeError) as err:
            raise ValueError(
                self._context(index, prompts, f"returned {type(value).__name__} {value!r:.200}")
                + " Return one float per image."
            ) from err
        if scores.ndim == 2 and scores.shape[1] == 1:
            scores = scores[:, 0]
        if scores.ndim == 0:
            raise ValueError(
                self._context(index, prompts, f"returned one value for {n} images")
                + " Return exactly one float per image, in order."
            )
        if scores.ndim != 1 or scores.shape[0] != n:
            raise ValueError(
                self._context(index, prompts, f"returned scores of shape {tuple(scores.shape)} for {n} images")
                + " Return exactly one float per image, in order."
            )
        bad = torch.nonzero(~torch.isfinite(scores)).flatten()
        if len(bad):
            i = int(bad[0])
            raise ValueError(
                self._context(
                    index, prompts, f"returned a non-finite score {scores[i].item()} for image {i}", prompts[i]
                )
                + " Every score must be a finite number."
            )
        return scores
