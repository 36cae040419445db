"""Frozen feature maps phi: the space in which DrPO's drift field is computed (docs/method.md, section 5).

Every map takes generator latents (UNet space, as :meth:`OneStepGenerator.sample` returns them) and returns a dict
`key -> (batch, tokens, dim)` tensor, differentiable with respect to the latents. Keys are independent particle
sets: the drift loss runs once per key and aggregates. Build one by name::

    fmap = build_feature_map("denoiser", generator)                   # default (docs/method.md §8.5)
    fmap = build_feature_map("latent_mae", generator, model_name_or_path="mae_latent_256_torch.pth")
    fmap = build_feature_map("dinov2", generator, model_name_or_path="facebook/dinov2-base")
    features = fmap(latents, embeds)                                   # embeds only needed by "denoiser"

Maps are frozen (`requires_grad=False`, always in eval mode). Add one with :func:`register_feature_map`.

| name | input | default keys |
|---|---|---|
| `denoiser` | base denoiser blocks at t=100 (adapter disabled) | last down block, `mid_block`, `up_blocks.0` |
| `latent_mae` | the latent-MAE ResNet of the paper (local checkpoint) | `layer4_{mean,std}{,_2,_4}` |
| `dinov2`, `vit_mae`, `clip_vision` | decoded pixels, `transformers` encoder | `layer{L}_{patch_mean,patch_std,cls}` |
| `latent` | the raw latents (the collapsing ablation) | `latent`, `latent_{mean,std}{,_2,_4}` |
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .generators import OneStepGenerator, PromptEmbeds, map_rows


logger = logging.getLogger(__name__)

__all__ = [
    "FEATURE_MAPS",
    "CLIPVisionFeatureMap",
    "DenoiserFeatureMap",
    "Dinov2FeatureMap",
    "FeatureMap",
    "LatentFeatureMap",
    "LatentMAEFeatureMap",
    "LatentMAEResNet",
    "PixelEncoderFeatureMap",
    "ViTMAEFeatureMap",
    "build_feature_map",
    "register_feature_map",
]

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
    """

    requires_embeds: ClassVar[bool] = False

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
        if latents.ndim != 4:
            raise ValueError(f"Expected latents of shape (B, C, H, W), got {tuple(latents.shape)}.")
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
        """Build the map for `generator` (see each subclass for its keyword arguments)."""
        raise NotImplementedError


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


def build_feature_map(
    name: str, generator: OneStepGenerator, keys: Sequence[str] | None = None, **kwargs: Any
) -> FeatureMap:
    """Build the feature map registered as `name` for `generator`, returning `keys` (default: its defaults).

    Raises:
        ValueError: `name` is not registered, or a key is unknown to the map.
    """
    if name not in FEATURE_MAPS:
        raise ValueError(
            f"Unknown feature map {name!r}. Available: {sorted(FEATURE_MAPS)}. Register a new one with "
            "`@trl_drpo.features.register_feature_map(name)` on a FeatureMap subclass."
        )
    return FEATURE_MAPS[name].from_generator(generator, keys=keys, **kwargs)


# --------------------------------------------------------------------------------------------------------------------
# Shared pooling
# --------------------------------------------------------------------------------------------------------------------


def _std(x: Tensor, dim: int | tuple[int, ...]) -> Tensor:
    # Population variance, so that a single position gives std sqrt(eps) rather than NaN.
    return (x.var(dim=dim, unbiased=False) + STD_EPS).sqrt()


def _stat_keys(prefix: str, patch_sizes: Iterable[int]) -> list[str]:
    keys = [f"{prefix}_mean", f"{prefix}_std"]
    for p in patch_sizes:
        keys += [f"{prefix}_mean_{p}", f"{prefix}_std_{p}"]
    return keys


def _patch_stats(x: Tensor, p: int) -> tuple[Tensor, Tensor]:
    # Non-overlapping p x p patches -> ((H/p)(W/p) tokens, C) mean and std.
    b, c, h, w = x.shape
    patches = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p, c)
    return patches.mean(dim=2), _std(patches, dim=2)


