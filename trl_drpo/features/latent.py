"""Feature maps on the latents: the latent-MAE ResNet of the paper (with its checkpoint converter) and the raw latents
(docs/method.md §5)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch.nn.functional as F
from torch import Tensor, nn

from ..checkpoints import read_weights_file
from ..generators import OneStepGenerator, PromptEmbeds
from .base import (
    FeatureMap,
    keep_computed,
    register_feature_map,
    spatial_stats,
    stat_keys,
)


LATENT_MAE_CHECKPOINT = (
    "a local path to the paper's latent-MAE checkpoint, mae_latent_256_torch.pth (published by the DrPO authors on "
    "ModelScope as jiangzhou130v1/drpo-mae-latent-256), or a directory written by LatentMAEResNet.save_pretrained"
)
"""Where the latent-MAE weights come from; every error that asks for them says this."""


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
    obj: Any = read_weights_file(path)
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
                raise ValueError(f"latent_mae needs `model_name_or_path`: {LATENT_MAE_CHECKPOINT}")
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
            keys += stat_keys(f"layer{k}", self.patch_sizes)
        return tuple(keys)

    @property
    def default_keys(self) -> tuple[str, ...]:
        return tuple(stat_keys(f"layer{self.model.num_stages}", self.patch_sizes))

    def compute(self, latents: Tensor, embeds: PromptEmbeds | None) -> dict[str, Tensor]:
        param = next(self.model.parameters())
        maps = self.model(latents.to(device=param.device, dtype=param.dtype))
        features: dict[str, Tensor] = {}
        for name, value in maps.items():
            features.update(spatial_stats(name, value.float(), self.keys, self.patch_sizes))
        return keep_computed(self, features, latents.shape)


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
        return ("latent", *stat_keys("latent", self.patch_sizes))

    @property
    def default_keys(self) -> tuple[str, ...]:
        return self.available_keys

    def compute(self, latents: Tensor, embeds: PromptEmbeds | None) -> dict[str, Tensor]:
        x = latents.float()
        features = spatial_stats("latent", x, self.keys, self.patch_sizes)
        if "latent" in self.keys:
            features["latent"] = x.flatten(2).transpose(1, 2)
        return keep_computed(self, features, latents.shape)
