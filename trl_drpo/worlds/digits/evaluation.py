"""Evaluation in the digit world: GenEval-style tables on held-out captions and seeds, for a pipeline as it serves.

Every image is what `pipe(prompt, num_inference_steps=1, guidance_scale=0.0, generator=torch.Generator()
.manual_seed(seed))` returns, so a tuned pipeline (a LoRA loaded or still attached by the trainer) is measured
exactly as a user would run it. Both the verifier (the training reward) and the independent judge score each image.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .grammar import CATEGORIES, balanced_prompts
from .verifier import CHECKS, summarize, verify


EVAL_SEED_BASE = 10_000
"""Evaluation seeds start here; training draws its noise from the trainer's own seed, so they never meet."""

EVAL_PER_CATEGORY = 60
"""Held-out (caption, seed) pairs per category of the world's recorded evaluations: 360 images in all."""


def eval_cases(per_category: int = EVAL_PER_CATEGORY, split: str = "test") -> list[tuple[dict[str, Any], int]]:
    """`(item, seed)` pairs, `per_category` for each of the six categories (`balanced_prompts`), each pair of a
    category with its own seed. 60 per category gives 360 images."""
    items = balanced_prompts(split, per_category)
    return [(item, EVAL_SEED_BASE + i % per_category) for i, item in enumerate(items)]


@torch.no_grad()
def generate(pipe: Any, captions: Sequence[str], seeds: Sequence[int], batch_size: int = 120) -> torch.Tensor:
    """Images of `pipe` for `(caption, seed)` pairs, one step, no guidance: `(N, 3, H, W)` float in [0, 1]."""
    images = []
    for start in range(0, len(captions), batch_size):
        stop = min(start + batch_size, len(captions))
        generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds[start:stop]]
        out = pipe(
            list(captions[start:stop]),
            num_inference_steps=1,
            guidance_scale=0.0,
            generator=generators,
            output_type="pt",
        )
        images.append(out.images.float().cpu())
    return torch.cat(images)


def score_tables(images: torch.Tensor, captions: Sequence[str]) -> dict[str, Any]:
    """Per-category tables (`summarize`) of the verifier and the judge for `images` `(N, 3, H, W)` in [0, 1] and
    their captions: `{"verifier": table, "judge": table}`."""
    return {"verifier": summarize(verify(images, captions)), "judge": summarize(verify(images, captions, judge=True))}


def evaluate_pipeline(pipe: Any, cases: Sequence[tuple[dict[str, Any], int]]) -> dict[str, Any]:
    """Per-category tables (`score_tables`) of the verifier and the judge for `pipe` on `cases`."""
    captions = [item["prompt"] for item, _ in cases]
    return score_tables(generate(pipe, captions, [seed for _, seed in cases]), captions)


def best_of_k(pipe: Any, cases: Sequence[tuple[dict[str, Any], int]], k: int) -> dict[str, Any]:
    """Best-of-K sampling of `pipe`, the inference-time reference: for each case, K candidates (seeds
    `seed * 1000 + j`), the one with the best verifier score kept; tables of the verifier and the judge on it."""
    captions = [item["prompt"] for item, _ in cases]
    repeated = [caption for caption in captions for _ in range(k)]
    seeds = [seed * 1000 + j for _, seed in cases for j in range(k)]
    images = generate(pipe, repeated, seeds)
    scores = torch.tensor([r["score"] for r in verify(images, repeated)]).view(len(cases), k)
    best = images.view(len(cases), k, *images.shape[1:])[torch.arange(len(cases)), scores.argmax(dim=1)]
    return score_tables(best, captions)


def diversity(pipe: Any, items: Sequence[dict[str, Any]], seeds: Sequence[int]) -> dict[str, float]:
    """How different the images of one caption are across seeds: the mean RMS pixel distance (0-1 scale) over all
    pairs of seeds, averaged over `items`, for `pipe` ("generated") and for ground-truth scenes ("ground_truth")."""
    import numpy as np

    from .scenes import render

    def mean_pairwise(images: torch.Tensor) -> float:
        flat = images.flatten(1)
        distances = torch.cdist(flat, flat) / flat.shape[1] ** 0.5
        n = len(flat)
        return float(distances.sum() / (n * (n - 1)))

    generated, truth = [], []
    for item in items:
        images = generate(pipe, [item["prompt"]] * len(seeds), seeds)
        generated.append(mean_pairwise(images))
        scenes = np.stack([np.asarray(render(item, seed), dtype=np.float32) / 255 for seed in seeds])
        truth.append(mean_pairwise(torch.from_numpy(scenes).permute(0, 3, 1, 2)))
    return {"generated": float(np.mean(generated)), "ground_truth": float(np.mean(truth))}


