"""Where the reference term's drift field points: back towards the base, or away from the set's centre?

The reference term (docs/method.md §2) pulls the current candidates towards the reference candidates of the base
generator, drawn from the same noises, and pushes them away from one another. This script builds sets of K
candidate features around a reference set and asks the term, as `trl_drpo.objective.drpo_targets` computes it, which
way it points, for the authors' estimator and for `mask_reference_pairs=True` (each candidate's own reference sample
masked). For every configuration it reports, averaged over candidates and seeds:

- ``towards_reference``: the cosine between a candidate's field and its way back to its own reference sample
  (``reference - current``); 0 where they coincide;
- ``outwards``: the cosine between the field and the candidate's offset from the current set's centroid (positive:
  the field spreads the set).

The sets: ``equal`` (the base itself, as at the first update), ``shifted`` (every candidate moved by the same vector,
0.3 or 1 times the set's spread), ``jittered`` (each candidate moved by its own noise of 0.3 times the spread),
``expanded`` / ``contracted`` (the set scaled about its centroid by 1.2 / 0.8).

    python -m benchmarks.reference_field   # a few seconds; writes benchmarks/results/reference_field.json
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from typing import Any

import torch

from benchmarks.common import machine_info, markdown_table
from trl_drpo.objective import DriftHyperparams, drpo_targets


RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "reference_field.json")

CASES = ("equal", "shifted 0.3", "shifted 1", "jittered 0.3", "expanded 1.2", "contracted 0.8")
ESTIMATORS = {"authors'": False, "mask_reference_pairs": True}


def current_set(case: str, reference: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The current candidates ``(K, D)`` for one of `CASES`, built around `reference` ``(K, D)`` (unit spread)."""
    name, _, size = case.partition(" ")
    k, dim = reference.shape
    if name == "equal":
        return reference.clone()
    amount = float(size)
    if name == "shifted":
        direction = torch.nn.functional.normalize(torch.randn(dim, generator=generator), dim=0)
        return reference + amount * dim**0.5 * direction  # the set's spread is 1 per coordinate
    if name == "jittered":
        return reference + amount * torch.randn(k, dim, generator=generator)
    centroid = reference.mean(dim=0, keepdim=True)
    return centroid + amount * (reference - centroid)


def reference_field(current: torch.Tensor, reference: torch.Tensor, mask_reference_pairs: bool) -> torch.Tensor:
    """The reference term's normalised field ``(K, D)`` at `current`, through `drpo_targets` (one prompt, 1 token)."""
    params = DriftHyperparams(reference_loss_weight=1.0, mask_reference_pairs=mask_reference_pairs)
    generated = {"phi": current[None, :, None]}
    anchors = {"phi": current[None, :1, None]}  # the preference term is built too; only the reference term is read
    targets = drpo_targets(generated, anchors, anchors, {"phi": reference[None, :, None]}, params)
    _, term = targets.terms["phi"][1]
    return term.field_at(current[None])[0]


def measure(dims: Sequence[int] = (4, 64, 512), seeds: int = 10, k: int = 24) -> dict[str, Any]:
    """Mean cosines of the reference field (see the module docstring) for every estimator, dimension and case."""
    rows = []
    for estimator, masked in ESTIMATORS.items():
        for dim in dims:
            for case in CASES:
                towards, outwards = [], []
                for seed in range(seeds):
                    generator = torch.Generator().manual_seed(seed)
                    reference = torch.randn(k, dim, generator=generator)
                    current = current_set(case, reference, generator)
                    field = reference_field(current, reference, masked)
                    back = reference - current
                    if back.norm() > 0:
                        towards.append(torch.nn.functional.cosine_similarity(field, back, dim=1).mean().item())
                    offset = current - current.mean(dim=0, keepdim=True)
                    outwards.append(torch.nn.functional.cosine_similarity(field, offset, dim=1).mean().item())
                rows.append(
                    {
                        "estimator": estimator,
                        "dim": dim,
                        "case": case,
                        "towards_reference": sum(towards) / len(towards) if towards else None,
                        "outwards": sum(outwards) / len(outwards),
                    }
                )
    return {"k": k, "seeds": seeds, "rows": rows}


def table(results: dict[str, Any]) -> str:
    """Markdown: one row per estimator and dimension, one column per case (towards reference / outwards)."""
    rows: dict[tuple[str, int], list[str]] = {}
    for row in results["rows"]:
        towards = "-" if row["towards_reference"] is None else f"{row['towards_reference']:+.2f}"
        rows.setdefault((row["estimator"], row["dim"]), []).append(f"{towards} / {row['outwards']:+.2f}")
    return markdown_table(["estimator", "D", *CASES], [[name, dim, *cells] for (name, dim), cells in rows.items()])


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=10, help="Reference sets drawn per configuration.")
    args = parser.parse_args(argv)
    results = measure(seeds=args.seeds)
    results["machine"] = machine_info()
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=1)
    print(table(results))


if __name__ == "__main__":
    main()
