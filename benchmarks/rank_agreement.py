"""Rank agreement: does a cheap ranking (a tiny decoder, a smaller image) pick the anchors the full ranking picks?

DrPO uses the reward only to rank each prompt's K candidates into positive and negative anchors
(`trl_drpo.ranking.select_anchors`). A ranking made on cheaper images (`DrPOConfig.ranking_vae`,
`ranking_resolution`) is as good as the full one wherever it picks the same anchors. On the digit world, for held-out
captions with K candidates each from the shipped base, every variant's images are scored by the world's reward (the
verifier's dense score, the training reward) and compared with the full decode's scores:

- ``anchor_agreement``: the fraction of prompts whose positive *and* negative anchor sets are the same as the full
  ranking's (prompts the full ranking skips count as agreeing when the cheap one skips them too);
- ``agreement_up_to_ties``: the same, counting as agreeing a cheap set that the full ranking could have picked had
  its ties been broken otherwise (no candidate left out scores strictly better, for the positives, or strictly worse,
  for the negatives, under the full reward). The verifier's score takes few values, so ties are common;
- ``positive_overlap`` / ``negative_overlap``: mean fraction of the full ranking's positives / negatives kept;
- ``kendall_tau``: mean Kendall tau-b between the two score orders of a prompt's candidates (prompts where either
  order is constant have none and are counted in ``tau_undefined``).

For scale, the full decode scored by the world's independent judge (another reward of the same captions) is
compared with the verifier's ranking in the same way: how far two rewards' rankings of the same images are apart.

The tiny decoder is an `AutoencoderTiny` distilled from the world's VAE on the base's own latents (train captions,
fresh noise), as TAESD was distilled from SD's VAE (without its adversarial loss): ``--distil`` trains it and saves it
to ``benchmarks/digits_taesd/`` (safetensors); the measurement loads it with `ranking_vae` exactly as the trainer does.

    python -m benchmarks.rank_agreement --distil   # ~8 min on 2 CPU cores, then the measurement
    python -m benchmarks.rank_agreement            # the measurement (~1 min); writes results/rank_agreement.json
    python -m benchmarks.rank_agreement --end_effect  # ... and DrPO trained with either ranking (~5 min)
    python -m benchmarks.rank_agreement --held_out_effect  # ... and the preset with either ranking, held out (~15 min)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from trl_drpo.generators import OneStepGenerator
from trl_drpo.generators.vae import decode_pixels
from trl_drpo.ranking import AnchorSelection, select_anchors
from trl_drpo.ranking_decoder import RankingDecoder, load_tiny_vae
from trl_drpo.worlds import digits
from trl_drpo.worlds.digits.grammar import balanced_prompts

from .common import machine_info


HERE = os.path.dirname(os.path.abspath(__file__))
TINY_DECODER_DIR = os.path.join(HERE, "digits_taesd")
RESULTS = os.path.join(HERE, "results", "rank_agreement.json")

# The digit world's "digits" preset: K=16 candidates, 4 positives and 4 negatives per prompt.
NUM_GENERATIONS, NUM_POSITIVES, NUM_NEGATIVES = 16, 4, 4
RULES = ("topk", "mean_split")
JUDGE_ROW = "full decode, the independent judge's score (another reward, for scale)"
TINY_DECODER = {  # the decoder only: 16 channels, 3 blocks at 8x8, 1 at 16x16, the 32x32 output conv
    "latent_channels": 8,
    "decoder_block_out_channels": (16, 16, 16),
    "num_decoder_blocks": (3, 1, 0),
    "encoder_block_out_channels": (8, 8, 8),  # unused for ranking; kept small
    "num_encoder_blocks": (1, 1, 1),
    "scaling_factor": 1.0,  # trained on the UNet-space latents, as TAESD
}


# --------------------------------------------------------------------------------------------------------------------
# Agreement statistics
# --------------------------------------------------------------------------------------------------------------------


def kendall_tau_b(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b between two score lists (exact, ties accounted for); NaN when either is constant."""
    concordant = discordant = ties_x = ties_y = 0
    n = len(x)
    for i in range(n):
        for j in range(i + 1, n):
            dx, dy = x[i] - x[j], y[i] - y[j]
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                ties_x += 1
            elif dy == 0:
                ties_y += 1
            elif (dx > 0) == (dy > 0):
                concordant += 1
            else:
                discordant += 1
    denominator = math.sqrt((concordant + discordant + ties_x) * (concordant + discordant + ties_y))
    return (concordant - discordant) / denominator if denominator else float("nan")


def _as_set(indices: torch.Tensor) -> set[int]:
    return set(indices.tolist())


def _overlap(full: set[int], cheap: set[int]) -> float:
    return len(full & cheap) / len(full) if full else 1.0