def as_eval_metrics(base: dict[str, Any] | None, tuned: dict[str, Any]) -> dict[str, float]:
    """Two `evaluate_pipeline` results as the evaluation keys a `DrPOTrainer` log and model card read as base against
    tuned: `eval_<scorer>/<category>` (tuned) and `eval_base_<scorer>/<category>` (base), pass rates in %, for the
    verifier and the judge, the six categories and `mean_of_six`. With `base` None, the tuned keys alone (an
    evaluation during training)."""
    out: dict[str, float] = {}
    for scorer in ("verifier", "judge"):
        for key in (*CATEGORIES, "overall"):
            name = f"{scorer}/{'mean_of_six' if key == 'overall' else key}"
            if key in tuned[scorer] and (base is None or key in base[scorer]):
                out[f"eval_{name}"] = float(tuned[scorer][key])  # unrounded: the card's change column subtracts them
                if base is not None:
                    out[f"eval_base_{name}"] = float(base[scorer][key])
    return out


def table_markdown(rows: dict[str, dict[str, Any]]) -> str:
    """A GenEval-like markdown table: one row per `{name: evaluate_pipeline(...)}` entry, verifier / judge pass
    rates (%) per category and their mean, then the mean score and per-check rates of the verifier."""
    # "check" in the name keeps the position check apart from the `position` category.
    header = ["", *CATEGORIES, "mean (6)", "score", *(f"{check} check" for check in CHECKS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, result in rows.items():
        v, j = result["verifier"], result["judge"]
        cells = [f"{v[c]:.1f} / {j[c]:.1f}" for c in CATEGORIES]
        cells.append(f"**{v['overall']:.1f}** / {j['overall']:.1f}")
        cells.append(f"{v['score']:.3f}")
        cells += [f"{v.get('check_' + k, float('nan')):.1f}" for k in CHECKS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def caption_grid(rows: dict[str, torch.Tensor], captions: Sequence[str], path: str, cell: int = 128) -> None:
    """Save a grid: one row per `{label: (N, 3, H, W) images}` (same seeds across rows), each column headed by its
    caption, each row labelled; images upscaled (nearest) to `cell` pixels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(captions)
    fig, axes = plt.subplots(len(rows), n, figsize=(1.6 * n, 1.9 * len(rows)), squeeze=False)
    for r, (label, images) in enumerate(rows.items()):
        for c in range(n):
            ax = axes[r][c]
            ax.imshow(images[c].permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(captions[c].replace(" and ", "\nand ").replace(" to the ", "\nto the "), fontsize=8)
            if c == 0:
                ax.set_ylabel(label, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=max(60, cell // 2))
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Measure the shipped base and, with ``--lora DIR``, the base with that adapter loaded, on held-out captions and
    seeds; print the table and, with ``--output_file``, write the tables as JSON. Returns the tables."""
    import argparse
    import json

    from . import load_pipeline

    parser = argparse.ArgumentParser(
        prog="python -m trl_drpo.worlds.digits.evaluation",
        description="Held-out verifier and judge accuracy of the digit world's base and, with --lora, of the base "
        "with that adapter.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--lora", help="A folder holding a DrPO adapter (pytorch_lora_weights.safetensors).")
    parser.add_argument(
        "--per_category", type=int, default=EVAL_PER_CATEGORY, help="Held-out (caption, seed) pairs per category."
    )
    parser.add_argument("--output_file", help="Write the tables here as JSON.")
    args = parser.parse_args(argv)
    pipe = load_pipeline()
    cases = eval_cases(args.per_category)
    rows = {"base": evaluate_pipeline(pipe, cases)}
    if args.lora:
        pipe.load_lora_weights(args.lora)
        rows["tuned"] = evaluate_pipeline(pipe, cases)
    print(f"Pass rates (%) on {len(cases)} held-out captions x seeds, verifier / judge:\n")
    print(table_markdown(rows))
    if args.output_file:
        with open(args.output_file, "w", encoding="utf-8") as handle:
            json.dump(rows, handle, indent=1)
    return rows


if __name__ == "__main__":
    main()
