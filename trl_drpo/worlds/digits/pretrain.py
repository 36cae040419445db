"""Pretrain the digit world's base pipeline: a one-step `StableDiffusionPipeline`, on a CPU, from nothing.

    python -m trl_drpo.worlds.digits.pretrain --output_dir digits-pretrain

Four stages, each saved to ``output_dir`` so that a stage can be rerun alone (``--stages``):

1. ``vae``: an `AutoencoderKL` (32x32x3 scenes <-> 8x8x8 latents) trained on scenes of the train captions and
   train-half glyphs, by pixel MSE plus a tiny KL term; its `scaling_factor` makes the latents unit-variance.
2. ``teacher``: a `UNet2DConditionModel` and a `CLIPTextModel` (with a word-level CLIP tokenizer saved as real
   vocab/merges files) trained jointly as a latent diffusion model: DDPM scaled-linear betas, v-prediction, 10%
   empty captions for classifier-free guidance. With ``--caption_parse_weight`` above 0 (off for the shipped
   base), a linear head on the text encoder's pooled output is also trained to read the caption back (object count,
   each object's digit and colour, the relation), so that the encoder tells "left of" from "right of" and which colour
   goes with which digit (see `caption_parse_targets`).
3. ``pairs``: the teacher samples latents from fixed noise with a deterministic multi-step sampler (DDIM from the
   conditional prediction alone; with ``--guidance`` above 1, classifier-free guidance), giving `(noise, caption) ->
   latent` pairs. The shipped base is distilled without guidance: a guided teacher (``--guidance 2``) gave a base
   with fewer errors, but errors specific to each caption that ranked samples of it could not teach away
   (benchmarks/README.md, "A base distilled without guidance").
4. ``student``: a copy of the teacher is distilled into *one* step: the exact computation
   `pipe(prompt, num_inference_steps=1, guidance_scale=0.0, latents=noise)` runs (Euler, trailing spacing, so
   t=999) is regressed onto the teacher's latents. This is the SD-Turbo serving set-up, reached by regression on
   teacher pairs (as in progressive/consistency-style distillation) rather than adversarial distillation.

The result is saved with `save_pipeline` in ``output_dir/pipeline`` and a JSON log of every stage in
``output_dir/pretrain_log.json``. The shipped weights in ``trl_drpo/worlds/digits/base`` come from this script's
default settings.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .grammar import CATEGORIES, COLORS, COUNT_WORDS, DIGITS, RELATIONS, parse, prompts
from .scenes import SCENE_SIZE, scene_array


STAGES = ("vae", "teacher", "pairs", "student", "evaluate")
MAX_TOKENS = 16
_DROP_PROMPT = 0.1


# ---------------------------------------------------------------------------------------------------- components


def _bpe(word: str, merges: list[tuple[str, str]]) -> list[str]:
    # CLIP's BPE on one word: repeatedly merge the adjacent pair of lowest rank.
    ranks = {pair: i for i, pair in enumerate(merges)}
    pieces = list(word[:-1]) + [word[-1] + "</w>"]
    while len(pieces) > 1:
        pairs = [(ranks.get((a, b), len(ranks)), i) for i, (a, b) in enumerate(zip(pieces, pieces[1:]))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        pieces = pieces[:i] + [pieces[i] + pieces[i + 1]] + pieces[i + 2 :]
    return pieces


def word_vocabulary() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's byte-level vocabulary plus whole-word tokens for every word of the grammar: `(vocab, merges)`.

    The byte alphabet keeps any text tokenizable; each grammar word gets a whole-word token through a chain of BPE
    merges, the way a trained BPE vocabulary holds frequent words.
    """
    from ...tiny_pipelines import bytes_to_unicode

    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in bytes_to_unicode():
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    words = ["a", "an", "and", "of", "to", "the", *COLORS, *COUNT_WORDS.values()]
    words += sorted({w for relation in RELATIONS for w in relation.split()})
    merges: list[tuple[str, str]] = []
    for word in dict.fromkeys(words):
        # Merge the word's current BPE pieces left to right; a new merge ranks last, so earlier words keep theirs.
        pieces = _bpe(word, merges)
        while len(pieces) > 1:
            merges.append((pieces[0], pieces[1]))
            vocab.setdefault(pieces[0] + pieces[1], len(vocab))
            pieces = _bpe(word, merges)
    return vocab, merges


