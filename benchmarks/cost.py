"""What one optimizer update costs: DrPO against DRaFT-style reward back-propagation, by component.

Three measurements, each a function returning JSON-ready dicts (run them all with `python -m benchmarks.run_all`):

- :func:`update_flops`: FLOPs per optimizer update at the paper's matched effective batch (4 GPUs x 2 accumulation
  micro-steps x 1 prompt x K=24 = 192 candidate images), counted on the `meta` device for the real architectures
  (SD-Turbo / SDXL-Turbo UNet + VAE at 512 px; a CLIP ViT-H/14 reward the size of PickScore/HPSv2 and a
  Qwen2-VL-7B reward the size of HPSv3), split into generation, decode, reward, features, field and backward.
- :func:`cpu_tiny`: wall-clock and peak memory of the same steps on the CPU with the tiny pipelines and rewards.
- :func:`gpu_real_size`: the same at real size on a CUDA GPU (random weights, bf16); skipped without CUDA.

Methods compared (the `METHODS` table):

- `drpo`: `trl_drpo` defaults: frozen-denoiser features (default keys), lambda = 0.2 (reference rollout), 8/8
  anchors, one graph over the K candidates (the rollout's graph is reused for the gradient).
- `drpo-chunk8`: the same with `candidate_chunk_size=8`: memory flat in K, at the cost of regenerating the
  candidates (and their features) with gradient.
- `drpo-paper`: the paper's HPSv3 profile: latent-MAE ResNet features (random weights, the published architecture),
  reference term off, 12/12 anchors, one graph.
- `drpo-tinyvae`: `drpo` with the candidates decoded for the reward by a TAESD-sized `AutoencoderTiny`
  (`ranking_vae`; random weights, TAESD's architecture).
- `drpo-224`: `drpo` with the reward reading 224 px images (`ranking_resolution=224`): the HPSv3-sized tower then
  reads a 224 px image (a quarter of the image tokens); the CLIP tower resizes to 224 anyway.
- `drpo-fast`: the "fast" preset: latent-MAE features, reference term off, 8/8 anchors, tiny decoder and 224 px
  ranking.
- `draft`: minimal reward back-propagation: loss = -reward through reward model, VAE decoder and UNet.
- `draft-paper`: the paper's profiled DRaFT: also a frozen-reference forward (weight 0) and gradient checkpointing in
  the reward model (one extra reward forward in backward).
"""

from __future__ import annotations

import argparse
import gc
import json
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from trl_drpo.features import LatentMAEResNet, build_feature_map
from trl_drpo.generators import OneStepGenerator
from trl_drpo.objective import DriftHyperparams
from trl_drpo.ranking_decoder import RankingDecoder
from trl_drpo.step import StepSettings, micro_step

from .common import (
    COMPONENTS,
    CPUPeakMemory,
    Meter,
    NullMeter,
    benchmark_step,
    fused_attention_on_meta,
    machine_info,
    median_dicts,
    peak_memory,
    torch_threads,
)
from .draft_baseline import DraftStepConfig, draft_step
from .models import PIPELINES, REWARDS, build_context, build_pipeline, tiny_autoencoder
from .reward_models import RewardTower, build_reward


WORLD_SIZE = 4
ACCUMULATION_STEPS = 2
PROMPTS_PER_MICRO_STEP = 1
NUM_GENERATIONS = 24
MICRO_STEPS_PER_UPDATE = WORLD_SIZE * ACCUMULATION_STEPS
IMAGES_PER_UPDATE = MICRO_STEPS_PER_UPDATE * PROMPTS_PER_MICRO_STEP * NUM_GENERATIONS  # 192, the paper's budget
PROMPT = "a photograph of an astronaut riding a horse on the moon"