def _spatial_stats(prefix: str, x: Tensor, wanted: Sequence[str], patch_sizes: Sequence[int]) -> dict[str, Tensor]:
    """The `{prefix}_mean/_std` (one token) and `{prefix}_mean_p/_std_p` (patch tokens) keys of `x` in `wanted`."""
    out: dict[str, Tensor] = {}
    if f"{prefix}_mean" in wanted:
        out[f"{prefix}_mean"] = x.mean(dim=(2, 3)).unsqueeze(1)
    if f"{prefix}_std" in wanted:
        out[f"{prefix}_std"] = _std(x, dim=(2, 3)).unsqueeze(1)
    for p in patch_sizes:
        keys = [k for k in (f"{prefix}_mean_{p}", f"{prefix}_std_{p}") if k in wanted]
        if keys and x.shape[-2] % p == 0 and x.shape[-1] % p == 0:
            mean, std = _patch_stats(x, p)
            out.update({k: v for k, v in zip((f"{prefix}_mean_{p}", f"{prefix}_std_{p}"), (mean, std)) if k in keys})
    return out


def _check_computed(fmap: FeatureMap, features: dict[str, Tensor], shape: Sequence[int]) -> dict[str, Tensor]:
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


# --------------------------------------------------------------------------------------------------------------------
# Latent-MAE ResNet
# --------------------------------------------------------------------------------------------------------------------


def _group_norm(channels: int) -> nn.GroupNorm:
    # Groups: the largest divisor of the channel count that is at most 32 (the checkpoint's convention).
    groups = max(g for g in range(1, min(32, channels) + 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels, eps=1e-5)


class _BasicBlock(nn.Module):
    """conv3x3 -> GN -> ReLU -> conv3x3 -> GN, plus a (1x1 conv -> GN) projection when the shape changes, -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.gn1 = _group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.gn2 = _group_norm(out_channels)
        self.proj_conv: nn.Module | None = None
        self.proj_gn: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.proj_conv = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)
            self.proj_gn = _group_norm(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.gn1(self.conv1(x)))
        y = self.gn2(self.conv2(y))
        residual = x if self.proj_conv is None else self.proj_gn(self.proj_conv(x))
        return F.relu(residual + y)


class LatentMAEResNet(nn.Module):
    """The encoder of the latent-space MAE (docs/method.md §5): a GroupNorm ResNet of basic blocks on VAE latents.

    Stem conv3x3 -> GN -> ReLU; then 4 stages of basic blocks (`layers`, default [3, 4, 6, 3]) of widths `widths`,
    stride 2 in the first block of stages 2-4, each stage followed by a GN (`layerK_norm`). :meth:`forward`
    returns the stage outputs `{"layer1": ..., "layer4": ...}` as `(B, C, H, W)` maps.

    :meth:`from_pretrained` reads the published checkpoint (`mae_latent_256_torch.pth`: flax-style names and HWIO
    kernels) as well as what :meth:`save_pretrained` writes.
    """

    CONFIG_NAME: ClassVar[str] = "config.json"
    WEIGHTS_NAME: ClassVar[str] = "model.safetensors"

    def __init__(
        self,
        in_channels: int = 4,
        widths: Sequence[int] = (64, 128, 256, 512),
        layers: Sequence[int] = (3, 4, 6, 3),
        stem_width: int | None = None,
    ) -> None:
        super().__init__()
        if len(widths) != len(layers):
            raise ValueError(f"widths {list(widths)} and layers {list(layers)} must have the same length.")
        self.config = {
            "in_channels": int(in_channels),
            "widths": [int(w) for w in widths],
            "layers": [int(n) for n in layers],
            "stem_width": int(stem_width or widths[0]),
        }
        stem = self.config["stem_width"]
        self.conv1 = nn.Conv2d(in_channels, stem, 3, padding=1, bias=False)
        self.gn1 = _group_norm(stem)
        self.stages = nn.ModuleList()
        self.norms = nn.ModuleList()
        channels = stem
        for index, (width, blocks) in enumerate(zip(self.config["widths"], self.config["layers"])):
            stage = nn.ModuleList()
            for block in range(blocks):
                stride = 2 if index > 0 and block == 0 else 1
                stage.append(_BasicBlock(channels, width, stride))
                channels = width
            self.stages.append(stage)
            self.norms.append(_group_norm(width))

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def forward(self, latents: Tensor) -> dict[str, Tensor]:
        x = F.relu(self.gn1(self.conv1(latents)))
        outputs: dict[str, Tensor] = {}
        for index, (stage, norm) in enumerate(zip(self.stages, self.norms)):
            for block in stage:
                x = block(x)
            x = norm(x)
            outputs[f"layer{index + 1}"] = x
        return outputs

    # ---------------------------------------------------------------------------------------------------- loading

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write `config.json` and `model.safetensors` (OIHW weights, this module's names) to `save_directory`."""
        from safetensors.torch import save_file

        path = Path(save_directory)
        path.mkdir(parents=True, exist_ok=True)
        (path / self.CONFIG_NAME).write_text(json.dumps(self.config, indent=2))
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, path / self.WEIGHTS_NAME)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> LatentMAEResNet:
        """Load from a directory written by :meth:`save_pretrained`, or from a single checkpoint file.

        Files: `.safetensors`, or a torch pickle (`.pth`/`.pt`/`.bin`) read with `weights_only=True` (no code runs).
        The dict may be the state dict itself or hold it under `state_dict` / `model_state_dict` (with optional
        `metadata.model_config`); `module.` / `_orig_mod.` prefixes are stripped. Both this module's names and the
        published flax-style names (`encoder.stages_{s}.layers_{b}.conv1.kernel`, `.scale`, HWIO kernels) load;
        the architecture (widths, blocks per stage) is read off the weights.
        """
        path = Path(path)
        config: dict[str, Any] = {}
        if path.is_dir():
            if (path / cls.CONFIG_NAME).is_file():
                config = json.loads((path / cls.CONFIG_NAME).read_text())
            candidates = [path / cls.WEIGHTS_NAME, *sorted(path.glob("*.safetensors")), *sorted(path.glob("*.pt*"))]
            files = [c for c in candidates if c.is_file()]
            if not files:
                raise FileNotFoundError(f"No latent-MAE weights (.safetensors / .pth) in {path}.")
            path = files[0]
        elif not path.is_file():
            raise FileNotFoundError(f"Latent-MAE checkpoint not found: {path} (a local file or directory is needed).")
        state, metadata = _read_checkpoint(path)
        state = _to_module_names(state)
        config = {**_infer_config(state), **config}
        model_config = metadata.get("model_config", {}) if isinstance(metadata, dict) else {}
        if "layers" in model_config and [int(n) for n in model_config["layers"]] != config["layers"]:
            raise ValueError(f"Checkpoint metadata layers {model_config['layers']} disagree with its weights.")
        model = cls(**config)
        model.load_state_dict(state, strict=True)
        return model