def save_tokenizer_files(path: str) -> None:
    """Write the world's tokenizer as CLIP's files: ``vocab.json``, ``merges.txt`` and ``tokenizer_config.json``."""
    vocab, merges = word_vocabulary()
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "vocab.json"), "w", encoding="utf-8") as handle:
        json.dump(vocab, handle, ensure_ascii=False)
    with open(os.path.join(path, "merges.txt"), "w", encoding="utf-8") as handle:
        handle.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MAX_TOKENS,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
    }
    with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as handle:
        json.dump(config, handle, indent=2)


def word_tokenizer():
    """The world's `CLIPTokenizer` (see `word_vocabulary`), built in memory; 16 tokens per caption."""
    from transformers import CLIPTokenizer

    vocab, merges = word_vocabulary()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_TOKENS)


def build_components(vocab_size: int) -> dict[str, Any]:
    """Fresh VAE, UNet, text encoder and the one-step scheduler of the world's pipeline (seeded by the caller)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3,
        block_out_channels=[16, 32, 64],
        layers_per_block=1,
        latent_channels=8,
        norm_num_groups=8,
        sample_size=SCENE_SIZE,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=MAX_TOKENS,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=SCENE_SIZE // 4,
        in_channels=8,
        out_channels=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(64, 96),
        layers_per_block=1,
        cross_attention_dim=64,
        attention_head_dim=4,
        norm_num_groups=16,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        prediction_type="v_prediction",
        timestep_spacing="trailing",
        steps_offset=1,
    )
    return {"vae": vae, "unet": unet, "text_encoder": text_encoder, "scheduler": scheduler}


def save_pipeline(path: str, components: dict[str, Any], tokenizer) -> None:
    """Save a `StableDiffusionPipeline` (safetensors, no safety checker) that `from_pretrained(path)` loads."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        **components, tokenizer=tokenizer, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.save_pretrained(path, safe_serialization=True)
    for name in ("unet", "vae", "text_encoder"):  # where the weights came from is a local path: keep it out
        config_path = os.path.join(path, name, "config.json")
        with open(config_path, encoding="utf-8") as handle:
            config = json.load(handle)
        config.pop("_name_or_path", None)
        with open(config_path, "w", encoding="utf-8") as handle:
            json.dump(config, handle, indent=2)
    # Real vocab/merges files, readable by any CLIP tokenizer, instead of the fast tokenizer's single JSON.
    shutil.rmtree(os.path.join(path, "tokenizer"))
    save_tokenizer_files(os.path.join(path, "tokenizer"))


# ---------------------------------------------------------------------------------------------------- data


class CaptionSampler:
    """Train captions drawn category-uniformly (then uniformly within the category), and their scenes."""

    def __init__(self, seed: int) -> None:
        self.by_category = [prompts("train", c) for c in CATEGORIES]
        self.rng = np.random.default_rng(seed)

    def items(self, n: int) -> list[dict[str, Any]]:
        cats = self.rng.integers(len(self.by_category), size=n)
        return [self.by_category[c][self.rng.integers(len(self.by_category[c]))] for c in cats]

    def scenes(self, items: list[dict[str, Any]]) -> torch.Tensor:
        """`(N, 3, 32, 32)` float32 scenes in [-1, 1] (the VAE's range) from train-half glyphs."""
        arrays = np.stack([scene_array(item, self.rng, "train") for item in items])
        return torch.from_numpy(arrays).permute(0, 3, 1, 2) * 2 - 1


