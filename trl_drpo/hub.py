"""Adapters on disk and on the Hub: diffusers-format LoRA files, loading them back, and what a push uploads.

The model card (its rendering, the guard for the user's own README, the sample grid) lives in `trl_drpo.model_card`;
its public names are also importable from here, where they were first defined.
"""

from __future__ import annotations

import inspect
import os
from typing import Any

import torch
from transformers import TrainerCallback

from .averaging import EMA_DIR
from .model_card import (
    CARD_MARKER,
    MODEL_CARD_TEMPLATE,
    base_model_id,
    check_card_is_ours,
    public_name,
    render_model_card,
    save_sample_grid,
)


__all__ = [
    "CARD_MARKER",
    "CONFIG_NAME",
    "LORA_METADATA_KEY",
    "LORA_WEIGHT_NAME",
    "MODEL_CARD_TEMPLATE",
    "MODEL_FILES",
    "CheckpointPushCallback",
    "base_model_id",
    "check_card_is_ours",
    "denoiser_name",
    "load_adapter",
    "load_denoiser",
    "load_lora_into",
    "public_config_json",
    "public_name",
    "render_model_card",
    "save_adapter",
    "save_sample_grid",
    "upload_model_files",
]


LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
LORA_METADATA_KEY = "lora_adapter_metadata"
"""Where diffusers keeps an adapter's PEFT config in the safetensors metadata."""
CONFIG_NAME = "drpo_config.json"
MODEL_FILES = (
    LORA_WEIGHT_NAME,
    "README.md",
    CONFIG_NAME,
    "unet/config.json",
    "unet/*.safetensors",
    "transformer/config.json",
    "transformer/*.safetensors",
)
"""What a saved DrPO model consists of, and all that is ever uploaded from its folder (plus the sample grid its card
shows): never transformers' pickled training arguments (which hold the Hub token), optimizer or RNG state, logs, or
any file the user keeps next to them."""


def denoiser_name(pipeline: Any) -> str:
    """The pipeline attribute holding its denoiser, which also prefixes the adapter's keys: `unet` or
    `transformer`."""
    return "unet" if isinstance(getattr(pipeline, "unet", None), torch.nn.Module) else "transformer"


def save_adapter(pipeline: Any, denoiser: torch.nn.Module, output_dir: str, adapter_name: str = "default") -> str:
    """Save the denoiser's LoRA adapter in diffusers' format, with the adapter's metadata, so that
    ``pipe.load_lora_weights(output_dir)`` (or `load_lora_into`) restores it.

    The pipeline class's own `save_lora_weights` writes it where it has one for the denoiser (`unet_lora_layers` for
    SD/SDXL, `transformer_lora_layers` for SD3, Flux, Sana); for pipelines without a LoRA loader (PixArt) the same
    layout is written here: keys prefixed with the denoiser's name, the PEFT config under diffusers' metadata key.
    """
    from peft.utils import get_peft_model_state_dict

    name = denoiser_name(pipeline)
    state = get_peft_model_state_dict(denoiser, adapter_name=adapter_name)
    layers = {key: value.detach().float().cpu().contiguous() for key, value in state.items()}
    config = denoiser.peft_config[adapter_name].to_dict()
    saver = getattr(type(pipeline), "save_lora_weights", None)
    if saver is not None and f"{name}_lora_layers" in inspect.signature(saver).parameters:
        saver(
            output_dir,
            **{f"{name}_lora_layers": layers, f"{name}_lora_adapter_metadata": config},
            safe_serialization=True,
            weight_name=LORA_WEIGHT_NAME,
        )
    else:
        _write_lora_file(os.path.join(output_dir, LORA_WEIGHT_NAME), name, layers, config)
    path = os.path.join(output_dir, LORA_WEIGHT_NAME)
    # diffusers writes the file through a private temporary file (mode 0600): give it the mode of every other file.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
    return path


