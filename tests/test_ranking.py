"""Turning rewards into anchors (docs/method.md, section 3): selection rules and reward ensembles."""

from __future__ import annotations

import pytest
import torch

from trl_drpo.ranking import (
    SELECTION_RULES,
    mean_split,
    reward_ensemble,
    select_anchors,
    threshold_split,
    top_bottom_k,
    zscore,
)


def as_set(indices: torch.Tensor) -> set[int]:
    return set(indices.tolist())


# ---------------------------------------------------------------------------------------------------------------
# Top-k / bottom-k
# ---------------------------------------------------------------------------------------------------------------


def test_top_bottom_k_takes_the_best_as_positives_and_the_worst_as_negatives():
    scores = torch.tensor([[0.3, 0.9, -1.0, 0.5, 2.0, 0.0], [5.0, 4.0, 3.0, 2.0, 1.0, 0.0]])
    first, second = top_bottom_k(scores, num_positives=2, num_negatives=3)
    assert first.positives.tolist() == [4, 1]  # best first
    assert as_set(first.negatives) == {0, 5, 2}
    assert second.positives.tolist() == [0, 1]
    assert as_set(second.negatives) == {3, 4, 5}


def test_top_bottom_k_anchors_are_disjoint_even_when_they_cover_every_candidate():
    scores = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    for selection in top_bottom_k(scores, num_positives=4, num_negatives=4):
        assert as_set(selection.positives).isdisjoint(as_set(selection.negatives))
        assert as_set(selection.positives) | as_set(selection.negatives) == set(range(8))


def test_top_bottom_k_breaks_ties_by_candidate_order():
    scores = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0, 0.0]])
    (selection,) = top_bottom_k(scores, num_positives=2, num_negatives=2)
    assert selection.positives.tolist() == [0, 1]
    assert as_set(selection.negatives) == {4, 5}
    (again,) = top_bottom_k(scores.clone(), num_positives=2, num_negatives=2)
    assert torch.equal(again.positives, selection.positives) and torch.equal(again.negatives, selection.negatives)


@pytest.mark.parametrize("rule", SELECTION_RULES)
def test_a_prompt_whose_candidates_all_score_the_same_is_skipped_by_every_rule(rule):
    scores = torch.tensor([[0.7] * 6, [0.0, 1.0, 0.5, 0.2, 0.9, 0.1]])
    skipped, ranked = select_anchors(scores, rule, num_positives=2, num_negatives=2, threshold=0.5)
    assert skipped is None and ranked is not None


def test_top_bottom_k_ties_across_the_cut_are_deterministic():
    scores = torch.tensor([[0.0, 2.0, 1.0, 1.0, 1.0, 1.0, -3.0]])
    (selection,) = top_bottom_k(scores, num_positives=2, num_negatives=2)
    assert selection.positives.tolist() == [1, 2]  # the first of the tied 1.0s
    assert as_set(selection.negatives) == {0, 6}


def test_top_bottom_k_without_negatives_returns_an_empty_negative_set():
    (selection,) = top_bottom_k(torch.tensor([[0.1, 0.2, 0.3]]), num_positives=1, num_negatives=0)
    assert selection.positives.tolist() == [2]
    assert selection.negatives.numel() == 0


@pytest.mark.parametrize(("num_positives", "num_negatives"), [(4, 3), (7, 1), (0, 2), (2, -1)])
def test_top_bottom_k_rejects_overlapping_or_empty_selections(num_positives, num_negatives):
    with pytest.raises(ValueError, match="disjoint"):
        top_bottom_k(torch.randn(2, 6), num_positives, num_negatives)


# ---------------------------------------------------------------------------------------------------------------
# Mean split ("advsign")
# ---------------------------------------------------------------------------------------------------------------


def test_mean_split_puts_above_mean_candidates_in_positives_and_below_mean_in_negatives():
    scores = torch.tensor([[1.0, 4.0, 2.0, 5.0], [0.0, 3.0, 3.0, 3.0]])
    first, second = mean_split(scores)  # means 3.0 and 2.25
    assert as_set(first.positives) == {1, 3} and as_set(first.negatives) == {0, 2}
    assert as_set(second.positives) == {1, 2, 3} and as_set(second.negatives) == {0}


