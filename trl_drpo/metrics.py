"""The trainer's metrics: what each DrPO step records and how the records become the numbers `Trainer.log` reports.

Each step appends, under `"train"`: `reward` and `reward_std` (the combined reward over the step's candidates),
`rewards/<name>/mean` and `rewards/<name>/std` per reward (online steps only: an offline step scores nothing),
`frac_prompts_skipped` (prompts whose candidates gave no anchors), `drift/<statistic>` per prompt the field was
computed for, and `timing/<phase>` in seconds. At each log they are averaged on each process, then across processes.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence

import torch
from accelerate.utils import gather_object

from .objective import DrPOTargets
from .scoring import RewardFunctions


class StepMetrics:
    """Per-mode (`"train"`, `"eval"`) lists of metric values since the last log."""

    def __init__(self) -> None:
        self._values: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}

    def record_step(
        self,
        reward_funcs: RewardFunctions | None,
        scores: torch.Tensor | None,
        targets: Sequence[DrPOTargets | None],
        timings: Mapping[str, float],
    ) -> None:
        """Append one training micro-step's metrics.

        Args:
            reward_funcs: the rewards that gave `scores` (their names and weights); unused when `scores` is None.
            scores: `(num_rewards, B*K)` raw scores of the step's candidates, or None (an offline step).
            targets: one entry per prompt of the step: its drift targets, or None when the prompt was skipped.
            timings: seconds per phase (`trl_drpo.step.TIMING_PHASES`, and `"step"`).
        """
        metrics = self._values["train"]
        if scores is not None:  # offline steps score nothing
            combined = reward_funcs.combine(scores)
            metrics["reward"].append(combined.mean().item())
            metrics["reward_std"].append(combined.std().item() if combined.numel() > 1 else 0.0)
            for name, values in zip(reward_funcs.names, scores):
                metrics[f"rewards/{name}/mean"].append(values.mean().item())
                metrics[f"rewards/{name}/std"].append(values.std().item() if values.numel() > 1 else 0.0)
        used = [t for t in targets if t is not None]
        metrics["frac_prompts_skipped"].append(1.0 - len(used) / len(targets))
        for target in used:
            for name, value in target.metrics.items():
                metrics[f"drift/{name}"].append(value.mean().item())
        for name, seconds in timings.items():
            metrics[f"timing/{name}"].append(seconds)

    def merged_into(self, logs: Mapping[str, float]) -> dict[str, float]:
        """`logs` with the recorded metrics of its mode added (evaluation when a key of `logs` starts with `eval_`,
        then prefixed `eval_`), each the mean over processes of the per-process means, sorted by name; the mode's
        records are then cleared.

        Every process must call it at the same log: the per-process means are gathered (a collective call), so all
        report the same numbers.
        """
        mode = "eval" if any(key.startswith("eval_") for key in logs) else "train"
        local = {key: sum(values) / len(values) for key, values in self._values[mode].items() if values}
        merged: dict[str, list[float]] = defaultdict(list)
        for rank_metrics in gather_object([local]):
            for key, value in rank_metrics.items():
                merged[key].append(value)
        prefix = "eval_" if mode == "eval" else ""
        self._values[mode].clear()
        return {**logs, **{prefix + key: sum(values) / len(values) for key, values in sorted(merged.items())}}
