"""Checkpoint folders (`checkpoint-N/`): telling a complete one from one cut short by a crash, and naming damage.

A `transformers.Trainer` writes a checkpoint's files one after the other; a run killed in between leaves a folder
that looks like the latest checkpoint but cannot be resumed. These checks read every file enough to know it is whole
(JSON parsed, safetensors headers read, the zip archives `torch.save` writes verified by their CRCs) without loading
any tensor, so resuming can skip an incomplete checkpoint or say which file is damaged (`resume_checkpoint`, which
`DrPOTrainer.train` resumes through). `DrPOTrainer` also writes each checkpoint in a hidden staging folder and renames
it into place when it is complete (`publish_checkpoint`), so a crash while saving leaves no `checkpoint-N` behind.

Weight files of any origin (reward models, feature maps) are read here too, the one place that loads a torch pickle:
`read_weights_file` never executes pickled code.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
import zipfile
from collections.abc import Mapping
from typing import Any

import torch


logger = logging.getLogger(__name__)

REQUIRED_FILES = ("trainer_state.json",)
"""Written last by the trainer: a checkpoint without it was interrupted."""
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_problems(folder: str, weights_name: str | None = None) -> list[str]:
    """What makes `folder` unusable to resume from, one sentence per damaged or missing file; empty when whole.

    Args:
        folder: a `checkpoint-N` folder.
        weights_name: the weights file the checkpoint must hold (e.g. the LoRA adapter), if any.
    """
    if not os.path.isdir(folder):
        return [f"{folder} is not a folder"]
    problems = []
    for name in (*REQUIRED_FILES, *([weights_name] if weights_name else [])):
        if not os.path.isfile(os.path.join(folder, name)):
            problems.append(f"{os.path.join(folder, name)} is missing (the checkpoint was not finished)")
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        problem = _file_problem(path)
        if problem:
            problems.append(f"{path} is damaged ({problem})")
    return problems


STAGING_DIR = ".drpo-staging"
"""Hidden folder of `output_dir` in which a checkpoint is written before it is renamed into place."""


def publish_checkpoint(staged: str, folder: str) -> None:
    """Move the finished checkpoint `staged` to `folder` (a `checkpoint-N` path), replacing a checkpoint of the same
    step already there; each move is a rename within `output_dir`, so `folder` is never seen half-written."""
    previous = staged + ".previous"
    if os.path.isdir(folder):
        shutil.rmtree(previous, ignore_errors=True)
        os.rename(folder, previous)
    os.rename(staged, folder)
    shutil.rmtree(previous, ignore_errors=True)


def _file_problem(path: str) -> str | None:
    try:
        if path.endswith(".json"):
            with open(path, encoding="utf-8") as handle:
                json.load(handle)
        elif path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="pt") as handle:
                handle.keys()
            _check_safetensors_length(path)
        elif path.endswith((".pt", ".pth", ".bin")):
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
            if bad is not None:
                return f"corrupt member {bad}"
    except Exception as err:  # any failure to read means the file cannot be resumed from
        return f"{type(err).__name__}: {err}".strip()
    return None


def _check_safetensors_length(path: str) -> None:
    # The header states where the last tensor ends; a truncated file is shorter than that.
    with open(path, "rb") as handle:
        header_size = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(header_size))
    end = max((info["data_offsets"][1] for key, info in header.items() if key != "__metadata__"), default=0)
    if os.path.getsize(path) < 8 + header_size + end:
        raise ValueError(f"truncated: {os.path.getsize(path)} bytes, the header needs {8 + header_size + end}")


def latest_complete_checkpoint(output_dir: str, weights_name: str | None = None) -> tuple[str | None, list[str]]:
    """The `checkpoint-N` folder of `output_dir` with the highest N that is whole, and the problems of every newer
    one that was skipped. `(None, problems)` when none is whole."""
    if not os.path.isdir(output_dir):
        return None, []
    steps = sorted(
        (int(match.group(1)), name) for name in os.listdir(output_dir) if (match := _CHECKPOINT.match(name))
    )
    skipped: list[str] = []
    for _, name in reversed(steps):
        folder = os.path.join(output_dir, name)
        problems = checkpoint_problems(folder, weights_name)
        if not problems:
            return folder, skipped
        skipped.extend(problems)
    return None, skipped


def resume_checkpoint(
    resume_from_checkpoint: str | bool | None,
    output_dir: str,
    weights_name: str | None = None,
    log: logging.Logger = logger,
) -> str | bool | None:
    """What to hand `transformers.Trainer.train(resume_from_checkpoint=...)` so that it resumes only from a whole
    checkpoint.

    `True` becomes the newest complete `checkpoint-N` of `output_dir` (see :func:`latest_complete_checkpoint`), with a
    warning on `log` for each problem of a newer checkpoint skipped on the way; a folder is returned as it is once
    checked; anything else (None, False) is returned unchanged.

    Raises:
        ValueError: `True` and no complete checkpoint in `output_dir` (the message lists what was skipped), or a
            folder with a damaged or missing file (named), before anything is loaded.
    """
    if resume_from_checkpoint is True:
        folder, skipped = latest_complete_checkpoint(output_dir, weights_name)
        for problem in skipped:
            log.warning("Not resuming from an incomplete checkpoint: %s.", problem)
        if folder is None:
            raise ValueError(
                f"No complete checkpoint to resume from in {output_dir}"
                + (f" ({'; '.join(skipped)})" if skipped else "")
                + ". Start without resume_from_checkpoint, or pass a checkpoint folder."
            )
        return folder
    if isinstance(resume_from_checkpoint, str):
        problems = checkpoint_problems(resume_from_checkpoint, weights_name)
        if problems:
            raise ValueError(f"Cannot resume from {resume_from_checkpoint}: {'; '.join(problems)}.")
    return resume_from_checkpoint


# ---------------------------------------------------------------------------------------------------------------------
# Weight files: read without executing pickled code
# ---------------------------------------------------------------------------------------------------------------------


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint needs arbitrary pickled code to load, which we never run."""


def read_weights_file(path: str | os.PathLike) -> Any:
    """What a weights file holds, read without ever executing pickled code: the tensors of a ``.safetensors`` file
    (a dict), or what ``torch.load(weights_only=True)`` rebuilds (tensors and plain containers) from anything else.

    Raises:
        UnsafeCheckpointError: the file holds pickled objects beyond tensors and containers.
    """
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(
            f"Refusing to load {path!r}: it contains pickled objects other than tensors, and loading it would "
            "execute arbitrary code. If you trust the file, re-save its state dict as safetensors "
            "(`safetensors.torch.save_file(state_dict, 'model.safetensors')`) and pass that instead."
        ) from err


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load the tensors of a checkpoint file without ever executing pickled code.

    ``.safetensors`` files are read with `safetensors`; anything else goes through ``torch.load(weights_only=True)``,
    whose restricted unpickler only rebuilds tensors and plain containers and refuses any other global. A checkpoint
    that nests its weights under ``"state_dict"``, ``"model"`` or ``"module"`` (HPSv2, Lightning) is unwrapped.

    Raises:
        UnsafeCheckpointError: the file holds pickled objects beyond tensors and containers.
    """
    path = os.fspath(path)
    obj = read_weights_file(path)
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path!r} does not hold a state dict (got {type(obj).__name__}).")
    state_dict = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state_dict:
        raise ValueError(f"{path!r} holds no tensors.")
    return state_dict
