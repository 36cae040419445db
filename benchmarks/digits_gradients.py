"""How much of a DrPO update on the digit world comes from the reward: LoRA gradients of single micro-steps compared.

For each caption and `NUM_DRAWS` noise draws of its own, one DrPO micro-step (`trl_drpo.step.micro_step`, the
trainer's own) is run on the shipped base with the verifier's ranking and again with that ranking reversed. Writing g
(true ranking) and r (reversed), the part of the gradient the reward decides is s = (g - r) / 2 and the part it does
not is c = (g + r) / 2.
Reported, per setting:

- ``cos_true_reversed``: cos(g, r); near 1 means the update hardly depends on which candidates won;
- ``signal_to_common``: |s| / |c|;
- ``signal_consistency``: cos(s1, s2) between two noise draws of the same caption, averaged over the pairs of draws;
  near 0 means each update's reward-driven direction is mostly sampling noise;
- ``signal_cross_caption``: cos between the signals of different captions.

The last settings grow K (one feature token per image, each candidate's own anchor copy masked, no reference term),
with a control in which the verifier's scores are replaced by random ones: a ranking that means nothing must give a
signal that does not repeat from one noise draw to the next.

    python -m benchmarks.digits_gradients   # writes benchmarks/results/digits_gradients.json (a few minutes)
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import time
from typing import Any

import torch

from trl_drpo import DrPOConfig, DrPOTrainer
from trl_drpo.step import micro_step
from trl_drpo.worlds.digits import load_pipeline, reward_fn

from .common import machine_info


CAPTIONS = (
    "a 3 to the left of a 7",
    "a 1 to the left of a 4",
    "a 6 above a 2",
    "a red 4 and a blue 9",
    "two 7s",
    "a 5 and a 8",
)
SETTINGS = {
    "digits preset": {},
    "no reference term": {"reference_loss_weight": 0.0},
    "no reference, wide preference radii (0.5, 1, 2)": {
        "reference_loss_weight": 0.0,
        "preference_radii": [0.5, 1.0, 2.0],
    },
}
_ONE_TOKEN_MASKED = {
    "reference_loss_weight": 0.0,
    "mask_anchor_copies": True,
    "feature_map": "denoiser",
    "feature_map_kwargs": {"spatial_tokens": False},
    "feature_keys": None,
}
SETTINGS.update(
    {
        f"one token per image, masked, no reference, K={k} ({k // 4}/{k // 4})": {
            **_ONE_TOKEN_MASKED,
            "num_generations": k,
            "num_positives": k // 4,
            "num_negatives": k // 4,
        }
        for k in (16, 64, 128, 256)
    }
)
SETTINGS["the same, K=128, random scores in place of the verifier's (control)"] = {
    **SETTINGS["one token per image, masked, no reference, K=128 (32/32)"],
    "_random_scores": True,
}
NUM_DRAWS = 3
RESULTS = os.path.join(os.path.dirname(__file__), "results", "digits_gradients.json")


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def measure(overrides: dict[str, Any], output_dir: str) -> dict[str, Any]:
    """The statistics above for one `DrPOConfig` on top of the "digits" preset (`overrides`; the key
    ``"_random_scores": True`` ranks by seeded random scores instead of the verifier's)."""
    random_scores = overrides.get("_random_scores", False)
    settings = {key: value for key, value in overrides.items() if key != "_random_scores"}
    config = DrPOConfig.from_preset("digits", output_dir=output_dir, report_to="none", **settings)
    trainer = DrPOTrainer(load_pipeline(), reward_fn("score"), config, train_dataset=list(CAPTIONS))
    params = list(trainer.generator.trainable_parameters())

    def gradient(caption: str, seed: int, sign: float) -> torch.Tensor:
        for p in params:
            p.grad = None

        def scorer(images, prompts):
            scores = trainer.reward_funcs(images, prompts)
            if random_scores:  # seeded by the noise draw, so that g and r rank the same random scores
                scores = torch.rand(scores.shape, generator=torch.Generator().manual_seed(seed))
            return scores, sign * trainer.reward_funcs.ranking(scores, 1)

        noise = torch.Generator().manual_seed(seed)
        micro_step(trainer.generator, trainer.model, trainer.feature_map, scorer, [caption], trainer.step_settings,
                   noise_generator=noise)  # fmt: skip
        return torch.cat([torch.zeros(p.numel()) if p.grad is None else p.grad.flatten() for p in params])

    rows, signals = [], {}
    for index, caption in enumerate(CAPTIONS):
        # Each caption its own noise draws, so that the captions' statistics are independent samples.
        pairs = [
            tuple(gradient(caption, 1000 * index + draw, sign) for sign in (1.0, -1.0)) for draw in range(NUM_DRAWS)
        ]
        signals[caption] = [(g - r) / 2 for g, r in pairs]
        rows.append(
            {
                "caption": caption,
                "cos_true_reversed": round(statistics.mean(_cos(g, r) for g, r in pairs), 3),
                "signal_to_common": round(
                    statistics.mean(float((g - r).norm() / (g + r).norm().clamp_min(1e-12)) for g, r in pairs), 3
                ),
                "signal_consistency": round(
                    statistics.mean(_cos(a, b) for a, b in itertools.combinations(signals[caption], 2)), 3
                ),
            }
        )
    cross = [_cos(signals[a][0], signals[b][0]) for a, b in itertools.combinations(CAPTIONS, 2)]
    summary = {key: round(statistics.mean(row[key] for row in rows), 3) for key in rows[0] if key != "caption"}
    return {
        "overrides": overrides,
        "per_caption": rows,
        "mean": {**summary, "signal_cross_caption": round(statistics.mean(cross), 3)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default="drpo-digits-gradients")
    args = parser.parse_args()
    start = time.time()
    results = {name: measure(overrides, args.output_dir) for name, overrides in SETTINGS.items()}
    report = {"machine": machine_info(), "seconds": round(time.time() - start, 1), "settings": results}
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=1)
    for name, result in results.items():
        print(name, json.dumps(result["mean"]))


if __name__ == "__main__":
    main()