def test_mean_split_leaves_candidates_exactly_at_the_mean_out():
    (selection,) = mean_split(torch.tensor([[1.0, 2.0, 3.0]]))
    assert as_set(selection.positives) == {2} and as_set(selection.negatives) == {0}


def test_mean_split_skips_a_prompt_without_preference():
    selections = mean_split(torch.tensor([[2.0, 2.0, 2.0], [0.0, 1.0, 0.0]]))
    assert selections[0] is None
    assert as_set(selections[1].positives) == {1}


# ---------------------------------------------------------------------------------------------------------------
# Pass / fail threshold (binary rewards, GenEval style)
# ---------------------------------------------------------------------------------------------------------------


def test_threshold_split_draws_positives_from_passes_and_negatives_from_failures():
    scores = torch.tensor([[1.0, 0.0, 0.5, 0.0, 1.0, 0.49, 1.0, 0.0]])
    (selection,) = threshold_split(scores, 0.5, num_positives=2, num_negatives=3, generator=torch.Generator())
    assert len(selection.positives) == 2 and as_set(selection.positives) <= {0, 2, 4, 6}  # >= threshold passes
    assert len(selection.negatives) == 3 and as_set(selection.negatives) <= {1, 3, 5, 7}


def test_a_score_equal_to_the_threshold_passes():
    (selection,) = threshold_split(torch.tensor([[0.5, 0.4999]]), 0.5, num_positives=1, num_negatives=1)
    assert selection.positives.tolist() == [0] and selection.negatives.tolist() == [1]


def test_threshold_split_takes_a_whole_pool_smaller_than_asked():
    scores = torch.tensor([[1.0, 0.0, 0.0, 0.0, 0.0]])
    (selection,) = threshold_split(scores, 0.5, num_positives=3, num_negatives=2)
    assert selection.positives.tolist() == [0]
    assert len(selection.negatives) == 2


def test_threshold_split_draws_at_random_and_reproducibly_with_a_seeded_generator():
    scores = (torch.arange(12) % 2).float().unsqueeze(0)
    draws = [threshold_split(scores, 0.5, 2, 2, generator=torch.Generator().manual_seed(s))[0] for s in range(20)]
    again = threshold_split(scores, 0.5, 2, 2, generator=torch.Generator().manual_seed(0))[0]
    assert torch.equal(again.positives, draws[0].positives) and torch.equal(again.negatives, draws[0].negatives)
    assert set().union(*(as_set(d.positives) for d in draws)) == {1, 3, 5, 7, 9, 11}  # not just the first ones
    assert set().union(*(as_set(d.negatives) for d in draws)) == {0, 2, 4, 6, 8, 10}


def test_threshold_split_skips_a_prompt_with_an_empty_pool():
    scores = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    all_pass, all_fail, mixed = threshold_split(scores, 0.5, 1, 1)
    assert all_pass is None and all_fail is None
    assert mixed.positives.tolist() == [1]


# ---------------------------------------------------------------------------------------------------------------
# Dispatch and validation
# ---------------------------------------------------------------------------------------------------------------


def test_select_anchors_dispatches_by_rule_name():
    scores = torch.tensor([[0.0, 1.0, 0.2, 0.9]])
    (topk,) = select_anchors(scores, "topk", 1, 1)
    assert topk.positives.tolist() == [1] and topk.negatives.tolist() == [0]
    (split,) = select_anchors(scores, "mean_split", 1, 1)
    assert as_set(split.positives) == {1, 3}
    (passfail,) = select_anchors(scores, "threshold", 4, 4, threshold=0.5)
    assert as_set(passfail.positives) == {1, 3} and as_set(passfail.negatives) == {0, 2}
    with pytest.raises(ValueError, match="Unknown anchor selection rule"):
        select_anchors(scores, "softmax", 1, 1)


@pytest.mark.parametrize(
    "rule", [lambda s: top_bottom_k(s, 1, 1), mean_split, lambda s: threshold_split(s, 0.5, 1, 1)]
)
@pytest.mark.parametrize(
    ("scores", "match"),
    [(torch.tensor([0.0, 1.0, 2.0]), "prompts, candidates"), (torch.tensor([[0.0, float("nan"), 1.0]]), "NaN")],
    ids=["one_dimensional", "nan"],
)
def test_selection_rules_reject_malformed_scores(rule, scores, match):
    with pytest.raises(ValueError, match=match):
        rule(scores)


