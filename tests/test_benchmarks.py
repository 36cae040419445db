"""Smoke tests of `benchmarks/`: the functions run in tiny configurations and return well-formed results, and the
DRaFT baseline really back-propagates the reward into the LoRA. Nothing here asserts a timing."""

from __future__ import annotations

import json
import math

import pytest
import torch

from benchmarks import cost, run_all, scaling
from benchmarks.common import (
    COMPONENTS,
    CPUPeakMemory,
    Meter,
    SavedTensorBytes,
    benchmark_step,
    fused_attention_on_meta,
)
from benchmarks.draft_baseline import DraftStepConfig, draft_step
from benchmarks.reward_models import build_reward
from trl_drpo import step as drpo_step


PROMPTS = ["a red apple", "a blue car"]


def tiny_generator(pipeline: str = "sd-turbo"):
    torch.manual_seed(0)
    return cost.build_generator(pipeline, "cpu", torch.float32, tiny=True, lora_rank=4)


def lora_grads(generator) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in generator.trainable_parameters()]


def zero_grads(generator) -> None:
    for p in generator.trainable_parameters():
        p.grad = None


# ----------------------------------------------------------------------------------------------------------------
# The DRaFT baseline
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reward_name", ["pickscore", "hpsv3"])
def test_draft_gradient_reaches_lora_through_the_reward(reward_name):
    generator = tiny_generator()
    torch.manual_seed(1)
    reward = build_reward(reward_name, "cpu", tiny=True)
    score = reward.score
    config = DraftStepConfig(num_generations=3, chunk_size=None)

    def grads_with(factor: float) -> list[torch.Tensor | None]:
        zero_grads(generator)
        reward.score = lambda images, state: factor * score(images, state)  # instance override of the tower
        draft_step(generator, reward, PROMPTS, config, noise_generator=torch.Generator().manual_seed(0))
        return [p.grad.detach().clone() if p.grad is not None else None for p in generator.trainable_parameters()]

    grads = grads_with(1.0)
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0
    # The gradient flows through the reward: negating the score negates it, a zero score removes it.
    for g, negated in zip(grads, grads_with(-1.0)):
        torch.testing.assert_close(negated, -g, rtol=1e-4, atol=1e-7)
    assert all(g is None or g.abs().max() == 0 for g in grads_with(0.0))
    # Frozen parts never receive gradients.
    assert all(p.grad is None for p in reward.parameters())
    assert all(p.grad is None for p in generator.vae.parameters())


def test_draft_streaming_gives_the_same_gradient_as_one_batch():
    generator = tiny_generator()
    reward = build_reward("pickscore", "cpu", tiny=True)
    results = []
    for chunk in (None, 1):
        zero_grads(generator)
        config = DraftStepConfig(num_generations=3, chunk_size=chunk)
        draft_step(generator, reward, PROMPTS, config, noise_generator=torch.Generator().manual_seed(0))
        results.append(lora_grads(generator))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_drpo_chunked_gradient_pass_matches_one_graph_and_saves_less():
    generator = tiny_generator()
    fmap = cost.build_features("drpo", generator, tiny=True)
    reward = build_reward("pickscore", "cpu", tiny=True)
    grads, saved_bytes = [], []
    for chunk in (None, 2):
        zero_grads(generator)
        # The one-graph pass regenerates its graph here, so that both passes are measured on their own.
        settings = drpo_step.StepSettings(
            **{**vars(cost.drpo_config("drpo", k=6, chunk=chunk)), "reuse_rollout_graph": False}
        )
        saved = SavedTensorBytes([generator.unwrapped_denoiser])
        scorer, hooks = benchmark_step(reward.ranking_fn(), saved=saved)
        noise = torch.Generator().manual_seed(0)
        rollout = drpo_step.rollout(generator, generator.denoiser, fmap, scorer, PROMPTS, settings, hooks, noise)
        drpo_step.gradient_pass(generator, generator.denoiser, fmap, rollout, settings, hooks)
        grads.append(lora_grads(generator))
        saved_bytes.append(saved.peak_bytes)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert 0 < saved_bytes[1] < saved_bytes[0]


