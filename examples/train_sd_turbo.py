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

from trl_drpo.cli import make_train_parser, train
from trl_drpo.drpo_config import PRESETS


def make_parser():
    """`TrainScriptArguments` + `DrPOConfig`, defaulting to the paper's recipe and stabilityai/sd-turbo."""
    parser = make_train_parser()
    # The paper's recipe is the default; a --config file and the flags override it.
    parser.set_defaults(
        **PRESETS["sd_turbo_paper"], model_name_or_path="stabilityai/sd-turbo", output_dir="drpo-sd-turbo"
    )
    return parser


if __name__ == "__main__":
    script_args, training_args = make_parser().parse_args_and_config()
    # Loads the pipeline and the rewards, trains, evaluates on the held-out prompts, then writes the adapter, the
    # model card and a sample grid to --output_dir (and pushes them with --push_to_hub): see trl_drpo.cli.train.
    trainer = train(script_args, training_args)
    if trainer.is_world_process_zero():
        print(f"Adapter, model card and samples in {training_args.output_dir}")
