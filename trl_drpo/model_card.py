"""The DrPO model card: its rendering from the template in ``model_cards/`` (diffusers LoRA metadata, rewards,
hyperparameters, base-vs-tuned rewards, a quick start), the guard that never overwrites a README the trainer did not
write, and the sample grid the card shows. What a card may say about local files is decided here: a local path is
named, never located, and no token reaches the text."""

from __future__ import annotations

import json
import os
import re
from enum import Enum
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any


if TYPE_CHECKING:
    from huggingface_hub import ModelCard

    from .generators import OneStepGenerator


MODEL_CARD_TEMPLATE = "drpo_lora.md"
"""The card's Jinja template, in the top-level ``model_cards/`` folder (``trl_drpo/model_cards/`` once installed)."""

CARD_MARKER = "<!-- trl_drpo model card:"
"""The line every card written by `render_model_card` holds, so that a README the trainer did not write is never
overwritten."""


def check_card_is_ours(output_dir: str) -> None:
    """Raise `FileExistsError` when ``output_dir/README.md`` exists and is not a trl_drpo model card (the user's own
    file), naming it and the ways out, before anything would overwrite it."""
    path = os.path.join(output_dir, "README.md")
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8", errors="replace") as handle:
        if CARD_MARKER in handle.read():
            return
    raise FileExistsError(
        f"{path} exists and was not written by trl_drpo; saving would replace it with the model card. Move or rename "
        "it, or choose another output_dir."
    )


def _template_path() -> Path:
    here = Path(__file__).resolve().parent
    for folder in (here.parent / "model_cards", here / "model_cards"):
        if (folder / MODEL_CARD_TEMPLATE).is_file():
            return folder / MODEL_CARD_TEMPLATE
    raise FileNotFoundError(f"Model card template {MODEL_CARD_TEMPLATE} not found next to trl_drpo.")


def _cli_call_options(call_kwargs: dict[str, Any] | None) -> str:
    """The `trl-drpo sample` options giving the trained call: `--resolution` for its size, `--pipeline_call_kwargs`
    for settings other than the plain one-step call's."""
    import json

    settings = dict(call_kwargs or {})
    size = settings.pop("height", None)
    settings.pop("width", None)
    options = f" --resolution {size}" if size else ""
    if settings and settings != {"num_inference_steps": 1, "guidance_scale": 0.0}:
        options += f" --pipeline_call_kwargs '{json.dumps(settings)}'"
    return options


def _pipeline_loader(pipeline: Any) -> str:
    """The diffusers class the quick start loads the base with: the text-to-image auto pipeline when it knows the
    family, else `DiffusionPipeline`."""
    from diffusers.pipelines.auto_pipeline import AUTO_TEXT2IMAGE_PIPELINES_MAPPING

    known = any(cls is type(pipeline) for cls in AUTO_TEXT2IMAGE_PIPELINES_MAPPING.values())
    return "AutoPipelineForText2Image" if known else "DiffusionPipeline"


def _versions() -> list[tuple[str, str]]:
    out = []
    for name in ("trl_drpo", "diffusers", "transformers", "peft", "trl", "accelerate", "torch"):
        try:
            out.append((name, metadata.version(name)))
        except metadata.PackageNotFoundError:
            continue
    return out


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _hub_id_or_none(name: str | None) -> str | None:
    """`name` if it reads as a Hub repo id rather than a local path; the card's metadata only takes Hub ids."""
    if not name or os.path.exists(name) or not _HUB_ID.match(name) or ".." in name:
        return None
    return name


def public_name(value: str) -> str:
    """A local path reduced to its last component (a name says what it is; a path says where, which may be private);
    anything else unchanged."""
    if os.path.isabs(value) or os.path.exists(value):
        return os.path.basename(os.path.normpath(value)) or value
    return value


def base_model_id(pipeline: Any) -> str | None:
    """The Hub id or path the pipeline was loaded from, if any."""
    name = getattr(getattr(pipeline, "config", None), "_name_or_path", None) or getattr(pipeline, "name_or_path", None)
    return str(name) if name else None