METHODS: dict[str, dict[str, Any]] = {
    "drpo": {"family": "drpo", "feature_map": "denoiser", "reference_loss_weight": 0.2, "anchors": 8, "chunk": None},
    "drpo-chunk8": {
        "family": "drpo",
        "feature_map": "denoiser",
        "reference_loss_weight": 0.2,
        "anchors": 8,
        "chunk": 8,
    },
    "drpo-paper": {
        "family": "drpo",
        "feature_map": "latent_mae",
        "reference_loss_weight": 0.0,
        "anchors": 12,
        "chunk": None,
    },
    "drpo-tinyvae": {
        "family": "drpo",
        "feature_map": "denoiser",
        "reference_loss_weight": 0.2,
        "anchors": 8,
        "chunk": None,
        "ranking_vae": True,
    },
    "drpo-224": {
        "family": "drpo",
        "feature_map": "denoiser",
        "reference_loss_weight": 0.2,
        "anchors": 8,
        "chunk": None,
        "ranking_resolution": 224,
    },
    "drpo-fast": {
        "family": "drpo",
        "feature_map": "latent_mae",
        "reference_loss_weight": 0.0,
        "anchors": 8,
        "chunk": None,
        "ranking_vae": True,
        "ranking_resolution": 224,
    },
    "draft": {"family": "draft", "reference_forward": False, "reward_checkpointing": False},
    "draft-paper": {"family": "draft", "reference_forward": True, "reward_checkpointing": True},
}


# ----------------------------------------------------------------------------------------------------------------
# Building the pieces
# ----------------------------------------------------------------------------------------------------------------


def build_generator(
    pipeline: str, device: torch.device | str, dtype: torch.dtype, tiny: bool = False, lora_rank: int = 16
) -> OneStepGenerator:
    """The pipeline's `OneStepGenerator` with the paper's LoRA (r16/alpha16 on the attention projections)."""
    generator = OneStepGenerator.from_pipeline(build_pipeline(pipeline, device, dtype, tiny=tiny))
    generator.add_lora(rank=lora_rank, alpha=lora_rank, init_lora_weights="gaussian")
    return generator


def build_features(method: str, generator: OneStepGenerator, tiny: bool = False):
    """The feature map of `method`: the default `denoiser` map, or a randomly initialised latent-MAE ResNet."""
    name = METHODS[method]["feature_map"]
    if name == "latent_mae":
        # The published architecture ([3, 4, 6, 3] basic blocks, widths 64-512); weights are random here.
        widths, layers = ((8, 16, 16), (1, 1, 1)) if tiny else ((64, 128, 256, 512), (3, 4, 6, 3))
        with build_context(generator.device, generator.dtype):
            model = LatentMAEResNet(in_channels=generator.latent_channels, widths=widths, layers=layers)
        return build_feature_map("latent_mae", generator, model=model)
    return build_feature_map(name, generator)


def ranking_resolution(method: str, generator: OneStepGenerator) -> int | None:
    """The side the reward reads the candidates at under `method` (None: full size); half the image for tiny
    pipelines, whose images are smaller than 224 px."""
    resolution = METHODS[method].get("ranking_resolution")
    if resolution is None or generator.resolution > resolution:
        return resolution
    return generator.resolution // 2


def build_ranking_decoder(method: str, generator: OneStepGenerator, tiny: bool = False) -> RankingDecoder | None:
    """What `method` decodes candidates for the reward with: a `RankingDecoder` (a TAESD-sized tiny VAE and / or a
    smaller image, as `DrPOConfig.ranking_vae` / `ranking_resolution` build it), or None for the full decode."""
    spec = METHODS[method]
    if not (spec.get("ranking_vae") or spec.get("ranking_resolution")):
        return None
    vae = tiny_autoencoder(generator.device, generator.dtype, tiny=tiny) if spec.get("ranking_vae") else None
    return RankingDecoder(generator, vae, ranking_resolution(method, generator))