def test_vlm_patches_match_the_qwen2_vl_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    reward = build_reward("hpsv3", "cpu", tiny=True)
    size = reward.spec.image_size
    image = torch.rand(1, 3, size, size)
    processor = Qwen2VLImageProcessorPil(
        do_resize=False, do_rescale=False, min_pixels=size * size, max_pixels=size * size
    )
    expected = processor(images=[image[0].numpy()], return_tensors="pt", input_data_format="channels_first")
    torch.testing.assert_close(reward.patches(image), expected["pixel_values"].float(), rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Measurement helpers
# ----------------------------------------------------------------------------------------------------------------


def test_cpu_peak_memory_sees_torch_allocations():
    with CPUPeakMemory() as probe:
        a = torch.ones(1_000_000)  # 4 MB
        b = a * 2  # 4 MB more
        del a, b
    assert probe.peak_bytes >= 8_000_000


def test_fused_attention_on_meta_counts_and_saves_like_a_fused_kernel():
    q, k, v = (torch.empty(1, 2, 64, 8, device="meta", requires_grad=True) for _ in range(3))
    saved = SavedTensorBytes()
    meter = Meter(count_flops=True)
    with fused_attention_on_meta(), saved.graph(), meter("generation"):
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    with meter("backward"):
        out.sum().backward()
    assert meter.flops["generation"] == 2 * (2 * 2 * 64 * 64 * 8)
    assert meter.flops["backward"] == 5 * (2 * 2 * 64 * 64 * 8)  # the scores are recomputed
    assert saved.peak_bytes < 2 * 64 * 64 * 4  # no L x L matrix kept


# ----------------------------------------------------------------------------------------------------------------
# cost.py and scaling.py in tiny configurations
# ----------------------------------------------------------------------------------------------------------------


def test_update_flops_rows_are_well_formed():
    out = cost.update_flops(grid=(("sd-turbo", ("drpo", "draft")),), rewards=("pickscore",), tiny=True)
    assert out["setting"]["images_per_update"] == 192
    rows = {row["method"]: row for row in out["rows"]}
    assert set(rows) == {"drpo", "draft"}
    for row in rows.values():
        flops = row["flops_per_update"]
        assert set(COMPONENTS) <= set(flops)
        assert flops["total"] == sum(flops[c] for c in COMPONENTS)
        assert all(flops[c] > 0 for c in ("generation", "decode", "reward", "backward"))
        assert all(v >= 0 for v in row["backward_split_per_update"].values())
        assert row["ratio_vs"]["draft"] > 0
    assert rows["drpo"]["flops_per_update"]["features"] > 0
    assert rows["drpo"]["flops_per_update"]["field"] > 0
    assert rows["draft"]["flops_per_update"]["features"] == 0
    assert 0 < rows["drpo"]["features_field_share"]["with_feature_backward"] < 1
    json.dumps(out)


def test_ranking_for_less_variants_decode_for_the_reward_with_the_tiny_vae_at_a_smaller_size():
    generator = cost.build_generator("sd-turbo", "meta", torch.float32, tiny=True)
    assert cost.build_ranking_decoder("drpo", generator, tiny=True) is None
    tinyvae, fast = (cost.build_ranking_decoder(m, generator, tiny=True) for m in ("drpo-tinyvae", "drpo-fast"))
    assert tinyvae.vae is not None and tinyvae.resolution is None
    assert fast.vae is not None and fast.resolution == 16  # half the tiny pipeline's 32 px (224 px at real size)
    grid = (("sd-turbo", ("drpo", "drpo-tinyvae", "drpo-fast")),)
    out = cost.update_flops(grid=grid, rewards=("pickscore",), tiny=True)
    rows = {row["method"]: row["flops_per_update"] for row in out["rows"]}
    assert rows["drpo-tinyvae"]["decode"] < rows["drpo"]["decode"]
    assert rows["drpo-fast"]["generation"] < rows["drpo"]["generation"]  # no reference rollout


def test_cpu_tiny_rows_are_well_formed():
    out = cost.cpu_tiny(rewards=("pickscore",), methods=("drpo", "draft"), k=4, chunks=(None, 2), repeats=1)
    assert len(out["rows"]) == 4
    for row in out["rows"]:
        assert set(COMPONENTS) | {"total"} <= set(row["seconds"])
        assert row["seconds"]["total"] > 0
        assert row["peak_cpu_bytes"] > 0


def test_gpu_paths_skip_without_cuda_and_run_on_cpu_tiny():
    if not torch.cuda.is_available():
        assert "skipped" in cost.gpu_real_size()
        assert "skipped" in scaling.memory_vs_k_gpu()
    out = cost.gpu_real_size(
        rewards=("hpsv3",), k=4, chunk_overrides={"drpo-chunk8": 2}, device="cpu", dtype=torch.float32, tiny=True
    )
    assert [(row["method"], row["chunk"]) for row in out["rows"]] == [("drpo", None), ("drpo-chunk8", 2), ("draft", 1)]
    for row in out["rows"]:
        assert row["seconds_per_update"]["total"] > 0 and row["peak_bytes"] > 0
    memory = scaling.memory_vs_k_gpu(ks=(4,), chunk=2, device="cpu", dtype=torch.float32, tiny=True)
    assert all(row["gradient_pass_peak_bytes"] > 0 for row in memory["rows"])


def test_field_cost_analytic_count_matches_the_counter():
    shapes = {"a": (1, 16), "b": (4, 8)}
    for k in (4, 8):
        row = scaling.field_cost(k, shapes, repeats=1)
        assert row["counted_flops"] == row["analytic_flops"] > 0
        assert row["cpu_seconds"] >= 0
    out = scaling.field_scaling(ks=(4, 8), tokens=(1, 2), repeats=1, tiny=True)
    assert [r["k"] for r in out["vs_k"]] == [4, 8]
    assert out["vs_k"][1]["analytic_flops"] > out["vs_k"][0]["analytic_flops"]


def test_memory_vs_k_chunked_activations_stay_flat():
    out = scaling.memory_vs_k_cpu(ks=(4, 8), chunk=2)
    saved = {(r["k"], r["chunk"]): r["saved_activation_bytes"] for r in out["rows"]}
    assert saved[(4, 2)] == saved[(8, 2)] > 0
    assert saved[(8, None)] > saved[(4, None)]
    assert all(r["gradient_pass_peak_bytes"] > 0 and r["step_peak_bytes"] > 0 for r in out["rows"])
    meta = scaling.memory_vs_k_meta(ks=(4, 8), chunk=4, tiny=True)
    meta_saved = {(r["k"], r["chunk"]): r["saved_activation_bytes"] for r in meta["rows"]}
    assert meta_saved[(4, 4)] == meta_saved[(8, 4)] > 0
    assert meta_saved[(8, None)] > meta_saved[(4, None)]


@pytest.mark.slow
def test_run_all_quick_writes_json_and_markdown_with_the_gpu_parts_of_a_gpu_run(tmp_path):
    # A `--only gpu` run (here on the CPU with the tiny models) leaves gpu.json; a later run without CUDA uses it.
    gpu_json = run_all.write_gpu(
        tmp_path / "gpu" / "gpu.json",
        log=lambda *_: None,
        ks=(4, 8),
        real_size_kwargs={"rewards": ("hpsv3",), "k": 4, "device": "cpu", "dtype": torch.float32, "tiny": True},
        memory_kwargs={"chunk": 2, "device": "cpu", "dtype": torch.float32, "tiny": True},
    )
    assert {"machine", "gpu_real_size", "memory_gpu"} <= set(json.loads(gpu_json.read_text()))
    results = run_all.run(quick=True, log=lambda *_: None, gpu_results=gpu_json)
    path = run_all.write(results, tmp_path)
    assert json.loads((tmp_path / "results.json").read_text())["quick"] is True
    summary = path.read_text()
    assert "### Targets" in summary and "| pipeline | reward | method |" in summary
    assert all(check["met"] in (True, False, None) for check in results["targets"])
    if not torch.cuda.is_available():
        gpu_part = summary.split("### Real size on GPU", 1)[1]
        assert "Measured on" in gpu_part and "| sd-turbo | hpsv3 | drpo-chunk8 |" in gpu_part
        assert any("GPU, real size" in check["case"] for check in results["targets"])


def test_digits_gradient_probe_reports_finite_statistics(tmp_path, monkeypatch):
    from benchmarks import digits_gradients

    monkeypatch.setattr(digits_gradients, "CAPTIONS", ("a 3 to the left of a 7", "two 7s"))
    result = digits_gradients.measure({"num_generations": 4, "num_positives": 1, "num_negatives": 1}, str(tmp_path))
    keys = {"cos_true_reversed", "signal_to_common", "signal_consistency", "signal_cross_caption"}
    assert set(result["mean"]) == keys
    assert all(-1.0 <= value <= 1.0 for key, value in result["mean"].items() if key.startswith(("cos", "signal_c")))
    assert len(result["per_caption"]) == 2


def test_digits_gradient_probe_control_ranks_by_random_scores_that_reversal_negates(tmp_path, monkeypatch):
    from benchmarks import digits_gradients

    monkeypatch.setattr(digits_gradients, "CAPTIONS", ("two 7s", "a 6 above a 2"))
    monkeypatch.setattr(digits_gradients, "NUM_DRAWS", 2)
    settings = {"num_generations": 4, "num_positives": 1, "num_negatives": 1, "reference_loss_weight": 0.0}
    # The authors' estimator: negatives weighted as the positives, each candidate's anchor copy unmasked.
    settings |= {"negative_weight": 3000.0, "mask_anchor_copies": False}
    result = digits_gradients.measure({**settings, "_random_scores": True}, str(tmp_path))
    # Random scores never tie, so the reversed ranking swaps the anchors and the update flips (up to the candidates'
    # own weight-1 repulsion, which both rankings share).
    assert result["mean"]["cos_true_reversed"] < -0.99
    assert result["overrides"]["_random_scores"] is True


def test_digits_ceiling_holds_the_best_candidates_and_sends_the_rest_to_the_nearest_best():
    from benchmarks.digits_ceiling import nearest_best

    latents = torch.tensor([[0.0, 0.0], [2.9, 0.0], [3.0, 0.0], [0.1, 0.0]]).view(4, 1, 2)
    targets = nearest_best(latents, torch.tensor([1.0, 0.5, 1.0, 0.2]))
    assert torch.equal(targets, latents[[0, 2, 2, 0]])


@pytest.mark.parametrize("online", [False, True])
def test_digits_ceiling_at_learning_rate_zero_evaluates_what_it_fits_on_the_base(online):
    from benchmarks import digits_ceiling

    setting = {"train": "unet+text_encoder", "split": "train", "learning_rate": 0.0, "steps": 2,
               "num_candidates": 4, "batch_size": 8, "evals": 1, "online": online}  # fmt: skip
    result = digits_ceiling.measure(setting, eval_per_category=1, train_per_category=1)
    assert result["candidates"] == 6 * 4
    assert result["history"][-1]["fit"] == result["fit_base"]
    assert result["history"][-1]["verifier"] == result["base"]["verifier"]


def test_rank_agreement_is_total_for_the_same_scores_and_tau_b_matches_scipy():
    from scipy.stats import kendalltau

    from benchmarks.rank_agreement import agreement, kendall_tau_b

    generator = torch.Generator().manual_seed(0)
    full = torch.randint(0, 4, (6, 16), generator=generator).float()  # ties, as the digit verifier's scores have
    cheap = full + torch.randint(0, 2, (6, 16), generator=generator).float()
    for a, b in zip(full.tolist(), cheap.tolist()):
        assert abs(kendall_tau_b(a, b) - kendalltau(a, b).statistic) < 1e-9
    same = agreement(full, full, "topk")
    assert same["anchor_agreement"] == same["kendall_tau"] == 1.0
    assert agreement(full, -full, "topk")["kendall_tau"] == -1.0


def test_rank_agreement_compares_every_cheap_ranking_with_the_full_one_on_the_digit_world():
    from benchmarks import rank_agreement

    results = rank_agreement.measure(per_category=1)
    rows = {row["variant"]: row for row in results["rows"]}
    assert results["prompts"] == 6 and len(rows) == 6
    full = rows["full (pipeline VAE, 32 px)"]
    assert full["topk"]["anchor_agreement"] == 1.0 and full["decode_cost_vs_full"] == 1.0
    assert rows["tiny decoder, 32 px"]["decode_cost_vs_full"] < 0.2  # the shipped distilled decoder
    assert all(-1.0 <= row["topk"]["kendall_tau"] <= 1.0 for row in rows.values())


def test_call_overhead_times_both_paths_of_the_same_computation():
    from benchmarks.call_overhead import measure
    from trl_drpo.tiny_pipelines import tiny_sd_pipeline

    row = measure(tiny_sd_pipeline(), batch=2, repeats=1)  # asserts the two paths give the same candidates
    assert {"fast_grad_s", "call_grad_s", "fast_no_grad_s", "call_no_grad_s", "overhead_grad_ms"} <= set(row)
    assert all(math.isfinite(value) for value in row.values()) and row["fast_grad_s"] > 0


def test_import_time_counts_the_packages_own_modules_apart_from_what_they_import():
    from benchmarks.import_time import measure

    row = measure("import trl_drpo.ranking", repeats=1)  # imports torch, whose time is not the package's own
    assert 0 < row["trl_drpo_seconds"] < row["seconds"]


def test_reference_field_directions_cover_every_estimator_dimension_and_case():
    from benchmarks.reference_field import CASES, ESTIMATORS, measure, table

    results = measure(dims=(8,), seeds=1)
    assert len(results["rows"]) == len(ESTIMATORS) * len(CASES)
    equal = [row for row in results["rows"] if row["case"] == "equal"]
    assert all(row["towards_reference"] is None for row in equal)  # no way back from the reference itself
    assert all(-1 <= row["outwards"] <= 1 for row in results["rows"])
    assert table(results).count("\n") == 1 + len(ESTIMATORS)