def builtin_base_name(base: str | None) -> str | None:
    """The `trl_drpo.loading.BUILTIN_MODELS` name of a base the package ships (the digit world's), given the folder
    the pipeline was loaded from; None for any other base."""
    from .worlds.digits import BASE_DIR

    if base and os.path.isdir(base) and os.path.samefile(base, BASE_DIR):
        return "trl-drpo/digits"
    return None


_CARD_HYPERPARAMETERS = (
    "learning_rate",
    "lr_scheduler_type",
    "weight_decay",
    "max_grad_norm",
    "max_steps",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "num_generations",
    "num_positives",
    "num_negatives",
    "num_anchor_generations",
    "anchor_selection",
    "mask_anchor_copies",
    "ranking_vae",
    "ranking_resolution",
    "kernel",
    "preference_radii",
    "reference_radii",
    "positive_weight",
    "negative_weight",
    "reference_weight",
    "reference_negative_weight",
    "reference_loss_weight",
    "drift_step",
    "feature_map",
    "feature_keys",
    "feature_aggregation",
    "feature_weights",
    "lora_rank",
    "lora_alpha",
    "lora_target_modules",
    "resolution",
    "seed",
)


def _precision(args: Any) -> str:
    return "fp16" if getattr(args, "fp16", False) else "bf16" if getattr(args, "bf16", False) else "fp32"


def _display_value(value: Any) -> Any:
    # Enums (e.g. the scheduler type) read better as their value than as `SchedulerType.CONSTANT`; dicts are shown as
    # the JSON a flag takes (`--feature_weights '{...}'`), not as Python reprs.
    if isinstance(value, dict):
        return json.dumps(value)
    return value.value if isinstance(value, Enum) else value


def _metric_label(key: str) -> str:
    # "rewards/pickscore/mean" -> "pickscore"; the ensemble "reward" is the weighted mean of the raw rewards.
    if key == "reward":
        return "reward (weighted mean)"
    parts = key.split("/")
    return parts[1] if len(parts) == 3 and parts[0] == "rewards" and parts[2] == "mean" else key


