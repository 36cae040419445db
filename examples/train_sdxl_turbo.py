# Copyright 2026 The trl_drpo contributors. Licensed under the Apache License, Version 2.0.
"""Fine-tune SDXL-Turbo with Drifting Preference Optimization (DrPO) and a LoRA adapter, against any reward.

The paper's recipe (4 GPUs, 32 prompts and 512 images per update, PickScore, 5000 steps, bf16):

    accelerate launch --config_file examples/accelerate_configs/multi_gpu.yaml --num_processes 4 \\
        examples/train_sdxl_turbo.py --config examples/configs/sdxl_turbo_paper.yaml

One GPU, same number of prompts per update:

    accelerate launch --config_file examples/accelerate_configs/single_gpu.yaml examples/train_sdxl_turbo.py \\
        --config examples/configs/sdxl_turbo_paper.yaml --gradient_accumulation_steps 32

DeepSpeed ZeRO-2 (``pip install deepspeed``):

    accelerate launch --config_file examples/accelerate_configs/deepspeed_zero2.yaml --num_processes 4 \\
        examples/train_sdxl_turbo.py --config examples/configs/sdxl_turbo_paper.yaml

Two rewards with weights, and a push to the Hub at the end:

    accelerate launch ... examples/train_sdxl_turbo.py --config examples/configs/sdxl_turbo_paper.yaml \\
        --reward_funcs pickscore aesthetic --reward_weights 0.7 0.3 --push_to_hub --hub_model_id you/sdxl-turbo-drpo

A CPU smoke run on the tiny offline pipeline (random weights, nothing downloaded):

    accelerate launch --cpu --num_processes 1 examples/train_sdxl_turbo.py --config examples/configs/tiny_cpu.yaml \\
        --model_name_or_path trl-drpo/tiny-sdxl --output_dir drpo-tiny-sdxl

Every `DrPOConfig` / `transformers.TrainingArguments` field is a flag, and ``--config`` takes a YAML file of them
(flags win over the file, the file over the paper's defaults). ``--model_name_or_path`` takes a Hub id or a local
folder; ``trl-drpo/tiny-sdxl`` selects the tiny offline pipeline. Written to ``--output_dir``: the adapter in
diffusers' LoRA format (``pipe.load_lora_weights(output_dir)``), ``drpo_config.json``, the model card
(``README.md``) with the base-vs-tuned rewards on the held-out prompts and a sample grid (``samples.png``), and
checkpoints.
"""

import os

from trl import TrlParser

from trl_drpo import DrPOConfig, DrPOTrainer
from trl_drpo.cli_arguments import TrainScriptArguments
from trl_drpo.drpo_config import PRESETS
from trl_drpo.loading import load_pipeline, resolve_dtype
from trl_drpo.model_card import save_sample_grid
from trl_drpo.prompts import held_out_prompts
from trl_drpo.rewards import load_rewards


def main(script_args: TrainScriptArguments, config: DrPOConfig) -> None:
    # Settings a user can get wrong (a feature checkpoint that is missing) fail before anything downloads.
    config.check_feature_map()

    # 1. The one-step pipeline, served as pipe(prompt, num_inference_steps=1, guidance_scale=0.0): DrPO trains exactly
    #    that computation, through the pipeline's own scheduler.
    dtype = resolve_dtype(script_args.torch_dtype, fp16=config.fp16, bf16=config.bf16)
    pipe = load_pipeline(
        script_args.model_name_or_path,
        torch_dtype=dtype,
        variant=script_args.variant,
        revision=script_args.model_revision,
    )

    # 2. The rewards: built-in names (pickscore, hpsv2, aesthetic, jpeg_compressibility, ...) or any callable
    #    (images, prompts) -> one score per image. They only rank each prompt's candidates, so they may be black boxes;
    #    several are z-scored per prompt and weighted by --reward_weights.
    rewards, _ = load_rewards(script_args.reward_funcs)

    # 3. Prompts: --dataset_name trains (a Hub dataset, or a local .txt/.csv/.jsonl/.parquet file); held-out prompts
    #    (--eval_dataset_name, or --eval_prompts) measure the base against the tuned pipeline on fixed seeds.
    eval_dataset, eval_prompts = held_out_prompts(
        script_args.eval_dataset_name,
        config.eval_prompts,
        config.prompt_column,
        script_args.eval_dataset_split,
        script_args.max_eval_prompts,
    )
    if eval_dataset is None and eval_prompts:
        config.eval_prompts = eval_prompts  # evaluate() reads them from the config

    # 4. Train a LoRA adapter on the denoiser (K candidates per prompt, best and worst as anchors, the drift field in
    #    the frozen feature space). --resume_from_checkpoint true resumes from the newest complete checkpoint.
    trainer = DrPOTrainer(pipe, rewards, config, eval_dataset=eval_dataset)
    resume = config.resume_from_checkpoint
    trainer.train(resume_from_checkpoint=True if str(resume).lower() in ("true", "latest") else resume)

    # 5. Measure, save and share: base-vs-tuned rewards (in the model card), a sample grid (base row above the tuned
    #    row, same seeds), the adapter in diffusers' LoRA format, and the Hub push with --push_to_hub.
    if eval_prompts:
        trainer.save_metrics("eval", trainer.evaluate())
    grid = None
    sample_prompts = list(script_args.sample_prompts or eval_prompts[:4])
    if sample_prompts:
        grid = "samples.png"
        save_sample_grid(trainer, sample_prompts, list(config.eval_seeds)[:2], os.path.join(config.output_dir, grid))
    trainer.save_model(config.output_dir)
    trainer.create_model_card(sample_grid=grid)
    if config.push_to_hub:
        trainer.push_to_hub(sample_grid=grid)
    if trainer.is_world_process_zero():
        print(f"Adapter, model card and samples in {config.output_dir}: pipe.load_lora_weights({config.output_dir!r})")


def make_parser() -> TrlParser:
    """`TrainScriptArguments` + `DrPOConfig`, defaulting to the paper's recipe and stabilityai/sdxl-turbo: a
    ``--config`` YAML file overrides the recipe, and flags override the file."""
    parser = TrlParser((TrainScriptArguments, DrPOConfig))
    parser.set_defaults(
        **PRESETS["sdxl_turbo_paper"], model_name_or_path="stabilityai/sdxl-turbo", output_dir="drpo-sdxl-turbo"
    )
    return parser


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
