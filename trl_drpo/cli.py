"""The ``trl-drpo`` command line: train, sample and evaluate DrPO adapters.

    trl-drpo train --config examples/configs/sd_turbo_paper.yaml [--any_DrPOConfig_field value ...]
    trl-drpo sample --model_name_or_path stabilityai/sd-turbo --adapter user/my-adapter --prompts "a cat" --seeds 0 1
    trl-drpo evaluate --model_name_or_path stabilityai/sd-turbo --adapter ./drpo-sd-turbo \\
        --reward_funcs pickscore aesthetic --prompts_file prompts.txt --output_file eval.json

`train` parses `DrPOConfig` plus the script arguments below from flags and an optional YAML file (``--config``; flags
win over the file), exactly like the example scripts; on several GPUs run it through Accelerate:
``accelerate launch --config_file examples/accelerate_configs/multi_gpu.yaml -m trl_drpo.cli train --config ...``.
`sample` and `evaluate` render fixed-seed images with the pipeline itself (one step, no guidance), base model and
adapter with the same initial noise, following the trainer's protocol: image ``(seed, i)`` starts from the noise
seeded with ``seed * 10**6 + i``. ``--model_name_or_path trl-drpo/tiny-sd`` (or ``tiny-sdxl``, ``tiny-flux``,
``tiny-sana``) selects a tiny offline pipeline of `trl_drpo.tiny_pipelines` instead of a Hub id or local folder.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from .cli_arguments import (
    EvaluateArguments,
    GenerationArguments,
    ModelArguments,
    SampleArguments,
    TrainScriptArguments,
    make_train_parser,
)
from .loading import BUILTIN_MODELS, load_pipeline, resolve_dtype


if TYPE_CHECKING:
    import torch

    from .drpo_config import DrPOConfig
    from .drpo_trainer import DrPOTrainer


# The options (`trl_drpo.cli_arguments`) and pipeline loading (`trl_drpo.loading`) were first defined here: scripts
# written against earlier versions still import them from this module.
__all__ = [
    "BUILTIN_MODELS",
    "COMMANDS",
    "SAMPLE_GRID_NAME",
    "EvaluateArguments",
    "GenerationArguments",
    "ModelArguments",
    "SampleArguments",
    "TrainScriptArguments",
    "evaluate",
    "load_pipeline",
    "main",
    "make_train_parser",
    "read_prompts",
    "render_images",
    "resolve_dtype",
    "sample",
    "train",
]

SAMPLE_GRID_NAME = "samples.png"


# ----------------------------------------------------------------------------------------------------------------
# Building blocks (used by the example scripts too)
# ----------------------------------------------------------------------------------------------------------------


def read_prompts(
    prompts: Sequence[str] | None = None,
    prompts_file: str | None = None,
    prompt_column: str = "prompt",
    split: str = "test",
    max_prompts: int | None = None,
) -> list[str]:
    """Prompts from a list and/or a file or Hub dataset (see `trl_drpo.prompts.load_prompt_dataset`), in order."""
    out = list(prompts or [])
    if prompts_file:
        from .prompts import load_prompt_dataset

        dataset = load_prompt_dataset(prompts_file, prompt_column=prompt_column, split=split)
        out += [str(row[prompt_column]) for row in dataset]
    if max_prompts is not None:
        out = out[:max_prompts]
    if not out:
        raise ValueError("No prompts: pass --prompts and/or --prompts_file.")
    return out


def render_images(
    pipe: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    resolution: int | None = None,
    batch_size: int = 8,
    call_kwargs: dict[str, Any] | str | None = None,
) -> torch.Tensor:
    """Images ``(len(seeds) * len(prompts), 3, H, W)`` in [0, 1] on the CPU, seed-major, rendered by `pipe` itself
    with the call settings training used (`call_kwargs`, a dict or JSON, over the family's one-step defaults).
    Image ``(seed, i)`` starts from the noise seeded with ``seed * 10**6 + i``, the protocol of
    `DrPOTrainer.render`, so base, adapter and training-time evaluation images are comparable."""
    import torch

    from .generators import OneStepGenerator, evaluation_seed

    if isinstance(call_kwargs, str):
        call_kwargs = json.loads(call_kwargs)
    generator = OneStepGenerator.from_pipeline(pipe, resolution=resolution, call_kwargs=call_kwargs)
    jobs = [(prompt, evaluation_seed(seed, i)) for seed in seeds for i, prompt in enumerate(prompts)]
    images = []
    for begin in range(0, len(jobs), batch_size):
        chunk = jobs[begin : begin + batch_size]
        noise = torch.cat([generator.make_noise(1, torch.Generator().manual_seed(s)) for _, s in chunk])
        with torch.no_grad():
            out = pipe(
                prompt=[p for p, _ in chunk],
                latents=noise,
                output_type="pt",
                **generator.pipeline_call_kwargs(),
            ).images
        images.append(out.float().cpu())
    return torch.cat(images)


def _load_for_generation(args: GenerationArguments) -> Any:
    from .devices import default_device

    device = args.device or str(default_device())
    dtype = resolve_dtype(args.torch_dtype, device=device)
    pipe = load_pipeline(
        args.model_name_or_path, torch_dtype=dtype, variant=args.variant, revision=args.model_revision
    )
    return pipe.to(device)


def _load_adapter(pipe: Any, args: GenerationArguments) -> None:
    if not hasattr(pipe, "load_lora_weights"):  # a family without a LoRA loader in diffusers (PixArt)
        from .hub import load_lora_into

        load_lora_into(pipe, args.adapter)
        return
    kwargs = {"weight_name": args.adapter_weight_name} if args.adapter_weight_name else {}
    pipe.load_lora_weights(args.adapter, **kwargs)


def _slug(text: str, length: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:length] or "prompt"


# ----------------------------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------------------------


def train(script_args: TrainScriptArguments, config: DrPOConfig) -> DrPOTrainer:
    """Train a DrPO adapter as the example scripts do: load the pipeline and the rewards, train, evaluate on the
    held-out prompts, write the sample grid, the adapter and the model card to ``config.output_dir``, and push to the
    Hub when ``config.push_to_hub``. Returns the trainer."""
    from .drpo_trainer import DrPOTrainer
    from .model_card import save_sample_grid
    from .prompts import held_out_prompts
    from .rewards import load_rewards

    config.check_feature_map()  # before the pipeline downloads
    # Offline DrPO (docs/method.md §9) learns from the dataset's chosen and rejected images: no reward to score with.
    offline = [name.lower() for name in script_args.reward_funcs] == ["none"]
    if offline:
        config.check_offline()
    dtype = resolve_dtype(script_args.torch_dtype, fp16=config.fp16, bf16=config.bf16)
    pipe = load_pipeline(
        script_args.model_name_or_path,
        torch_dtype=dtype,
        variant=script_args.variant,
        revision=script_args.model_revision,
    )
    rewards = None if offline else load_rewards(script_args.reward_funcs)[0]  # weights: config.reward_weights
    eval_dataset, eval_prompts = held_out_prompts(
        script_args.eval_dataset_name,
        config.eval_prompts,
        config.prompt_column,
        script_args.eval_dataset_split,
        script_args.max_eval_prompts,
    )
    if eval_dataset is None and eval_prompts:
        config.eval_prompts = eval_prompts
    trainer = DrPOTrainer(pipe, rewards, config, eval_dataset=eval_dataset)
    resume = config.resume_from_checkpoint
    if isinstance(resume, str) and resume.lower() in ("true", "latest"):
        resume = True
    trainer.train(resume_from_checkpoint=resume)

    if eval_prompts and not offline:
        metrics = trainer.evaluate()
        trainer.save_metrics("eval", metrics)
    grid = None
    sample_prompts = list(script_args.sample_prompts or eval_prompts[:4])
    if sample_prompts:
        path = os.path.join(config.output_dir, SAMPLE_GRID_NAME)
        save_sample_grid(trainer, sample_prompts, list(config.eval_seeds)[:2], path)
        grid = SAMPLE_GRID_NAME
    trainer.save_model(config.output_dir)
    trainer.create_model_card(sample_grid=grid)
    if config.push_to_hub:
        trainer.push_to_hub(sample_grid=grid)
    return trainer


def sample(args: SampleArguments) -> dict[str, Any]:
    """Render the prompts with fixed seeds and write PNGs (``tuned/`` with an adapter, ``base/`` without one or with
    ``compare``), a grid and ``manifest.json`` to ``args.output_dir``. Returns the manifest."""
    from .generators import evaluation_seed
    from .scoring import to_pil
    from .visualization import save_image_grid

    prompts = read_prompts(args.prompts, args.prompts_file, args.prompt_column, args.prompts_split, args.max_prompts)
    pipe = _load_for_generation(args)
    rendered: dict[str, Any] = {}
    if args.adapter is None or args.compare:
        rendered["base"] = render_images(
            pipe, prompts, args.seeds, args.resolution, args.batch_size, args.pipeline_call_kwargs
        )
    if args.adapter is not None:
        _load_adapter(pipe, args)
        rendered["tuned"] = render_images(
            pipe, prompts, args.seeds, args.resolution, args.batch_size, args.pipeline_call_kwargs
        )

    os.makedirs(args.output_dir, exist_ok=True)
    records = [
        {"prompt": prompt, "seed": seed, "index": i, "noise_seed": evaluation_seed(seed, i)}
        for seed in args.seeds
        for i, prompt in enumerate(prompts)
    ]
    for kind, images in rendered.items():
        os.makedirs(os.path.join(args.output_dir, kind), exist_ok=True)
        for record, image in zip(records, to_pil(images)):
            name = f"{kind}/seed{record['seed']}_{record['index']:03d}_{_slug(record['prompt'])}.png"
            image.save(os.path.join(args.output_dir, name))
            record[kind] = name
    import torch

    save_image_grid(
        torch.cat(list(rendered.values())), os.path.join(args.output_dir, "grid.png"), columns=len(prompts)
    )
    manifest = {
        "model": args.model_name_or_path,
        "adapter": args.adapter,
        "seeds": list(args.seeds),
        "num_prompts": len(prompts),
        "grid": "grid.png",
        "images": records,
    }
    with open(os.path.join(args.output_dir, "manifest.json"), "w", encoding="utf-8") as handle:
        json.dump(manifest, handle, indent=2)
    return manifest


def evaluate(args: EvaluateArguments) -> dict[str, Any]:
    """Mean reward(s) of the base model and of the adapter on the same prompts and noise, written to
    ``args.output_file`` as JSON: per-reward means, the weighted mean ``reward`` (as `DrPOTrainer.evaluate` reports
    it), the change, the fraction of images the adapter improves (``win_rate``) and per-image scores."""
    from .rewards import load_rewards
    from .scoring import RewardFunctions

    prompts = read_prompts(args.prompts, args.prompts_file, args.prompt_column, args.prompts_split, args.max_prompts)
    funcs, _ = load_rewards(args.reward_funcs)
    rewards = RewardFunctions.build(funcs, args.reward_weights)
    rewards.load()  # a reward that cannot load fails now, before the pipeline loads and renders
    pairs = [(seed, prompt) for seed in args.seeds for prompt in prompts]  # seed-major, as rendered
    repeated = [prompt for _, prompt in pairs]
    pipe = _load_for_generation(args)

    def score(images: torch.Tensor) -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
        scores = rewards(images, repeated)  # (rewards, images)
        combined = rewards.combine(scores)
        summary = {"reward": combined.mean().item()}
        for name, values in zip(rewards.names, scores):
            summary[f"rewards/{name}/mean"] = values.mean().item()
        return summary, scores, combined

    base, base_scores, base_combined = score(
        render_images(pipe, prompts, args.seeds, args.resolution, args.batch_size, args.pipeline_call_kwargs)
    )
    results: dict[str, Any] = {
        "model": args.model_name_or_path,
        "adapter": args.adapter,
        "num_prompts": len(prompts),
        "seeds": list(args.seeds),
        "num_images": len(repeated),
        "rewards": dict(zip(rewards.names, rewards.normalized_weights)),
        "base": base,
    }
    per_image = [
        {"prompt": prompt, "seed": seed, "base": {n: s[j].item() for n, s in zip(rewards.names, base_scores)}}
        for j, (seed, prompt) in enumerate(pairs)
    ]
    if args.adapter is not None:
        _load_adapter(pipe, args)
        images = render_images(pipe, prompts, args.seeds, args.resolution, args.batch_size, args.pipeline_call_kwargs)
        tuned, tuned_scores, tuned_combined = score(images)
        results["tuned"] = tuned
        results["delta"] = {key: tuned[key] - base[key] for key in tuned}
        results["win_rate"] = (tuned_combined > base_combined).float().mean().item()
        for j, record in enumerate(per_image):
            record["tuned"] = {n: s[j].item() for n, s in zip(rewards.names, tuned_scores)}
    results["per_image"] = per_image
    folder = os.path.dirname(os.path.abspath(args.output_file))
    os.makedirs(folder, exist_ok=True)
    with open(args.output_file, "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=2)
    return results


# ----------------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------------


def _parse(parser: Any, argv: list[str]) -> tuple[Any, ...]:
    """`parser.parse_args_and_config(argv)`, where a configuration the dataclasses' own checks reject (a `ValueError`
    from `DrPOConfig.__post_init__`, say) ends as argparse's errors do, with exit status 2 and no traceback, since the
    user's flags or YAML are at fault, not the program. The usage is left out: with every `TrainingArguments` field it
    runs to over a hundred lines and would bury the message naming the fix."""
    try:
        return parser.parse_args_and_config(argv)
    except ValueError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\nSee `{parser.prog} --help` for every option.\n")


def _train_command(argv: list[str]) -> None:
    script_args, config = _parse(make_train_parser(prog="trl-drpo train"), argv)
    trainer = train(script_args, config)
    if trainer.is_world_process_zero():
        import glob

        from .hub import MODEL_FILES

        # Name only what this run wrote (the model's files, adapter or full denoiser, and what came with them): an
        # offline run, for one, has no rewards to render a sample grid for.
        written = [
            os.path.relpath(path, config.output_dir)
            for pattern in (*MODEL_FILES, SAMPLE_GRID_NAME, "eval_results.json")
            for path in sorted(glob.glob(os.path.join(config.output_dir, pattern)))
        ]
        print(f"Written to {os.path.abspath(config.output_dir)}: {', '.join(written)}")


def _sample_command(argv: list[str]) -> None:
    from trl import TrlParser

    (args,) = _parse(TrlParser(SampleArguments, prog="trl-drpo sample"), argv)
    manifest = sample(args)
    print(f"{len(manifest['images'])} images per model written to {os.path.abspath(args.output_dir)}")


def _evaluate_command(argv: list[str]) -> None:
    from trl import TrlParser

    (args,) = _parse(TrlParser(EvaluateArguments, prog="trl-drpo evaluate"), argv)
    results = evaluate(args)
    rows = ["metric", *results["base"]]
    width = max(len(row) for row in rows)
    print(f"{'metric':<{width}}  {'base':>10}" + (f"  {'tuned':>10}  {'change':>10}" if "tuned" in results else ""))
    for key, base in results["base"].items():
        line = f"{key:<{width}}  {base:>10.4g}"
        if "tuned" in results:
            line += f"  {results['tuned'][key]:>10.4g}  {results['delta'][key]:>+10.3g}"
        print(line)
    if "win_rate" in results:
        print(f"adapter better on {results['win_rate']:.0%} of {results['num_images']} images")
    print(f"written to {os.path.abspath(args.output_file)}")


COMMANDS: dict[str, tuple[Callable[[list[str]], None], str]] = {
    "train": (_train_command, "train a DrPO LoRA adapter (a YAML --config and/or DrPOConfig flags)"),
    "sample": (_sample_command, "render prompts with fixed seeds from a base model and an adapter, as PNGs"),
    "evaluate": (_evaluate_command, "mean reward(s) of base vs adapter on a prompt set, as JSON"),
}


def _usage() -> str:
    lines = ["usage: trl-drpo {train,sample,evaluate} [options]   (trl-drpo COMMAND --help for its options)", ""]
    lines += [f"  {name:<9} {description}" for name, (_, description) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``trl-drpo`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from . import __version__

        print(f"trl-drpo {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"trl-drpo: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    COMMANDS[command][0](rest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