_DIGIT_CLASSES, _COLOR_CLASSES = len(DIGITS) + 1, len(COLORS) + 1
CAPTION_PARSE_CLASSES = (
    max(COUNT_WORDS) + 1,
    _DIGIT_CLASSES,
    _COLOR_CLASSES,
    _DIGIT_CLASSES,
    _COLOR_CLASSES,
    len(RELATIONS) + 1,
)
"""Classes of each field `caption_parse_targets` reads: object count (0-3), first digit, first colour, second digit,
second colour, relation; the last class of a field means "none"."""


def caption_parse_targets(captions: list[str]) -> torch.Tensor:
    """`(N, 6)` int64 class targets of the captions' structure, in `CAPTION_PARSE_CLASSES` order: what a text
    encoder must keep apart to condition the scene (the order of the objects, the relation's direction, which colour
    binds to which digit). Raises `ValueError` for a caption outside the grammar."""
    colors, rows = list(COLORS), []
    for caption in captions:
        structure = parse(caption)
        objects = structure["objects"]
        row = [len(objects)]
        for index in range(2):
            obj = objects[index] if index < len(objects) else None
            row.append(DIGITS.index(obj["digit"]) if obj else len(DIGITS))
            row.append(colors.index(obj["color"]) if obj and obj["color"] else len(colors))
        relation = structure["relation"]
        row.append(RELATIONS.index(relation) if relation else len(RELATIONS))
        rows.append(row)
    return torch.tensor(rows, dtype=torch.int64)


