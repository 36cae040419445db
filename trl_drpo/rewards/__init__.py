"""Built-in rewards and a registry of them by name.

Every reward is a callable ``reward(images, prompts) -> list[float]``, one finite score per image, used by DrPO only
to rank candidates (never differentiated). Model rewards load lazily (on the first call or `load()`) from a Hugging
Face Hub id or a local path, run in inference mode, batched, in float16 on GPU (float32 on CPU), and accept both PIL
images and the trainer's ``(B, 3, H, W)`` tensors in [0, 1] (``input_format = "pt"``).

Built-in rewards (name: what, default weights):

- ``jpeg_compressibility``: minus the JPEG size in kB at quality 95 (DDPO); no model.
- ``jpeg_incompressibility``: the JPEG size in kB at quality 95 (DDPO); no model.
- ``aesthetic``: LAION improved aesthetic predictor on CLIP ViT-L/14 embeddings; ``trl-lib/ddpo-aesthetic-predictor``.
- ``clip_score``: prompt-image cosine of any CLIP model; ``openai/clip-vit-large-patch14``.
- ``pickscore``: PickScore cosine, without the temperature as in the DrPO paper; ``yuvalkirstain/PickScore_v1``.
- ``hpsv2`` / ``hpsv2.1``: HPSv2 cosine, open_clip checkpoint converted to a transformers CLIP; ``xswu/HPSv2``.
- ``image_reward``: ImageReward (BLIP) on transformers' BLIP modules; ``THUDM/ImageReward``.
- ``vlm_judge``: P("yes") of a VLM asked whether the image matches the prompt; ``Qwen/Qwen2.5-VL-3B-Instruct``.

Use them directly (``PickScore(device="cuda:1")``), by name (``get_reward("pickscore", batch_size=16)``), or from a
config list with weights (``load_rewards(["pickscore", "aesthetic"], weights=[0.7, 0.3])``). Register your own with
`register_reward`.
"""

from __future__ import annotations

import functools
import importlib
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

from ..checkpoints import UnsafeCheckpointError, load_state_dict_file
from .base import (
    ClipStylePreprocessor,
    PretrainedReward,
    Reward,
    to_pil_images,
)
from .clip import AestheticScore, CLIPScore, PickScore, RewardMLP
from .hps import HPSv2, convert_open_clip_state_dict
from .image_reward import ImageReward, ImageRewardModel, convert_image_reward_state_dict
from .jpeg import JpegCompressibility, JpegIncompressibility
from .vlm import VLMJudge


RewardFunc = Callable[..., Any]
"""``reward(images, prompts, **columns) -> Sequence[float] | torch.Tensor | np.ndarray`` (may be ``async``)."""

RewardSpec = Union[str, RewardFunc, Mapping[str, Any]]
"""One entry of a reward list: a registered name, ``"module:attribute"``, a callable, or ``{"name": ..., **kwargs}``
(optionally with ``"weight"``)."""

REWARDS: dict[str, Callable[..., RewardFunc]] = {}
"""Registered reward factories by canonical name; call one with keyword arguments to build the reward."""

_ALIASES: dict[str, str] = {}