def drpo_config(method: str, k: int = NUM_GENERATIONS, chunk: int | None = None, **kw: Any) -> StepSettings:
    """`StepSettings` of a DrPO method at `k` candidates (anchors scaled down when k is small)."""
    spec = METHODS[method]
    anchors = min(spec["anchors"], k // 2)
    drift = DriftHyperparams(reference_loss_weight=spec["reference_loss_weight"])
    return StepSettings(
        num_generations=k, num_positives=anchors, num_negatives=anchors, candidate_chunk_size=chunk, drift=drift, **kw
    )


def method_chunk(method: str, k: int = NUM_GENERATIONS) -> int | None:
    """Candidates per chunk of `method`: DrPO's own setting, or K at once for DRaFT."""
    return METHODS[method]["chunk"] if METHODS[method]["family"] == "drpo" else k


def draft_config(method: str, k: int = NUM_GENERATIONS, chunk: int | None = 1, **kw: Any) -> DraftStepConfig:
    """`DraftStepConfig` of a DRaFT method."""
    return DraftStepConfig(
        num_generations=k, chunk_size=chunk, reference_forward=METHODS[method]["reference_forward"], **kw
    )


def run_method(
    method: str,
    generator: OneStepGenerator,
    reward: RewardTower,
    features: Any,
    meter: Meter,
    k: int = NUM_GENERATIONS,
    chunk: int | None = None,
    accumulation_steps: int = 1,
    seed: int = 0,
    decoder: RankingDecoder | None = None,
) -> torch.Tensor:
    """One micro-step of `method` (one prompt, `k` candidates) under `meter`; DrPO decodes for the reward with
    `decoder` (`build_ranking_decoder`; None: the full decode)."""
    noise = torch.Generator().manual_seed(seed)
    if METHODS[method]["family"] == "drpo":
        settings = drpo_config(method, k, chunk)
        scorer, hooks = benchmark_step(reward.ranking_fn(), meter)
        args = (generator, generator.denoiser, features, scorer, [PROMPT], settings, hooks, accumulation_steps)
        return micro_step(*args, noise_generator=noise, decoder=decoder)[0]
    config = draft_config(method, k, chunk, accumulation_steps=accumulation_steps)
    return draft_step(generator, reward, [PROMPT], config, meter, noise)


def _prepare_reward(method: str, reward: RewardTower) -> RewardTower:
    reward.set_gradient_checkpointing(bool(METHODS[method].get("reward_checkpointing")))
    return reward


# ----------------------------------------------------------------------------------------------------------------
# FLOPs on the meta device
# ----------------------------------------------------------------------------------------------------------------


def _isolated_backward_flops(fn: Any, leaf_shape: Sequence[int]) -> int:
    """FLOPs of `backward()` of `fn(leaf).float().sum()` for a meta leaf that requires grad."""
    from torch.utils.flop_counter import FlopCounterMode

    leaf = torch.empty(*leaf_shape, device="meta", requires_grad=True)
    # The forward runs under a counter too: a counter that sees only the backward mis-tracks modules that are
    # re-run there (activation checkpointing) and breaks the graph.
    with FlopCounterMode(display=False):
        out = fn(leaf).float().sum()
    with FlopCounterMode(display=False) as counter:
        out.backward()
    return int(counter.get_total_flops())


def backward_split(method: str, generator: OneStepGenerator, reward: RewardTower, features: Any) -> dict[str, int]:
    """Per-image backward FLOPs of each module the gradient crosses, from isolated single-image passes.

    DrPO: through the feature map (to the latents), the rest is the denoiser. DRaFT: through the reward (to the
    pixels) and the VAE decoder (to the latents), the rest is the denoiser.
    """
    latent_shape = generator.latent_shape(1)
    if METHODS[method]["family"] == "drpo":
        embeds = generator.encode_prompts([PROMPT])

        def through_features(latents: torch.Tensor) -> torch.Tensor:
            return torch.cat([v.flatten() for v in features(latents, embeds).values()])

        return {"features": _isolated_backward_flops(through_features, latent_shape)}
    state = reward.prompt_state([PROMPT])
    side = generator.resolution
    reward_only = _isolated_backward_flops(lambda images: reward.score(images, state), (1, 3, side, side))
    decode_and_reward = _isolated_backward_flops(
        lambda latents: reward.score(generator.decode_with_grad(latents), state), latent_shape
    )
    return {"reward": reward_only, "decode": decode_and_reward - reward_only}


def micro_step_flops(
    generator: OneStepGenerator, reward: RewardTower, method: str, k: int = NUM_GENERATIONS, tiny: bool = False
) -> dict[str, Any]:
    """FLOPs of one micro-step (1 prompt, `k` candidates) of `method` on a `meta` generator and reward.

    DrPO runs with its method's `chunk` (one graph saves the regeneration); DRaFT's chunking does not change its
    FLOPs, so it is counted with one chunk (fast on `meta`).
    """
    reward = _prepare_reward(method, reward)
    drpo = METHODS[method]["family"] == "drpo"
    features = build_features(method, generator, tiny=tiny) if drpo else None
    decoder = build_ranking_decoder(method, generator, tiny=tiny) if drpo else None
    meter = Meter(count_flops=True)
    run_method(method, generator, reward, features, meter, k=k, chunk=method_chunk(method, k), decoder=decoder)
    split = backward_split(method, generator, reward, features)
    detail = {name: int(value) for name, value in sorted(meter.flops.items())}
    return {"components": meter.flop_totals(), "detail": detail, "backward_per_image": split}


DEFAULT_FLOP_GRID: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("sd-turbo", tuple(METHODS)),
    ("sdxl-turbo", ("drpo", "drpo-tinyvae", "drpo-224", "drpo-fast", "draft", "draft-paper")),
)
"""(pipeline, methods) counted by default: every variant on SD-Turbo (the paper's profiled pipeline); on SDXL-Turbo the
trainer's defaults, the ranking-for-less variants and both DRaFTs (the chunked and paper DrPO rows add nothing new
there, and leaving them out keeps `run_all` within a few minutes on two CPU cores)."""


