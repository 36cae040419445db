"""The feature-map base class, its registry, and the pooled statistics several maps share (docs/method.md §5)."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar, TypeVar

from torch import Tensor, nn

from ..generators import OneStepGenerator, PromptEmbeds, map_rows


logger = logging.getLogger(__name__)

STD_EPS = 1e-6
"""Added to the variance before the square root in every `_std` key (as the authors do)."""


# --------------------------------------------------------------------------------------------------------------------
# Base class and registry
# --------------------------------------------------------------------------------------------------------------------


class FeatureMap(nn.Module):
    """A frozen map `latents -> {key: (batch, tokens, dim)}`, differentiable with respect to the latents.

    Subclasses set :attr:`available_keys` / :attr:`default_keys` (before calling :meth:`_select_keys`) and implement
    :meth:`compute`. Call the map as `fmap(latents, embeds=None)`.

    Attributes:
        keys: the keys returned, in order.
        requires_embeds: whether `embeds` must be passed (one row per latent, or a single row for all).
        takes_call_layout: whether the map reads latents in the layout of the pipeline call's `latents=` (packed for
            FLUX) rather than only on the VAE's `(B, C, H, W)` grid.
    """

    requires_embeds: ClassVar[bool] = False
    takes_call_layout: ClassVar[bool] = False

    def __init__(self) -> None:
        super().__init__()
        self.keys: tuple[str, ...] = ()
        self._keys_were_chosen = False

    @property
    def available_keys(self) -> tuple[str, ...]:
        """Every key this map can produce."""
        raise NotImplementedError

    @property
    def default_keys(self) -> tuple[str, ...]:
        """The keys used when none are chosen."""
        raise NotImplementedError

    def _select_keys(self, keys: Sequence[str] | str | None) -> None:
        if isinstance(keys, str):
            keys = [keys]
        self._keys_were_chosen = keys is not None
        selected = tuple(keys) if keys is not None else tuple(self.default_keys)
        unknown = [key for key in selected if key not in self.available_keys]
        if unknown:
            raise ValueError(
                f"Unknown feature keys {unknown} for {type(self).__name__}. Available: {list(self.available_keys)}."
            )
        if not selected:
            raise ValueError(f"{type(self).__name__} needs at least one feature key.")
        self.keys = selected

    def _freeze(self) -> None:
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FeatureMap:
        """Feature maps stay in eval mode (no dropout, fixed statistics) whatever the caller asks."""
        return super().train(False)

    def compute(self, latents: Tensor, embeds: PromptEmbeds | None) -> dict[str, Tensor]:
        """The features for :attr:`keys`; implemented by subclasses."""
        raise NotImplementedError

    def forward(self, latents: Tensor, embeds: PromptEmbeds | None = None) -> dict[str, Tensor]:
        """`{key: (batch, tokens, dim)}` for :attr:`keys`, with gradient to `latents` when it requires one."""
        if latents.ndim != 4 and not self.takes_call_layout:
            raise ValueError(
                f"{type(self).__name__} reads latents on the VAE's grid, (B, C, H, W); got {tuple(latents.shape)} "
                "(FLUX packs its latents): use feature_map='denoiser' or a pixel feature map."
            )
        if self.requires_embeds and embeds is None:
            raise ValueError(f"{type(self).__name__} needs the prompt embeddings: call fmap(latents, embeds).")
        return self.compute(latents, embeds)

    def per_prompt(
        self, latents: Tensor, embeds: PromptEmbeds | None, num_prompts: int, rows: int | None = None
    ) -> dict[str, Tensor]:
        """The features of prompt-major latents as ``{key: (prompts, candidates, tokens, dim)}`` in float32,
        computed `rows` latents at a time (all at once by default)."""
        select = (lambda r: embeds.select(r)) if embeds is not None else (lambda r: None)
        feats = map_rows(lambda r: self(latents[r], select(r)), len(latents), rows or len(latents))
        return {key: value.float().reshape(num_prompts, -1, *value.shape[1:]) for key, value in feats.items()}

    @classmethod
    def from_generator(cls, generator: OneStepGenerator, keys: Sequence[str] | None = None, **kwargs: Any):
        """Build the map for `generator`: by default its constructor, `cls(generator, keys=keys, **kwargs)` (see each
        subclass for its keyword arguments)."""
        return cls(generator, keys=keys, **kwargs)


class _StopForward(Exception):
    """Raised by the hook on the last block a map reads, so that the rest of the network does not run."""


def _same(output: Any) -> Any:
    return output


def read_block_outputs(
    root: nn.Module, names: Sequence[str], forward: Callable[[], Any], transform: Callable[[Any], Tensor] = _same
) -> dict[str, Tensor]:
    """Run `forward()` (a call of `root`) with forward hooks on `root`'s submodules `names`, and return each one's
    output through `transform`, stopping the forward as soon as all of them have run (in whatever order the network
    runs them), so that the blocks after them cost nothing."""
    captured: dict[str, Tensor] = {}

    def hook_for(name: str):
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            captured[name] = transform(output)
            if len(captured) == len(names):
                raise _StopForward

        return hook

    handles = [root.get_submodule(name).register_forward_hook(hook_for(name)) for name in names]
    try:
        forward()
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return captured


_FeatureMapT = TypeVar("_FeatureMapT", bound="type[FeatureMap]")
FEATURE_MAPS: dict[str, type[FeatureMap]] = {}
"""Registry: name -> :class:`FeatureMap` subclass (built through its `from_generator`)."""


def register_feature_map(name: str) -> Callable[[_FeatureMapT], _FeatureMapT]:
    """Class decorator registering a :class:`FeatureMap` subclass under `name` for :func:`build_feature_map`."""

    def decorator(cls: _FeatureMapT) -> _FeatureMapT:
        if not (isinstance(cls, type) and issubclass(cls, FeatureMap)):
            raise TypeError(f"{cls!r} must be a subclass of FeatureMap.")
        FEATURE_MAPS[name] = cls
        return cls

    return decorator


COMBINE = "+"
"""Joins map names into one combined map: ``"denoiser+vae_decoder"`` (see :class:`CombinedFeatureMap`)."""


class CombinedFeatureMap(FeatureMap):
    """Several feature maps read side by side: the union of their keys, each key its own particle set (so the drift
    loss aggregates over all of them, docs/method.md §5). Built by :func:`build_feature_map` from a name such as
    ``"denoiser+vae_decoder"``.

    Keys are ``"<map>/<key>"`` (``"denoiser/mid_block"``, ``"vae_decoder/mid_block_mean_4"``); each part computes
    its own keys, in the order of the name, with the gradient to the latents of every part.
    """

    def __init__(self, maps: dict[str, FeatureMap]) -> None:
        super().__init__()
        self.maps = nn.ModuleDict(maps)
        self.keys = tuple(f"{name}/{key}" for name, fmap in maps.items() for key in fmap.keys)
        self.requires_embeds = any(fmap.requires_embeds for fmap in maps.values())
        self.takes_call_layout = all(fmap.takes_call_layout for fmap in maps.values())

    @property
    def available_keys(self) -> tuple[str, ...]:
        return tuple(f"{name}/{key}" for name, fmap in self.maps.items() for key in fmap.available_keys)

    @property
    def default_keys(self) -> tuple[str, ...]:
        return tuple(f"{name}/{key}" for name, fmap in self.maps.items() for key in fmap.default_keys)

    def compute(self, latents: Tensor, embeds: PromptEmbeds | None) -> dict[str, Tensor]:
        features = {}
        for name, fmap in self.maps.items():
            features.update({f"{name}/{key}": value for key, value in fmap(latents, embeds).items()})
        return features


def _split_combined(name: str, keys: Sequence[str] | None, kwargs: dict[str, Any]) -> dict[str, tuple]:
    # "a+b" -> {part: (its keys or None, its kwargs)}, validating the per-map layout of keys and kwargs.
    parts = name.split(COMBINE)
    if len(set(parts)) != len(parts) or not all(parts):
        raise ValueError(f"feature_map={name!r} must join distinct map names with '+', e.g. 'denoiser+vae_decoder'.")
    stray = [k for k, v in kwargs.items() if k not in parts or not isinstance(v, dict)]
    if stray:
        example = ", ".join(f"{part!r}: {{...}}" for part in parts)
        raise ValueError(
            f"feature_map={name!r} takes feature_map_kwargs per map, {{{example}}}; got {sorted(stray)} at the top "
            "level."
        )
    per_part: dict[str, list[str] | None] = dict.fromkeys(parts)
    for key in keys or ():
        part, _, sub = key.partition("/")
        if part not in per_part or not sub:
            raise ValueError(
                f"feature key {key!r}: the keys of feature_map={name!r} are '<map>/<key>' with <map> one of {parts}."
            )
        per_part[part] = [*(per_part[part] or []), sub]
    if keys is not None:
        empty = [part for part, chosen in per_part.items() if not chosen]
        if empty:
            raise ValueError(
                f"feature_keys choose no key of {empty}: give each map of feature_map={name!r} at least one "
                "'<map>/<key>' key, or leave feature_keys unset for every map's defaults."
            )
    return {part: (per_part[part], kwargs.get(part, {})) for part in parts}


def build_feature_map(
    name: str, generator: OneStepGenerator, keys: Sequence[str] | None = None, **kwargs: Any
) -> FeatureMap:
    """Build the feature map registered as `name` for `generator`, returning `keys` (default: its defaults).

    `name` may join registered names with ``"+"`` (``"denoiser+vae_decoder"``): a :class:`CombinedFeatureMap`,
    whose `kwargs` are given per map (``denoiser={"pool_size": 1}, vae_decoder={"patch_sizes": [4]}``) and whose
    keys are ``"<map>/<key>"``.

    Raises:
        ValueError: a name is not registered, a key is unknown to its map, an option is not one the map takes (keys
            are chosen by `keys`, never by an option), or a combination's keys or kwargs are not laid out per map.
    """
    check_feature_map_options(name, kwargs)
    if COMBINE in name:
        parts = _split_combined(name, keys, kwargs)
        return CombinedFeatureMap(
            {part: build_feature_map(part, generator, keys=k, **kw) for part, (k, kw) in parts.items()}
        )
    if name not in FEATURE_MAPS:
        raise ValueError(
            f"Unknown feature map {name!r}. Available: {sorted(FEATURE_MAPS)}, or several joined with '+'. Register "
            "a new one with `@trl_drpo.features.register_feature_map(name)` on a FeatureMap subclass."
        )
    return FEATURE_MAPS[name].from_generator(generator, keys=keys, **kwargs)


def check_feature_map_options(name: str, kwargs: dict[str, Any]) -> None:
    """Raise a `ValueError` naming the fix when `kwargs` (`DrPOConfig.feature_map_kwargs`, per map for maps joined
    with ``"+"``) hold an option that the feature map `name` does not take, or try to choose its keys (that is
    `feature_keys`' job). Cheap: reads the registered classes' signatures, builds nothing. Names that are not
    registered, and a combination's kwargs that are not laid out per map, are left to `build_feature_map`."""
    per_map = {part: kwargs.get(part) for part in name.split(COMBINE)} if COMBINE in name else {name: kwargs}
    for part, options in per_map.items():
        if part in FEATURE_MAPS and isinstance(options, dict):
            _check_options(part, FEATURE_MAPS[part], options)


def _check_options(name: str, cls: type[FeatureMap], options: dict[str, Any]) -> None:
    # A misspelt option would otherwise surface as a bare TypeError from inside the map's constructor.
    if "keys" in options:
        raise ValueError(
            f"feature_map_kwargs cannot choose the keys of feature map {name!r}: set feature_keys instead "
            "('<map>/<key>' for maps joined with '+')."
        )
    accepted: set[str] = set()
    for builder in (cls.from_generator, cls.__init__):
        parameters = inspect.signature(builder).parameters.values()
        accepted |= {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            break  # this builder passes no further options on
    else:
        return  # the constructor itself takes any option
    accepted -= {"self", "generator", "keys"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(
            f"Feature map {name!r} takes no option {unknown} in feature_map_kwargs; its options: {sorted(accepted)}."
        )


# --------------------------------------------------------------------------------------------------------------------
# Shared pooling
# --------------------------------------------------------------------------------------------------------------------


def feature_std(x: Tensor, dim: int | tuple[int, ...]) -> Tensor:
    # Population variance, so that a single position gives std sqrt(eps) rather than NaN.
    return (x.var(dim=dim, unbiased=False) + STD_EPS).sqrt()


def stat_keys(prefix: str, patch_sizes: Iterable[int]) -> list[str]:
    keys = [f"{prefix}_mean", f"{prefix}_std"]
    for p in patch_sizes:
        keys += [f"{prefix}_mean_{p}", f"{prefix}_std_{p}"]
    return keys


def patch_stats(x: Tensor, p: int) -> tuple[Tensor, Tensor]:
    # Non-overlapping p x p patches -> ((H/p)(W/p) tokens, C) mean and std.
    b, c, h, w = x.shape
    patches = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p, c)
    return patches.mean(dim=2), feature_std(patches, dim=2)


def spatial_stats(prefix: str, x: Tensor, wanted: Sequence[str], patch_sizes: Sequence[int]) -> dict[str, Tensor]:
    """The `{prefix}_mean/_std` (one token) and `{prefix}_mean_p/_std_p` (patch tokens) keys of `x` in `wanted`."""
    out: dict[str, Tensor] = {}
    if f"{prefix}_mean" in wanted:
        out[f"{prefix}_mean"] = x.mean(dim=(2, 3)).unsqueeze(1)
    if f"{prefix}_std" in wanted:
        out[f"{prefix}_std"] = feature_std(x, dim=(2, 3)).unsqueeze(1)
    for p in patch_sizes:
        keys = [k for k in (f"{prefix}_mean_{p}", f"{prefix}_std_{p}") if k in wanted]
        if keys and x.shape[-2] % p == 0 and x.shape[-1] % p == 0:
            mean, std = patch_stats(x, p)
            out.update({k: v for k, v in zip((f"{prefix}_mean_{p}", f"{prefix}_std_{p}"), (mean, std)) if k in keys})
    return out


def keep_computed(fmap: FeatureMap, features: dict[str, Tensor], shape: Sequence[int]) -> dict[str, Tensor]:
    # Patch keys need a map side divisible by the patch size. A key the user chose must exist; default keys that
    # cannot exist at this input size are skipped (with a warning), as the authors' extractor does.
    missing = [k for k in fmap.keys if k not in features]
    if missing and fmap._keys_were_chosen:
        raise ValueError(
            f"Feature keys {missing} cannot be computed for inputs of shape {tuple(shape)}: the feature map's side "
            "is not divisible by the patch size. Choose other keys or a larger resolution."
        )
    if missing and missing != getattr(fmap, "_warned_missing", None):
        logger.warning("Skipping default feature keys %s: not computable for inputs of shape %s.", missing, shape)
        fmap._warned_missing = missing
    return {k: features[k] for k in fmap.keys if k in features}