def _secrets(args: Any) -> list[str]:
    """Tokens that must never reach a card: the run's Hub token and the ones in the environment."""
    values = [getattr(args, "hub_token", None)]
    values += [os.environ.get(name) for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")]
    return [value for value in values if isinstance(value, str) and len(value) >= 4]


def _drift_field(args: Any, offline: bool) -> str:
    """What the run's drift field does, in words: only the terms whose weight is non-zero."""
    terms = ["pulls towards the encoded chosen image" if offline else "pulls towards the best candidates"]
    if getattr(args, "negative_weight", 0.0) > 0:
        terms.append("pushes away from the rejected one" if offline else "pushes away from the worst")
    if getattr(args, "reference_loss_weight", 0.0) > 0:
        terms.append("stays anchored to the base model's samples (weight `reference_loss_weight`)")
    if len(terms) < 3:
        return " and ".join(terms)
    return ", ".join(terms[:-1]) + ", and " + terms[-1]


def render_model_card(
    pipeline: Any,
    args: Any,
    reward_names: list[str],
    reward_weights: list[float],
    tags: list[str],
    eval_metrics: dict[str, float] | None = None,
    model_name: str | None = None,
    dataset_name: str | None = None,
    extra_tags: list[str] | None = None,
    sample_grid: str | None = None,
    repo_id: str | None = None,
    call_kwargs: dict[str, Any] | None = None,
    example_prompt: str | None = None,
    eval_description: str | None = None,
    weights_averaged: bool | None = None,
) -> ModelCard:
    """Render the DrPO model card (a `huggingface_hub.ModelCard`) from the template in ``model_cards/``.

    The card carries the diffusers LoRA metadata (``library_name: diffusers``, ``pipeline_tag: text-to-image``,
    ``base_model`` when the base is a Hub id, the tags), the rewards and their weights, key hyperparameters,
    base-vs-tuned rewards when an evaluation ran (``eval_metrics`` as `DrPOTrainer.evaluate` returns them), an
    optional sample grid (a path relative to the card), a quick start and the framework versions. It never includes a
    token: the run's ``hub_token`` and the ``HF_TOKEN`` of the environment are scrubbed from the text in case a
    user-supplied string (a dataset URL, a model name) carried one.

    Args:
        repo_id: the Hub repo the card describes, for the quick start; defaults to `args.hub_model_id`, then
            `model_name`, then the name of `args.output_dir`.
        call_kwargs: the keyword arguments of the trained call, for the quick start
            (`OneStepGenerator.pipeline_call_kwargs`); default `num_inference_steps=1, guidance_scale=0.0`.
        eval_description: the sentence introducing the evaluation table, for metrics that are not the trainer's own
            evaluation (e.g. the digit world's pass rates); None describes `DrPOTrainer.evaluate`'s mean rewards.
        example_prompt: the quick start's prompt when `args.eval_prompts` is empty (whose first prompt it is
            otherwise).
        weights_averaged: whether the weights the card goes with are the run's moving average (`args.use_ema`), as
            they are once training ends, and not the trained weights a checkpoint resumes from; default
            `args.use_ema`.

    With no rewards (offline DrPO) the card describes the preference pairs instead of a reward table.
    """
    from huggingface_hub import ModelCard, ModelCardData

    base = base_model_id(pipeline)
    builtin_base = builtin_base_name(base)
    base_hub_id = _hub_id_or_none(base)
    local_base = base is not None and base_hub_id is None and builtin_base is None
    base_display = base
    if local_base:
        base = public_name(base)  # a pipeline loaded from a local folder: name it, never locate it
        base_display = f"{base} (a local folder)"
    elif builtin_base:
        base = builtin_base
        base_display = f"`{base}` (the digit world's base, shipped with trl_drpo)"
    repo_id = repo_id or args.hub_model_id or model_name or Path(args.output_dir).name
    dataset = dataset_name or getattr(args, "dataset_name", None)
    total = sum(reward_weights) or 1.0
    all_tags = list(dict.fromkeys([*tags, *(extra_tags or []), "lora"]))
    card_data = ModelCardData(
        library_name="diffusers",
        pipeline_tag="text-to-image",
        base_model=base_hub_id,
        tags=all_tags,
        license="apache-2.0",
        datasets=[_hub_id_or_none(dataset)] if _hub_id_or_none(dataset) else None,
    )
    metrics = []
    eval_metrics = eval_metrics or {}
    for key, tuned in sorted(eval_metrics.items(), key=lambda item: (item[0] != "eval_reward", item[0])):
        if key.startswith("eval_base_") or not isinstance(tuned, (int, float)):
            continue
        base_key = "eval_base_" + key[len("eval_") :]
        if base_key in eval_metrics:
            base_value = eval_metrics[base_key]
            metrics.append(
                (_metric_label(key[len("eval_") :]), f"{base_value:.4g}", f"{tuned:.4g}", f"{tuned - base_value:+.3g}")
            )
    hyperparameters = [
        (name, _display_value(getattr(args, name))) for name in _CARD_HYPERPARAMETERS if hasattr(args, name)
    ]
    if weights_averaged is None:
        weights_averaged = getattr(args, "use_ema", False)
    ema_decay = args.ema_decay if weights_averaged else None
    if ema_decay is not None:  # the saved weights are the moving average, not the last update's
        hyperparameters.append(("ema_decay", _display_value(ema_decay)))
    hyperparameters.append(("mixed_precision", _precision(args)))
    card = ModelCard.from_template(
        card_data,
        template_path=str(_template_path()),
        model_name=model_name or Path(repo_id).name,
        repo_id=repo_id,
        # A local base is named in the text; the quick start shows where its folder goes, not where it was.
        base_model_id=(f"path/to/{base}" if local_base else base) or "<base model id or path>",
        base_model_display=base_display or "a one-step text-to-image pipeline",
        builtin_base=builtin_base,
        example_prompt=(list(getattr(args, "eval_prompts", None) or []) or [example_prompt or "a photo of a cat"])[0],
        call_arguments=", ".join(
            f"{key}={value!r}"
            for key, value in (call_kwargs or {"num_inference_steps": 1, "guidance_scale": 0.0}).items()
        ),
        cli_call_options=_cli_call_options(call_kwargs),
        pipeline_loader=_pipeline_loader(pipeline),
        # Half precision for serving: bf16 for a run trained in bf16 (FLUX and SANA publish bf16 weights), else fp16.
        serving_dtype="bfloat16" if _precision(args) == "bf16" else "float16",
        loads_with_diffusers=hasattr(pipeline, "load_lora_weights"),
        base_model_url=f"https://huggingface.co/{base_hub_id}" if base_hub_id else None,
        rewards=[(name, weight / total) for name, weight in zip(reward_names, reward_weights)],
        metrics=metrics,
        eval_seeds=list(getattr(args, "eval_seeds", []) or []),
        eval_description=eval_description,
        # A local prompt file is named, not located: its path says nothing to readers and may be private.
        dataset=dataset if _hub_id_or_none(dataset) or not dataset else os.path.basename(os.path.normpath(dataset)),
        dataset_url=f"https://huggingface.co/datasets/{_hub_id_or_none(dataset)}"
        if _hub_id_or_none(dataset)
        else None,
        sample_grid=sample_grid,
        drift_field=_drift_field(args, offline=not reward_names),
        anchor_generations=getattr(args, "num_anchor_generations", 0),
        ema_decay=ema_decay,
        ema_horizon=round(1 / (1 - ema_decay)) if ema_decay is not None else None,
        hyperparameters=hyperparameters,
        versions=_versions(),
    )
    text = str(card)
    secrets = _secrets(args)
    if any(secret in text for secret in secrets):
        for secret in secrets:
            text = text.replace(secret, "<redacted>")
        card = ModelCard(text)
    return card


def save_sample_grid(trainer: Any, prompts: list[str], seeds: list[int], path: str, min_cell: int = 128) -> str:
    """Render `prompts` with fixed `seeds` from the base generator (top rows) and the tuned one (bottom rows), same
    noise for both, and save the grid as a PNG at `path` (for the model card's ``sample_grid``).

    Each row holds one seed's images of all prompts, so a column compares one prompt across seeds and models. Call
    it on every process of a distributed run (the denoiser may be wrapped for data parallelism, so all ranks run the
    same forward passes); only the main process writes the file. Returns `path`.
    """
    import torch

    from .visualization import save_image_grid

    base = trainer.render(prompts, seeds, adapter=False)
    tuned = trainer.render(prompts, seeds, adapter=True)
    if trainer.is_world_process_zero():
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        save_image_grid(torch.cat([base, tuned]), path, columns=len(prompts), min_cell=min_cell)
    return path


def write_model_card(output_dir: str, **card: Any) -> str:
    """Render the card (`render_model_card` takes `card`) and write it to ``output_dir/README.md``; returns the path.

    Raises:
        FileExistsError: ``output_dir/README.md`` is the user's own file (see `check_card_is_ours`).
    """
    check_card_is_ours(output_dir)
    path = os.path.join(output_dir, "README.md")
    render_model_card(**card).save(path)
    return path


def first_prompt(dataset: Any, prompt_column: str) -> str | None:
    """The first prompt of a training dataset, the card's quick-start prompt when there are no evaluation prompts (a
    prompt the adapter was trained for says more than a generic one). None for an iterable or prompt-less dataset."""
    try:
        return str(dataset[0][prompt_column])
    except (TypeError, KeyError, IndexError, NotImplementedError):  # iterable or prompt-less datasets
        return None


def trained_call_kwargs(generator: OneStepGenerator, resolution: int | None) -> dict[str, Any]:
    """The call settings the adapter was trained for, which the card's quick start shows: the image size only when
    `resolution` chose it."""
    if resolution is None:
        return dict(generator.call_kwargs)
    return generator.pipeline_call_kwargs()
