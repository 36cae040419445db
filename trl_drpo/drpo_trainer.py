"""The DrPO trainer: online preference fine-tuning of one-step diffusers pipelines with any reward."""

from __future__ import annotations

import copy
import logging
import os
import shutil
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from typing import Any

import torch
from accelerate.utils import gather_object
from datasets import Dataset, IterableDataset
from transformers import Trainer, TrainerCallback, set_seed
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, HubStrategy, rotate_checkpoints

from .averaging import EMA_DIR, EMACallback
from .checkpoints import STAGING_DIR, publish_checkpoint, resume_checkpoint
from .drpo_config import DrPOConfig
from .evaluation import last_eval_metrics, render_pairs, reward_means, seed_major_pairs
from .features import build_feature_map
from .generators import OneStepGenerator
from .generators.adapters import check_no_loaded_adapter
from .hub import (
    CONFIG_NAME,
    LORA_WEIGHT_NAME,
    CheckpointPushCallback,
    load_adapter,
    load_denoiser,
    public_config_json,
    save_adapter,
    upload_model_files,
)
from .metrics import StepMetrics
from .model_card import check_card_is_ours, first_prompt, trained_call_kwargs, write_model_card
from .preferences import (
    PreferenceLatents,
    is_preference_dataset,
    load_preference_dataset,
)
from .prompts import PromptCollator, load_prompt_dataset
from .ranking_decoder import RankingDecoder
from .reporting import ReportingCallbackHandler, log_candidates
from .scoring import RewardFunctions
from .step import TIMING_PHASES, StepHooks, StepNoise, micro_step


logger = logging.getLogger(__name__)

_DEEPSPEED_CHUNK_ERROR = (
    "DeepSpeed steps its engine on every backward call, so the chunked gradient pass cannot run under it: set "
    "candidate_chunk_size=None (one graph over all candidates) with DeepSpeed."
)


def _resolve_reward_names(reward_funcs: Any) -> Any:
    # Built-in reward names (as TRL's GRPO takes reward model ids) become their callables through the registry.
    items = reward_funcs if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
    if not any(isinstance(item, str) for item in items):
        return reward_funcs
    from .rewards import get_reward

    return [get_reward(item) if isinstance(item, str) else item for item in items]