def _read_checkpoint(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        obj: Any = load_file(str(path))
    else:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    metadata: dict[str, Any] = {}
    if isinstance(obj, dict):
        for wrapper in ("state_dict", "model_state_dict"):
            if isinstance(obj.get(wrapper), dict):
                metadata = obj.get("metadata", {}) or {}
                obj = obj[wrapper]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"Unsupported latent-MAE checkpoint format in {path}: expected a dict of tensors.")
    state = {}
    for key, value in obj.items():
        for prefix in ("module.", "_orig_mod."):
            while key.startswith(prefix):
                key = key[len(prefix) :]
        state[key] = value
    return state, metadata


def _to_module_names(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Map the published flax-style names onto :class:`LatentMAEResNet`'s (keeping its own), kernels as OIHW."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        name = key[len("encoder.") :] if key.startswith("encoder.") else key
        parts = name.split(".")
        if parts[0].startswith("stages_") and len(parts) > 2 and parts[1].startswith("layers_"):
            parts = ["stages", parts[0][len("stages_") :], parts[1][len("layers_") :], *parts[2:]]
        elif parts[0].startswith("layer") and parts[0].endswith("_norm"):
            parts = ["norms", str(int(parts[0][len("layer") : -len("_norm")]) - 1), *parts[1:]]
        if parts[0] not in ("conv1", "gn1", "stages", "norms"):
            continue  # decoder / MAE-head weights of a full MAE checkpoint are not part of the encoder
        if value.ndim == 4:
            value = _to_oihw(key, value, kernel_size=1 if "proj_conv" in parts else 3)
        if parts[-1] in ("kernel", "scale"):
            parts[-1] = "weight"
        out[".".join(parts)] = value
    return out


def _to_oihw(key: str, kernel: Tensor, kernel_size: int) -> Tensor:
    # Flax exports conv kernels as HWIO; PyTorch wants OIHW. A `.kernel` name is always HWIO; otherwise the position
    # of the (known) spatial size tells.
    k = (kernel_size, kernel_size)
    if key.endswith(".kernel") or (tuple(kernel.shape[:2]) == k and tuple(kernel.shape[2:]) != k):
        if tuple(kernel.shape[:2]) != k:
            raise ValueError(f"Kernel {key} of shape {tuple(kernel.shape)} is not a {k} HWIO kernel.")
        return kernel.permute(3, 2, 0, 1).contiguous()
    if tuple(kernel.shape[2:]) != k:
        raise ValueError(f"Kernel {key} of shape {tuple(kernel.shape)} is neither OIHW nor HWIO with size {k}.")
    return kernel


def _infer_config(state: dict[str, Tensor]) -> dict[str, Any]:
    if "conv1.weight" not in state:
        raise KeyError("Latent-MAE checkpoint has no stem convolution (`encoder.conv1`).")
    layers: list[int] = []
    widths: list[int] = []
    while any(k.startswith(f"stages.{len(layers)}.") for k in state):
        stage = len(layers)
        layers.append(len({k.split(".")[2] for k in state if k.startswith(f"stages.{stage}.")}))
        widths.append(int(state[f"stages.{stage}.0.conv1.weight"].shape[0]))
    if not layers:
        raise KeyError("Latent-MAE checkpoint has no residual stages (`encoder.stages_*`).")
    stem = state["conv1.weight"]
    return {"in_channels": int(stem.shape[1]), "stem_width": int(stem.shape[0]), "widths": widths, "layers": layers}


@register_feature_map("latent_mae")
class LatentMAEFeatureMap(FeatureMap):
    """Mean/std features of the latent-MAE ResNet's stage outputs (docs/method.md §5; the paper's SD-Turbo default).

    Keys, for each stage K: `layerK_mean`, `layerK_std` (one token of dim C: the spatial mean and
    `sqrt(var + 1e-6)`), and `layerK_mean_p`, `layerK_std_p` for p in `patch_sizes` (one token per non-overlapping
    p x p patch). Default: the six layer4 keys. Input: the latents in UNet space (scaled), as sampled.
    """

    def __init__(
        self, model: LatentMAEResNet, keys: Sequence[str] | None = None, patch_sizes: Sequence[int] = (2, 4)
    ) -> None:
        super().__init__()
        self.model = model
        self.patch_sizes = tuple(int(p) for p in patch_sizes)
        self._select_keys(keys)
        self._freeze()

    @classmethod
    def from_generator(
        cls,
        generator: OneStepGenerator | None,
        keys: Sequence[str] | None = None,
        model_name_or_path: str | os.PathLike | None = None,
        model: LatentMAEResNet | None = None,
        patch_sizes: Sequence[int] = (2, 4),
    ):
        """Load the ResNet from `model_name_or_path` (a local checkpoint file or directory), or use `model`."""
        if model is None:
            if model_name_or_path is None:
                raise ValueError(
                    "latent_mae needs `model_name_or_path`: a local path to the latent-MAE checkpoint "
                    "(e.g. mae_latent_256_torch.pth) or a directory written by LatentMAEResNet.save_pretrained."
                )
            model = LatentMAEResNet.from_pretrained(model_name_or_path)
        if generator is not None:
            if generator.latent_channels != model.config["in_channels"]:
                raise ValueError(
                    f"The latent-MAE takes {model.config['in_channels']}-channel latents; the generator makes "
                    f"{generator.latent_channels}."
                )
            model = model.to(generator.device)
        return cls(model, keys=keys, patch_sizes=patch_sizes)

    @property
    def available_keys(self) -> tuple[str, ...]:
        keys: list[str] = []
        for k in range(1, self.model.num_stages + 1):
            keys += _stat_keys(f"layer{k}", self.patch_sizes)
        return tuple(keys)

    @property
    def default_keys(self) -> tuple[str, ...]:
        return tuple(_stat_keys(f"layer{self.model.num_stages}", self.patch_sizes))

    def compute(self, latents: Tensor, embeds: PromptEmbeds | None) -> dict[str, Tensor]:
        param = next(self.model.parameters())
        maps = self.model(latents.to(device=param.device, dtype=param.dtype))
        features: dict[str, Tensor] = {}
        for name, value in maps.items():
            features.update(_spatial_stats(name, value.float(), self.keys, self.patch_sizes))
        return _check_computed(self, features, latents.shape)


# --------------------------------------------------------------------------------------------------------------------
# Raw latents
# --------------------------------------------------------------------------------------------------------------------


@register_feature_map("latent")
class LatentFeatureMap(FeatureMap):
    """The latents themselves (docs/method.md §5; the paper's ablation, which collapses).

    Keys: `latent` (one C-dim token per latent position), `latent_mean`, `latent_std`, `latent_mean_p`,
    `latent_std_p` for p in `patch_sizes`. All are the default.
    """

    def __init__(self, keys: Sequence[str] | None = None, patch_sizes: Sequence[int] = (2, 4)) -> None:
        super().__init__()
        self.patch_sizes = tuple(int(p) for p in patch_sizes)
        self._select_keys(keys)
        self._freeze()

    @classmethod
    def from_generator(
        cls, generator: OneStepGenerator | None, keys: Sequence[str] | None = None, patch_sizes: Sequence[int] = (2, 4)
    ):
        """Keyword argument: `patch_sizes` ((2, 4))."""
        return cls(keys=keys, patch_sizes=patch_sizes)

    @property
    def available_keys(self) -> tuple[str, ...]:
        return ("latent", *_stat_keys("latent", self.patch_sizes))

    @property
    def default_keys(self) -> tuple[str, ...]:
        return self.available_keys

    def compute(self, latents: Tensor, embeds: PromptEmbeds | None) -> dict[str, Tensor]:
        x = latents.float()
        features = _spatial_stats("latent", x, self.keys, self.patch_sizes)
        if "latent" in self.keys:
            features["latent"] = x.flatten(2).transpose(1, 2)
        return _check_computed(self, features, latents.shape)


# --------------------------------------------------------------------------------------------------------------------
# Pixel encoders through transformers
# --------------------------------------------------------------------------------------------------------------------

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _processor_settings(model_name_or_path: str | os.PathLike, **hub_kwargs: Any) -> dict[str, Any]:
    """The model's image-processor config as a dict, or `{}` when there is none.

    Read as plain JSON (no processor object): fast processors need torchvision, and only mean/std/size are used.
    """
    from transformers.image_processing_base import ImageProcessingMixin

    try:
        settings, _ = ImageProcessingMixin.get_image_processor_dict(str(model_name_or_path), **hub_kwargs)
    except (OSError, ValueError):
        return {}
    return settings


def _processor_size(settings: dict[str, Any]) -> int | None:
    for field in ("crop_size", "size"):
        size = settings.get(field)
        if isinstance(size, int):
            return size
        if isinstance(size, dict):
            for name in ("height", "shortest_edge"):
                if name in size:
                    return int(size[name])
    return None


class PixelEncoderFeatureMap(FeatureMap):
    """Features of a `transformers` vision transformer on the decoded images (docs/method.md §5).

    The latents are decoded *with gradient* by the generator (`decode_with_grad`, in chunks of
    `decode_chunk_size`), resized (bicubic, antialiased) to the encoder's input size, normalised with the model's
    image-processor mean/std (ImageNet or CLIP defaults when it has none), and encoded. For each transformer layer
    L (hidden state L, 1-based) the keys are `layer{L}_patch_mean`, `layer{L}_patch_std` (one token: mean / std
    over patch tokens) and `layer{L}_cls` (the CLS token).

    Subclasses set `model_class` (a `transformers` model class), the default mean/std and `default_layer_stride`.
    """

    model_class: ClassVar[str] = ""
    default_mean: ClassVar[tuple[float, ...]] = _IMAGENET_MEAN
    default_std: ClassVar[tuple[float, ...]] = _IMAGENET_STD
    default_layer_stride: ClassVar[int | None] = None  # None: the last layer only

    def __init__(
        self,
        model: nn.Module,
        generator: OneStepGenerator | None,
        keys: Sequence[str] | None = None,
        image_size: int | None = None,
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
        layer_stride: int | None = None,
        decode_chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self._generator = generator
        self.num_layers = int(model.config.num_hidden_layers)
        self.native_image_size = int(model.config.image_size)
        self.image_size = int(image_size or self.native_image_size)
        self.layer_stride = layer_stride if layer_stride is not None else self.default_layer_stride
        self.decode_chunk_size = decode_chunk_size
        mean = torch.tensor(image_mean or self.default_mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(image_std or self.default_std, dtype=torch.float32).view(1, -1, 1, 1)
        self.register_buffer("image_mean", mean, persistent=False)
        self.register_buffer("image_std", std, persistent=False)
        self._select_keys(keys)
        self._freeze()

    @classmethod
    def load_model(cls, model_name_or_path: str | os.PathLike, **kwargs: Any) -> nn.Module:
        """`model_class.from_pretrained(model_name_or_path, **kwargs)`."""
        import transformers

        return getattr(transformers, cls.model_class).from_pretrained(str(model_name_or_path), **kwargs)

    @classmethod
    def from_generator(
        cls,
        generator: OneStepGenerator | None,
        keys: Sequence[str] | None = None,
        model_name_or_path: str | os.PathLike | None = None,
        model: nn.Module | None = None,
        image_size: int | None = None,
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
        layer_stride: int | None = None,
        decode_chunk_size: int | None = None,
        **model_kwargs: Any,
    ):
        """Load `model_name_or_path` (a Hub id or local directory) with `from_pretrained(**model_kwargs)`.

        Input size and mean/std come from the model's image-processor config unless given; `layer_stride` picks the
        layers that have keys by default (every `layer_stride`-th layer; default per encoder).
        """
        settings: dict[str, Any] = {}
        if model is None:
            if model_name_or_path is None:
                raise ValueError(f"{cls.__name__} needs `model_name_or_path` (a Hub id or a local directory).")
            model = cls.load_model(model_name_or_path, **model_kwargs)
            hub_kwargs = {k: v for k, v in model_kwargs.items() if k in ("local_files_only", "revision", "cache_dir")}
            settings = _processor_settings(model_name_or_path, **hub_kwargs)
        if generator is not None:
            model = model.to(generator.device)
        return cls(
            model,
            generator,
            keys=keys,
            image_size=image_size or _processor_size(settings),
            image_mean=image_mean or settings.get("image_mean"),
            image_std=image_std or settings.get("image_std"),
            layer_stride=layer_stride,
            decode_chunk_size=decode_chunk_size,
        )

    @property
    def available_keys(self) -> tuple[str, ...]:
        keys: list[str] = []
        for layer in range(1, self.num_layers + 1):
            keys += [f"layer{layer}_patch_mean", f"layer{layer}_patch_std", f"layer{layer}_cls"]
        return tuple(keys)

    @property
    def default_keys(self) -> tuple[str, ...]:
        stride = self.layer_stride or self.num_layers
        layers = list(range(stride, self.num_layers + 1, stride)) or [self.num_layers]
        return tuple(f"layer{layer}_{kind}" for layer in layers for kind in ("patch_mean", "patch_std", "cls"))

    def preprocess(self, images: Tensor) -> Tensor:
        """Images in [0, 1] -> the encoder's normalised input (differentiable)."""
        size = (self.image_size, self.image_size)
        if tuple(images.shape[-2:]) != size:
            images = F.interpolate(images, size=size, mode="bicubic", align_corners=False, antialias=True)
        mean = self.image_mean.to(images.device, images.dtype)
        std = self.image_std.to(images.device, images.dtype)
        return (images - mean) / std

    def _hidden_states(self, pixel_values: Tensor) -> Sequence[Tensor]:
        """Hidden states `[embeddings, layer 1, ..., layer N]`, each `(B, 1 + patches, D)`."""
        kwargs = {}
        if self.image_size != self.native_image_size:
            kwargs["interpolate_pos_encoding"] = True
        return self.model(pixel_values=pixel_values, output_hidden_states=True, **kwargs).hidden_states

    def encode_images(self, images: Tensor) -> dict[str, Tensor]:
        """Features of images `(B, 3, H, W)` in [0, 1]."""
        param = next(self.model.parameters())
        pixel_values = self.preprocess(images.to(param.device, torch.float32)).to(param.dtype)
        hidden_states = self._hidden_states(pixel_values)
        features: dict[str, Tensor] = {}
        for key in self.keys:
            layer, kind = key[len("layer") :].split("_", 1)
            hidden = hidden_states[int(layer)].float()
            if kind == "cls":
                features[key] = hidden[:, :1]
            elif kind == "patch_mean":
                features[key] = hidden[:, 1:].mean(dim=1, keepdim=True)
            else:
                features[key] = _std(hidden[:, 1:], dim=1).unsqueeze(1)
        return features

    def compute(self, latents: Tensor, embeds: PromptEmbeds | None) -> dict[str, Tensor]:
        if self._generator is None:
            raise ValueError(f"{type(self).__name__} was built without a generator, so it cannot decode latents.")
        images = self._generator.decode_with_grad(latents, chunk_size=self.decode_chunk_size)
        return self.encode_images(images)


@register_feature_map("dinov2")
class Dinov2FeatureMap(PixelEncoderFeatureMap):
    """DINOv2 (`Dinov2Model`) on decoded pixels (docs/method.md §5): default keys at every 3rd layer (3, 6, 9, 12)."""

    model_class = "Dinov2Model"
    default_layer_stride = 3

    def _hidden_states(self, pixel_values: Tensor) -> Sequence[Tensor]:
        # DINOv2 always interpolates its position embeddings.
        return self.model(pixel_values=pixel_values, output_hidden_states=True).hidden_states


@register_feature_map("vit_mae")
class ViTMAEFeatureMap(PixelEncoderFeatureMap):
    """ViT-MAE encoder (`ViTMAEModel`) on decoded pixels (docs/method.md §5): default keys of the last layer.

    Loaded with `mask_ratio=0.0` and run with a fixed, identity patch order (docs/method.md §8.4): the authors' path
    masks 75% of the patches at random on every call, so the same image got different features each time.
    """

    model_class = "ViTMAEModel"

    @classmethod
    def load_model(cls, model_name_or_path: str | os.PathLike, **kwargs: Any) -> nn.Module:
        kwargs["mask_ratio"] = 0.0
        return super().load_model(model_name_or_path, **kwargs)

    def __init__(self, model: nn.Module, *args: Any, **kwargs: Any) -> None:
        if float(getattr(model.config, "mask_ratio", 0.0)) != 0.0:
            raise ValueError("vit_mae features need a ViTMAEModel with mask_ratio=0.0 (see load_model).")
        super().__init__(model, *args, **kwargs)

    def _hidden_states(self, pixel_values: Tensor) -> Sequence[Tensor]:
        patch = self.model.config.patch_size
        num_patches = (pixel_values.shape[-2] // patch) * (pixel_values.shape[-1] // patch)
        # ViTMAE shuffles patches by argsort(noise) even with mask_ratio 0; ascending noise keeps the image order,
        # which makes every call bit-identical.
        noise = torch.arange(num_patches, device=pixel_values.device, dtype=torch.float32)
        noise = noise.expand(pixel_values.shape[0], num_patches)
        kwargs = {"interpolate_pos_encoding": True} if self.image_size != self.native_image_size else {}
        return self.model(pixel_values=pixel_values, noise=noise, output_hidden_states=True, **kwargs).hidden_states


@register_feature_map("clip_vision")
class CLIPVisionFeatureMap(PixelEncoderFeatureMap):
    """CLIP vision tower (`CLIPVisionModel`) on decoded pixels: default keys of the last layer."""

    model_class = "CLIPVisionModel"
    default_mean = _CLIP_MEAN
    default_std = _CLIP_STD
