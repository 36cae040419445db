"""The options of the `trl-drpo` commands, shared with the example scripts: which pipeline to load, what to train
with besides `DrPOConfig`, and what `sample` and `evaluate` render and score. Plain dataclasses, parsed by TRL's
`TrlParser` (flags and an optional YAML ``--config``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ModelArguments:
    """Which pipeline to load and how."""

    model_name_or_path: str = field(
        default="stabilityai/sd-turbo",
        metadata={
            "help": "Hub id or local folder of a diffusers pipeline; trl-drpo/tiny-sd, tiny-sdxl, tiny-flux or "
            "tiny-sana for the tiny random ones, trl-drpo/digits for the digit world's pretrained base."
        },
    )
    model_revision: str | None = field(default=None, metadata={"help": "Hub revision (branch, tag or commit)."})
    variant: str | None = field(default=None, metadata={"help": "Weights variant to load, e.g. fp16."})
    torch_dtype: str = field(
        default="auto",
        metadata={
            "help": "Dtype of the pipeline's weights: auto, float32, float16 or bfloat16. For training, auto follows "
            "the mixed precision (fp16/bf16 flags), else float32; for sampling, float16 on GPU and float32 on CPU."
        },
    )


@dataclass
class TrainScriptArguments(ModelArguments):
    """Arguments of `trl-drpo train` and the example scripts besides `DrPOConfig`."""

    reward_funcs: list[str] = field(
        default_factory=lambda: ["pickscore"],
        metadata={
            "help": "Rewards by registered name (see trl_drpo.rewards.available_rewards()) or 'module:attribute'; "
            "weigh them with --reward_weights. 'none' trains offline DrPO on the preference pairs (prompt, chosen, "
            "rejected) of --dataset_name."
        },
    )
    eval_dataset_name: str | None = field(
        default=None,
        metadata={"help": "Held-out prompts for evaluate() (Hub dataset id or local file); else --eval_prompts."},
    )
    eval_dataset_split: str = field(default="test", metadata={"help": "Split of eval_dataset_name."})
    max_eval_prompts: int | None = field(default=None, metadata={"help": "Use at most this many eval prompts."})
    sample_prompts: list[str] | None = field(
        default=None,
        metadata={"help": "Prompts of the model card's sample grid; defaults to the first 4 evaluation prompts."},
    )


@dataclass
class GenerationArguments(ModelArguments):
    """Arguments shared by `sample` and `evaluate`: model, adapter, prompts, seeds, device."""

    adapter: str | None = field(
        default=None,
        metadata={"help": "DrPO/diffusers LoRA adapter: a local folder or .safetensors file, or a Hub repo id."},
    )
    adapter_weight_name: str | None = field(
        default=None, metadata={"help": "File name of the adapter inside its folder or repo, if ambiguous."}
    )
    prompts: list[str] | None = field(default=None, metadata={"help": "Prompts to render."})
    prompts_file: str | None = field(
        default=None,
        metadata={"help": "Prompts from a file (.txt one per line, .json/.jsonl/.csv/.parquet) or a Hub dataset id."},
    )
    prompt_column: str = field(default="prompt", metadata={"help": "Column of prompts_file holding the prompts."})
    prompts_split: str = field(default="test", metadata={"help": "Split of prompts_file when it is a Hub dataset."})
    max_prompts: int | None = field(default=None, metadata={"help": "Use at most this many prompts."})
    seeds: list[int] = field(
        default_factory=lambda: [1234, 1235], metadata={"help": "Seeds; every prompt is rendered once per seed."}
    )
    resolution: int | None = field(default=None, metadata={"help": "Image side in pixels; default: the model's."})
    pipeline_call_kwargs: str | None = field(
        default=None,
        metadata={
            "help": "Settings of the pipeline call as JSON (the training run's `pipeline_call_kwargs`); default: the "
            "family's one-step settings."
        },
    )
    batch_size: int = field(default=8, metadata={"help": "Images per pipeline call."})
    device: str | None = field(default=None, metadata={"help": "Device; default: cuda if available, else cpu."})


@dataclass
class SampleArguments(GenerationArguments):
    """Arguments of `trl-drpo sample`."""

    output_dir: str = field(default="drpo-samples", metadata={"help": "Folder for the PNGs and manifest.json."})
    compare: bool = field(
        default=False,
        metadata={"help": "Also render the base model with the same noise (base/) and write a comparison grid."},
    )


@dataclass
class EvaluateArguments(GenerationArguments):
    """Arguments of `trl-drpo evaluate`."""

    reward_funcs: list[str] = field(
        default_factory=lambda: ["pickscore"],
        metadata={"help": "Rewards by registered name or 'module:attribute'."},
    )
    reward_weights: list[float] | None = field(
        default=None, metadata={"help": "One weight per reward for the weighted mean 'reward'; default equal."}
    )
    output_file: str = field(default="drpo-eval.json", metadata={"help": "Where to write the results (JSON)."})


def make_train_parser(prog: str | None = None) -> Any:
    """The `TrlParser` of `train` and the example scripts: `TrainScriptArguments` + `DrPOConfig`, with ``--config``."""
    from trl import TrlParser

    from .drpo_config import DrPOConfig

    return TrlParser((TrainScriptArguments, DrPOConfig), prog=prog)
