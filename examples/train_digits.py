# Copyright 2026 The trl_drpo contributors. Licensed under the Apache License, Version 2.0.
"""Align the digit world's one-step base to its black-box verifier with DrPO, on a CPU, and measure it.

    python examples/train_digits.py --config examples/configs/digits.yaml

The base is `trl_drpo.worlds.digits.load_pipeline()`: a `StableDiffusionPipeline` pretrained in this project on
scenes of real handwritten digits and served like SD-Turbo, `pipe(prompt, num_inference_steps=1,
guidance_scale=0.0)`. The reward is the verifier's dense score (the fraction of the caption's checks that hold: count,
digits, colours, positions), used only to rank each prompt's candidates. Before training, during it (every
``--eval_every`` updates) and after it, the pipeline is measured on held-out captions x held-out seeds by the verifier
and by an independent judge; best-of-K sampling of the base is the inference-time reference line.

Written to ``--output_dir``: the adapter in diffusers' LoRA format (``pipe.load_lora_weights(output_dir)``), the
model card, ``digits_report.json`` (every table, the accuracy-vs-wall-clock history, the settings) and
``digits_report.md`` (the GenEval-style table). Every `DrPOConfig` field is a flag; ``--config`` takes a YAML file
of them, over the "digits" preset.
"""

import json
import os
from dataclasses import MISSING, dataclass, field, fields

from trl import TrlParser

from trl_drpo import DrPOConfig
from trl_drpo.drpo_config import PRESETS
from trl_drpo.worlds.digits.alignment import align
from trl_drpo.worlds.digits.evaluation import EVAL_PER_CATEGORY


@dataclass
class DigitsScriptArguments:
    """Evaluation settings of the digit-world run."""

    eval_per_category: int = field(
        default=EVAL_PER_CATEGORY, metadata={"help": "Held-out (caption, seed) pairs per category."}
    )
    eval_every: int = field(default=150, metadata={"help": "Optimizer updates between evaluations during training."})
    best_of_k: bool = field(default=True, metadata={"help": "Also evaluate best-of-K sampling of the base."})
    pretrained_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "A digit-world pipeline folder to align instead of the shipped base (e.g. the `pipeline/` folder "
            "of a `python -m trl_drpo.worlds.digits.pretrain` run with other settings)."
        },
    )


def make_parser() -> TrlParser:
    """The script's arguments and every `DrPOConfig` field, defaulting to the "digits" preset (``--config`` YAML and
    flags override it)."""
    parser = TrlParser((DigitsScriptArguments, DrPOConfig))
    parser.set_defaults(**PRESETS["digits"], output_dir="drpo-digits")
    return parser


if __name__ == "__main__":
    script_args, config = make_parser().parse_args_and_config()

    trainer, report = align(
        config,
        eval_per_category=script_args.eval_per_category,
        eval_every=script_args.eval_every,
        best_of=script_args.best_of_k,
        pretrained_model_name_or_path=script_args.pretrained_model_name_or_path,
    )
    trainer.save_model(config.output_dir)
    trainer.create_model_card(eval_description=report["card_eval_description"])

    # The run's method settings: the preset's fields, the run's length and seed, and every DrPO field set away from its
    # default, so that a recipe given as flags or YAML over the preset is recorded whole.
    # DrPOConfig's base is transformers' TrainingArguments, taken from the class rather than imported first: importing
    # transformers before trl_drpo would let bitsandbytes log its unused-kernel notice before trl_drpo filters it.
    inherited = {f.name for f in fields(DrPOConfig.__base__)}
    drpo_defaults = {
        f.name: f.default if f.default is not MISSING else f.default_factory()
        for f in fields(DrPOConfig)
        if f.name not in inherited and (f.default is not MISSING or f.default_factory is not MISSING)
    }
    recorded = {*PRESETS["digits"], "max_steps", "seed"}
    recorded |= {name for name, default in drpo_defaults.items() if getattr(config, name) != default}
    report["settings"] = {k: v for k, v in config.to_dict().items() if k in recorded}
    with open(os.path.join(config.output_dir, "digits_report.json"), "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=1)
    with open(os.path.join(config.output_dir, "digits_report.md"), "w", encoding="utf-8") as handle:
        handle.write(report["table"] + "\n")
    print(report["table"])
    print(f"\n{report['steps']} updates in {report['train_seconds']:.0f} s of training. Report in {config.output_dir}")
