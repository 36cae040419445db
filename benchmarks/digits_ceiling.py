"""How far preference tuning can take the digit world's base: every candidate regressed onto its caption's best.

DrPO pulls each candidate towards the better-ranked candidates of its caption in a feature space. This benchmark
gives the generator that pull's exact version instead: for every training caption, K candidates of the shipped base
are ranked by the verifier's dense score, and every candidate's noise is regressed (mean squared error on the
one-step latents) onto the latent of the nearest best-scoring candidate of its caption; a best-scoring candidate is
its own target, so what already passes is held in place. No estimator, kernel or feature space stands between the
ranking and the update, so what this reaches within a wall-clock bounds what a method that only ranks the base's own
samples can reach with the same weights trained.

Each setting trains one set of weights (a rank-8 LoRA on the attention projections or on the "digits" preset's
targets, every UNet weight, or every UNet and text-encoder weight)
on the train captions, or on the evaluation's own captions (where nothing has to carry to new captions, only to new
noise), either on the base's candidates ranked once (16 per caption) or online, on fresh candidates ranked under the
current weights at every update as DrPO does, and is evaluated like `align` on the 360 held-out (caption, seed)
pairs, by the verifier and the judge.
Reported per evaluation: the training wall-clock (evaluations excluded), the tables, and ``fit``: the verifier pass
rate on (up to) 1,024 of the training noises themselves.

    python -m benchmarks.digits_ceiling   # writes benchmarks/results/digits_ceiling.json (about 45 minutes)
    python -m benchmarks.digits_ceiling --settings "LoRA rank 8, train captions"   # one setting, merged in
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from trl_drpo.drpo_config import PRESETS
from trl_drpo.generators import OneStepGenerator
from trl_drpo.generators.embeds import PromptEmbeds
from trl_drpo.worlds.digits import load_pipeline
from trl_drpo.worlds.digits.alignment import TRAIN_PER_CATEGORY
from trl_drpo.worlds.digits.evaluation import EVAL_PER_CATEGORY, eval_cases, evaluate_pipeline
from trl_drpo.worlds.digits.grammar import balanced_prompts
from trl_drpo.worlds.digits.verifier import verify

from .common import machine_info


SETTINGS: dict[str, dict[str, Any]] = {
    # The LoRA on the attention projections alone (the "digits" preset's targets until 2026-12-05) ...
    "LoRA rank 8, train captions": {"train": "lora", "split": "train", "learning_rate": 1e-3, "steps": 1200},
    # ... and on the preset's targets since: feed-forward layers and ResNet convolutions too.
    "LoRA rank 8 on the preset's targets, train captions": {
        "train": "lora",
        "target_modules": PRESETS["digits"]["lora_target_modules"],
        "split": "train",
        "learning_rate": 1e-3,
        "steps": 1200,
    },
    "every UNet and text-encoder weight, train captions, 20 minutes": {
        "train": "unet+text_encoder",
        "split": "train",
        "learning_rate": 3e-4,
        "steps": 3600,
    },
    "online, every UNet and text-encoder weight, train captions": {
        "train": "unet+text_encoder",
        "split": "train",
        "learning_rate": 1e-4,
        "steps": 300,
        "evals": 3,
        "online": True,
    },
    "every UNet and text-encoder weight, the evaluation's own captions": {
        "train": "unet+text_encoder",
        "split": "test",
        "learning_rate": 3e-4,
        "steps": 1200,
    },
}
NUM_CANDIDATES = 16
BATCH_SIZE = 64
NUM_EVALS = 6
NOISE_SEED_BASE = 100_000  # far from the evaluation seeds (`evaluation.EVAL_SEED_BASE` and up)
RESULTS = os.path.join(os.path.dirname(__file__), "results", "digits_ceiling.json")


def nearest_best(latents: Tensor, scores: Tensor) -> Tensor:
    """The regression target of each candidate of one caption: the latent of the nearest (Euclidean distance over
    all latent values) candidate among those with the highest score, which for a best-scoring candidate is itself.

    Args:
        latents: `(K, ...)` float latents of one caption's K candidates.
        scores: `(K,)` their reward scores (any scale; only the maximum and ties with it matter).

    Returns:
        `(K, ...)` targets in the dtype and layout of `latents`.
    """
    best = (scores == scores.max()).nonzero().flatten()
    distances = torch.cdist(latents.flatten(1).float(), latents[best].flatten(1).float())
    return latents[best[distances.argmin(dim=1)]]


def _encode(pipe: Any, generator: OneStepGenerator, captions: list[str]) -> PromptEmbeds:
    # The pipeline's public `encode_prompt` with the autograd graph kept (the generator's own encoder runs without
    # gradient, since DrPO never trains the text encoder).
    embeds, _ = pipe.encode_prompt(captions, generator.device, 1, False)
    return PromptEmbeds(prompt_embeds=embeds)


def _pass_rate(generator: OneStepGenerator, noise: Tensor, captions: list[str]) -> float:
    with torch.no_grad():
        images = generator.decode(generator.sample(generator.encode_prompts(captions), noise))
    return 100.0 * sum(result["passed"] for result in verify(images, captions)) / len(captions)


def _ranked(generator: OneStepGenerator, caption: str, noise: Tensor) -> tuple[Tensor, Tensor]:
    # One caption's candidates from `noise` under the current weights: their targets and which of them score best.
    with torch.no_grad():
        latents = generator.sample(generator.encode_prompts([caption] * len(noise)), noise)
        scores = torch.tensor([r["score"] for r in verify(generator.decode(latents), [caption] * len(noise))])
    return nearest_best(latents, scores), scores == scores.max()


def _rounded_tables(result: dict[str, Any]) -> dict[str, Any]:
    return {who: {key: round(value, 1) for key, value in table.items()} for who, table in result.items()}


def measure(
    setting: dict[str, Any],
    eval_per_category: int = EVAL_PER_CATEGORY,
    train_per_category: int = TRAIN_PER_CATEGORY,
    pretrained_model_name_or_path: str | None = None,
) -> dict[str, Any]:
    """Train one `setting` of `SETTINGS` (keys ``train`` in {"lora", "unet", "unet+text_encoder"}, ``split`` in
    {"train", "test"}, ``learning_rate``, ``steps``; optional ``target_modules`` (the LoRA's; default the attention
    projections), ``num_candidates``, ``batch_size``, ``evals``, and
    ``online``: rank fresh candidates under the current weights at every update instead of the base's fixed ones) on
    the winners' targets and return its base and evaluation history. `pretrained_model_name_or_path`: another
    digit-world pipeline folder in place of the shipped base."""
    torch.manual_seed(0)
    pipe = load_pipeline(pretrained_model_name_or_path=pretrained_model_name_or_path)
    generator = OneStepGenerator.from_pipeline(pipe)
    cases = eval_cases(eval_per_category)
    base = evaluate_pipeline(pipe, cases)
    k = setting.get("num_candidates", NUM_CANDIDATES)
    captions = [item["prompt"] for item in balanced_prompts(setting["split"], train_per_category)]

    began = time.time()
    noises, targets, owners, best = [], [], [], []
    for index, caption in enumerate(captions):
        noise = generator.make_noise(k, generator=torch.Generator().manual_seed(NOISE_SEED_BASE + index))
        target, winners = _ranked(generator, caption, noise)
        noises.append(noise)
        targets.append(target)
        owners += [index] * k
        best.append(winners)
    noises, targets, owners = torch.cat(noises), torch.cat(targets), torch.tensor(owners)
    targets_seconds = time.time() - began

    trains_text_encoder = setting["train"] == "unet+text_encoder"
    if setting["train"] == "lora":
        params = generator.add_lora(
            rank=PRESETS["digits"]["lora_rank"],
            alpha=PRESETS["digits"]["lora_alpha"],
            target_modules=setting.get("target_modules"),
        )
    else:
        generator.denoiser.requires_grad_(True)
        params = list(generator.denoiser.parameters())
        if trains_text_encoder:
            pipe.text_encoder.requires_grad_(True)
            params += list(pipe.text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=setting["learning_rate"], weight_decay=0.0)
    frozen_embeds = generator.encode_prompts(captions)
    probe = torch.arange(0, len(owners), max(1, len(owners) // 1024))
    probe_captions = [captions[i] for i in owners[probe].tolist()]
    fit_base = round(_pass_rate(generator, noises[probe], probe_captions), 1)

    steps, batch_size = setting["steps"], setting.get("batch_size", BATCH_SIZE)
    every = max(1, steps // setting.get("evals", NUM_EVALS))
    draws = torch.Generator().manual_seed(1)
    history, train_seconds = [], 0.0
    for step in range(1, steps + 1):
        began = time.time()
        if setting.get("online"):  # fresh candidates of batch_size // k captions, ranked under the current weights
            rows = torch.randint(len(captions), (batch_size // k,), generator=draws).repeat_interleave(k)
            noise = generator.make_noise(len(rows), generator=draws)
            ranked = [_ranked(generator, captions[i], part)[0] for i, part in zip(rows[::k].tolist(), noise.split(k))]
            target = torch.cat(ranked)
        else:  # the fixed candidates of the base
            index = torch.randint(len(owners), (batch_size,), generator=draws)
            rows, noise, target = owners[index], noises[index], targets[index]
        if trains_text_encoder:
            embeds = _encode(pipe, generator, [captions[i] for i in rows.tolist()])
        else:
            embeds = frozen_embeds.select(rows)
        loss = F.mse_loss(generator.sample(embeds, noise), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        train_seconds += time.time() - began
        if step % every == 0 or step == steps:
            history.append(
                {
                    "step": step,
                    "train_seconds": round(train_seconds, 1),
                    "loss": round(loss.item(), 5),
                    "fit": round(_pass_rate(generator, noises[probe], probe_captions), 1),
                    **_rounded_tables(evaluate_pipeline(pipe, cases)),
                }
            )
            row = history[-1]
            print(row["step"], row["train_seconds"], row["fit"], row["verifier"]["overall"], row["judge"]["overall"])
    return {
        "setting": setting,
        "candidates": len(owners),
        "best_scoring_percent": round(100.0 * float(torch.cat(best).float().mean()), 1),
        "fit_base": fit_base,
        "targets_seconds": round(targets_seconds, 1),
        "base": _rounded_tables(base),
        "history": history,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument(
        "--pretrained_model_name_or_path",
        default=None,
        help="A digit-world pipeline folder (the shipped base if unset).",
    )
    parser.add_argument("--results", default=RESULTS, help="The JSON file the settings' results are merged into.")
    args = parser.parse_args(argv)
    report = {"settings": {}}
    if os.path.exists(args.results):
        with open(args.results, encoding="utf-8") as handle:
            report = json.load(handle)
    for name in args.settings:
        print(name, flush=True)
        report["settings"][name] = measure(
            SETTINGS[name], pretrained_model_name_or_path=args.pretrained_model_name_or_path
        )
        report["machine"] = machine_info()
        os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
        with open(args.results, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=1)


if __name__ == "__main__":
    main()