def update_flops(
    grid: Sequence[tuple[str, Sequence[str]]] = DEFAULT_FLOP_GRID,
    rewards: Sequence[str] = REWARDS,
    tiny: bool = False,
) -> dict[str, Any]:
    """FLOPs per optimizer update (192 images) for every (pipeline, methods) x reward, with ratios to DRaFT.

    `tiny=True` counts the tiny architectures instead (for tests; the numbers then mean nothing).
    """
    rows = []
    for pipeline, methods in grid:
        generator = build_generator(pipeline, "meta", torch.float32, tiny=tiny)
        for reward_name in rewards:
            towers = {None: build_reward(reward_name, "meta", tiny=tiny)}
            for method in methods:
                size = ranking_resolution(method, generator)
                if size not in towers:  # the reward reading the ranking's smaller image
                    towers[size] = build_reward(reward_name, "meta", tiny=tiny, image_size=size)
                with fused_attention_on_meta():
                    micro = micro_step_flops(generator, towers[size], method, tiny=tiny)
                per_update = {name: value * MICRO_STEPS_PER_UPDATE for name, value in micro["components"].items()}
                per_update["total"] = sum(per_update[name] for name in COMPONENTS)
                split = {name: value * IMAGES_PER_UPDATE for name, value in micro["backward_per_image"].items()}
                if METHODS[method]["family"] == "drpo":
                    split["denoiser"] = per_update["backward"] - split["features"]
                else:
                    split["denoiser"] = per_update["backward"] - split["reward"] - split["decode"]
                rows.append(
                    {
                        "pipeline": pipeline,
                        "reward": reward_name,
                        "method": method,
                        "flops_per_update": per_update,
                        "backward_split_per_update": split,
                        "micro_step_detail": micro["detail"],
                    }
                )
            del towers
            gc.collect()
    _add_ratios(rows)
    return {
        "setting": {
            "world_size": WORLD_SIZE,
            "accumulation_steps": ACCUMULATION_STEPS,
            "prompts_per_micro_step": PROMPTS_PER_MICRO_STEP,
            "num_generations": NUM_GENERATIONS,
            "images_per_update": IMAGES_PER_UPDATE,
            "resolution": 512,
            "hpsv3_assumption": "448x448 image (HPSv3's 256*28*28 pixel cap): 1024 vision patches, 256 LM image "
            "tokens, plus 128 text tokens (template + instruction + prompt); LM head replaced by a 2-output head",
            "counter": "torch.utils.flop_counter.FlopCounterMode on meta tensors: matmul/conv/attention FLOPs "
            "(2 per multiply-add; attention as the fused kernel, whose backward recomputes the scores), element-wise "
            "ops not counted",
        },
        "methods": METHODS,
        "rows": rows,
    }


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    """Each row's `speedup_vs[draft method]` = DRaFT total / this total, and the share of features + field."""
    index = {(r["pipeline"], r["reward"], r["method"]): r for r in rows}
    for row in rows:
        total = row["flops_per_update"]["total"]
        row["ratio_vs"] = {
            method: round(index[(row["pipeline"], row["reward"], method)]["flops_per_update"]["total"] / total, 3)
            for method in METHODS
            if METHODS[method]["family"] == "draft" and (row["pipeline"], row["reward"], method) in index
        }
        if METHODS[row["method"]]["family"] == "drpo":
            flops = row["flops_per_update"]
            feature_backward = row["backward_split_per_update"]["features"]
            row["features_field_share"] = {
                "forward_only": round((flops["features"] + flops["field"]) / total, 4),
                "with_feature_backward": round((flops["features"] + flops["field"] + feature_backward) / total, 4),
                "field_only": round(flops["field"] / total, 6),
            }


