"""The embedded demo: DrPO on a tiny offline pipeline, on a CPU, in a few minutes.

    python -m trl_drpo.demo [--output_dir drpo-demo] [--max_steps 60]

It builds a tiny `StableDiffusionPipeline` with random weights (nothing is downloaded), tunes a LoRA adapter with
`DrPOTrainer` against a non-differentiable reward (JPEG compressibility, which no reward-gradient method can use),
and writes to ``output_dir``: the adapter in diffusers' LoRA format, the model card, ``samples.png`` (base images
above, tuned images below, same seeds) and ``reward_curve.png``. It prints the mean reward of the base and tuned
generator on held-out prompts and seeds.
"""

from __future__ import annotations

import argparse
import json
import os

import torch


TRAIN_PROMPTS = [
    "a red apple on a table",
    "a lighthouse at dusk",
    "a cat sleeping on a sofa",
    "a bowl of ramen",
    "a snowy mountain village",
    "an astronaut riding a horse",
    "a field of sunflowers",
    "a steam train crossing a bridge",
]
HELD_OUT_PROMPTS = ["a sailing boat at sea", "a cup of coffee", "a forest in autumn", "a city street at night"]
HELD_OUT_SEEDS = [101, 102, 103, 104]


def demo_config(output_dir: str, max_steps: int, **overrides):
    """The demo's `DrPOConfig`: the paper's method at toy scale (K=16, 4/4 anchors, no accumulation)."""
    from .drpo_config import DrPOConfig

    values = dict(
        output_dir=output_dir,
        max_steps=max_steps,
        num_generations=16,
        num_positives=4,
        num_negatives=4,
        gradient_accumulation_steps=1,
        per_device_train_batch_size=2,
        learning_rate=3e-3,
        lora_rank=8,
        lora_alpha=8,
        candidate_chunk_size=8,
        logging_steps=5,
        save_strategy="no",
        report_to="none",
        seed=0,
        eval_prompts=HELD_OUT_PROMPTS,
        eval_seeds=HELD_OUT_SEEDS,
        disable_tqdm=False,
        use_cpu=not torch.cuda.is_available(),
    )
    values.update(overrides)
    return DrPOConfig(**values)


def run_demo(output_dir: str = "drpo-demo", max_steps: int = 60, **overrides) -> dict[str, float]:
    """Train, evaluate and write the demo's artefacts; returns the evaluation metrics (tuned and base)."""
    from .drpo_trainer import DrPOTrainer
    from .rewards import JpegCompressibility
    from .testing import tiny_sd_pipeline
    from .visualization import plot_curve, save_image_grid

    torch.manual_seed(0)
    pipe = tiny_sd_pipeline(seed=0)
    config = demo_config(output_dir, max_steps, **overrides)
    trainer = DrPOTrainer(pipe, JpegCompressibility(), config, train_dataset=TRAIN_PROMPTS)

    base_images = trainer.render(HELD_OUT_PROMPTS, HELD_OUT_SEEDS[:2], adapter=False)
    trainer.train()
    metrics = trainer.evaluate()
    tuned_images = trainer.render(HELD_OUT_PROMPTS, HELD_OUT_SEEDS[:2], adapter=True)

    os.makedirs(output_dir, exist_ok=True)
    grid_path = os.path.join(output_dir, "samples.png")
    save_image_grid(torch.cat([base_images, tuned_images]), grid_path, columns=len(HELD_OUT_PROMPTS) * 2)
    history = [(entry["step"], entry["reward"]) for entry in trainer.state.log_history if "reward" in entry]
    if history:
        plot_curve({"train reward (JPEG compressibility)": history}, os.path.join(output_dir, "reward_curve.png"),
                   title="DrPO demo: mean reward of the candidates per logged step")
    trainer.save_model(output_dir)
    trainer.create_model_card(sample_grid="samples.png", output_dir=output_dir)
    with open(os.path.join(output_dir, "eval_metrics.json"), "w", encoding="utf-8") as handle:
        json.dump(metrics, handle, indent=2)
    return metrics


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="drpo-demo")
    parser.add_argument("--max_steps", type=int, default=60)
    args = parser.parse_args(argv)
    metrics = run_demo(args.output_dir, args.max_steps)
    base, tuned = metrics["eval_base_reward"], metrics["eval_reward"]
    print(
        f"\nJPEG compressibility on held-out prompts and seeds: base {base:.3f} -> tuned {tuned:.3f} "
        f"({tuned - base:+.3f}).\nArtefacts in {os.path.abspath(args.output_dir)}: pytorch_lora_weights.safetensors, "
        "README.md, samples.png, reward_curve.png, eval_metrics.json."
    )


if __name__ == "__main__":
    main()
