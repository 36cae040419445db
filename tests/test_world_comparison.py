"""The digit-world comparison (`benchmarks.world_comparison`): the baselines' losses do what the authors' do, the
surrogate scores captions' checks softly, the one command runs and writes its tables and plot, and the README quotes
the recorded run. Nothing here asserts a timing."""

from __future__ import annotations

import itertools
import json
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import world_comparison
from benchmarks.world_baselines import (
    dpo1step_loss,
    neighbor_grpo_loss,
    neighbor_noises,
    quasi_norm_advantages,
)
from benchmarks.world_surrogate import EMPTY, exact_count_probability, soft_caption_scores

from kit import REPO


ROOT = Path(REPO)


def one_hot_scene(cells: dict[int, tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cell probabilities `(1, 4, 11)` and `(1, 4, 4)` of a scene whose cells hold `{cell: (digit, colour)}`."""
    digits, colors = torch.zeros(1, 4, EMPTY + 1), torch.full((1, 4, 4), 0.25)
    for cell in range(4):
        digit, color = cells.get(cell, (EMPTY, None))
        digits[0, cell, digit] = 1.0
        if color is not None:
            colors[0, cell] = torch.nn.functional.one_hot(torch.tensor(color), 4).float()
    return digits, colors


# ---------------------------------------------------------------------------------------------------- surrogate


@pytest.mark.parametrize(
    ("caption", "cells", "expected"),
    [
        ("a 2 to the left of a 6", {0: (2, 0), 1: (6, 0)}, 1.0),
        ("a 2 to the left of a 6", {1: (2, 0), 0: (6, 0)}, 3 / 4),  # count and both digits hold; the relation fails
        ("a 2 above a 6", {1: (2, 0), 3: (6, 0)}, 1.0),
        ("three 4s", {0: (4, 0), 1: (4, 1), 3: (4, 2)}, 1.0),
        ("three 4s", {0: (4, 0), 1: (4, 1)}, 2 / 4),  # the count and the third 4 fail
        ("a red 7", {2: (7, 0)}, 1.0),
        ("a red 7", {2: (7, 2)}, 2 / 3),  # a blue 7: the colour check fails
        ("a blue 1 and a yellow 8", {0: (8, 3), 3: (1, 2)}, 1.0),
    ],
)
def test_the_surrogate_scores_certain_scenes_as_the_verifier_counts_checks(caption, cells, expected):
    digits, colors = one_hot_scene(cells)
    assert soft_caption_scores(digits, colors, [caption]).item() == pytest.approx(expected)


def test_the_surrogate_score_is_differentiable_in_the_cell_probabilities():
    logits = torch.randn(2, 4, EMPTY + 1, requires_grad=True)
    score = soft_caption_scores(logits.softmax(-1), torch.full((2, 4, 4), 0.25), ["a 3 and a 5", "two 9s"]).sum()
    score.backward()
    assert logits.grad.abs().sum() > 0


def test_exact_count_probability_is_the_poisson_binomial_distribution():
    occupied = torch.tensor([0.1, 0.5, 0.7, 0.9])
    for count in range(5):
        brute = sum(
            math.prod(p if bit else 1 - p for p, bit in zip(occupied.tolist(), bits))
            for bits in itertools.product((0, 1), repeat=4)
            if sum(bits) == count
        )
        assert exact_count_probability(occupied, count).item() == pytest.approx(brute)


# ---------------------------------------------------------------------------------------------------- DPO1step


def test_dpo1step_loss_is_log_two_while_the_policy_is_the_reference():
    latents = torch.randn(2, 6, 3)
    loss = dpo1step_loss(latents.clone().requires_grad_(), latents, torch.randn(2, 6), 2, 2)
    assert loss.item() == pytest.approx(math.log(2))


def test_dpo1step_moves_the_samples_towards_the_preferred_set():
    start = torch.randn(1, 6, 3)
    scores = torch.arange(6.0)[None]  # the last two are preferred, the first two rejected
    policy = start.clone().requires_grad_()
    dpo1step_loss(policy, start, scores, 2, 2).backward()
    moved = (start - 0.01 * policy.grad)[0]
    chosen, rejected = start[0, 4:].mean(0), start[0, :2].mean(0)

    def gap(samples: torch.Tensor) -> float:  # distance to the rejected set minus distance to the preferred one
        return float((samples - rejected).pow(2).sum() - (samples - chosen).pow(2).sum())

    assert gap(moved) > gap(start[0])


# ---------------------------------------------------------------------------------------------------- Neighbor-GRPO


def test_quasi_norm_advantages_follow_the_authors_formula_and_vanish_without_spread():
    rewards = torch.tensor([[0.0, 1.0, 3.0, 4.0], [2.0, 2.0, 2.0, 2.0]])
    centered = torch.tensor([-2.0, -1.0, 1.0, 2.0])
    norm = centered.abs().pow(0.8).sum().pow(1 / 0.8)
    advantages = quasi_norm_advantages(rewards)
    torch.testing.assert_close(advantages[0], 2.0 * centered / norm)
    assert advantages[1].abs().sum() == 0
    assert quasi_norm_advantages(torch.tensor([0.0, 0.0, 0.0, 1.0]), clip=0.5).max() == 0.5  # 0.73 unclipped


def test_neighbor_noises_stay_standard_normal_around_their_base():
    base, deltas = torch.randn(1, 200_000), torch.randn(1, 3, 200_000)
    noises = neighbor_noises(base, deltas, 0.3)
    assert noises.std().item() == pytest.approx(1.0, abs=0.01)
    assert torch.corrcoef(torch.stack([noises[0, 0], base[0]]))[0, 1].item() == pytest.approx(
        math.sqrt(0.91), abs=0.01
    )


def test_neighbor_grpo_pulls_an_anchor_towards_the_candidates_with_positive_advantage():
    candidates = torch.tensor([[[0.0], [1.0], [4.0]]])  # (B=1, G=3, D=1)
    advantages = torch.tensor([[-1.0, 0.0, 1.0]])
    anchor = torch.tensor([[[1.5]]], requires_grad=True)
    loss = neighbor_grpo_loss(candidates, anchor, anchor.detach(), advantages)
    assert loss.item() == pytest.approx(-advantages.mean().item())  # ratio 1 at the rollout's own anchor
    loss.backward()
    assert anchor.grad.item() < 0  # descending the loss moves the anchor up, towards the best candidate


# ---------------------------------------------------------------------------------------------------- the command


@pytest.mark.parametrize("method", list(world_comparison.METHODS))
def test_every_method_update_puts_finite_gradients_on_the_lora_only(method):
    args = world_comparison.parse_args(["--quick"])
    config = world_comparison.config_for(method, args)
    surrogate = world_comparison.SurrogateVerifier(world_comparison.train_cell_classifier(steps=1))
    _, generator, update = world_comparison.build_method(method, config, surrogate)
    noise = world_comparison.StepNoise(0, rank=0)
    # Three updates' draws, gradients accumulating: Neighbor-GRPO's candidates share one base noise, so a single group
    # may tie under the verifier (zero advantages, no gradient).
    for step in range(3):
        update(["a 3 above a 1"], world_comparison.Meter(), noise.next(step))
    trainable = set(map(id, generator.trainable_parameters()))
    grads = [p.grad for p in generator.denoiser.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert all(id(p) in trainable for p in generator.denoiser.parameters() if p.grad is not None)
    assert any(g.abs().sum() > 0 for g in grads)


def test_the_documented_toy_command_runs_as_written_and_writes_its_tables_and_plot(tmp_path):
    command = next(line for line in world_comparison.__doc__.splitlines() if "--quick" in line).split("#")[0]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    subprocess.run(shlex.split(command.replace("python", sys.executable, 1)), cwd=tmp_path, env=env, check=True)
    out = tmp_path / "world-comparison-quick"
    written = json.loads((out / "world_comparison.json").read_text())
    assert set(written["methods"]) == set(world_comparison.METHODS)
    for run in written["methods"].values():
        assert run["updates"] > 0 and len(run["history"]) >= 2
        assert run["history"][0]["train_seconds"] == 0.0 and run["history"][-1]["train_seconds"] >= 2.0
        assert {"generation", "decode", "reward", "backward", "optimizer", "total"} <= set(run["seconds_per_update"])
    assert len(written["targets"]) == 4 and all(isinstance(t["met"], bool) for t in written["targets"])
    markdown = (out / "world_comparison.md").read_text()
    assert all(f"| {name} |" in markdown for name in world_comparison.METHODS)
    assert markdown.startswith("**A `--quick` smoke run")
    assert (out / "world_comparison.png").read_bytes()[:4] == b"\x89PNG"


def test_the_readme_quotes_the_recorded_comparison():
    recorded = json.loads((ROOT / "benchmarks" / "results" / "world_comparison.json").read_text())
    tables = world_comparison.render_markdown(recorded)
    assert tables in (ROOT / "benchmarks" / "README.md").read_text()
    assert (ROOT / "benchmarks" / "results" / "world_comparison.png").exists()
