"""Configuration of the DrPO trainer."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from transformers import TrainingArguments

from .drift import canonical_kernel
from .objective import TOKEN_MATCHING, DriftHyperparams, invalid_key_weights
from .ranking import SELECTION_RULES


if TYPE_CHECKING:
    from .step import StepSettings


_PAPER_RADII = [0.02, 0.05, 0.2]
# The paper's LoRA targets, the default: the attention projections (self- and cross-attention).
ATTENTION_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]

# The paper's recipes (docs/method.md, section 6). Values not listed keep the DrPOConfig defaults, which
# are the SD-Turbo recipe already.
PRESETS: dict[str, dict[str, Any]] = {
    "sd_turbo_paper": {
        "num_generations": 24,
        "num_positives": 8,
        "num_negatives": 8,
        "learning_rate": 1e-4,
        "max_steps": 1000,
        "gradient_accumulation_steps": 8,
        # The authors' SD-Turbo features: the latent-MAE ResNet's six layer4 keys (its map's defaults), summed. The
        # checkpoint is the user's to give (feature_map_kwargs={"model_name_or_path": ...}); `check_feature_map` asks.
        "feature_map": "latent_mae",
        "feature_aggregation": "sum",
        "reference_loss_weight": 0.2,
        "resolution": 512,
        "fp16": True,
    },
    "sdxl_turbo_paper": {
        "num_generations": 16,
        "num_positives": 8,
        "num_negatives": 8,
        "learning_rate": 1e-5,
        "max_steps": 5000,
        "gradient_accumulation_steps": 8,
        "feature_aggregation": "mean",
        # The teacher-feature script: w+ 3000 / w- 2000, reference 3500 / 5000, lambda 0.25.
        "negative_weight": 2000.0,
        "reference_weight": 3500.0,
        "reference_negative_weight": 5000.0,
        "reference_loss_weight": 0.25,
        "resolution": 512,
        "bf16": True,
    },
    # The digit world (trl_drpo.worlds.digits) on a CPU, measured on its shipped base (benchmarks/README.md, "What
    # DrPO achieves: the digit world"): 8 prompts x 16 candidates per update, the 4 best as positives, lr 1e-3, LoRA
    # rank 8. Each winner's own anchor copy is masked (otherwise its copy holds it while the losers push it off at
    # full strength) and the negatives carry no weight (the candidates' own repulsion keeps them apart). A moving
    # average of the weights, evaluated and saved, ends 1.1-1.4 points higher and skips the evaluation-to-evaluation
    # dips of the trained weights.
    "digits": {
        "num_generations": 16,
        "num_positives": 4,
        "num_negatives": 4,
        "per_device_train_batch_size": 8,
        "gradient_accumulation_steps": 1,
        "learning_rate": 1e-3,
        "mask_anchor_copies": True,
        "negative_weight": 0.0,
        # The features: two blocks of the base denoiser, one token per latent position, and the VAE decoder's
        # mid-block statistics per quarter of the scene, which tell colours apart where the denoiser's blocks barely
        # do. Leaving out the denoiser's up_blocks.0 (2/3 of its tokens) makes an update 27% cheaper and pays for
        # the reference term.
        "feature_map": "denoiser+vae_decoder",
        "feature_map_kwargs": {"denoiser": {"spatial_tokens": True, "pool_size": 1}},
        "feature_keys": [
            "denoiser/down_blocks.1",
            "denoiser/mid_block",
            "vae_decoder/mid_block_mean_4",
            "vae_decoder/mid_block_std_4",
        ],
        # A light reference term that pulls a drifting set back to the base's (each candidate's own reference sample
        # masked): without it the wider LoRA below lost green on every seed, late in the run; at 0.2 it held the
        # colours and stopped the learning; at 0.05 the colours rise with the rest.
        "reference_loss_weight": 0.05,
        "mask_reference_pairs": True,
        "lora_rank": 8,
        "lora_alpha": 8,
        # The attention projections (the paper's targets), the feed-forward layers and the ResNet convolutions: most
        # of this UNet's weights sit outside attention. With these features and reference term three training seeds
        # gained +10.4 to +13.2 points on the held-out mean of six (+8.1 on average with the attention alone).
        "lora_target_modules": [*ATTENTION_LORA_TARGETS, "ff.net.0.proj", "ff.net.2", "conv1", "conv2"],
        "use_ema": True,
        "max_steps": 900,
        "logging_steps": 5,
        "save_strategy": "no",
    },
}

# The paper's SD-Turbo recipe ranked for less (benchmarks/README.md, "Ranking for less"): a TAESD decode
# (`AutoencoderTiny`, about 1/18 of the SD VAE's FLOPs) at 224 px for the rewards, the latent-MAE features, and no
# reference term, so that no reference rollout or reference features run at all. What it trades: rankings made on
# a cheaper image (they can disagree with full-size ones where the reward looks at fine detail), and no reference
# term to hold the generator near its base. The latent-MAE checkpoint is the user's to give, as in
# "sd_turbo_paper". For another pipeline family, override ranking_vae (madebyollin/taesdxl for SDXL-Turbo) and
# the features.
PRESETS["fast"] = {
    **PRESETS["sd_turbo_paper"],
    "reference_loss_weight": 0.0,
    "ranking_vae": "madebyollin/taesd",
    "ranking_resolution": 224,
}

# FLUX.1-schnell and SANA-Sprint: the paper has no recipe for them, so these are ours (examples/configs/
# flux_schnell.yaml and sana_sprint.yaml mark each value). They keep the paper's SDXL-Turbo recipe, the one for its
# larger model (K=16, 8/8 anchors, lr 1e-5, the teacher-feature field, bf16, 8 accumulated prompts), and change
# what the models call for: 1000 updates (the SD-Turbo recipe's length), LoRA on the attention projections of the
# transformer, candidates processed 4 at a time, the image size, and for FLUX's 12B transformer gradient
# checkpointing. Neither has been run on the real checkpoint here.
PRESETS["flux_schnell"] = {
    **PRESETS["sdxl_turbo_paper"],
    "max_steps": 1000,
    "resolution": 512,
    # Both streams of the double-stream blocks (the text stream's add_*_proj / to_add_out); the single-stream
    # blocks' to_q/k/v (their output projection is fused with the MLP's).
    "lora_target_modules": [*ATTENTION_LORA_TARGETS, "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"],
    "candidate_chunk_size": 4,
    "activation_checkpointing": True,
}
PRESETS["sana_sprint"] = {
    **PRESETS["sdxl_turbo_paper"],
    "max_steps": 1000,
    "resolution": 1024,  # the 1024px model's own size: a 32x32 latent grid, 1024 tokens like FLUX's 512 px
    "lora_target_modules": list(ATTENTION_LORA_TARGETS),  # the paper's: self- (linear) and cross-attention
    "candidate_chunk_size": 4,
}


@dataclass
class DrPOConfig(TrainingArguments):
    r"""
    Configuration class for [`DrPOTrainer`].

    Defaults follow the paper's SD-Turbo recipe (Drifting Preference Optimization, arXiv 2606.02521;
    docs/method.md, section 6); `DrPOConfig.from_preset("sdxl_turbo_paper", ...)` gives the SDXL-Turbo one.
    `DrPOConfig.from_preset("fast", feature_map_kwargs={"model_name_or_path": ...})` is the SD-Turbo recipe ranked
    for less: candidates decoded for the rewards by TAESD (`ranking_vae="madebyollin/taesd"`) at
    `ranking_resolution=224`, the latent-MAE features (its checkpoint is yours to give) and `reference_loss_weight=0`
    (no reference rollout or features). It trades ranking fidelity (rankings of a cheaper image) and the reference
    term's pull towards the base for FLOPs (benchmarks/README.md). Only the
    parameters specific to DrPO are listed here; see [`~transformers.TrainingArguments`] for the others. A step of
    training is one optimizer update over `per_device_train_batch_size * gradient_accumulation_steps` prompts per
    process, each with `num_generations` candidates.

    Parameters:
        > Parameters that control sampling

        num_generations (`int`, *optional*, defaults to `24`):
            Number of candidates K generated per prompt, from independent noise.
        resolution (`int` or `None`, *optional*, defaults to `None`):
            Image size in pixels: the `height` and `width` of the pipeline call. `None` uses the pipeline's default
            (512 for SD-Turbo and SDXL-Turbo).
        pipeline_call_kwargs (`dict`, `str` or `None`, *optional*, defaults to `None`):
            Settings of the pipeline call that is trained, evaluated and served: the candidates are
            `pipe(prompt, height=resolution, width=resolution, **pipeline_call_kwargs)` with gradient. `None` uses the
            pipeline family's one-step defaults (`{"num_inference_steps": 1, "guidance_scale": 0.0}` for SD, SDXL and
            SD3; FLUX.1-schnell, PixArt DMD and SANA-Sprint have their own, see the README); keys given here override
            them, e.g. `{"num_inference_steps": 1, "timesteps": [399], "guidance_scale": 0.0}` for DMD2. A JSON
            string is accepted (command line). The prompts, `latents`, `output_type`, `generator` and the image size
            are set by the trainer and may not appear here. The model card's quick start and `trl-drpo sample` use
            the same settings.
        candidate_chunk_size (`int` or `None`, *optional*, defaults to `None`):
            Candidates per prompt processed at once: in the no-gradient rollout (generation, reference, decode,
            features) and when they are regenerated with gradient. Peak activation memory scales with this chunk, not
            with K; the gradient is the same for any value. `None` (or any value >= K) builds one graph over all K
            candidates: the rollout's graph is reused for the gradient, which saves a denoiser forward and a feature
            forward per candidate, but peak memory grows with K.
        decode_chunk_size (`int` or `None`, *optional*, defaults to `None`):
            Latents decoded by the VAE at once (no gradient). `None` decodes a candidate chunk at a time.

        > Parameters that control anchor selection and rewards

        num_positives (`int`, *optional*, defaults to `8`):
            Positive anchors per prompt (the best-ranked candidates under `anchor_selection="topk"`; the size of
            the random draw from the passing pool under `"threshold"`).
        num_negatives (`int`, *optional*, defaults to `8`):
            Negative anchors per prompt, likewise.
        num_anchor_generations (`int`, *optional*, defaults to `0`):
            Extra candidates per prompt, generated without gradient from their own noise, scored and ranked with the
            K and eligible as anchors, but never trained: the anchors come from a larger pool at the cost of E more
            no-gradient generations, decodes, reward calls and feature passes per prompt, and no more backward. The
            authors' GenEval mode draws extra no-gradient rounds like this until both pools are large enough
            (docs/method.md §8). `0` ranks the K candidates alone, as the paper's other recipes do. The logged
            `reward` then averages over all K + E samples of the current generator. Not for offline DrPO, whose
            anchors are the dataset's.
        anchor_selection (`str`, *optional*, defaults to `"topk"`):
            Rule that turns rewards into anchors: `"topk"` (top / bottom k), `"mean_split"` (above / below the
            prompt's mean, equal anchor weights: not the authors' advantage-weighted "advsign" variant, see
            `trl_drpo.ranking.mean_split`) or `"threshold"` (pass / fail at `selection_threshold`, for binary
            rewards).
        selection_threshold (`float`, *optional*, defaults to `0.5`):
            Pass mark of the `"threshold"` rule, on the *raw* reward (with several rewards, their raw scores
            weighted by `reward_weights`), never on z-scores: a candidate passes when its score is >= this value.
        reward_weights (`list[float]` or `None`, *optional*, defaults to `None`):
            Weights of the reward functions, normalised to sum to one after each reward is z-scored within its
            prompt's group. `None` weighs them equally.
        ranking_vae (`str` or `None`, *optional*, defaults to `None`):
            Decoder of the candidates the rewards rank: `None` uses the pipeline's own VAE; else a local folder or Hub
            id of a diffusers `AutoencoderTiny` made for the pipeline's VAE (`madebyollin/taesd` for SD-Turbo,
            `madebyollin/taesdxl` for SDXL-Turbo), loaded with `from_pretrained`. It decodes for ranking only:
            evaluation, logged images, sample grids and the model card always use the pipeline's full decode. A
            TAESD decode costs about 1/18 of the SD VAE's; rankings can change where the tiny decoder misses detail
            the reward looks at (measure with `benchmarks/rank_agreement.py`).
        ranking_resolution (`int` or `None`, *optional*, defaults to `None`):
            Side, in pixels, to which the candidates are resized (bilinear, antialiased) before the rewards score
            them. `None` scores them at full size. Rewards that resize to 224 px themselves (CLIP, PickScore,
            HPSv2) see nearly the same image at 224; rewards that take the image at its own size (HPSv3: Qwen2-VL,
            up to 448 px) cost less, and those that look at fine detail may rank differently.

        > Parameters that control the drift field

        positive_weight (`float`, *optional*, defaults to `3000.0`):
            Kernel weight of each positive anchor in the preference field (the paper's "eta").
        negative_weight (`float`, *optional*, defaults to `3000.0`):
            Kernel weight of each negative anchor in the preference field, against weight 1 for each candidate, which
            repels the others too; `0.0` leaves the candidates as the only repelling set (docs/method.md §2).
        reference_weight (`float`, *optional*, defaults to `3000.0`):
            Kernel weight of each reference (base-generator) sample in the reference field.
        reference_negative_weight (`float`, *optional*, defaults to `3000.0`):
            Kernel weight of the current samples acting as negatives in the reference field.
        reference_loss_weight (`float`, *optional*, defaults to `0.2`):
            Weight lambda of the reference term; `0.0` turns it off and skips the reference rollout.
        preference_radii (`list[float]`, *optional*, defaults to `[0.02, 0.05, 0.2]`):
            Kernel radii of the preference field, relative to the mean feature distance.
        reference_radii (`list[float]`, *optional*, defaults to `[0.02, 0.05, 0.2]`):
            Kernel radii of the reference field.
        kernel (`str`, *optional*, defaults to `"laplacian"`):
            Kernel of both fields: `"laplacian"` (alias `"exponential"`), `"rbf"` or `"cosine"`.
        drift_step (`float`, *optional*, defaults to `1.0`):
            Multiplier on the normalised field in the regression target.
        mask_anchor_copies (`bool`, *optional*, defaults to `False`):
            Mask each candidate's own copy among the preference anchors. The authors' estimator does not: a candidate
            chosen as a positive then finds itself at distance zero, which inflates its positive mass and pushes it
            away from the negatives at full strength (docs/method.md §2). `True` leaves it pulled by the other
            positives and pushed by the negatives with their natural masses, which keeps winning candidates where
            they are (benchmarks/README.md, "Overfitting a few captions").
        mask_reference_pairs (`bool`, *optional*, defaults to `False`):
            Mask each candidate's own reference sample (the base's sample from the same noise) in the reference
            term. The authors' estimator does not: that sample, at distance zero at the base, inflates the attracting
            mass, so near the base the term pushes the candidates away from their set's centroid (it spreads the set)
            rather than back to the base. `True` turns it into a pull of the set as a whole back towards the
            reference set; neither pulls a single candidate back to its own reference sample (docs/method.md §2,
            benchmarks/README.md, "Where the reference term points").
        token_matching (`str`, *optional*, defaults to `"pooled"`):
            How the tokens of a feature key meet in the kernel: `"pooled"` (the authors') puts every token of every
            candidate of a prompt in one set; `"positional"` makes one set per token position, so a token is pulled
            and pushed only by the same position of the anchors (docs/method.md §8). Positional matching suits
            feature maps whose tokens are spatial positions (`spatial_tokens=True`), when what the reward checks is
            where things are.

        > Parameters that control the feature space

        feature_map (`str`, *optional*, defaults to `"denoiser"`):
            Frozen feature map phi: `"denoiser"` (the frozen base denoiser's blocks), `"vae_decoder"` (the VAE
            decoder's blocks), `"latent_mae"`, `"dinov2"`, `"vit_mae"`, `"clip_vision"` or `"latent"`; or several
            joined with `+` (`"denoiser+vae_decoder"`), whose keys are `"<map>/<key>"`.
        feature_keys (`list[str]` or `None`, *optional*, defaults to `None`):
            Keys of the feature map to use; `None` uses the map's defaults.
        feature_map_kwargs (`dict` or `None`, *optional*, defaults to `None`):
            Keyword arguments of the feature map (e.g. `{"model_name_or_path": "facebook/dinov2-base"}`); for a
            combination, one dict per map (`{"denoiser": {"pool_size": 1}, "vae_decoder": {}}`).
        feature_aggregation (`str`, *optional*, defaults to `"sum"`):
            How the per-key losses combine: `"sum"` (SD-Turbo recipe) or `"mean"` (SDXL recipe).
        feature_weights (`dict` or `None`, *optional*, defaults to `None`):
            Loss weight of each feature key, applied on top of `feature_aggregation` (key -> finite number > 0;
            a key not named weighs 1, `None` weighs every key 1 as the paper does). Each key's field has unit RMS,
            so a weight sets the key's share of the update, e.g. `{"vae_decoder/mid_block_mean_4": 0.5,
            "vae_decoder/mid_block_std_4": 0.5}` beside the denoiser's keys. A name that is not one of the feature
            map's keys raises a `ValueError` when the trainer builds the map.

        > Parameters that control the adapter

        use_lora (`bool`, *optional*, defaults to `True`):
            Train a LoRA adapter on the denoiser. `False` fine-tunes the whole denoiser and keeps a frozen copy
            for the reference samples.
        lora_rank (`int`, *optional*, defaults to `16`):
            LoRA rank r.
        lora_alpha (`int`, *optional*, defaults to `16`):
            LoRA alpha.
        lora_dropout (`float`, *optional*, defaults to `0.0`):
            LoRA dropout.
        lora_target_modules (`list[str]`, *optional*, defaults to `["to_q", "to_k", "to_v", "to_out.0"]`):
            Modules of the denoiser that receive LoRA layers.
        lora_init (`str`, *optional*, defaults to `"default"`):
            `peft.LoraConfig.init_lora_weights`: `"default"` is PEFT's default (A Kaiming-uniform, B zero), which
            the authors' code uses; any other value PEFT accepts (`"gaussian"`, `"pissa"`, ...) is passed on.

        use_ema (`bool`, *optional*, defaults to `False`):
            Keep an exponential moving average of the trained weights (diffusers' `EMAModel`, updated after every
            optimizer update). Evaluation during training uses it, and the model holds it when training ends, so the
            saved adapter is the average; checkpoints keep the trained weights and the average, saved the same way,
            in their `ema/` subfolder (`trl_drpo.averaging`). Not in the paper: it settles the update-to-update
            jitter of a rank-only reward.
        ema_decay (`float`, *optional*, defaults to `0.99`):
            Decay of the moving average, in (0, 1): the average is the plain mean of the first `1 / (1 - ema_decay)`
            updates' weights, then exponential with a horizon of about that many updates.

        > Parameters that control the data

        dataset_name (`str` or `None`, *optional*, defaults to `None`):
            Prompt dataset used when no `train_dataset` is given: a `datasets` Hub id or a local file (`.txt` with
            one prompt per line, `.json`, `.jsonl`, `.csv`, `.parquet`) or directory.
        dataset_config (`str` or `None`, *optional*, defaults to `None`):
            Configuration name of the dataset.
        dataset_train_split (`str`, *optional*, defaults to `"train"`):
            Split used for training.
        prompt_column (`str`, *optional*, defaults to `"prompt"`):
            Column holding the prompts. Other columns are passed to rewards that accept them as keyword arguments.

        > Parameters that control evaluation and logging

        eval_prompts (`list[str]` or `None`, *optional*, defaults to `None`):
            Prompts rendered by `evaluate()` when no `eval_dataset` is given.
        eval_seeds (`list[int]`, *optional*, defaults to `[1234, 1235]`):
            Seeds of the evaluation images; each prompt is rendered once per seed.
        log_images_steps (`int`, *optional*, defaults to `0`):
            Log a grid of the current candidates with their rewards to TensorBoard / W&B every this many steps;
            `0` disables it.
    """

    _VALID_DICT_FIELDS = TrainingArguments._VALID_DICT_FIELDS + [
        "feature_map_kwargs",
        "feature_weights",
        "pipeline_call_kwargs",
    ]

    # Paper defaults that differ from TrainingArguments'.
    learning_rate: float = field(default=1e-4, metadata={"help": "The initial learning rate for AdamW."})
    max_steps: int = field(default=1000, metadata={"help": "Total number of optimizer updates."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Max gradient norm."})
    weight_decay: float = field(default=1e-2, metadata={"help": "Weight decay of AdamW."})
    lr_scheduler_type: str = field(default="constant_with_warmup", metadata={"help": "The scheduler type to use."})
    gradient_accumulation_steps: int = field(
        default=8, metadata={"help": "Prompts' micro-batches accumulated per optimizer update."}
    )
    per_device_train_batch_size: int = field(default=1, metadata={"help": "Prompts per device per micro-batch."})
    save_steps: float = field(default=100, metadata={"help": "Save a checkpoint every this many updates."})
    logging_steps: float = field(default=1, metadata={"help": "Log every this many updates."})
    # A list on the command line too (`--report_to tensorboard wandb`); TrainingArguments' union type takes one word.
    report_to: list[str] | None = field(
        default_factory=lambda: ["none"],
        metadata={"help": "Integrations to report to, one or several (tensorboard wandb ...), 'all' or 'none'."},
    )
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep dataset columns: rewards may take them as keyword arguments."}
    )
    # Batches are prompt strings: there is nothing to pin, and pinning warns on every CPU run.
    dataloader_pin_memory: bool = field(default=False, metadata={"help": "Pin dataloader memory (batches are text)."})

    num_generations: int = field(default=24, metadata={"help": "Candidates K per prompt."})
    resolution: int | None = field(default=None, metadata={"help": "Image size; None uses the pipeline's default."})
    pipeline_call_kwargs: dict | str | None = field(
        default=None,
        metadata={
            "help": "Settings of the trained and served pipeline call, a dict or JSON string (e.g. "
            '{"num_inference_steps": 1, "timesteps": [399], "guidance_scale": 0.0}); None = the family defaults.'
        },
    )
    candidate_chunk_size: int | None = field(
        default=None,
        metadata={
            "help": "Candidates per prompt processed at once; None = K in one graph (fastest, memory grows with K)."
        },
    )
    decode_chunk_size: int | None = field(
        default=None, metadata={"help": "Latents decoded at once; None = the candidate chunk's rows."}
    )

    num_positives: int = field(default=8, metadata={"help": "Positive anchors per prompt."})
    num_negatives: int = field(default=8, metadata={"help": "Negative anchors per prompt."})
    num_anchor_generations: int = field(
        default=0,
        metadata={"help": "Extra no-gradient candidates per prompt, ranked with the K as anchors, not trained."},
    )
    anchor_selection: str = field(default="topk", metadata={"help": "Anchor rule.", "choices": list(SELECTION_RULES)})
    selection_threshold: float = field(default=0.5, metadata={"help": "Pass mark of the 'threshold' rule."})
    reward_weights: list[float] | None = field(default=None, metadata={"help": "Weights of the reward functions."})
    ranking_vae: str | None = field(
        default=None,
        metadata={
            "help": "AutoencoderTiny (local folder or Hub id) decoding candidates for the rewards only; None = the "
            "pipeline's VAE."
        },
    )
    ranking_resolution: int | None = field(
        default=None,
        metadata={"help": "Pixel side candidates are resized to (antialiased) before the rewards; None = full size."},
    )

    positive_weight: float = field(default=3000.0, metadata={"help": "Kernel weight of positive anchors (eta)."})
    negative_weight: float = field(default=3000.0, metadata={"help": "Kernel weight of negative anchors."})
    reference_weight: float = field(default=3000.0, metadata={"help": "Kernel weight of reference samples."})
    reference_negative_weight: float = field(
        default=3000.0, metadata={"help": "Kernel weight of current samples as negatives in the reference field."}
    )
    reference_loss_weight: float = field(default=0.2, metadata={"help": "Weight lambda of the reference term."})
    preference_radii: list[float] = field(
        default_factory=lambda: list(_PAPER_RADII), metadata={"help": "Kernel radii of the preference field."}
    )
    reference_radii: list[float] = field(
        default_factory=lambda: list(_PAPER_RADII), metadata={"help": "Kernel radii of the reference field."}
    )
    kernel: str = field(default="laplacian", metadata={"help": "Drift kernel: laplacian, rbf or cosine."})
    drift_step: float = field(default=1.0, metadata={"help": "Multiplier on the normalised drift."})
    mask_anchor_copies: bool = field(
        default=False, metadata={"help": "Mask each candidate's own copy among the preference anchors."}
    )
    mask_reference_pairs: bool = field(
        default=False, metadata={"help": "Mask each candidate's own reference sample in the reference term."}
    )
    token_matching: str = field(
        default="pooled", metadata={"help": "Kernel sets of tokens: pooled (one per prompt) or positional."}
    )

    feature_map: str = field(default="denoiser", metadata={"help": "Frozen feature map phi."})
    feature_keys: list[str] | None = field(default=None, metadata={"help": "Feature keys; None = map defaults."})
    feature_map_kwargs: dict | str | None = field(
        default=None, metadata={"help": "Keyword arguments of the feature map (a dict or a JSON string)."}
    )
    feature_aggregation: str = field(default="sum", metadata={"help": "Per-key loss aggregation: sum or mean."})
    feature_weights: dict | str | None = field(
        default=None,
        metadata={"help": "Loss weight per feature key (a dict or a JSON string; keys not named weigh 1)."},
    )

    use_lora: bool = field(default=True, metadata={"help": "Train a LoRA adapter (else the full denoiser)."})
    lora_rank: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: list(ATTENTION_LORA_TARGETS),
        metadata={"help": "Denoiser modules that get LoRA layers."},
    )
    lora_init: str = field(
        default="default",
        metadata={"help": "PEFT's init_lora_weights: 'default' (PEFT's and the authors'), 'gaussian', 'pissa', ..."},
    )
    use_ema: bool = field(default=False, metadata={"help": "Keep, evaluate and save an EMA of the trained weights."})
    ema_decay: float = field(default=0.99, metadata={"help": "Decay of the EMA, in (0, 1) (horizon 1/(1-decay))."})

    dataset_name: str | None = field(default=None, metadata={"help": "Prompt dataset (Hub id or local path)."})
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Training split."})
    prompt_column: str = field(default="prompt", metadata={"help": "Column holding the prompts."})

    eval_prompts: list[str] | None = field(default=None, metadata={"help": "Prompts rendered by evaluate()."})
    eval_seeds: list[int] = field(default_factory=lambda: [1234, 1235], metadata={"help": "Evaluation seeds."})
    log_images_steps: int = field(default=0, metadata={"help": "Image-grid logging period in steps (0 = off)."})

    def __post_init__(self) -> None:
        self._validate_drpo()
        super().__post_init__()

    def _validate_drpo(self) -> None:
        def fail(message: str) -> None:
            raise ValueError(f"DrPOConfig: {message}")

        if self.num_generations < 2:
            fail(f"num_generations must be >= 2 to rank candidates, got {self.num_generations}.")
        if self.anchor_selection not in SELECTION_RULES:
            fail(f"anchor_selection must be one of {SELECTION_RULES}, got {self.anchor_selection!r}.")
        if self.token_matching not in TOKEN_MATCHING:
            fail(f"token_matching must be one of {TOKEN_MATCHING}, got {self.token_matching!r}.")
        if self.num_positives < 1 or self.num_negatives < 0:
            fail("num_positives must be >= 1 and num_negatives >= 0.")
        if self.num_anchor_generations < 0:
            fail(f"num_anchor_generations must be >= 0, got {self.num_anchor_generations}.")
        ranked = self.num_generations + self.num_anchor_generations
        if self.anchor_selection == "topk" and self.num_positives + self.num_negatives > ranked:
            fail(
                f"num_positives + num_negatives ({self.num_positives} + {self.num_negatives}) exceeds "
                f"num_generations + num_anchor_generations ({ranked}); anchors are disjoint candidates. Lower the "
                "anchor counts, or raise num_generations or num_anchor_generations."
            )
        for name in ("positive_weight", "negative_weight", "reference_weight", "reference_negative_weight"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                fail(f"{name} must be a finite number >= 0, got {value}.")
        if self.positive_weight == 0:
            fail("positive_weight must be > 0: without positives there is no preference field.")
        if not math.isfinite(self.reference_loss_weight) or self.reference_loss_weight < 0:
            fail(f"reference_loss_weight must be >= 0, got {self.reference_loss_weight}.")
        for name in ("preference_radii", "reference_radii"):
            radii = getattr(self, name)
            if not radii or any(not math.isfinite(float(r)) or float(r) <= 0 for r in radii):
                fail(f"{name} must be a non-empty list of positive numbers, got {radii}.")
        try:
            canonical_kernel(self.kernel)
        except ValueError as err:
            fail(str(err))
        if self.feature_aggregation not in ("sum", "mean"):
            fail(f"feature_aggregation must be 'sum' or 'mean', got {self.feature_aggregation!r}.")
        for name in ("candidate_chunk_size", "decode_chunk_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                fail(f"{name} must be None or >= 1, got {value}.")
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 8):
            fail(f"resolution must be a positive multiple of 8, got {self.resolution}.")
        if self.reward_weights is not None and any(not math.isfinite(w) or w < 0 for w in self.reward_weights):
            fail(f"reward_weights must be finite and non-negative, got {self.reward_weights}.")
        if not 0.0 < self.ema_decay < 1.0:
            fail(f"ema_decay must be in (0, 1) (e.g. 0.99, an average over about 100 updates), got {self.ema_decay}.")
        if self.lora_rank < 1:
            fail(f"lora_rank must be >= 1, got {self.lora_rank}.")
        if self.ranking_resolution is not None and self.ranking_resolution < 1:
            fail(
                f"ranking_resolution must be None (full size) or a positive pixel side such as 224, got "
                f"{self.ranking_resolution}."
            )
        if self.ranking_vae is not None:
            from .ranking_decoder import check_ranking_vae_source

            check_ranking_vae_source(self.ranking_vae)
        if self.per_device_train_batch_size < 1:
            fail("per_device_train_batch_size (prompts per micro-batch) must be >= 1.")
        for name in ("feature_map_kwargs", "feature_weights", "pipeline_call_kwargs"):
            value = getattr(self, name)
            if isinstance(value, str):
                import json

                try:
                    setattr(self, name, json.loads(value))
                except json.JSONDecodeError as err:
                    fail(f"{name} must be a dict or a JSON object string, got {value!r} ({err}).")
            if getattr(self, name) is not None and not isinstance(getattr(self, name), dict):
                fail(f"{name} must be a dict or a JSON object string, got {type(getattr(self, name)).__name__}.")

        bad = invalid_key_weights(self.feature_weights or {})
        if bad:
            fail(
                "feature_weights must map feature keys to finite numbers > 0 (a key left out weighs 1; to drop a "
                f"key, leave it out of feature_keys), got {bad}."
            )

    def check_offline(self) -> None:
        """Raise a `ValueError` naming the fix when an option needs a reward that offline DrPO (docs/method.md §9)
        does not have. The trainer and the CLI call it for an offline run before any model is loaded."""
        if self.num_anchor_generations:
            raise ValueError(
                "num_anchor_generations ranks extra candidates with the reward, and offline DrPO (reward_funcs=None) "
                "takes its anchors from the dataset's pairs: set num_anchor_generations=0 or pass a reward."
            )

    def check_feature_map(self) -> None:
        """Raise a `ValueError` naming the fix when `feature_map_kwargs` holds an option the feature map does not take
        (or a key choice, which is `feature_keys`' job), or when the map needs weights that it does not give (the
        latent-MAE's checkpoint). The trainer and the CLI call it before any model is loaded."""
        from .features.base import COMBINE, check_feature_map_options

        check_feature_map_options(self.feature_map, self.feature_map_kwargs or {})
        parts = self.feature_map.split(COMBINE)
        if "latent_mae" not in parts:
            return
        kwargs = self.feature_map_kwargs or {}
        where = "feature_map_kwargs={'model_name_or_path': ...}"
        if len(parts) > 1:  # a combination takes its kwargs per map
            kwargs = kwargs.get("latent_mae") if isinstance(kwargs.get("latent_mae"), dict) else {}
            where = "feature_map_kwargs={'latent_mae': {'model_name_or_path': ...}, ...}"
        if not (kwargs.get("model_name_or_path") or kwargs.get("model")):
            from .features.latent import LATENT_MAE_CHECKPOINT

            raise ValueError(
                f"feature_map='latent_mae' (the paper's SD-Turbo features) needs its checkpoint: set {where} to "
                f"{LATENT_MAE_CHECKPOINT}; or use feature_map='denoiser', which needs no extra weights."
            )

    @property
    def one_graph(self) -> bool:
        """Whether a step keeps one graph over all K candidates (no `candidate_chunk_size` below K)."""
        return self.step_settings.one_graph

    @property
    def lora_settings(self) -> dict[str, Any]:
        """`OneStepGenerator.add_lora`'s keyword arguments for the LoRA fields (`lora_init="default"` is PEFT's
        `init_lora_weights=True`)."""
        return {
            "rank": self.lora_rank,
            "alpha": self.lora_alpha,
            "target_modules": self.lora_target_modules,
            "dropout": self.lora_dropout,
            "init_lora_weights": True if self.lora_init == "default" else self.lora_init,
        }

    def _settings(self, cls: type, **renamed: Any) -> Any:
        # The settings dataclasses of the pure modules use the config's field names; `renamed` supplies the rest.
        names = {f.name for f in dataclasses.fields(cls) if f.init} - set(renamed)
        return cls(**{name: getattr(self, name) for name in names if hasattr(self, name)}, **renamed)

    @property
    def step_settings(self) -> StepSettings:
        """The numbers of one micro-step as `trl_drpo.step` takes them."""
        from .step import StepSettings  # the step module imports diffusers; the config stays light to import

        return self._settings(StepSettings, drift=self.drift_hyperparams)

    @property
    def drift_hyperparams(self) -> DriftHyperparams:
        """The numbers of the DrPO objective as the pure-math module takes them."""
        return self._settings(DriftHyperparams, aggregation=self.feature_aggregation, key_weights=self.feature_weights)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> DrPOConfig:
        """A config reproducing one of the paper's recipes (`"sd_turbo_paper"`, `"sdxl_turbo_paper"`), the SD-Turbo
        recipe ranked for less (`"fast"`: a tiny decoder at 224 px for the rewards, latent-MAE features, no reference
        term; see the class docstring), our recipes for FLUX.1-schnell and SANA-Sprint (`"flux_schnell"`,
        `"sana_sprint"`, derived from the SDXL-Turbo one) or the digit world's (`"digits"`, see
        `trl_drpo.worlds.digits`), with `overrides` applied on top (e.g. `output_dir`, or `fp16=False` on a CPU)."""
        if name not in PRESETS:
            raise ValueError(f"Unknown DrPO preset {name!r}; choose one of {sorted(PRESETS)}.")
        return cls(**{**PRESETS[name], **overrides})