# ----------------------------------------------------------------------------------------------------------------
# CPU, tiny pipelines
# ----------------------------------------------------------------------------------------------------------------


def cpu_tiny(
    pipeline: str = "sd-turbo",
    rewards: Sequence[str] = REWARDS,
    methods: Sequence[str] = ("drpo", "draft"),
    k: int = NUM_GENERATIONS,
    chunks: Sequence[int | None] = (None, 4),
    repeats: int = 3,
    threads: int = 1,
) -> dict[str, Any]:
    """Wall-clock (median of `repeats`, after one warm-up) and peak CPU memory of one micro-step, tiny models.

    Each method runs with every chunk size in `chunks` (`None`: one graph for all K; DRaFT: K at once), on
    `threads` torch threads.
    """
    results = []
    with torch_threads(threads):
        _cpu_tiny_rows(results, pipeline, rewards, methods, k, chunks, repeats)
    return {
        "setting": {
            "pipeline": f"tiny {pipeline} (random weights, 32 px, fp32, LoRA r4)",
            "rewards": "tiny CLIP (pickscore) / tiny Qwen2-VL (hpsv3) towers, random weights",
            "num_generations": k,
            "repeats": repeats,
            "torch_threads": threads,
            "memory_method": "peak of torch's CPU allocator above the level at step start, from torch.profiler "
            "memory events (gradient buffers pre-allocated by a warm-up step)",
        },
        "rows": results,
    }


def _cpu_tiny_rows(
    results: list[dict[str, Any]],
    pipeline: str,
    rewards: Sequence[str],
    methods: Sequence[str],
    k: int,
    chunks: Sequence[int | None],
    repeats: int,
) -> None:
    for reward_name in rewards:
        for method in methods:
            for chunk in chunks:
                torch.manual_seed(0)
                generator = build_generator(pipeline, "cpu", torch.float32, tiny=True, lora_rank=4)
                reward = _prepare_reward(method, build_reward(reward_name, "cpu", tiny=True))
                drpo = METHODS[method]["family"] == "drpo"
                features = build_features(method, generator, tiny=True) if drpo else None
                step = _TinyStep(method, generator, reward, features, k, chunk)
                step(NullMeter())  # warm-up: lazy initialisation, gradient buffers
                timings = []
                for _ in range(repeats):
                    meter = Meter()
                    step(meter)
                    seconds = meter.second_totals()
                    seconds["total"] = sum(seconds[name] for name in COMPONENTS)
                    timings.append(seconds)
                with CPUPeakMemory() as probe:
                    step(NullMeter())
                results.append(
                    {
                        "pipeline": pipeline,
                        "reward": reward_name,
                        "method": method,
                        "chunk": chunk,
                        "seconds": {name: round(v, 4) for name, v in median_dicts(timings).items()},
                        "peak_cpu_bytes": probe.peak_bytes,
                    }
                )


class _TinyStep:
    """One micro-step of a method on fixed pieces; gradients are zeroed in place afterwards, so that their buffers
    exist before a measured step and the measurement sees activations, not gradient allocation."""

    def __init__(
        self,
        method: str,
        generator: OneStepGenerator,
        reward: RewardTower,
        features: Any,
        k: int,
        chunk: int | None,
    ) -> None:
        self.method, self.generator, self.reward, self.features = method, generator, reward, features
        self.k, self.chunk = k, chunk

    def __call__(self, meter: Meter) -> None:
        run_method(self.method, self.generator, self.reward, self.features, meter, k=self.k, chunk=self.chunk)
        for param in self.generator.trainable_parameters():
            if param.grad is not None:
                param.grad.zero_()


# ----------------------------------------------------------------------------------------------------------------
# GPU, real size
# ----------------------------------------------------------------------------------------------------------------