# ---------------------------------------------------------------------------------------------------------------
# Reward ensembles: per-prompt z-scores, normalised weights
# ---------------------------------------------------------------------------------------------------------------


def test_zscore_standardises_each_prompt_separately():
    scores = torch.tensor([[1.0, 2.0, 3.0, 6.0], [100.0, 300.0, 200.0, 400.0]])
    z = zscore(scores)
    torch.testing.assert_close(z.mean(dim=1), torch.zeros(2), atol=1e-6, rtol=0)
    torch.testing.assert_close(z.pow(2).mean(dim=1), torch.ones(2))
    torch.testing.assert_close(zscore(scores * torch.tensor([[3.0], [0.01]]) + torch.tensor([[-7.0], [5.0]])), z)


def test_a_constant_prompt_gets_zero_scores_not_nan():
    combined = reward_ensemble([torch.tensor([[2.0, 2.0, 2.0], [0.0, 1.0, 2.0]])])
    assert torch.isfinite(combined).all()
    assert torch.equal(combined[0], torch.zeros(3))
    assert combined[1, 2] > combined[1, 0]


def test_a_reward_that_barely_separates_candidates_is_scaled_down_not_blown_up():
    informative = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    flat = torch.tensor([[3e-7, 0.0, -3e-7, 0.0]])  # disagrees, but with a spread of about 2e-7
    assert zscore(flat).abs().max() < 0.5
    combined = reward_ensemble([informative, flat])
    assert torch.equal(combined.argsort(dim=1), informative.argsort(dim=1))


def test_a_single_reward_keeps_its_ranking():
    scores = torch.randn(3, 10, generator=torch.Generator().manual_seed(1)) * 40 + 7
    combined = reward_ensemble([scores], weights=[0.3])
    assert torch.equal(torch.argsort(combined, dim=1), torch.argsort(scores, dim=1))
    torch.testing.assert_close(combined, zscore(scores))


def test_reward_ensemble_is_the_normalised_weighted_sum_of_z_scores():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(2, 6, generator=g), 1000 * torch.randn(2, 6, generator=g)
    combined = reward_ensemble([a, b], weights=[1.0, 3.0])
    torch.testing.assert_close(combined, 0.25 * zscore(a) + 0.75 * zscore(b))
    torch.testing.assert_close(reward_ensemble([a, b], weights=[2.0, 6.0]), combined)  # only the ratio matters
    torch.testing.assert_close(reward_ensemble(torch.stack([a, b]), weights=[1.0, 3.0]), combined)


def test_reward_ensemble_is_not_dominated_by_a_reward_on_a_larger_scale():
    # Without the z-score, the reward in the thousands would decide the ranking alone.
    small = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    large = torch.tensor([[3000.0, 2000.0, 1000.0, 0.0]]) + 0.5 * torch.tensor([[0.0, 0.0, 0.0, 1.0]])
    combined = reward_ensemble([small, large])
    assert combined[0, 3] > combined[0, 0]


def test_reward_ensemble_without_weights_averages_the_z_scores():
    g = torch.Generator().manual_seed(3)
    a, b, c = (torch.randn(2, 5, generator=g) for _ in range(3))
    torch.testing.assert_close(reward_ensemble([a, b, c]), (zscore(a) + zscore(b) + zscore(c)) / 3)


@pytest.mark.parametrize(
    ("weights", "match"),
    [
        ([1.0], "2 rewards"),
        ([1.0, -1.0], "non-negative"),
        ([0.0, 0.0], "positive sum"),
        ([1.0, float("nan")], "non-negative"),
    ],
)
def test_reward_ensemble_rejects_bad_weights(weights, match):
    with pytest.raises(ValueError, match=match):
        reward_ensemble([torch.randn(2, 4), torch.randn(2, 4)], weights=weights)


def test_reward_ensemble_rejects_rewards_of_different_shapes():
    with pytest.raises(ValueError, match="shape"):
        reward_ensemble([torch.randn(2, 4), torch.randn(1, 4)])


def test_reward_ensemble_needs_a_reward():
    with pytest.raises(ValueError, match="At least one reward"):
        reward_ensemble([])