def _write_lora_file(path: str, prefix: str, layers: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
    # The layout of diffusers' `save_lora_weights`: prefixed keys, and the prefixed PEFT config as JSON metadata.
    import json

    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    packed = {f"{prefix}.{key}": list(v) if isinstance(v, set) else v for key, v in config.items()}
    metadata = {"format": "pt", LORA_METADATA_KEY: json.dumps(packed, indent=2, sort_keys=True)}
    save_file({f"{prefix}.{key}": value for key, value in layers.items()}, path, metadata=metadata)


def load_lora_into(pipeline: Any, folder_or_repo: str, adapter_name: str = "default") -> None:
    """Load a saved DrPO adapter into `pipeline` for inference: ``pipe.load_lora_weights`` where the pipeline has
    it; otherwise (PixArt) the adapter is injected into the denoiser with PEFT from the file's own config.

    Args:
        pipeline: a fresh pipeline of the family the adapter was trained on.
        folder_or_repo: a folder holding `pytorch_lora_weights.safetensors`, or a Hub model id.
        adapter_name: the adapter's name in the denoiser.

    Raises:
        ValueError: the file does not match the pipeline's denoiser.
    """
    if hasattr(pipeline, "load_lora_weights"):
        pipeline.load_lora_weights(folder_or_repo, weight_name=LORA_WEIGHT_NAME, adapter_name=adapter_name)
        return
    import json

    from peft import LoraConfig, inject_adapter_in_model
    from safetensors import safe_open

    path = os.path.join(folder_or_repo, LORA_WEIGHT_NAME)
    if not os.path.isdir(folder_or_repo):
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(folder_or_repo, LORA_WEIGHT_NAME)
    name = denoiser_name(pipeline)
    with safe_open(path, framework="pt") as handle:
        metadata = json.loads((handle.metadata() or {}).get(LORA_METADATA_KEY, "{}"))
    config = {key[len(name) + 1 :]: value for key, value in metadata.items() if key.startswith(f"{name}.")}
    if not config:
        raise ValueError(f"{path} holds no LoRA config for `{name}` in its metadata: was it saved by trl_drpo?")
    denoiser = getattr(pipeline, name)
    inject_adapter_in_model(LoraConfig(**config), denoiser, adapter_name=adapter_name)
    denoiser.peft_config = {**getattr(denoiser, "peft_config", {}), adapter_name: LoraConfig(**config)}
    load_adapter(denoiser, os.path.dirname(path), adapter_name=adapter_name, prefix=name)


def load_adapter(
    denoiser: torch.nn.Module, checkpoint_dir: str, adapter_name: str = "default", prefix: str = "unet"
) -> None:
    """Load a `save_adapter` file back into an already-injected adapter (used to resume training); `prefix` is the
    denoiser's name in the pipeline (`unet` or `transformer`)."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = os.path.join(checkpoint_dir, LORA_WEIGHT_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No DrPO adapter at {path}: is {checkpoint_dir!r} a DrPO checkpoint folder?")
    head = f"{prefix}."
    state = {key[len(head) :]: value for key, value in load_file(path).items() if key.startswith(head)}
    if not state:
        raise ValueError(f"The adapter at {path} has no `{head}` keys: it was trained on another pipeline family.")
    result = set_peft_model_state_dict(denoiser, state, adapter_name=adapter_name)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"The adapter at {path} does not match the model: unexpected keys {unexpected[:5]}.")


def upload_model_files(
    folder: str,
    repo_id: str,
    commit_message: str,
    token: str | None = None,
    revision: str | None = None,
    path_in_repo: str | None = None,
    extra_files: tuple[str, ...] = (),
    blocking: bool = True,
) -> Any:
    """Upload the `MODEL_FILES` of `folder` (and `extra_files`, paths relative to it, such as the card's sample grid)
    to the Hub model repo `repo_id` in one commit, under `path_in_repo` (default: the repo's root).

    Returns `huggingface_hub`'s `CommitInfo` (a `Future` of it when `blocking=False`). Raises `FileNotFoundError`
    when `folder` holds neither an adapter nor a full denoiser, so that no commit ever lacks the model.
    """
    from huggingface_hub import upload_folder

    holds_model = os.path.isfile(os.path.join(folder, LORA_WEIGHT_NAME)) or any(
        os.path.isdir(os.path.join(folder, name)) for name in ("unet", "transformer")
    )
    if not holds_model:
        raise FileNotFoundError(
            f"Nothing to push from {folder}: it holds no {LORA_WEIGHT_NAME} and no unet/ or transformer/ folder."
        )
    return upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        path_in_repo=path_in_repo,
        commit_message=commit_message,
        token=token,
        revision=revision,
        allow_patterns=[*MODEL_FILES, *(name for name in extra_files if name)],
        run_as_future=not blocking,
    )


class CheckpointPushCallback(TrainerCallback):
    """Pushes each checkpoint the trainer saves, the way `hub_strategy` asks (`every_save`: the model files to the
    repo's root; `checkpoint` / `all_checkpoints`: also under `last-checkpoint/` or `checkpoint-N/`), but only its
    `MODEL_FILES`: every commit carries a loadable adapter and its card, and nothing pickled. With `use_ema` the
    adapter pushed is the checkpoint's moving average (its `averaging.EMA_DIR`), the model that evaluation renders and
    that training ends with. The optimizer and RNG state stay in the local checkpoint, so a run resumes from a local
    checkpoint folder, not from the Hub."""

    def __init__(self, trainer: Any, hub_strategy: str) -> None:
        self.trainer, self.hub_strategy = trainer, str(getattr(hub_strategy, "value", hub_strategy))

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        checkpoint = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        averaged = os.path.join(checkpoint, EMA_DIR)
        folder = averaged if os.path.isdir(averaged) else checkpoint
        message = f"Training in progress, step {state.global_step}"
        push = dict(repo_id=self.trainer.hub_model_id, token=args.hub_token, revision=args.hub_revision)
        upload_model_files(folder, commit_message=message, **push)
        if self.hub_strategy in ("checkpoint", "all_checkpoints"):
            path = "last-checkpoint" if self.hub_strategy == "checkpoint" else os.path.basename(checkpoint)
            upload_model_files(folder, commit_message=message + ", checkpoint", path_in_repo=path, **push)


def load_denoiser(denoiser: torch.nn.Module, checkpoint_dir: str, name: str = "unet") -> None:
    """Load the fully fine-tuned denoiser that `save_pretrained` wrote to `checkpoint_dir/<name>` (`unet` or
    `transformer`; safetensors, possibly sharded) into `denoiser` (used to resume training without LoRA)."""
    from diffusers.models.model_loading_utils import load_state_dict

    folder = os.path.join(checkpoint_dir, name)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"No DrPO denoiser at {folder}: is {checkpoint_dir!r} a DrPO checkpoint folder?")
    state: dict[str, torch.Tensor] = {}
    for file in sorted(f for f in os.listdir(folder) if f.endswith(".safetensors")):
        state.update(load_state_dict(os.path.join(folder, file)))
    denoiser.load_state_dict(state)


def public_config_json(args: Any) -> str:
    """`args` as JSON for files that may leave the machine: tokens redacted (as `to_dict` does) and every absolute
    local path (output and logging folders, a local dataset, a checkpoint) reduced to its last component."""
    import json

    values = {key: public_name(value) if isinstance(value, str) else value for key, value in args.to_dict().items()}
    return json.dumps(values, indent=2, sort_keys=True, default=str)