def _normalize(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def register_reward(
    name: str,
    factory: Callable[..., RewardFunc] | None = None,
    *,
    aliases: Sequence[str] = (),
    overwrite: bool = False,
) -> Any:
    """Register a reward factory (a class or a function returning a reward callable) under ``name``.

    Usable as ``register_reward("mine", MyReward)`` or as a decorator ``@register_reward("mine")``. Names are case-
    and dash/underscore-insensitive. Registering a taken name raises unless ``overwrite=True``.
    """

    def add(target: Callable[..., RewardFunc]) -> Callable[..., RewardFunc]:
        key = _normalize(name)
        for alias in (key, *(_normalize(a) for a in aliases)):
            if not overwrite and (alias in REWARDS or alias in _ALIASES):
                raise ValueError(f"A reward named {alias!r} is already registered; pass overwrite=True to replace it.")
        REWARDS[key] = target
        _ALIASES.pop(key, None)
        for alias in aliases:
            _ALIASES[_normalize(alias)] = key
        return target

    return add(factory) if factory is not None else add


def available_rewards() -> list[str]:
    """Canonical names of the registered rewards, sorted."""
    return sorted(REWARDS)


def get_reward(name: str, **kwargs: Any) -> RewardFunc:
    """Build the reward registered as ``name`` (or an alias such as ``"clip"``, ``"hps"``, ``"imagereward"``),
    passing ``kwargs`` to its factory, e.g. ``get_reward("pickscore", device="cuda:1", batch_size=16)``.

    Raises:
        KeyError: unknown name; the message lists the available ones.
    """
    key = _normalize(name)
    key = _ALIASES.get(key, key)
    if key not in REWARDS:
        raise KeyError(
            f"Unknown reward {name!r}. Available rewards: {', '.join(available_rewards())}. Pass a callable, a "
            "'module:attribute' import path, or register your own with trl_drpo.rewards.register_reward."
        )
    return REWARDS[key](**kwargs)


def _import_reward(path: str, kwargs: Mapping[str, Any]) -> RewardFunc:
    module_name, _, attribute = path.partition(":")
    target = getattr(importlib.import_module(module_name), attribute)
    if isinstance(target, type):  # a reward class: build it
        return target(**kwargs)
    if kwargs:
        raise ValueError(f"{path!r} is not a class, so it takes no keyword arguments (got {sorted(kwargs)}).")
    return target


def _build(spec: RewardSpec) -> tuple[RewardFunc, float | None]:
    if isinstance(spec, str):
        return (_import_reward(spec, {}) if ":" in spec else get_reward(spec)), None
    if isinstance(spec, Mapping):
        options = dict(spec)
        if "name" not in options:
            raise ValueError(f"A reward given as a mapping needs a 'name' key, got {spec!r}.")
        name, weight = str(options.pop("name")), options.pop("weight", None)
        reward = _import_reward(name, options) if ":" in name else get_reward(name, **options)
        return reward, (float(weight) if weight is not None else None)
    if callable(spec):
        return spec, None
    raise TypeError(f"Cannot build a reward from {spec!r}: give a name, a callable or a mapping with a 'name'.")


def load_rewards(
    specs: RewardSpec | Sequence[RewardSpec] | Mapping[str, float],
    weights: Sequence[float] | None = None,
) -> tuple[list[RewardFunc], list[float]]:
    """Turn a config's reward list into ``(callables, weights)``, ready for the trainer.

    Accepted forms::

        "pickscore"                                           # one reward, weight 1
        ["pickscore", "aesthetic"], weights=[0.7, 0.3]        # names (or callables) plus weights
        {"pickscore": 0.7, "aesthetic": 0.3}                  # name -> weight
        [{"name": "pickscore", "weight": 0.7, "batch_size": 16}, "my_pkg.rewards:MyReward"]

    Weights default to 1 and are returned as given (the trainer normalises them after z-scoring each reward).

    Raises:
        KeyError: an unknown reward name (the message lists the available ones).
        ValueError: weights of the wrong number, negative or not finite, or given twice.
    """
    if isinstance(specs, Mapping) and "name" not in specs:
        if weights is not None:
            raise ValueError("Give weights either in the {name: weight} mapping or as `weights`, not both.")
        specs, weights = list(specs.keys()), [float(w) for w in specs.values()]
    if isinstance(specs, (str, Mapping)) or callable(specs):
        specs = [specs]
    specs = list(specs)
    if not specs:
        raise ValueError("No rewards given.")
    if weights is not None and len(weights) != len(specs):
        raise ValueError(f"Got {len(weights)} weights for {len(specs)} rewards; give one weight per reward.")
    funcs, resolved = [], []
    for i, spec in enumerate(specs):
        reward, inline_weight = _build(spec)
        if inline_weight is not None and weights is not None:
            raise ValueError(f"Reward {i} has a 'weight' key and `weights` were given too; use one of them.")
        weight = float(weights[i]) if weights is not None else (inline_weight if inline_weight is not None else 1.0)
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"Reward weights must be finite and non-negative, got {weight} for reward {i}.")
        funcs.append(reward)
        resolved.append(weight)
    return funcs, resolved


register_reward("jpeg_compressibility", JpegCompressibility, aliases=("compressibility",))
register_reward("jpeg_incompressibility", JpegIncompressibility, aliases=("incompressibility",))
register_reward("aesthetic", AestheticScore, aliases=("aesthetics", "laion_aesthetic", "aes"))
register_reward("clip_score", CLIPScore, aliases=("clip", "clipscore"))
register_reward("pickscore", PickScore, aliases=("pick_score",))
register_reward("hpsv2", HPSv2, aliases=("hps", "hps_v2"))
register_reward("hpsv2.1", functools.partial(HPSv2, version="v2.1", name="hpsv2.1"), aliases=("hps_v2.1",))
register_reward("image_reward", ImageReward, aliases=("imagereward", "ir"))
register_reward("vlm_judge", VLMJudge, aliases=("vlm",))


__all__ = [
    "REWARDS",
    "AestheticScore",
    "CLIPScore",
    "ClipStylePreprocessor",
    "HPSv2",
    "ImageReward",
    "ImageRewardModel",
    "JpegCompressibility",
    "JpegIncompressibility",
    "PickScore",
    "PretrainedReward",
    "Reward",
    "RewardFunc",
    "RewardMLP",
    "RewardSpec",
    "UnsafeCheckpointError",
    "VLMJudge",
    "available_rewards",
    "convert_image_reward_state_dict",
    "convert_open_clip_state_dict",
    "get_reward",
    "load_rewards",
    "load_state_dict_file",
    "register_reward",
    "to_pil_images",
]
