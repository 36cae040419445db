"""How DrPO's costs scale: drift-field cost vs K and tokens per image, peak memory vs K (chunked vs one graph).

- :func:`field_scaling`: FLOPs (counted) and CPU seconds of `drpo_targets` -- the drift field of every default
  feature key, preference and reference terms -- for K = 8..64 candidates and 1..64 tokens per image, at the real
  feature widths of SD-Turbo's default `denoiser` keys. Sizes too large to run on two CPU cores get the analytic
  count only (:func:`field_flops_analytic`, checked against the counter on the sizes that do run).
- :func:`memory_vs_k_cpu`: peak CPU memory of the gradient pass (phase b) and of the whole micro-step, chunked vs
  one graph, tiny pipeline (allocator events, see `benchmarks.common.CPUPeakMemory`), plus the autograd activation
  bytes of the largest graph.
- :func:`memory_vs_k_meta`: activation bytes autograd saves in the gradient pass at real size (SD-Turbo, bf16) on the
  `meta` device, chunked vs one graph.
- :func:`memory_vs_k_gpu`: `torch.cuda.max_memory_allocated` of the gradient pass at real size; skipped without CUDA.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from trl_drpo import step as drpo_step
from trl_drpo.features import build_feature_map
from trl_drpo.generators import OneStepGenerator
from trl_drpo.objective import DriftHyperparams, drpo_targets

from .common import (
    CPUPeakMemory,
    SavedTensorBytes,
    benchmark_step,
    fused_attention_on_meta,
    machine_info,
    peak_memory,
    torch_threads,
)
from .cost import PROMPT, build_generator


FIELD_KS = (8, 16, 24, 32, 48, 64)
FIELD_TOKENS = (1, 4, 16, 64)
MEMORY_KS = (8, 16, 24, 32)
MEASURE_LIMIT_FLOPS = 4e10
"""Field sizes above this many FLOPs are not run on the CPU (analytic count only)."""


def anchors_for(k: int) -> int:
    """Positives (= negatives) at K candidates: the paper's 8 of 24, i.e. K / 3."""
    return max(1, k // 3)


def _step_config(k: int, chunk: int | None, reuse_rollout_graph: bool = True) -> drpo_step.StepSettings:
    """A micro-step at K candidates with `anchors_for(K)` positives and negatives, in chunks of `chunk`.

    `reuse_rollout_graph=False` makes the one-graph gradient pass regenerate its graph, so that the pass can be
    measured on its own, like a chunked one.
    """
    return drpo_step.StepSettings(
        num_generations=k,
        num_positives=anchors_for(k),
        num_negatives=anchors_for(k),
        candidate_chunk_size=chunk,
        reuse_rollout_graph=reuse_rollout_graph,
    )


# ----------------------------------------------------------------------------------------------------------------
# Drift-field cost
# ----------------------------------------------------------------------------------------------------------------


def default_feature_shapes(
    pipeline: str = "sd-turbo", spatial_tokens: bool = False, tiny: bool = False
) -> dict[str, tuple[int, int]]:
    """`{key: (tokens per image, dim)}` of the default `denoiser` feature keys at 512 px, read off a `meta` run."""
    generator = build_generator(pipeline, "meta", torch.float32, tiny=tiny)
    fmap = build_feature_map("denoiser", generator, spatial_tokens=spatial_tokens)
    latents = torch.empty(generator.latent_shape(1), device="meta")
    with torch.no_grad(), fused_attention_on_meta():
        feats = fmap(latents, generator.encode_prompts([PROMPT]))
    return {key: (int(value.shape[1]), int(value.shape[2])) for key, value in feats.items()}


def field_flops_analytic(
    k: int, tokens: int, dim: int, positives: int, negatives: int, num_radii: int, reference: bool
) -> int:
    """Matmul FLOPs of `drpo_targets` for one key (what `FlopCounterMode` counts).

    Per drift term with N generated particles against T targets (generated + negatives + positives): the distance
    matrix `x @ t^T` (2 N T D) plus, per radius, the attraction and repulsion products `A @ t` (2 N T D in all).
    The preference term has T = N + (P + M) * tokens; the reference term has T = 3 N (generated, generated as
    negatives, reference as positives).
    """
    n = k * tokens
    per_target = 2 * n * dim * (1 + num_radii)
    flops = per_target * (n + (positives + negatives) * tokens)
    if reference:
        flops += per_target * 3 * n
    return flops


def field_cost(
    k: int,
    shapes: Mapping[str, tuple[int, int]],
    params: DriftHyperparams | None = None,
    measure: bool = True,
    repeats: int = 3,
) -> dict[str, Any]:
    """FLOPs and median CPU seconds of the targets of one prompt (all keys of `shapes`), with K candidates."""
    params = params or DriftHyperparams()
    anchors = anchors_for(k)
    reference = params.reference_loss_weight > 0
    analytic = sum(
        field_flops_analytic(k, t, d, anchors, anchors, len(params.preference_radii), reference)
        for t, d in shapes.values()
    )
    out: dict[str, Any] = {"k": k, "analytic_flops": analytic, "counted_flops": None, "cpu_seconds": None}
    if not measure or analytic > MEASURE_LIMIT_FLOPS:
        return out
    draw = torch.Generator().manual_seed(k)
    gen = {key: torch.randn(1, k, t, d, generator=draw) for key, (t, d) in shapes.items()}
    ref = {key: torch.randn(1, k, t, d, generator=draw) for key, (t, d) in shapes.items()} if reference else None
    positives = {key: value[:, :anchors] for key, value in gen.items()}
    negatives = {key: value[:, k - anchors :] for key, value in gen.items()}

    def run() -> None:
        drpo_targets(gen, positives, negatives, ref, params)

    with FlopCounterMode(display=False) as counter:
        run()
    run()  # warm-up outside the counter (first-call allocations)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    out.update(counted_flops=int(counter.get_total_flops()), cpu_seconds=round(statistics.median(times), 5))
    return out


def field_scaling(
    ks: Sequence[int] = FIELD_KS,
    tokens: Sequence[int] = FIELD_TOKENS,
    pipeline: str = "sd-turbo",
    repeats: int = 3,
    tiny: bool = False,
) -> dict[str, Any]:
    """Field cost vs K (1 token per image, the default) and vs tokens per image (K = 24), default keys' widths."""
    shapes = default_feature_shapes(pipeline, tiny=tiny)
    spatial = default_feature_shapes(pipeline, spatial_tokens=True, tiny=tiny)
    with torch_threads(1):  # stable timings on a shared machine
        vs_k = [field_cost(k, shapes, repeats=repeats) for k in ks]
        vs_tokens = []
        for t in tokens:
            row = field_cost(24, {key: (t, d) for key, (_, d) in shapes.items()}, repeats=repeats)
            vs_tokens.append({"tokens_per_image": t, **row})
        spatial_cost = field_cost(24, spatial, repeats=repeats)
    spatial_row = {"tokens": {key: t for key, (t, _) in spatial.items()}, **spatial_cost}
    return {
        "setting": {
            "pipeline": pipeline,
            "feature_map": "denoiser (default keys)",
            "keys": {key: {"tokens": t, "dim": d} for key, (t, d) in shapes.items()},
            "anchors": "K/3 positives and K/3 negatives (8/8 at K=24)",
            "reference_term": True,
            "prompts": 1,
            "measure_limit_flops": MEASURE_LIMIT_FLOPS,
            "cpu_threads": 1,
        },
        "vs_k": vs_k,
        "vs_tokens": vs_tokens,
        "spatial_tokens_default_keys": spatial_row,
    }


def field_share(field_rows: Sequence[Mapping[str, Any]], per_image_flops: float) -> list[dict[str, Any]]:
    """Share of the field in an update at each K: field / (per-image FLOPs without the field x K + field).

    `per_image_flops` is the rest of a DrPO update per candidate image (from `cost.update_flops`); both scale with the
    number of prompts, so one prompt's micro-step stands for the update.
    """
    out = []
    for row in field_rows:
        field = row["counted_flops"] or row["analytic_flops"]
        out.append({"k": row["k"], "field_share": field / (per_image_flops * row["k"] + field)})
    return out


# ----------------------------------------------------------------------------------------------------------------
# Peak memory vs K
# ----------------------------------------------------------------------------------------------------------------


def _random_rank(images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    # Phase (b) does not depend on which candidates are anchors: a random ranking keeps a reward model out of it.
    return torch.rand(images.shape[0], generator=torch.Generator().manual_seed(len(prompts)))


def memory_vs_k_cpu(
    ks: Sequence[int] = MEMORY_KS, chunk: int = 4, pipeline: str = "sd-turbo", resolution: int | None = None
) -> dict[str, Any]:
    """Peak CPU memory of the gradient pass and of the whole micro-step vs K, chunked vs one graph, tiny pipeline."""
    rows: list[dict[str, Any]] = []
    with torch_threads(1):
        _memory_rows(rows, ks, chunk, pipeline, resolution)
    return {
        "setting": {
            "pipeline": f"tiny {pipeline}, fp32, {resolution or 32} px, denoiser features, lambda 0.2",
            "chunk": chunk,
            "method": "CPU allocator peak above the level at entry (torch.profiler memory events); saved activation "
            "bytes of the largest autograd graph (saved_tensors_hooks, parameters excluded)",
        },
        "rows": rows,
    }


def _memory_rows(
    rows: list[dict[str, Any]], ks: Sequence[int], chunk: int, pipeline: str, resolution: int | None
) -> None:
    for k in ks:
        for chunk_size in (chunk, None):
            torch.manual_seed(0)
            generator = build_generator(pipeline, "cpu", torch.float32, tiny=True, lora_rank=4)
            if resolution:
                generator.resolution = resolution
            fmap = build_feature_map("denoiser", generator)
            config = _step_config(k, chunk_size)  # the trainer's step (one graph reuses the rollout's)
            isolated = _step_config(k, chunk_size, reuse_rollout_graph=False)

            scorer, hooks = benchmark_step(_random_rank)

            def step(config=config, generator=generator, fmap=fmap, scorer=scorer, hooks=hooks) -> None:
                drpo_step.micro_step(generator, generator.denoiser, fmap, scorer, [PROMPT], config, hooks)

            step()  # warm-up: gradient buffers exist afterwards, so only activations are measured
            rollout = drpo_step.rollout(generator, generator.denoiser, fmap, scorer, [PROMPT], isolated, hooks)
            saved = SavedTensorBytes([generator.unwrapped_denoiser])
            with CPUPeakMemory() as gradient_pass:
                drpo_step.gradient_pass(
                    generator,
                    generator.denoiser,
                    fmap,
                    rollout,
                    isolated,
                    benchmark_step(_random_rank, saved=saved)[1],
                )
            del rollout
            with CPUPeakMemory() as whole:
                step()
            rows.append(
                {
                    "k": k,
                    "chunk": chunk_size,
                    "gradient_pass_peak_bytes": gradient_pass.peak_bytes,
                    "step_peak_bytes": whole.peak_bytes,
                    "saved_activation_bytes": saved.peak_bytes,
                }
            )


def _synthetic_rollout(
    generator: OneStepGenerator, fmap: Any, config: drpo_step.StepSettings, shapes: Mapping[str, tuple[int, int]]
) -> drpo_step.Rollout:
    # On `meta` phase (a) yields random stand-in targets anyway (no values exist); building them directly from the
    # feature shapes gives phase (b) exactly the same graph without running the rollout.
    k = config.num_generations
    embeds = generator.encode_prompts([PROMPT]).repeat_interleave(k)
    noise = generator.make_noise(k)
    draw = torch.Generator().manual_seed(k)
    feats = {key: torch.randn(1, k, t, d, generator=draw) for key, (t, d) in shapes.items()}
    anchors = config.num_positives
    targets = drpo_targets(
        feats,
        {key: v[:, :anchors] for key, v in feats.items()},
        {key: v[:, k - anchors :] for key, v in feats.items()},
        {key: torch.randn_like(v) for key, v in feats.items()},
        config.drift,
    )
    return drpo_step.Rollout(embeds=embeds, noise=noise, targets=[targets.to(generator.device)])


def memory_vs_k_meta(
    ks: Sequence[int] = MEMORY_KS,
    chunk: int = 8,
    pipeline: str = "sd-turbo",
    dtype: torch.dtype = torch.bfloat16,
    tiny: bool = False,
) -> dict[str, Any]:
    """Activation bytes saved for backward by the gradient pass at real size (`meta`), chunked vs one graph."""
    generator = build_generator(pipeline, "meta", dtype, tiny=tiny)
    fmap = build_feature_map("denoiser", generator)
    shapes = default_feature_shapes(pipeline, tiny=tiny)
    rows = []
    for k in ks:
        for chunk_size in (chunk, None):
            config = _step_config(k, chunk_size, reuse_rollout_graph=False)
            rollout = _synthetic_rollout(generator, fmap, config, shapes)
            saved = SavedTensorBytes([generator.unwrapped_denoiser])
            with fused_attention_on_meta():
                drpo_step.gradient_pass(
                    generator, generator.denoiser, fmap, rollout, config, benchmark_step(_random_rank, saved=saved)[1]
                )
            rows.append({"k": k, "chunk": chunk_size, "saved_activation_bytes": saved.peak_bytes})
            gc.collect()
    return {
        "setting": {
            "pipeline": f"{pipeline} at 512 px, {dtype}, LoRA r16, denoiser features (default keys), lambda 0.2",
            "chunk": chunk,
            "method": "bytes of distinct storages autograd saves for backward in the largest graph of the gradient "
            "pass (saved_tensors_hooks on meta tensors; parameters excluded; transient forward buffers not included)",
        },
        "rows": rows,
    }


def memory_vs_k_gpu(
    ks: Sequence[int] = MEMORY_KS,
    chunk: int = 8,
    pipeline: str = "sd-turbo",
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cuda",
    tiny: bool = False,
) -> dict[str, Any]:
    """Peak GPU memory of the gradient pass at real size, chunked vs one graph; skipped without CUDA.

    (`device="cpu", tiny=True` runs the same code on the tiny pipeline, for tests.)
    """
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        return {"skipped": "run without a CUDA device: real-size GPU memory vs K was not measured"}
    generator = build_generator(pipeline, device, dtype, tiny=tiny)
    fmap = build_feature_map("denoiser", generator)
    rows = []
    for k in ks:
        for chunk_size in (chunk, None):
            config = _step_config(k, chunk_size, reuse_rollout_graph=False)  # the gradient pass on its own
            row: dict[str, Any] = {"k": k, "chunk": chunk_size}
            try:
                scorer, hooks = benchmark_step(_random_rank)
                rollout = drpo_step.rollout(generator, generator.denoiser, fmap, scorer, [PROMPT], config, hooks)
                with peak_memory(device) as probe:
                    drpo_step.gradient_pass(generator, generator.denoiser, fmap, rollout, config, hooks)
                row["gradient_pass_peak_bytes"] = probe.peak_bytes
                del rollout
            except torch.OutOfMemoryError as error:
                row["error"] = f"out of memory: {str(error).splitlines()[0]}"
            for p in generator.trainable_parameters():
                p.grad = None
            rows.append(row)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return {
        "setting": {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
            "pipeline": f"{pipeline} at 512 px, {dtype}, denoiser features, lambda 0.2",
            "chunk": chunk,
            "method": "torch.cuda.max_memory_allocated during the gradient pass, above the level before it",
        },
        "rows": rows,
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("field", "memory", "gpu", "all"), default="all")
    args = parser.parse_args(argv)
    out: dict[str, Any] = {"machine": machine_info()}
    if args.part in ("field", "all"):
        out["field"] = field_scaling()
    if args.part in ("memory", "all"):
        out["memory_cpu"] = memory_vs_k_cpu()
        out["memory_meta"] = memory_vs_k_meta()
    if args.part in ("memory", "gpu", "all"):
        out["memory_gpu"] = memory_vs_k_gpu()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
