"""A preference dataset of the digit world, for offline DrPO: pairs of the base's own samples for one train caption,
the one the verifier scores higher chosen, the lower one rejected.

It stands in for a Pick-a-Pic-style dataset of human choices (docs/method.md, section 9): the pairs are fixed before
training and no reward runs while training on them. Held-out captions never appear, and the seeds are disjoint from
the evaluation seeds, so what offline DrPO learns is measured on scenes it never saw.

    python -m trl_drpo.worlds.digits.preferences --output_dir digits-preferences

writes ``digits-preferences/train.parquet`` (columns ``prompt``, ``chosen``, ``rejected`` as PNG images, and
``category``, ``chosen_score``, ``rejected_score``), which `trl-drpo train --reward_funcs none --dataset_name
digits-preferences/train.parquet` and `DrPOTrainer(pipe, None, config, train_dataset=...)` read.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import torch

from .evaluation import EVAL_SEED_BASE, generate
from .grammar import balanced_prompts
from .verifier import verify


PREFERENCE_SEED_BASE = 50_000
"""Seeds of the candidates the pairs are drawn from: ``PREFERENCE_SEED_BASE + caption_index * candidates + j``,
clear of the evaluation seeds (`EVAL_SEED_BASE` onwards, a few hundred of them)."""

assert PREFERENCE_SEED_BASE > EVAL_SEED_BASE + 10_000  # the two seed ranges never meet


def preference_pairs(pipe: Any = None, per_category: int = 64, candidates: int = 8) -> Any:
    """Build the preference pairs from the base's samples on the train captions.

    For each of ``per_category`` train captions per category (`balanced_prompts`; small categories repeat their
    captions, each repetition with its own seeds), ``candidates`` samples are drawn and scored by the verifier's dense
    score; the best becomes ``chosen`` and the worst ``rejected`` (the first of equals, in seed order). A caption
    whose candidates all score the same gives no pair.

    Args:
        pipe: the pipeline to sample; the shipped base (`digits.load_pipeline()`) when None.
        per_category: captions per category, so at most ``6 * per_category`` pairs.
        candidates: samples per caption, at least 2.

    Returns:
        A `datasets.Dataset` with columns ``prompt`` (str), ``category`` (str), ``chosen`` and ``rejected``
        (`datasets.Image`, 32x32 RGB), ``chosen_score`` and ``rejected_score`` (float in [0, 1]).

    Raises:
        ValueError: ``per_category < 1`` or ``candidates < 2``.
    """
    import datasets

    from ...scoring import to_pil
    from . import load_pipeline

    if per_category < 1 or candidates < 2:
        raise ValueError(f"Need per_category >= 1 and candidates >= 2, got {per_category} and {candidates}.")
    pipe = pipe if pipe is not None else load_pipeline()
    items = balanced_prompts("train", per_category)
    captions = [item["prompt"] for item in items for _ in range(candidates)]
    seeds = [PREFERENCE_SEED_BASE + i for i in range(len(captions))]
    # Scored as stored (8-bit PNG), so that each pair's scores are those of its images.
    images = to_pil(generate(pipe, captions, seeds))
    scores = torch.tensor([result["score"] for result in verify(images, captions)]).view(len(items), candidates)
    rows: dict[str, list[Any]] = {key: [] for key in ("prompt", "category", "chosen", "rejected")}
    rows.update(chosen_score=[], rejected_score=[])
    for index, item in enumerate(items):
        best, worst = int(scores[index].argmax()), int(scores[index].argmin())
        if scores[index, best] == scores[index, worst]:
            continue
        chosen, rejected = images[index * candidates + best], images[index * candidates + worst]
        rows["prompt"].append(item["prompt"])
        rows["category"].append(item["category"])
        rows["chosen"].append(chosen)
        rows["rejected"].append(rejected)
        rows["chosen_score"].append(float(scores[index, best]))
        rows["rejected_score"].append(float(scores[index, worst]))
    features = datasets.Features(
        {
            "prompt": datasets.Value("string"),
            "category": datasets.Value("string"),
            "chosen": datasets.Image(),
            "rejected": datasets.Image(),
            "chosen_score": datasets.Value("float32"),
            "rejected_score": datasets.Value("float32"),
        }
    )
    return datasets.Dataset.from_dict(rows, features=features)


def main(argv: list[str] | None = None) -> str:
    """Write ``OUTPUT_DIR/train.parquet``; returns its path."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default="digits-preferences", help="Folder for train.parquet.")
    parser.add_argument("--per_category", type=int, default=64, help="Train captions per category.")
    parser.add_argument("--candidates", type=int, default=8, help="Base samples per caption, best vs worst.")
    args = parser.parse_args(argv)
    dataset = preference_pairs(per_category=args.per_category, candidates=args.candidates)
    os.makedirs(args.output_dir, exist_ok=True)
    path = os.path.join(args.output_dir, "train.parquet")
    dataset.to_parquet(path)
    counts = {category: dataset["category"].count(category) for category in dict.fromkeys(dataset["category"])}
    print(f"{len(dataset)} preference pairs written to {path}: {counts}")
    return path


if __name__ == "__main__":
    main()
