"""DrPO end to end on a toy: a one-step generator of 2-D points, aligned to a reward it can only rank with.

The generator is a residual MLP ``z -> z + mlp(z)`` whose last layer starts at zero, so the base generator is the
identity and its samples are N(0, I). The reward, computed in numpy on detached points and quantised, is
``-floor(10 * |x - (2, 0)|_1) / 10``: it has no gradient and only ranks candidates. Each step follows the trainer's
two phases (docs/method.md, section 4): a no-grad rollout of K candidates for a few "prompts"
(independent noise groups) and of the frozen base on the same noise, ranking, `drpo_targets`; then the candidates
are regenerated in chunks with grad and regressed onto their targets.

Margins, measured over seeds 0-11 (the test uses seed 0): after 50 Adam steps the held-out reward gains at least
1.7 over the base with lambda = 0.2 (the paper's default) and at least 0.57 with lambda = 1.0; the mean distance
between tuned and base outputs with lambda = 1.0 is at most 0.71 times the one with lambda = 0.2.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from trl_drpo.objective import DriftHyperparams, drpo_targets
from trl_drpo.ranking import top_bottom_k


TARGET = np.array([2.0, 0.0])
PROMPTS, CANDIDATES, ANCHORS, CHUNK = 4, 16, 4, 8
STEPS, LR = 50, 3e-3
SMALL_LAMBDA, LARGE_LAMBDA = 0.2, 1.0


def reward(points: torch.Tensor) -> torch.Tensor:
    """A black-box, piecewise-constant score of (..., 2) points: higher is closer to (2, 0)."""
    x = points.detach().numpy().astype(np.float64)
    return torch.from_numpy(-np.floor(np.abs(x - TARGET).sum(-1) * 10) / 10).float()


class OneStepGenerator(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 32), nn.SiLU(), nn.Linear(32, 32), nn.SiLU(), nn.Linear(32, 2))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, noise: torch.Tensor) -> torch.Tensor:
        return noise + self.net(noise)


def features(points: torch.Tensor) -> dict[str, torch.Tensor]:
    """The feature map: the points themselves, one token per sample, (B, K, 1, 2)."""
    return {"point": points.unsqueeze(2)}


def tune(base: OneStepGenerator, reference_loss_weight: float, seed: int) -> OneStepGenerator:
    generator = copy.deepcopy(base).requires_grad_(True)
    optimizer = torch.optim.Adam(generator.parameters(), lr=LR)
    params = DriftHyperparams(reference_loss_weight=reference_loss_weight)
    rng = torch.Generator().manual_seed(seed)
    for _ in range(STEPS):
        noise = torch.randn(PROMPTS, CANDIDATES, 2, generator=rng)
        with torch.no_grad():
            candidates, reference = generator(noise), base(noise)
        selections = top_bottom_k(reward(candidates), ANCHORS, ANCHORS)
        positives = torch.stack([candidates[b, s.positives] for b, s in enumerate(selections)])
        negatives = torch.stack([candidates[b, s.negatives] for b, s in enumerate(selections)])
        targets = drpo_targets(
            features(candidates), features(positives), features(negatives), features(reference), params
        )
        optimizer.zero_grad()
        for start in range(0, CANDIDATES, CHUNK):
            chunk = generator(noise[:, start : start + CHUNK])
            targets.loss(features(chunk), start).mean().backward()
        optimizer.step()
    return generator.requires_grad_(False)


@pytest.fixture(scope="module")
def outcome():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead
    try:
        torch.manual_seed(0)
        base = OneStepGenerator().requires_grad_(False)
        tuned = {lam: tune(base, lam, seed=1) for lam in (SMALL_LAMBDA, LARGE_LAMBDA)}
        held_out = torch.randn(4096, 2, generator=torch.Generator().manual_seed(1234))
        base_points = base(held_out)
        result = {"base_points": base_points, "held_out": held_out, "base_reward": reward(base_points).mean()}
        for lam, generator in tuned.items():
            points = generator(held_out)
            result[lam] = {
                "reward": reward(points).mean(),
                "distance_to_base": (points - base_points).norm(dim=-1).mean(),
            }
        return result
    finally:
        torch.set_num_threads(threads)


def test_the_base_generator_is_the_identity(outcome):
    torch.testing.assert_close(outcome["base_points"], outcome["held_out"])


def test_drpo_raises_the_held_out_reward_clearly_above_the_base_generator(outcome):
    gain = outcome[SMALL_LAMBDA]["reward"] - outcome["base_reward"]
    assert gain > 1.0, f"reward {outcome['base_reward']:.3f} -> {outcome[SMALL_LAMBDA]['reward']:.3f}"


def test_a_larger_reference_weight_keeps_the_tuned_generator_closer_to_the_base(outcome):
    near, far = outcome[LARGE_LAMBDA]["distance_to_base"], outcome[SMALL_LAMBDA]["distance_to_base"]
    assert near < 0.85 * far, f"distance to base: {near:.3f} (lambda={LARGE_LAMBDA}) vs {far:.3f}"
    # ... while still trading some of that closeness for reward.
    assert outcome[LARGE_LAMBDA]["reward"] > outcome["base_reward"] + 0.25
