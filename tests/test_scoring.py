"""Calling user rewards (`trl_drpo.scoring.RewardFunctions`): what a reward may return, and async rewards."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from trl_drpo.scoring import RewardFunctions


IMAGES = torch.rand(3, 3, 8, 8)
PROMPTS = ["a", "b", "c"]
EXPECTED = [1.0, 0.0, 2.0]


def scores_of(value):
    rewards = RewardFunctions.build(lambda images, prompts: value)
    return rewards(IMAGES, PROMPTS)[0].tolist()


@pytest.mark.parametrize(
    "value",
    [
        [1, 0, 2],
        (1.0, 0.0, 2.0),
        [np.float32(1), np.int64(0), np.float16(2)],
        np.array([1, 0, 2], dtype=np.int32),
        np.array([[1.0], [0.0], [2.0]]),
        torch.tensor([1.0, 0.0, 2.0], dtype=torch.bfloat16),
        torch.tensor([1.0, 0.0, 2.0], dtype=torch.float16),
        torch.tensor([1, 0, 2], dtype=torch.int64),
        torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64, requires_grad=True),
        [torch.tensor(1.0), torch.tensor(0, dtype=torch.int32), torch.tensor(2.0, dtype=torch.bfloat16)],
        torch.tensor([[1.0], [0.0], [2.0]]),
    ],
    ids=lambda v: type(v).__name__ + str(getattr(v, "dtype", "")),
)
def test_every_numeric_return_type_becomes_one_float_per_image(value):
    assert scores_of(value) == EXPECTED


def test_booleans_are_pass_fail_scores():
    assert scores_of(torch.tensor([True, False, True])) == [1.0, 0.0, 1.0]


@pytest.mark.parametrize("value", [0.5, np.float32(0.5), torch.tensor(0.5)])
def test_a_single_value_for_a_batch_says_so(value):
    with pytest.raises(ValueError, match="returned one value for 3 images"):
        scores_of(value)


def test_none_says_so():
    with pytest.raises(ValueError, match="returned None for 3 images"):
        scores_of(None)


def test_async_rewards_run_inside_a_running_event_loop():
    async def reward(images, prompts):
        await asyncio.sleep(0)
        return [len(p) for p in prompts]

    rewards = RewardFunctions.build([reward])

    async def application():  # e.g. a notebook cell or an async service calling trainer.train()
        return rewards(IMAGES, PROMPTS)

    assert asyncio.run(application())[0].tolist() == [1.0, 1.0, 1.0]
