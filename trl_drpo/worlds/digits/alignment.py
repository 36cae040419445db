"""DrPO in the digit world: the shipped base aligned to the verifier, measured on held-out captions and seeds.

Shared by the embedded demo (`python -m trl_drpo.demo`) and the recipe script (`examples/train_digits.py`):

    from trl_drpo import DrPOConfig
    from trl_drpo.worlds.digits.alignment import align

    config = DrPOConfig.from_preset("digits", output_dir="drpo-digits", max_steps=60)
    trainer, report = align(config)
    print(report["table"])
"""

from __future__ import annotations

import time
from typing import Any

from transformers import ProgressCallback, TrainerCallback

from . import load_pipeline, reward_fn
from .evaluation import EVAL_PER_CATEGORY, as_eval_metrics, best_of_k, eval_cases, evaluate_pipeline, table_markdown
from .grammar import balanced_prompts


TRAIN_PER_CATEGORY = 64
"""Training captions per category of the recipe (small categories repeated, so that each weighs the same)."""


class AccuracyCallback(TrainerCallback):
    """Evaluates the pipeline `trainer` trains every `every` optimizer updates (and at the end), recording the verifier
    and judge tables against the training wall-clock (evaluation time excluded) in `history`.

    Each evaluation is also logged through `trainer.log` as ``eval_<scorer>/<category or mean_of_six>`` (pass rates in
    %, the keys `as_eval_metrics` gives the tuned pipeline), so that the console, TensorBoard or W&B show the held-out
    curve while the run goes on. The model card's base-against-tuned table reads the final evaluation `align` logs
    with the base beside it."""

    def __init__(self, trainer: Any, cases: list, every: int) -> None:
        self.trainer, self.cases, self.every = trainer, cases, max(1, int(every))
        self.history: list[dict[str, Any]] = []
        self._start = self._eval_seconds = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self._start, self._eval_seconds = time.time(), 0.0

    def _record(self, step: int) -> None:
        began = time.time()
        seconds = began - self._start - self._eval_seconds  # training time so far: earlier evaluations excluded
        with self.trainer.ema_weights():  # what the run will save: the moving average under `use_ema`
            result = evaluate_pipeline(self.trainer.generator.pipeline, self.cases)
        self._eval_seconds += time.time() - began
        self.history.append({"step": step, "train_seconds": round(seconds, 1), **result})
        self.trainer.log(as_eval_metrics(None, result))

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0:
            self._record(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        if not self.history or self.history[-1]["step"] != state.global_step:
            self._record(state.global_step)

    @property
    def train_seconds(self) -> float:
        """Training wall-clock so far, evaluation excluded, in seconds."""
        return self.history[-1]["train_seconds"] if self.history else 0.0


def align(
    config: Any,
    eval_per_category: int = EVAL_PER_CATEGORY,
    eval_every: int = 10,
    train_per_category: int = TRAIN_PER_CATEGORY,
    best_of: bool = True,
    callbacks: list | None = None,
    progress_bar: Any = None,
    pretrained_model_name_or_path: str | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Evaluate the base, train a DrPO adapter on the train captions with the verifier's dense score as the reward,
    and evaluate the tuned pipeline.

    Args:
        config: a `DrPOConfig` (e.g. `DrPOConfig.from_preset("digits", output_dir=...)`).
        eval_per_category: held-out (caption, seed) pairs per category (60 gives 360 images).
        eval_every: optimizer updates between evaluations during training (the accuracy-vs-time curve).
        train_per_category: training captions per category (small categories repeated, so each weighs the same).
        best_of: also evaluate best-of-K sampling of the base (K = `config.num_generations`).
        callbacks: extra `transformers.TrainerCallback`s.
        progress_bar: a `transformers.ProgressCallback` replacing the default training bar (when tqdm is on).
        pretrained_model_name_or_path: a digit-world pipeline folder to align instead of the shipped base (see
            `load_pipeline`).

    Returns:
        `(trainer, report)`: the trainer (its pipeline serves the tuned model) and a JSON-able dict with "base",
        "tuned" (and "best_of_k") tables from the verifier and the judge, "history" (tables during training),
        "train_seconds", "table" (markdown) and the settings.
    """
    from ...drpo_trainer import DrPOTrainer

    pipe = load_pipeline(pretrained_model_name_or_path=pretrained_model_name_or_path)
    cases = eval_cases(eval_per_category)
    rows: dict[str, Any] = {"base": evaluate_pipeline(pipe, cases)}
    if best_of:
        rows[f"best-of-{config.num_generations} (base)"] = best_of_k(pipe, cases, config.num_generations)
    train_prompts = [item["prompt"] for item in balanced_prompts("train", train_per_category)]
    trainer = DrPOTrainer(pipe, reward_fn("score"), config, train_dataset=train_prompts, callbacks=callbacks)
    accuracy = AccuracyCallback(trainer, cases, eval_every)
    trainer.add_callback(accuracy)
    if progress_bar is not None and not config.disable_tqdm:
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(progress_bar)
    trainer.train()
    rows["DrPO"] = accuracy.history[-1]
    # Logged as an evaluation, so that the model card shows the held-out tables as base against tuned.
    trainer.log(as_eval_metrics(rows["base"], rows["DrPO"]))
    report = {
        "base": rows["base"],
        "tuned": {"verifier": rows["DrPO"]["verifier"], "judge": rows["DrPO"]["judge"]},
        "history": accuracy.history,
        "train_seconds": accuracy.train_seconds,
        "steps": trainer.state.global_step,
        "eval_images": len(cases),
        "table": table_markdown(rows),
        "card_eval_description": f"Pass rates (%) of the digit world's verifier and of its independent judge on "
        f"{len(cases)} held-out captions x seeds (`python -m trl_drpo.worlds.digits.evaluation`):",
    }
    if best_of:
        report["best_of_k"] = rows[f"best-of-{config.num_generations} (base)"]
    return trainer, report