def _could_be_picked(scores: torch.Tensor, chosen: set[int], best: bool) -> bool:
    """Whether `chosen` is a top (`best`) or bottom set of `scores` under some breaking of ties."""
    inside = scores[sorted(chosen)]
    outside = scores[[i for i in range(len(scores)) if i not in chosen]]
    if not len(inside) or not len(outside):
        return True
    return bool(inside.min() >= outside.max()) if best else bool(inside.max() <= outside.min())


def _mean(values: Sequence[float]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


def agreement(full: torch.Tensor, cheap: torch.Tensor, rule: str) -> dict[str, Any]:
    """The statistics of the module docstring for `(prompts, K)` scores of the full and the cheap ranking."""
    picks: list[list[AnchorSelection | None]] = [
        select_anchors(scores, rule, NUM_POSITIVES, NUM_NEGATIVES, generator=torch.Generator().manual_seed(0))
        for scores in (full, cheap)
    ]
    same, tied, positives, negatives = [], [], [], []
    for row, a, b in zip(full, *picks):
        if a is None or b is None:
            same.append(a is None and b is None)
            tied.append(same[-1])
            continue
        pos_a, pos_b, neg_a, neg_b = (_as_set(s) for s in (a.positives, b.positives, a.negatives, b.negatives))
        same.append(pos_a == pos_b and neg_a == neg_b)
        tied.append(_could_be_picked(row, pos_b, best=True) and _could_be_picked(row, neg_b, best=False))
        positives.append(_overlap(pos_a, pos_b))
        negatives.append(_overlap(neg_a, neg_b))
    taus = [kendall_tau_b(a.tolist(), b.tolist()) for a, b in zip(full, cheap)]
    defined = [t for t in taus if not math.isnan(t)]
    return {
        "anchor_agreement": _mean([float(s) for s in same]),
        "agreement_up_to_ties": _mean([float(t) for t in tied]),
        "positive_overlap": _mean(positives),
        "negative_overlap": _mean(negatives),
        "kendall_tau": _mean(defined),
        "tau_undefined": len(taus) - len(defined),
        "prompts": len(same),
    }


# --------------------------------------------------------------------------------------------------------------------
# Latents, tiny decoder
# --------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def base_latents(generator: OneStepGenerator, prompts: Sequence[str], per_prompt: int, seed: int) -> torch.Tensor:
    """`(len(prompts) * per_prompt, C, h, w)` latents of the base, prompt-major, from noise seeded by `seed`."""
    noise_generator = torch.Generator().manual_seed(seed)
    chunks = []
    for prompt in prompts:
        embeds = generator.encode_prompts([prompt]).repeat_interleave(per_prompt)
        chunks.append(generator.sample(embeds, generator.make_noise(per_prompt, noise_generator)))
    return torch.cat(chunks)


def distil_tiny_decoder(
    generator: OneStepGenerator, seconds: float = 420.0, samples: int = 8192, batch_size: int = 128, log: Any = print
) -> dict[str, Any]:
    """Distil an `AutoencoderTiny` decoder from the pipeline's VAE on the base's latents for the train captions
    (L1 + MSE on the VAE's [-1, 1] output), for at most `seconds`, and save it to `TINY_DECODER_DIR`."""
    from diffusers import AutoencoderTiny

    start = time.perf_counter()
    train = [item["prompt"] for item in digits.prompts(split="train")]
    per_prompt = max(1, samples // len(train))
    latents = base_latents(generator, train, per_prompt, seed=12345)
    with torch.no_grad():
        vae = generator.vae
        targets = torch.cat([decode_pixels(vae, c) for c in latents.split(512)])
    log(f"distil: {len(latents)} latents and VAE decodes in {time.perf_counter() - start:.0f} s")
    torch.manual_seed(0)
    tiny = AutoencoderTiny(**TINY_DECODER)
    optimizer = torch.optim.Adam(tiny.decoder.parameters(), lr=2e-3)
    steps, losses = 0, []
    train_start = time.perf_counter()
    budget = seconds - (train_start - start)
    while time.perf_counter() - train_start < budget:
        progress = (time.perf_counter() - train_start) / budget
        for group in optimizer.param_groups:  # cosine decay over the time budget
            group["lr"] = 2e-3 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        index = torch.randint(len(latents), (batch_size,))
        output = tiny.decode(latents[index] / tiny.config.scaling_factor).sample
        loss = F.l1_loss(output, targets[index]) + F.mse_loss(output, targets[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        steps += 1
        if steps % 500 == 0:
            log(f"distil: step {steps}, loss {sum(losses[-500:]) / 500:.4f}")
    tiny.eval().save_pretrained(TINY_DECODER_DIR)
    return {
        "steps": steps,
        "samples": len(latents),
        "final_loss": round(sum(losses[-200:]) / len(losses[-200:]), 4),
        "seconds": round(time.perf_counter() - start, 1),
    }


def decode_flops(module_call: Any, latents: torch.Tensor) -> int:
    """FLOPs of one call (matmuls, convolutions, attention), counted with `FlopCounterMode`."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        module_call(latents)
    return counter.get_total_flops()


# --------------------------------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------------------------------


def variants(generator: OneStepGenerator, tiny_dir: str) -> dict[str, RankingDecoder]:
    """The cheap rankings compared with the full one (the pipeline's VAE at 32 px)."""
    tiny = load_tiny_vae(tiny_dir, generator)
    return {
        "full (pipeline VAE, 32 px)": RankingDecoder(generator),
        "tiny decoder, 32 px": RankingDecoder(generator, tiny),
        "pipeline VAE, 24 px": RankingDecoder(generator, None, 24),
        "pipeline VAE, 16 px": RankingDecoder(generator, None, 16),
        "tiny decoder, 16 px": RankingDecoder(generator, tiny, 16),
    }


def measure(per_category: int = 16, tiny_dir: str = TINY_DECODER_DIR, seed: int = 2026) -> dict[str, Any]:
    """Agreement of every variant with the full ranking on `per_category` held-out captions of each category."""
    generator = OneStepGenerator.from_pipeline(digits.load_pipeline())
    prompts = [item["prompt"] for item in balanced_prompts("test", per_category)]
    latents = base_latents(generator, prompts, NUM_GENERATIONS, seed)
    repeated = [p for p in prompts for _ in range(NUM_GENERATIONS)]
    reward, judge = digits.reward_fn("score"), digits.reward_fn("score", judge=True)
    decoders = variants(generator, tiny_dir)
    scores, full_name = {}, next(iter(decoders))

    def score(fn: Any, images: torch.Tensor) -> torch.Tensor:
        return torch.tensor(fn(images, repeated), dtype=torch.float32).view(len(prompts), -1)

    for name, decoder in decoders.items():
        images = decoder(latents, 256)
        scores[name] = score(reward, images)
        if name == full_name:  # for scale: how far another reward's ranking of the same images is
            scores[JUDGE_ROW] = score(judge, images)
    decoders[JUDGE_ROW] = decoders[full_name]
    one = latents[:1]
    full_flops = decode_flops(lambda z: generator.decode(z), one)
    rows = []
    for name, decoder in decoders.items():
        flops = full_flops if decoder.vae is None else decode_flops(decoder, one)
        row = {"variant": name, "decode_mflops_per_image": round(flops / 1e6, 2)}
        row["decode_cost_vs_full"] = round(flops / full_flops, 3)
        row["mean_reward"] = round(scores[name].mean().item(), 4)
        for rule in RULES:
            row[rule] = agreement(scores[full_name], scores[name], rule)
        rows.append(row)
    return {
        "prompts": len(prompts),
        "num_generations": NUM_GENERATIONS,
        "anchors": [NUM_POSITIVES, NUM_NEGATIVES],
        "reward": reward.name,
        "seed": seed,
        "rows": rows,
    }


def quiet_preset(output_dir: str, steps: int, **overrides: Any) -> Any:
    """The "digits" preset for `steps` updates into `output_dir`, logging once, with no reports and no progress bar."""
    from trl_drpo import DrPOConfig

    return DrPOConfig.from_preset(
        "digits",
        output_dir=output_dir,
        max_steps=steps,
        logging_steps=steps,
        report_to="none",
        disable_tqdm=True,
        **overrides,
    )


END_EFFECT_RECIPE = {  # the recipe that moves fixed captions (benchmarks/README.md, "Overfitting a few captions")
    "per_device_train_batch_size": 1,
    "learning_rate": 3e-3,
    "reference_loss_weight": 0.0,
    "mask_anchor_copies": True,
    "feature_map": "denoiser",
    "feature_map_kwargs": {"spatial_tokens": False, "pool_size": 1},
    "feature_keys": None,
}


def end_effect(
    steps: int = 150, seeds: Sequence[int] = (0, 1, 2, 3), tiny_dir: str = TINY_DECODER_DIR
) -> dict[str, Any]:
    """What DrPO learns with the full vs the tiny-decoder ranking: the verifier's pass rate on four train `position`
    captions (32 fixed seeds each) after `steps` updates of the recipe above, one run per training seed."""
    import tempfile

    from trl_drpo import DrPOTrainer
    from trl_drpo.worlds.digits.evaluation import generate

    captions = [item["prompt"] for item in digits.prompts("train", "position")][::7][:4]
    repeated, noise_seeds = [c for c in captions for _ in range(32)], [20_000 + j for _ in captions for j in range(32)]

    def pass_rate(pipe: Any) -> float:
        results = digits.verify(generate(pipe, repeated, noise_seeds), repeated)
        return round(100.0 * sum(r["passed"] for r in results) / len(results), 1)

    out: dict[str, Any] = {"captions": captions, "steps": steps, "base": pass_rate(digits.load_pipeline())}
    for name, ranking_vae in (("full", None), ("tiny decoder", tiny_dir)):
        runs = []
        for seed in seeds:
            pipe = digits.load_pipeline()
            with tempfile.TemporaryDirectory() as output_dir:
                config = quiet_preset(output_dir, steps, seed=seed, ranking_vae=ranking_vae, **END_EFFECT_RECIPE)
                tick = time.perf_counter()
                DrPOTrainer(pipe, digits.reward_fn("score"), config, train_dataset=captions).train()
                runs.append({"seed": seed, "pass_rate": pass_rate(pipe), "seconds": round(time.perf_counter() - tick)})
        out[name] = runs
    return out


def held_out_effect(steps: int = 300, tiny_dir: str = TINY_DECODER_DIR) -> dict[str, Any]:
    """What DrPO does to the world's held-out captions with the full vs the tiny-decoder ranking: the "digits"
    preset as shipped, `steps` updates over the train captions from the same seed, then the verifier's and the
    judge's pass rates on the 360 held-out (caption, seed) pairs of `trl_drpo.worlds.digits.alignment.align`."""
    import tempfile

    from trl_drpo.worlds.digits.alignment import align

    out: dict[str, Any] = {"steps": steps, "recipe": "digits preset"}
    for name, ranking_vae in (("full", None), ("tiny decoder", tiny_dir)):
        with tempfile.TemporaryDirectory() as output_dir:
            config = quiet_preset(output_dir, steps, ranking_vae=ranking_vae)
            _, report = align(config, eval_every=steps, best_of=False)
        out.setdefault("base", {judge: report["base"][judge] for judge in ("verifier", "judge")})
        out[name] = {**report["tuned"], "train_seconds": round(report["train_seconds"], 1)}
    return out


def render_markdown(results: dict[str, Any]) -> str:
    """The table recorded in benchmarks/README.md."""
    lines = [
        "| ranking | decode MFLOPs / image (vs full) | top-4/bottom-4 sets agree | up to ties | positives kept "
        "| negatives kept | Kendall tau-b | mean_split sets agree |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        topk, split = row["topk"], row["mean_split"]
        lines.append(
            f"| {row['variant']} | {row['decode_mflops_per_image']} ({row['decode_cost_vs_full']}x) "
            f"| {100 * topk['anchor_agreement']:.1f}% | {100 * topk['agreement_up_to_ties']:.1f}% "
            f"| {100 * topk['positive_overlap']:.1f}% "
            f"| {100 * topk['negative_overlap']:.1f}% | {topk['kendall_tau']:.3f} "
            f"| {100 * split['anchor_agreement']:.1f}% |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--distil", action="store_true", help="distil the tiny decoder first (into benchmarks/)")
    parser.add_argument("--distil_seconds", type=float, default=420.0)
    parser.add_argument("--per_category", type=int, default=16, help="held-out captions per category")
    parser.add_argument("--end_effect", action="store_true", help="also train DrPO with the full and the tiny ranking")
    parser.add_argument(
        "--held_out_effect",
        action="store_true",
        help="also train the digits preset with either ranking over the train captions and evaluate held-out captions",
    )
    args = parser.parse_args(argv)
    start = time.time()
    distillation = None
    if args.distil:
        distillation = distil_tiny_decoder(OneStepGenerator.from_pipeline(digits.load_pipeline()), args.distil_seconds)
    previous = {}
    if os.path.isfile(RESULTS):
        with open(RESULTS, encoding="utf-8") as handle:
            previous = json.load(handle)
    distillation = distillation or previous.get("distillation")
    results = measure(args.per_category)
    results["end_effect"] = end_effect() if args.end_effect else previous.get("end_effect")
    results["held_out_effect"] = held_out_effect() if args.held_out_effect else previous.get("held_out_effect")
    report = {
        "machine": machine_info(),
        "seconds": round(time.time() - start, 1),
        "tiny_decoder": {**TINY_DECODER, "path": os.path.relpath(TINY_DECODER_DIR, os.path.dirname(HERE))},
        "distillation": distillation,
        **results,
    }
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=1)
    print(render_markdown(results))
    for part in ("end_effect", "held_out_effect"):
        if results[part]:
            print(json.dumps(results[part]))


if __name__ == "__main__":
    main()