class DrPOTrainer(Trainer):
    """Trainer for Drifting Preference Optimization (DrPO) of one-step text-to-image generators.

    Each optimizer update, for every prompt of the micro-batch: K candidates are generated from fresh noise, along
    with their reference twins from the base generator (the same denoiser with the adapter disabled, same noise);
    the candidates are decoded and scored by the rewards, which are only used to rank them; the best and worst
    become positive and negative anchors; a frozen feature map embeds everything; the drift field gives each
    candidate's features a detached target; and the candidates' features are regressed onto their targets, on the
    rollout's own graph (one graph over the K candidates, the default) or by regenerating the candidates with
    gradient chunk by chunk (`candidate_chunk_size`, memory flat in K). The reward never receives a gradient.

    Args:
        pipe: a diffusers pipeline with a supported one-step adapter (`StableDiffusionPipeline` for SD-Turbo,
            `StableDiffusionXLPipeline` for SDXL-Turbo; see `trl_drpo.generators.register_generator`).
        reward_funcs: a callable ``reward(images, prompts, **columns) -> list[float]``, a built-in reward's name
            (``"pickscore"``, see `trl_drpo.rewards.available_rewards`), or a list of them (weighted by
            `DrPOConfig.reward_weights`). See `trl_drpo.scoring` for the convention. Rewards with a ``load()``
            method (the built-in model rewards) are loaded here, so that one that cannot load fails before any
            generation. None trains offline DrPO on a preference dataset (docs/method.md §9).
        args: a `DrPOConfig`; defaults to the paper's SD-Turbo recipe with ``output_dir="drpo-output"``.
        train_dataset: prompts: a `datasets.Dataset` / `IterableDataset` with a prompt column, a list of strings,
            or None to load `args.dataset_name`. With `reward_funcs=None`, a preference dataset instead: rows of a
            prompt, a ``chosen`` and a ``rejected`` image (`trl_drpo.preferences.load_preference_dataset` lists the
            accepted forms; every image is checked before training).
        eval_dataset: prompts for `evaluate()` (same forms), or None to use `args.eval_prompts`.
        peft_config: a `peft.LoraConfig` overriding the LoRA fields of `args`.
        callbacks: extra `transformers.TrainerCallback`s.
        optimizers: ``(optimizer, lr_scheduler)``, as in `transformers.Trainer`.
    """

    _tag_names = ["trl", "drpo", "lora", "text-to-image", "diffusers", "diffusers-training"]

    def __init__(
        self,
        pipe: Any,
        reward_funcs: Callable | Sequence[Callable] | None,
        args: DrPOConfig | None = None,
        train_dataset: Dataset | IterableDataset | Sequence[str] | str | None = None,
        eval_dataset: Dataset | IterableDataset | Sequence[str] | str | None = None,
        peft_config: Any = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple[torch.optim.Optimizer | None, torch.optim.lr_scheduler.LambdaLR | None] = (None, None),
    ) -> None:
        args = DrPOConfig(output_dir="drpo-output") if args is None else args
        if not isinstance(args, DrPOConfig):
            raise TypeError(f"`args` must be a DrPOConfig, got {type(args).__name__}.")
        # Everything a user can get wrong is checked here, before any model runs.
        check_card_is_ours(args.output_dir)
        args.check_feature_map()
        self.generator = OneStepGenerator.from_pipeline(
            pipe, resolution=args.resolution, call_kwargs=args.pipeline_call_kwargs
        )
        if train_dataset is None:
            if args.dataset_name is None:
                raise ValueError(
                    "No prompts to train on: pass `train_dataset` (a datasets.Dataset or a list of prompts, or a "
                    "preference dataset with reward_funcs=None) or set `dataset_name` in DrPOConfig."
                )
            train_dataset = args.dataset_name
        # Offline DrPO (docs/method.md §9): no reward; the anchors are the dataset's chosen and rejected images.
        self.offline = reward_funcs is None
        if not self.offline and is_preference_dataset(train_dataset):
            raise ValueError(
                "A preference dataset (chosen/rejected columns) with a reward: mixing online and offline DrPO is not "
                "supported. Pass reward_funcs=None to train offline on the pairs, or a prompt dataset to train online."
            )
        if self.offline:
            args.check_offline()
        self.reward_funcs = None
        if self.offline:
            train_dataset = load_preference_dataset(
                train_dataset,
                prompt_column=args.prompt_column,
                split=args.dataset_train_split,
                config_name=args.dataset_config,
            )
        else:
            self.reward_funcs = RewardFunctions.build(_resolve_reward_names(reward_funcs), args.reward_weights)
            self.reward_funcs.load()  # a reward that cannot load fails now, not after the first rollout
            train_dataset = load_prompt_dataset(
                train_dataset,
                prompt_column=args.prompt_column,
                split=args.dataset_train_split,
                config_name=args.dataset_config,
            )
        self._preference_latents = PreferenceLatents(self.generator.encode_images)
        if eval_dataset is None and args.eval_prompts:
            eval_dataset = list(args.eval_prompts)
        if eval_dataset is not None:
            eval_dataset = load_prompt_dataset(eval_dataset, prompt_column=args.prompt_column, split="test")
        if not args.one_graph and args.deepspeed:
            raise ValueError(_DEEPSPEED_CHUNK_ERROR)

        denoiser = self.generator.denoiser
        check_no_loaded_adapter(self.generator.unwrapped_denoiser)
        if args.use_lora:
            # transformers seeds in `Trainer.__init__`, which runs after this: seed now, so that the adapter's initial
            # weights (PEFT draws them from the global generator) are those of `args.seed` on every run.
            set_seed(args.seed)
            if peft_config is None:
                self.generator.add_lora(**args.lora_settings)
            else:
                self.generator.add_lora(config=peft_config)
        else:
            # Full fine-tuning: the reference must come from a frozen copy, since there is no adapter to disable.
            self.generator.set_reference_denoiser(copy.deepcopy(denoiser).requires_grad_(False).eval())
            # Trained weights stay in fp32 under fp16/bf16 autocast (add_lora does the same for LoRA weights).
            denoiser.requires_grad_(True).float()
        self.peft_config = peft_config
        # transformers would call `gradient_checkpointing_enable`, which diffusers models do not have: switch it on
        # through diffusers' own API and take the flag off the arguments so the Trainer does not try again.
        # Changes below go to the Trainer's copy of the arguments; the user's config keeps its values.
        user_args, args = args, copy.deepcopy(args)
        if args.activation_checkpointing or args.gradient_checkpointing:
            denoiser.enable_gradient_checkpointing()
            args.activation_checkpointing = args.gradient_checkpointing = False
        # transformers' in-training push uploads its own list of file names (none of them the adapter) with the
        # training arguments pickled, Hub token included: DrPO pushes its checkpoints itself, model files only.
        callbacks = list(callbacks or [])
        # First among the callbacks, so that the others (evaluations at a step's end, the final save) see the average.
        # Its checkpoint copy is saved and read back like the model's own weights (a LoRA one loads in diffusers).
        self._ema = EMACallback(args.ema_decay, self._save, self._load_weights) if args.use_ema else None
        if self._ema is not None:
            callbacks.insert(0, self._ema)
        if args.push_to_hub and args.hub_strategy != HubStrategy.END:
            callbacks.append(CheckpointPushCallback(self, user_args.hub_strategy))
            args.hub_strategy = HubStrategy.END

        super().__init__(
            model=denoiser,
            args=args,
            data_collator=PromptCollator(args.prompt_column),
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            callbacks=callbacks,
            optimizers=optimizers,
        )
        if (
            not args.one_graph and self.is_deepspeed_enabled
        ):  # DeepSpeed may come from the accelerate config, not from args
            raise ValueError(_DEEPSPEED_CHUNK_ERROR)
        handler = self.callback_handler
        self.callback_handler = ReportingCallbackHandler(
            handler.callbacks, self.model, self.processing_class, self.optimizer, self.lr_scheduler
        )
        self.generator.pipeline.to(self.accelerator.device)
        self._pipeline_device = self.generator.device  # the concrete device (cuda:0 for Accelerate's "cuda")
        self.feature_map = build_feature_map(
            args.feature_map, self.generator, keys=args.feature_keys, **(args.feature_map_kwargs or {})
        )
        self.feature_map.to(self.accelerator.device)
        unknown = sorted(set(args.feature_weights or {}) - set(self.feature_map.keys))
        if unknown:
            raise ValueError(
                f"feature_weights names {unknown}, which are not among the feature keys in use "
                f"{list(self.feature_map.keys)} (feature_map={args.feature_map!r}, feature_keys={args.feature_keys}): "
                "weigh some of those, or select the key with feature_keys."
            )
        # What the rewards rank: the pipeline's VAE, or a tiny one (checked against the pipeline's VAE now), at full
        # size or resized. Evaluation, logged images and samples always use the full decode.
        self.ranking_decoder = RankingDecoder.from_config(
            self.generator, None if self.offline else args.ranking_vae, args.ranking_resolution
        )
        self.step_settings = args.step_settings
        self._metrics = StepMetrics()
        self._noise = StepNoise(args.seed, self.accelerator.process_index)
        self._images_logged_step = -1
        self._base_eval: tuple[tuple[str, ...], dict[str, float]] | None = None
        if hasattr(self.model, "add_model_tags"):
            self.model.add_model_tags(self._tag_names)

    def ema_weights(self) -> AbstractContextManager[None]:
        """Within this context the model (and so the pipeline) holds the moving average of the trained weights, when
        `use_ema` is on and training has begun; the trained weights come back on exit. Without `use_ema`, or before
        training, nothing changes. `evaluate()` renders through it; after training the model holds the average."""
        return nullcontext() if self._ema is None else self._ema.applied()

    # ------------------------------------------------------------------------------------------------------------
    # One step
    # ------------------------------------------------------------------------------------------------------------

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any) -> Any:
        """`transformers.Trainer.train`, resuming only from whole checkpoints.

        `resume_from_checkpoint=True` picks the newest *complete* `checkpoint-N` of `output_dir`, skipping (with a
        warning) any that a crash left unfinished or damaged; a checkpoint path with a damaged or missing file raises
        a `ValueError` naming the file, before anything is loaded.
        """
        weights = LORA_WEIGHT_NAME if self.args.use_lora else None
        resume_from_checkpoint = resume_checkpoint(resume_from_checkpoint, self.args.output_dir, weights, logger)
        self._follow_pipeline_changes()  # before transformers moves the denoiser (only) back to the trainer's device
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def _follow_pipeline_changes(self) -> None:
        """Train what the pipeline serves after the user changed it (each step runs the pipeline's own call with its
        current scheduler and dtype): a half-precision cast, which also reaches the trained weights, is followed with
        those weights put back in fp32; a move to another device raises, naming the fix, since the optimizer state,
        the feature map and Accelerate's placement stay on the device the trainer was built with (and `train()`
        would move the denoiser back, but not the text encoders and the VAE)."""
        placed = self._pipeline_device
        moved = {}
        for name, module in self.generator.pipeline.components.items():
            param = next(module.parameters(), None) if isinstance(module, torch.nn.Module) else None
            if param is not None and param.device != placed:
                moved[name] = str(param.device)
        if moved:
            raise ValueError(
                f"The pipeline was moved after the trainer was built, which placed it on {placed}, where its "
                f"optimizer state and feature map are: now {moved}. A pipeline moved (or offloaded) after the "
                f"trainer is built cannot be trained: move it back with `pipe.to({str(placed)!r})`. The trainer "
                "places the pipeline on its Accelerate device: choose that device with `accelerate launch` (or "
                "CUDA_VISIBLE_DEVICES, or `use_cpu=True`)."
            )
        self.generator.upcast_trainable_parameters()

    def training_step(
        self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
    ) -> torch.Tensor:
        self._follow_pipeline_changes()
        model.train()
        args = self.args
        prompts = list(inputs["prompt"])
        columns = {key: value for key, value in inputs.items() if key != "prompt"}
        k = args.num_generations
        timings: dict[str, float] = defaultdict(float)
        start = time.perf_counter()

        def scorer(images: torch.Tensor, repeated: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
            per_prompt = len(repeated) // len(prompts)  # K, plus any extra anchor candidates
            repeated_columns = {c: [v for v in values for _ in range(per_prompt)] for c, values in columns.items()}
            scores = self.reward_funcs(images, repeated, repeated_columns)  # (rewards, B*(K+E))
            return scores, self.reward_funcs.ranking(scores, len(prompts), raw=args.anchor_selection == "threshold")

        @contextmanager
        def meter(name: str) -> Iterator[None]:
            tick = time.perf_counter()
            yield
            timings[TIMING_PHASES[name]] += time.perf_counter() - tick

        hooks = StepHooks(
            meter=meter,
            autocast=self.compute_loss_context_manager,
            backward=self.accelerator.backward,
            no_sync=lambda: self.accelerator.no_sync(model),
        )
        accumulation = getattr(self, "current_gradient_accumulation_steps", args.gradient_accumulation_steps)
        loss, rollout = micro_step(
            self.generator,
            model,
            self.feature_map,
            None if self.offline else scorer,
            prompts,
            self.step_settings,
            hooks,
            noise_generator=self._noise.next(self.state.global_step),
            selection_generator=self._noise.next(self.state.global_step),
            accumulation_steps=accumulation,
            preference_latents=self._preference_latents(columns) if self.offline else None,
            decoder=self.ranking_decoder,
        )
        timings["step"] = time.perf_counter() - start

        self._metrics.record_step(self.reward_funcs, rollout.scores, rollout.targets, timings)
        step = self.state.global_step
        logs_images = args.log_images_steps and step % args.log_images_steps == 0 and rollout.images is not None
        if logs_images and self._images_logged_step != step and self.is_world_process_zero():
            self._images_logged_step = step
            candidates, scores, names = rollout.images[:k], rollout.scores[:, :k], self.reward_funcs.names
            if not self.ranking_decoder.is_full:  # logged images are the pipeline's own, not what the rewards saw
                candidates = self.generator.decode(rollout.latents[:k].detach(), chunk_size=args.decode_chunk_size)
            log_candidates(
                self.callback_handler.callbacks, args.report_to, candidates, scores, names, prompts[0], step
            )
        return loss

    # ------------------------------------------------------------------------------------------------------------
    # Logging
    # ------------------------------------------------------------------------------------------------------------

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        super().log(self._metrics.merged_into(logs), start_time)

    # ------------------------------------------------------------------------------------------------------------
    # Evaluation
    # ------------------------------------------------------------------------------------------------------------

    def _eval_prompts(self, eval_dataset: Any) -> list[str]:
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is not None:
            if not isinstance(dataset, (Dataset, IterableDataset)):
                dataset = load_prompt_dataset(dataset, prompt_column=self.args.prompt_column, split="test")
            return [row[self.args.prompt_column] for row in dataset]
        raise ValueError("Nothing to evaluate: pass `eval_dataset` or set `eval_prompts` in DrPOConfig.")

    @torch.no_grad()
    def render(self, prompts: Sequence[str], seeds: Sequence[int], adapter: bool = True) -> torch.Tensor:
        """Images ``(len(seeds) * len(prompts), 3, H, W)`` in [0, 1] for fixed seeds, seed-major.

        Image ``(seed, i)`` uses the latent seed ``seed * 10**6 + i`` (the paper's protocol), so results are
        comparable across runs and checkpoints. ``adapter=False`` renders the base generator.
        """
        return self._render_pairs(prompts, seed_major_pairs(seeds, len(prompts)), adapter)

    def _render_pairs(self, prompts: Sequence[str], pairs: Sequence[tuple[int, int]], adapter: bool) -> torch.Tensor:
        """Images for ``(seed, prompt index)`` pairs, in order (see :meth:`render`)."""
        chunk_size, autocast = self.args.decode_chunk_size, self.compute_loss_context_manager
        return render_pairs(self.generator, prompts, pairs, adapter, chunk_size, autocast)

    def _score(self, prompts: Sequence[str], adapter: bool) -> dict[str, float]:
        # Each process renders and scores its own share of the (seed, prompt) pairs; the scores are gathered in
        # order, so every process reports the same means as a single process would.
        pairs = seed_major_pairs(self.args.eval_seeds, len(prompts))
        with self.accelerator.split_between_processes(pairs) as mine:
            rows: list[list[float]] = []
            if mine:
                images = self._render_pairs(prompts, mine, adapter)
                scores = self.reward_funcs(images, [prompts[i] for _, i in mine])
                rows = scores.T.tolist()
        return reward_means(self.reward_funcs, torch.tensor(gather_object(rows)).T)

    def evaluate(
        self,
        eval_dataset: Dataset | Sequence[str] | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> dict[str, float]:
        """Render fixed-seed samples for the evaluation prompts and report the mean reward(s) of the tuned
        generator next to those of the base pipeline (computed once per prompt set). Raises `ValueError` in an
        offline run, which has no reward to score with."""
        if self.reward_funcs is None:
            raise ValueError(
                "evaluate() scores samples with the rewards, and this offline DrPO run has none: measure the adapter "
                "with your own judge (e.g. `trl-drpo evaluate --adapter <output_dir> --reward_funcs ...`)."
            )
        prompts = self._eval_prompts(eval_dataset)
        start = time.perf_counter()
        was_training = self.model.training
        self.model.eval()
        with self.ema_weights():
            tuned = self._score(prompts, adapter=True)
        if self._base_eval is None or self._base_eval[0] != tuple(prompts):
            self._base_eval = (tuple(prompts), self._score(prompts, adapter=False))
        self.model.train(was_training)
        metrics = {f"{metric_key_prefix}_{key}": value for key, value in tuned.items()}
        metrics.update({f"{metric_key_prefix}_base_{key}": value for key, value in self._base_eval[1].items()})
        metrics[f"{metric_key_prefix}_runtime"] = time.perf_counter() - start
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    # ------------------------------------------------------------------------------------------------------------
    # Saving, loading, Hub
    # ------------------------------------------------------------------------------------------------------------

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Write the adapter in diffusers' LoRA format (or the full denoiser), the config and the model card."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        denoiser = self.accelerator.unwrap_model(self.model)
        if self.args.use_lora:
            save_adapter(self.generator.pipeline, denoiser, output_dir)
        else:
            denoiser.save_pretrained(os.path.join(output_dir, self.generator.denoiser_name))
        with open(os.path.join(output_dir, CONFIG_NAME), "w", encoding="utf-8") as handle:
            handle.write(public_config_json(self.args))
        self._write_model_card(output_dir)

    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        # transformers writes `checkpoint-N` file by file (adapter, optimizer, scheduler, RNG, trainer state), so a
        # crash in between leaves a folder that looks like the newest checkpoint. No public hook says where a
        # checkpoint is written: this override (and the `_get_output_dir` it shadows for the call) points
        # transformers at a hidden staging folder, and the checkpoint is renamed into place once every process has
        # written its part.
        run_dir = self._get_output_dir(trial=trial)
        staging = os.path.join(run_dir, STAGING_DIR)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.args.should_save:
            shutil.rmtree(os.path.join(staging, name), ignore_errors=True)  # what an earlier crash left
        self.accelerator.wait_for_everyone()
        self._get_output_dir = lambda trial=None: staging
        try:
            super()._save_checkpoint(model, trial)
        finally:
            del self._get_output_dir
        if self.args.should_save and self._ema is not None:
            self._ema.save(os.path.join(staging, name))  # inside the staging folder: published with the rest
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            publish_checkpoint(os.path.join(staging, name), os.path.join(run_dir, name))
            best = self.state.best_model_checkpoint
            if best and os.path.dirname(best) == staging:  # this checkpoint is the best: name it where it now is
                self.state.best_model_checkpoint = os.path.join(run_dir, os.path.basename(best))
                self.state.save_to_json(os.path.join(run_dir, name, TRAINER_STATE_NAME))
            rotate_checkpoints(run_dir, self.args.save_total_limit, self.state.best_model_checkpoint, use_mtime=True)
            with suppress(OSError):
                os.rmdir(staging)  # only when empty
        self.accelerator.wait_for_everyone()

    def _load_weights(self, folder: str, model: torch.nn.Module | None = None) -> None:
        """Load the adapter (or the full denoiser) that `_save` wrote into `folder` into the model, in place."""
        denoiser = self.accelerator.unwrap_model(model if model is not None else self.model)
        if self.args.use_lora:
            load_adapter(denoiser, folder, prefix=self.generator.denoiser_name)
        else:
            load_denoiser(denoiser, folder, self.generator.denoiser_name)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        self._load_weights(resume_from_checkpoint, model)
        if self._ema is not None:  # the average is rebuilt, from this checkpoint's, when training begins
            self._ema.resume_folder = resume_from_checkpoint
        elif os.path.isdir(os.path.join(resume_from_checkpoint, EMA_DIR)):
            logger.warning(
                "%s holds a moving average of the weights (%s/), but use_ema is off: training resumes from the "
                "trained weights and the average is not continued (set use_ema=True to continue it).",
                resume_from_checkpoint,
                EMA_DIR,
            )

    def _write_model_card(self, output_dir: str, **kwargs: Any) -> None:
        write_model_card(
            output_dir,
            pipeline=self.generator.pipeline,
            args=self.args,
            reward_names=self.reward_funcs.names if self.reward_funcs else [],
            reward_weights=self.reward_funcs.weights if self.reward_funcs else [],
            tags=self._tag_names,
            eval_metrics=last_eval_metrics(self.state.log_history),
            repo_id=getattr(self, "hub_model_id", None),  # the full "user/name" once push_to_hub created the repo
            call_kwargs=trained_call_kwargs(self.generator, self.args.resolution),
            example_prompt=first_prompt(self.train_dataset, self.args.prompt_column),
            weights_averaged=self._ema is not None and self._ema.holds_average,
            **kwargs,
        )

    def create_model_card(
        self,
        model_name: str | None = None,
        dataset_name: str | None = None,
        tags: str | list[str] | None = None,
        sample_grid: str | None = None,
        output_dir: str | None = None,
        eval_description: str | None = None,
        **kwargs: Any,
    ) -> None:
        """Write the DrPO model card (diffusers LoRA metadata, rewards, hyperparameters, base-vs-tuned rewards of
        the last evaluation, an optional sample grid path relative to the card) to ``output_dir/README.md``
        (default `args.output_dir`). `eval_description` introduces the evaluation table when its metrics come from an
        evaluation of your own logged as `eval_<name>` / `eval_base_<name>` (None: this trainer's `evaluate`).
        `push_to_hub` calls it; the card never holds a token."""
        if not self.is_world_process_zero():
            return
        extra_tags = [tags] if isinstance(tags, str) else list(tags or [])
        self._write_model_card(
            output_dir or self.args.output_dir,
            model_name=model_name,
            dataset_name=dataset_name,
            extra_tags=extra_tags,
            sample_grid=sample_grid,
            eval_description=eval_description,
        )

    def push_to_hub(
        self,
        commit_message: str | None = "End of training",
        blocking: bool = True,
        token: str | None = None,
        revision: str | None = None,
        **kwargs: Any,
    ) -> Any:
        """Save the model to `args.output_dir` and upload only its files (`trl_drpo.hub.MODEL_FILES`) and the card's
        sample grid (`sample_grid=`, relative to `output_dir`; other kwargs go to `create_model_card`): never the
        pickled training arguments, logs or other files. Returns the `CommitInfo` (a `Future` when not `blocking`)."""
        token = token if token is not None else self.args.hub_token
        if self.hub_model_id is None:
            self.init_hf_repo(token=token)
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        self.save_model(_internal_call=True)
        if not self.is_world_process_zero():
            return None
        self.create_model_card(**kwargs)
        return upload_model_files(
            self.args.output_dir,
            self.hub_model_id,
            commit_message=commit_message or "End of training",
            token=token,
            revision=revision if revision is not None else self.args.hub_revision,
            extra_files=(kwargs.get("sample_grid") or "",),
            blocking=blocking,
        )