def text_encoder_output(tokenizer, text_encoder, captions: list[str]) -> Any:
    """The text encoder's output (hidden states and pooled output) on the captions, tokenised as
    `StableDiffusionPipeline.encode_prompt` tokenises them."""
    ids = tokenizer(captions, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt")
    return text_encoder(ids.input_ids)


def encode_text(tokenizer, text_encoder, captions: list[str]) -> torch.Tensor:
    """`(N, 16, 64)` hidden states exactly as `StableDiffusionPipeline.encode_prompt` computes them."""
    return text_encoder_output(tokenizer, text_encoder, captions).last_hidden_state


class Log:
    """Stage records written to ``pretrain_log.json`` after every change, so a stopped run keeps its history."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.data: dict[str, Any] = {}
        if os.path.exists(path):
            with open(path, encoding="utf-8") as handle:
                self.data = json.load(handle)

    def update(self, stage: str, **values: Any) -> None:
        self.data.setdefault(stage, {}).update(values)
        with open(self.path, "w", encoding="utf-8") as handle:
            json.dump(self.data, handle, indent=1)


def _cosine_lr(step: int, total: int, peak: float, warmup: int = 100) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _run(name: str, steps: int, step_fn, optimizer, peak_lr: float, log: Log, every: int = 50) -> None:
    start, losses, history = time.time(), [], []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = _cosine_lr(step, steps, peak_lr)
        loss = step_fn()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
        if (step + 1) % every == 0 or step + 1 == steps:
            mean = float(np.mean(losses[-every:]))
            history.append([step + 1, round(time.time() - start, 1), mean])
            print(f"[{name}] step {step + 1}/{steps} loss {mean:.5f} ({time.time() - start:.0f} s)", flush=True)
            log.update(name, history=history, seconds=round(time.time() - start, 1), steps=step + 1)


# ---------------------------------------------------------------------------------------------------- stages


def train_vae(args, log: Log) -> None:
    torch.manual_seed(args.seed)
    components = build_components(vocab_size=len(word_tokenizer()))
    vae = components["vae"].train()
    sampler = CaptionSampler(args.seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)

    def step():
        x = sampler.scenes(sampler.items(args.vae_batch_size))
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        # Ink pixels weigh more: the black background is most of a scene and easy.
        weight = 1.0 + 4.0 * (x.amax(dim=1, keepdim=True) > -0.8).float()
        return (weight * (recon - x) ** 2).mean() + args.kl_weight * posterior.kl().mean()

    _run("vae", args.vae_steps, step, optimizer, args.vae_lr, log)
    vae.eval()
    with torch.no_grad():
        x = sampler.scenes(sampler.items(1024))
        latents = vae.encode(x).latent_dist.mode()
        recon = vae.decode(latents).sample.clamp(-1, 1)
    scaling = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scaling)
    vae.save_pretrained(os.path.join(args.output_dir, "vae"), safe_serialization=True)
    log.update("vae", scaling_factor=scaling, recon_mse=float(((recon - x) ** 2).mean()))


def chunk_sizes(total: int, size: int) -> list[int]:
    """`total` items in chunks of `size`, the last one smaller when `size` does not divide `total` (so a chunked
    stage draws exactly the count asked for, and the same draws as before for a multiple of `size`)."""
    return [min(size, total - start) for start in range(0, total, size)]


def _load_vae(args):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(os.path.join(args.output_dir, "vae")).eval().requires_grad_(False)


def _latent_pool(args, vae) -> tuple[torch.Tensor, list[str]]:
    sampler = CaptionSampler(args.seed + 1)
    latents, captions = [], []
    with torch.no_grad():
        for size in chunk_sizes(args.pool_size, 512):
            items = sampler.items(size)
            x = sampler.scenes(items)
            latents.append(vae.encode(x).latent_dist.mode() * vae.config.scaling_factor)
            captions.extend(item["prompt"] for item in items)
    return torch.cat(latents), captions


def train_teacher(args, log: Log) -> None:
    from diffusers import DDPMScheduler

    torch.manual_seed(args.seed)
    tokenizer = word_tokenizer()
    components = build_components(vocab_size=len(tokenizer))
    unet, text_encoder = components["unet"].train(), components["text_encoder"].train()
    noise_scheduler = DDPMScheduler.from_config(components["scheduler"].config)
    start = time.time()
    pool, captions = _latent_pool(args, _load_vae(args))
    log.update("teacher", pool_size=len(captions), pool_seconds=round(time.time() - start, 1))
    params = list(unet.parameters()) + list(text_encoder.parameters())
    parse_head = None  # made only when asked: its initialisation would draw from the seeded global generator
    if args.caption_parse_weight > 0:
        parse_head = torch.nn.Linear(text_encoder.config.hidden_size, sum(CAPTION_PARSE_CLASSES))
        params += list(parse_head.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.teacher_lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(args.seed)

    def step():
        index = torch.randint(len(captions), (args.batch_size,), generator=generator)
        x0 = pool[index]
        batch = [captions[i] for i in index.tolist()]
        drop = torch.rand(len(batch), generator=generator) < _DROP_PROMPT
        batch = ["" if d else c for c, d in zip(batch, drop.tolist())]
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(batch),), generator=generator)
        noisy = noise_scheduler.add_noise(x0, noise, t)
        target = noise_scheduler.get_velocity(x0, noise, t)
        encoded = text_encoder_output(tokenizer, text_encoder, batch)
        pred = unet(noisy, t, encoder_hidden_states=encoded.last_hidden_state).sample
        loss = F.mse_loss(pred, target)
        kept = [i for i, caption in enumerate(batch) if caption]  # the empty captions have nothing to read back
        if parse_head is not None and kept:
            logits = parse_head(encoded.pooler_output[kept]).split(CAPTION_PARSE_CLASSES, dim=1)
            targets = caption_parse_targets([batch[i] for i in kept])
            parse_loss = sum(F.cross_entropy(lg, targets[:, j]) for j, lg in enumerate(logits)) / len(logits)
            loss = loss + args.caption_parse_weight * parse_loss
        return loss

    _run("teacher", args.teacher_steps, step, optimizer, args.teacher_lr, log)
    unet.save_pretrained(os.path.join(args.output_dir, "teacher_unet"), safe_serialization=True)
    text_encoder.save_pretrained(os.path.join(args.output_dir, "text_encoder"), safe_serialization=True)
    save_tokenizer_files(os.path.join(args.output_dir, "tokenizer"))


def _load_teacher(args):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    unet = UNet2DConditionModel.from_pretrained(os.path.join(args.output_dir, "teacher_unet"))
    text_encoder = CLIPTextModel.from_pretrained(os.path.join(args.output_dir, "text_encoder"))
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(args.output_dir, "tokenizer"))
    return unet, text_encoder, tokenizer


@torch.no_grad()
def teacher_sample(unet, text_encoder, tokenizer, captions, noise, steps: int, guidance: float) -> torch.Tensor:
    """DDIM (eta 0) with classifier-free guidance from `noise` (standard normal latents) to clean latents; at
    `guidance` 1 the conditional prediction alone (the unconditional one would cancel), at half the cost."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="v_prediction",
        timestep_spacing="trailing",
        set_alpha_to_one=True,
        clip_sample=False,
    )
    scheduler.set_timesteps(steps)
    cond = encode_text(tokenizer, text_encoder, list(captions))
    guided = guidance != 1.0
    if guided:  # one batch of unconditional then conditional rows, built once for every step
        embeds = torch.cat([encode_text(tokenizer, text_encoder, [""]).expand_as(cond), cond])
    x = noise.clone()
    for t in scheduler.timesteps:
        if guided:
            out_uncond, out_cond = unet(torch.cat([x, x]), t, encoder_hidden_states=embeds).sample.chunk(2)
            prediction = out_uncond + guidance * (out_cond - out_uncond)
        else:
            prediction = unet(x, t, encoder_hidden_states=cond).sample
        x = scheduler.step(prediction, t, x).prev_sample
    return x


