# Copyright 2026 The trl_drpo contributors. Licensed under the Apache License, Version 2.0.
"""Fine-tune SD-Turbo with Drifting Preference Optimization (DrPO) and a LoRA adapter, against any reward.

The paper's recipe (4 GPUs, 32 prompts and 768 images per update, PickScore, 1000 steps):

    accelerate launch --config_file examples/accelerate_configs/multi_gpu.yaml --num_processes 4 \\
        examples/train_sd_turbo.py --config examples/configs/sd_turbo_paper.yaml

One GPU, same number of prompts per update:

    accelerate launch --config_file examples/accelerate_configs/single_gpu.yaml examples/train_sd_turbo.py \\
        --config examples/configs/sd_turbo_paper.yaml --gradient_accumulation_steps 32

DeepSpeed ZeRO-2 (``pip install deepspeed``):

    accelerate launch --config_file examples/accelerate_configs/deepspeed_zero2.yaml --num_processes 4 \\
        examples/train_sd_turbo.py --config examples/configs/sd_turbo_paper.yaml

Two rewards with weights, and a push to the Hub at the end:

    accelerate launch ... examples/train_sd_turbo.py --config examples/configs/sd_turbo_paper.yaml \\
        --reward_funcs pickscore aesthetic --reward_weights 0.7 0.3 --push_to_hub --hub_model_id you/sd-turbo-drpo

A CPU smoke run on the tiny offline pipeline (random weights, nothing downloaded):

    accelerate launch --cpu --num_processes 1 examples/train_sd_turbo.py --config examples/configs/tiny_cpu.yaml

Every `DrPOConfig` / `transformers.TrainingArguments` field is a flag, and ``--config`` takes a YAML file of them
(flags win over the file, the file over the paper's defaults). ``--model_name_or_path`` takes a Hub id or a local
folder; ``trl-drpo/tiny-sd`` selects the tiny offline pipeline. Written to ``--output_dir``: the adapter in diffusers'
LoRA format (``pipe.load_lora_weights(output_dir)``), ``drpo_config.json``, the model card (``README.md``) with the
base-vs-tuned rewards on the held-out prompts and a sample grid (``samples.png``), and checkpoints.
"""

import os
from dataclasses import dataclass, field

import torch
from diffusers import StableDiffusionPipeline
from trl import TrlParser

from trl_drpo import DrPOConfig, DrPOTrainer
from trl_drpo.drpo_config import PRESETS
from trl_drpo.hub import save_sample_grid
from trl_drpo.prompts import load_prompt_dataset
from trl_drpo.rewards import load_rewards
from trl_drpo.testing import tiny_sd_pipeline


TINY_MODEL = "trl-drpo/tiny-sd"


@dataclass
class ScriptArguments:
    model_name_or_path: str = field(
        default="stabilityai/sd-turbo",
        metadata={"help": f"Hub id or local folder of the SD-Turbo pipeline; {TINY_MODEL} for the tiny offline one."},
    )
    model_revision: str | None = field(default=None, metadata={"help": "Hub revision of the model."})
    variant: str | None = field(default=None, metadata={"help": "Weights variant to load, e.g. fp16."})
    torch_dtype: str = field(
        default="auto",
        metadata={"help": "Dtype of the frozen weights: auto (the fp16/bf16 of the run, else float32) or a name."},
    )
    reward_funcs: list[str] = field(
        default_factory=lambda: ["pickscore"],
        metadata={"help": "Rewards by name (trl_drpo.rewards.available_rewards()) or 'module:attribute'."},
    )
    eval_dataset_name: str | None = field(
        default=None, metadata={"help": "Held-out prompts (Hub dataset id or local file); else --eval_prompts."}
    )
    eval_dataset_split: str = field(default="test", metadata={"help": "Split of eval_dataset_name."})
    max_eval_prompts: int | None = field(default=None, metadata={"help": "Use at most this many eval prompts."})


def frozen_weights_dtype(name: str, training_args: DrPOConfig) -> torch.dtype:
    if name != "auto":
        return getattr(torch, name)
    return torch.float16 if training_args.fp16 else torch.bfloat16 if training_args.bf16 else torch.float32


def main(script_args: ScriptArguments, training_args: DrPOConfig) -> DrPOTrainer:
    # The pipeline. Only the UNet's LoRA adapter is trained; the trainer keeps those weights in fp32.
    if script_args.model_name_or_path == TINY_MODEL:
        pipe = tiny_sd_pipeline()
    else:
        pipe = StableDiffusionPipeline.from_pretrained(
            script_args.model_name_or_path,
            revision=script_args.model_revision,
            variant=script_args.variant,
            torch_dtype=frozen_weights_dtype(script_args.torch_dtype, training_args),
        )
    pipe.set_progress_bar_config(disable=True)

    # The rewards only rank candidates: they need no gradient and may be any callable. Their weights are
    # training_args.reward_weights (--reward_weights).
    reward_funcs, _ = load_rewards(script_args.reward_funcs)

    # Held-out prompts for the base-vs-tuned evaluation at the end (the training prompts come from --dataset_name).
    eval_dataset, eval_prompts = None, list(training_args.eval_prompts or [])
    if script_args.eval_dataset_name:
        eval_dataset = load_prompt_dataset(
            script_args.eval_dataset_name,
            prompt_column=training_args.prompt_column,
            split=script_args.eval_dataset_split,
        )
        if script_args.max_eval_prompts is not None:
            eval_dataset = eval_dataset.select(range(min(script_args.max_eval_prompts, len(eval_dataset))))
        eval_prompts = list(eval_dataset[training_args.prompt_column])

    trainer = DrPOTrainer(pipe, reward_funcs, args=training_args, eval_dataset=eval_dataset)
    resume = training_args.resume_from_checkpoint
    trainer.train(resume_from_checkpoint=True if resume in ("true", "latest") else resume)

    # Base vs tuned rewards on fixed seeds, and a grid of base (top) and tuned (bottom) samples, for the model card.
    sample_grid = None
    if eval_prompts:
        trainer.save_metrics("eval", trainer.evaluate())
        sample_grid = "samples.png"
        grid_path = os.path.join(training_args.output_dir, sample_grid)
        save_sample_grid(trainer, eval_prompts[:4], training_args.eval_seeds[:2], grid_path)
    trainer.save_model(training_args.output_dir)
    trainer.create_model_card(sample_grid=sample_grid)
    if training_args.push_to_hub:
        trainer.push_to_hub(sample_grid=sample_grid)
    if trainer.is_world_process_zero():
        print(f"Adapter, model card and samples in {os.path.abspath(training_args.output_dir)}")
    return trainer


def make_parser() -> TrlParser:
    parser = TrlParser((ScriptArguments, DrPOConfig))
    # The paper's SD-Turbo recipe is the default; a --config file and the flags override it.
    parser.set_defaults(**PRESETS["sd_turbo_paper"], output_dir="drpo-sd-turbo")
    return parser


if __name__ == "__main__":
    script_args, training_args = make_parser().parse_args_and_config()
    main(script_args, training_args)