def gpu_real_size(
    pipelines: Sequence[str] = ("sd-turbo",),
    rewards: Sequence[str] = REWARDS,
    methods: Sequence[str] = ("drpo", "drpo-chunk8", "draft"),
    k: int = NUM_GENERATIONS,
    chunk_overrides: Mapping[str, int | None] | None = None,
    draft_chunk: int | None = 1,
    repeats: int = 1,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cuda",
    tiny: bool = False,
) -> dict[str, Any]:
    """Per-GPU update time and peak memory at real size: `ACCUMULATION_STEPS` micro-steps of 1 prompt x K.

    One GPU does what each of the paper's 4 does per update (2 micro-steps of 24 candidates); the all-reduce of the
    LoRA gradients is not included. Random weights in `dtype` (LoRA in fp32). DrPO methods run with their own
    `chunk` (or `chunk_overrides[method]`); DRaFT streams `draft_chunk` images at a time, as the paper's did.
    Skipped when `device` is CUDA and there is none. (`device="cpu", tiny=True` runs the same code on the tiny
    models, for tests.)
    """
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        return {"skipped": "run without a CUDA device: real-size wall-clock and GPU memory were not measured"}
    rows = []
    for pipeline in pipelines:
        generator = build_generator(pipeline, device, dtype, tiny=tiny)
        for reward_name in rewards:
            reward = build_reward(reward_name, device, dtype, tiny=tiny)
            for method in methods:
                reward = _prepare_reward(method, reward)
                drpo = METHODS[method]["family"] == "drpo"
                features = build_features(method, generator, tiny=tiny) if drpo else None
                chunk = method_chunk(method, k) if drpo else draft_chunk
                chunk = (chunk_overrides or {}).get(method, chunk)
                row = _gpu_measure(method, generator, reward, features, k, chunk, repeats, device)
                rows.append({"pipeline": pipeline, "reward": reward_name, "method": method, "chunk": chunk, **row})
                del features
                _free(device)
            del reward
            _free(device)
        del generator
        _free(device)
    return {
        "setting": {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
            "dtype": str(dtype),
            "micro_steps_per_gpu_update": ACCUMULATION_STEPS,
            "num_generations": k,
            "repeats": repeats,
            "memory_method": "torch.cuda.max_memory_allocated above the level before the update",
        },
        "rows": rows,
    }


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _gpu_measure(
    method: str,
    generator: OneStepGenerator,
    reward: RewardTower,
    features: Any,
    k: int,
    chunk: int | None,
    repeats: int,
    device: torch.device,
) -> dict[str, Any]:
    params = generator.trainable_parameters()

    def update(meter: Meter) -> None:
        for micro in range(ACCUMULATION_STEPS):
            run_method(method, generator, reward, features, meter, k, chunk, ACCUMULATION_STEPS, seed=micro)
        for p in params:
            p.grad = None

    try:
        update(NullMeter())  # warm-up (kernels, allocator)
        timings = []
        for _ in range(repeats):
            meter = Meter(device=device)
            update(meter)
            seconds = meter.second_totals()
            seconds["total"] = sum(seconds[name] for name in COMPONENTS)
            timings.append(seconds)
        with peak_memory(device) as probe:
            update(NullMeter())
    except torch.OutOfMemoryError as error:
        for p in params:
            p.grad = None
        return {"error": f"out of memory: {str(error).splitlines()[0]}"}
    return {
        "seconds_per_update": {name: round(v, 3) for name, v in median_dicts(timings).items()},
        "peak_bytes": probe.peak_bytes,
    }


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("flops", "cpu", "gpu", "all"), default="all")
    parser.add_argument("--gpu-pipelines", nargs="+", default=["sd-turbo"], choices=PIPELINES)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    out: dict[str, Any] = {"machine": machine_info()}
    if args.part in ("flops", "all"):
        out["flops"] = update_flops()
    if args.part in ("cpu", "all"):
        out["cpu_tiny"] = cpu_tiny(repeats=args.repeats)
    if args.part in ("gpu", "all"):
        out["gpu_real_size"] = gpu_real_size(pipelines=args.gpu_pipelines)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()


__all__ = [
    "IMAGES_PER_UPDATE",
    "METHODS",
    "cpu_tiny",
    "gpu_real_size",
    "micro_step_flops",
    "update_flops",
]