def make_pairs(args, log: Log) -> None:
    unet, text_encoder, tokenizer = _load_teacher(args)
    unet.eval()
    text_encoder.eval()
    sampler = CaptionSampler(args.seed + 2)
    generator = torch.Generator().manual_seed(args.seed + 2)
    start, noises, targets, captions = time.time(), [], [], []
    for size in chunk_sizes(args.num_pairs, 256):
        batch = [item["prompt"] for item in sampler.items(size)]
        noise = torch.randn((size, 8, SCENE_SIZE // 4, SCENE_SIZE // 4), generator=generator)
        targets.append(
            teacher_sample(unet, text_encoder, tokenizer, batch, noise, args.teacher_steps_sample, args.guidance)
        )
        noises.append(noise)
        captions.extend(batch)
    from safetensors.torch import save_file

    save_file(
        {"noise": torch.cat(noises), "latents": torch.cat(targets)}, os.path.join(args.output_dir, "pairs.safetensors")
    )
    with open(os.path.join(args.output_dir, "pairs_captions.json"), "w", encoding="utf-8") as handle:
        json.dump(captions, handle)
    log.update("pairs", count=len(captions), seconds=round(time.time() - start, 1), guidance=args.guidance)


def train_student(args, log: Log) -> None:
    from safetensors.torch import load_file

    torch.manual_seed(args.seed)
    unet, text_encoder, tokenizer = _load_teacher(args)
    unet.train()
    text_encoder.train()
    components = build_components(vocab_size=len(tokenizer))
    scheduler = components["scheduler"]
    scheduler.set_timesteps(1)
    t, sigma = scheduler.timesteps[0], scheduler.sigmas[0]
    pairs = load_file(os.path.join(args.output_dir, "pairs.safetensors"))
    with open(os.path.join(args.output_dir, "pairs_captions.json"), encoding="utf-8") as handle:
        captions = json.load(handle)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.student_lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(args.seed + 3)

    def step():
        index = torch.randint(len(captions), (args.batch_size,), generator=generator)
        noise, target = pairs["noise"][index], pairs["latents"][index]
        # What the pipeline runs: latents = noise * init_noise_sigma, scaled input, one Euler step to sigma 0.
        latents = noise * scheduler.init_noise_sigma
        model_input = scheduler.scale_model_input(latents, t)
        embeds = encode_text(tokenizer, text_encoder, [captions[i] for i in index.tolist()])
        v = unet(model_input, t, encoder_hidden_states=embeds).sample
        x0 = v * (-sigma / (sigma**2 + 1) ** 0.5) + latents / (sigma**2 + 1)
        return F.mse_loss(x0, target)

    _run("student", args.student_steps, step, optimizer, args.student_lr, log)
    components.update(unet=unet.eval(), text_encoder=text_encoder.eval(), vae=_load_vae(args))
    scheduler = type(components["scheduler"]).from_config(components["scheduler"].config)
    components["scheduler"] = scheduler
    save_pipeline(os.path.join(args.output_dir, "pipeline"), components, tokenizer)


def evaluate_base(args, log: Log) -> None:
    """The base table (verifier and judge on held-out captions and seeds), the same table for ground-truth scenes
    and their VAE reconstructions (the autoencoder's ceiling), and the diversity figure, logged."""
    from diffusers import StableDiffusionPipeline

    from .evaluation import diversity, eval_cases, evaluate_pipeline
    from .grammar import balanced_prompts
    from .scenes import render
    from .verifier import summarize, verify

    pipe = StableDiffusionPipeline.from_pretrained(os.path.join(args.output_dir, "pipeline"))
    pipe.set_progress_bar_config(disable=True)
    cases = eval_cases(60)
    log.update("evaluate", **evaluate_pipeline(pipe, cases))
    captions = [item["prompt"] for item, _ in cases]
    scenes = np.stack([np.asarray(render(item, seed), dtype=np.float32) / 255 for item, seed in cases])
    scenes = torch.from_numpy(scenes).permute(0, 3, 1, 2)
    with torch.no_grad():
        recon = pipe.vae.decode(pipe.vae.encode(scenes * 2 - 1).latent_dist.mode()).sample
    recon = (recon / 2 + 0.5).clamp(0, 1)
    log.update(
        "evaluate",
        ground_truth=summarize(verify(scenes, captions)),
        vae_reconstruction=summarize(verify(recon, captions)),
    )
    log.update("evaluate", diversity=diversity(pipe, balanced_prompts("test", 4), list(range(8))))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="digits-pretrain")
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae_steps", type=int, default=3000)
    parser.add_argument("--vae_batch_size", type=int, default=64)
    parser.add_argument("--vae_lr", type=float, default=1e-3)
    parser.add_argument("--kl_weight", type=float, default=1e-6)
    parser.add_argument("--pool_size", type=int, default=102400, help="Encoded train scenes for the teacher.")
    parser.add_argument("--teacher_steps", type=int, default=4800)
    parser.add_argument("--teacher_lr", type=float, default=5e-4)
    parser.add_argument(
        "--caption_parse_weight",
        type=float,
        default=0.0,
        help="Weight of the teacher's caption read-back loss on the text encoder (0: off, as for the shipped base).",
    )
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--num_pairs", type=int, default=16384)
    parser.add_argument("--teacher_steps_sample", type=int, default=12, help="DDIM steps of the teacher.")
    parser.add_argument(
        "--guidance", type=float, default=1.0, help="The teacher's classifier-free guidance (1: none, as shipped)."
    )
    parser.add_argument("--student_steps", type=int, default=2000)
    parser.add_argument("--student_lr", type=float, default=2e-4)
    args = parser.parse_args(argv)
    # Counts that size a stage: zero or less would fail deep inside it (an empty batch or pool), after earlier
    # stages have already run for minutes.
    for name in (
        "vae_steps",
        "vae_batch_size",
        "pool_size",
        "teacher_steps",
        "batch_size",
        "num_pairs",
        "teacher_steps_sample",
        "student_steps",
    ):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}.")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    os.makedirs(args.output_dir, exist_ok=True)
    log = Log(os.path.join(args.output_dir, "pretrain_log.json"))
    log.update("settings", **{k: v for k, v in vars(args).items() if k not in ("output_dir", "stages")})
    stages = {
        "vae": train_vae,
        "teacher": train_teacher,
        "pairs": make_pairs,
        "student": train_student,
        "evaluate": evaluate_base,
    }
    for name in args.stages:
        start = time.time()
        stages[name](args, log)
        log.update(name, stage_seconds=round(time.time() - start, 1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
