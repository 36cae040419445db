"""Specifications of the built-in rewards (`trl_drpo.rewards`).

Offline and CPU only: every model reward is built from a tiny random config, saved to a temporary directory, and
loaded back through the same ``from_pretrained`` / file-resolution code a user's Hub id goes through.
"""

from __future__ import annotations

import builtins
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from trl_drpo.rewards import (
    REWARDS,
    AestheticScore,
    CLIPScore,
    ClipStylePreprocessor,
    HPSv2,
    ImageReward,
    JpegCompressibility,
    JpegIncompressibility,
    PickScore,
    UnsafeCheckpointError,
    VLMJudge,
    available_rewards,
    convert_open_clip_state_dict,
    get_reward,
    load_rewards,
    register_reward,
)
from trl_drpo.rewards.clip import RewardMLP
from trl_drpo.rewards.image_reward import (
    IMAGE_REWARD_MEAN,
    IMAGE_REWARD_STD,
    ImageRewardModel,
    blip_text_config_from_med_config,
)
from trl_drpo.tiny_pipelines import tiny_clip_tokenizer


PROMPTS = ["a red cat", "a red cat", "a blue dog"]


def images_uint8(count: int = 3, size: int = 32, seed: int = 0) -> torch.Tensor:
    """A (B, 3, H, W) batch of random images on the uint8 grid, as a float tensor in [0, 1]."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, 3, size, size), generator=generator).float() / 255.0


def as_pil(images: torch.Tensor) -> list[Image.Image]:
    arrays = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(array) for array in arrays]


def assert_valid_scores(scores, count: int) -> None:
    assert isinstance(scores, list) and len(scores) == count
    assert all(isinstance(s, float) and math.isfinite(s) for s in scores)


# ---------------------------------------------------------------------------------------------------------------------
# Tiny checkpoints on disk
# ---------------------------------------------------------------------------------------------------------------------


def _tiny_clip_config(projection_dim: int = 16):
    from transformers import CLIPConfig

    common = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, hidden_act="gelu")
    return CLIPConfig(
        text_config=dict(common, vocab_size=1000, bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(common, image_size=32, patch_size=8),
        projection_dim=projection_dim,
    )


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny CLIP checkpoint with its tokenizer and image processor, as on the Hub."""
    from transformers import CLIPImageProcessor, CLIPModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-clip")
    CLIPModel(_tiny_clip_config()).save_pretrained(path)
    tiny_clip_tokenizer().save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return str(path)


def _to_open_clip_layout(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The open_clip layout of a `transformers` CLIP state dict: fused qkv, x @ P projections, resblocks."""
    names = {
        "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
        "text_model.embeddings.position_embedding.weight": "positional_embedding",
        "text_model.final_layer_norm.weight": "ln_final.weight",
        "text_model.final_layer_norm.bias": "ln_final.bias",
        "vision_model.embeddings.class_embedding": "visual.class_embedding",
        "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
        "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
        "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
        "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
        "vision_model.post_layernorm.weight": "visual.ln_post.weight",
        "vision_model.post_layernorm.bias": "visual.ln_post.bias",
        "logit_scale": "logit_scale",
    }
    out = {new: hf_state[old] for old, new in names.items()}
    out["text_projection"] = hf_state["text_projection.weight"].t().contiguous()
    out["visual.proj"] = hf_state["visual_projection.weight"].t().contiguous()
    parts = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    for tower, prefix in (("text_model", ""), ("vision_model", "visual.")):
        for layer in range(2):
            src, dst = f"{tower}.encoder.layers.{layer}.", f"{prefix}transformer.resblocks.{layer}."
            for leaf in ("weight", "bias"):
                qkv = [hf_state[f"{src}self_attn.{p}_proj.{leaf}"] for p in "qkv"]
                out[f"{dst}attn.in_proj_{leaf}"] = torch.cat(qkv)
                out[f"{dst}attn.out_proj.{leaf}"] = hf_state[f"{src}self_attn.out_proj.{leaf}"]
                for hf_part, oc_part in parts.items():
                    out[f"{dst}{oc_part}.{leaf}"] = hf_state[f"{src}{hf_part}.{leaf}"]
    out["attn_mask"] = torch.full((77, 77), float("-inf")).triu(1)  # a buffer older open_clip versions saved
    return out


@pytest.fixture(scope="module")
def hps_checkpoint_dir(clip_dir, tmp_path_factory):
    """An HPSv2-style directory: an open_clip state dict of the tiny CLIP under "state_dict", like xswu/HPSv2."""
    from transformers import CLIPModel

    path = tmp_path_factory.mktemp("tiny-hps")
    state = _to_open_clip_layout(CLIPModel.from_pretrained(clip_dir).state_dict())
    torch.save({"state_dict": state}, path / "HPS_v2_compressed.pt")
    return str(path)


TINY_BLIP_VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
)
TINY_MED_CONFIG = {
    "architectures": ["BertModel"],
    "attention_probs_dropout_prob": 0.1,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "hidden_size": 24,
    "intermediate_size": 48,
    "layer_norm_eps": 1e-12,
    "max_position_embeddings": 40,
    "model_type": "bert",
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "pad_token_id": 0,
    "type_vocab_size": 2,
    "vocab_size": 64,
    "encoder_width": 32,
    "add_cross_attention": True,
}


def _to_blip_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The original ImageReward layout (BLIP's timm-style ViT names under blip.visual_encoder)."""
    vision = {
        "embeddings.class_embedding": "cls_token",
        "embeddings.position_embedding": "pos_embed",
        "embeddings.patch_embedding.weight": "patch_embed.proj.weight",
        "embeddings.patch_embedding.bias": "patch_embed.proj.bias",
        "post_layernorm.weight": "norm.weight",
        "post_layernorm.bias": "norm.bias",
    }
    parts = {
        "layer_norm1": "norm1",
        "layer_norm2": "norm2",
        "self_attn.qkv": "attn.qkv",
        "self_attn.projection": "attn.proj",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
    }
    out = {}
    for key, value in state.items():
        if key.startswith("vision_model."):
            rest = key[len("vision_model.") :]
            if rest in vision:
                rest = vision[rest]
            else:
                _, _, layer, rest = rest.split(".", 3)  # encoder.layers.<i>.<part>.<leaf>
                part, _, leaf = rest.rpartition(".")
                rest = f"blocks.{layer}.{parts[part]}.{leaf}"
            out["blip.visual_encoder." + rest] = value
        elif key.startswith("text_encoder."):
            out["blip." + key] = value
        else:
            out[key] = value
    # Parts of BLIP that scoring does not use, present in the real checkpoint.
    out["blip.vision_proj.weight"] = torch.zeros(8, 32)
    out["blip.text_proj.weight"] = torch.zeros(8, 24)
    return out


@pytest.fixture(scope="module")
def image_reward_dirs(tmp_path_factory):
    """(checkpoint directory like THUDM/ImageReward, tokenizer directory, the random model it holds)."""
    from transformers import BertTokenizer, BlipVisionConfig

    torch.manual_seed(0)
    vision_config = BlipVisionConfig(**TINY_BLIP_VISION, layer_norm_eps=1e-6)
    model = ImageRewardModel(vision_config, blip_text_config_from_med_config(TINY_MED_CONFIG, 32)).eval()
    model_dir = tmp_path_factory.mktemp("tiny-image-reward")
    torch.save(_to_blip_layout(model.state_dict()), model_dir / "ImageReward.pt")
    (model_dir / "med_config.json").write_text(json.dumps(TINY_MED_CONFIG))

    tokenizer_dir = tmp_path_factory.mktemp("tiny-bert-tokenizer")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "blue", "cat", "dog", "photo", "of"]
    BertTokenizer(vocab={w: i for i, w in enumerate(words)}).save_pretrained(tokenizer_dir)
    return str(model_dir), str(tokenizer_dir), model


VLM_WORDS = ["<pad>", "<unk>", "<s>", "</s>", "<image>", "USER", "ASSISTANT", ":", "?", "'", ".", "yes", "no"]
VLM_WORDS += ["Yes", "No", "Does", "this", "image", "match", "the", "prompt", "Answer", "or", "a", "red", "blue"]
VLM_WORDS += ["cat", "dog"]


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    """A tiny Llava (CLIP vision tower + Llama) with a word-level tokenizer and a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    vocab = {word: i for i, word in enumerate(VLM_WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens={"image_token": "<image>"},
    )
    template = (
        "{% for m in messages %}{{ m['role'] | upper }}: {% for c in m['content'] %}{% if c['type'] == 'image' %}"
        "<image> {% else %}{{ c['text'] }}{% endif %}{% endfor %} {% endfor %}"
        "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    )
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}),
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the CLS token, which the "default" strategy drops again
        chat_template=template,
    )
    small = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**small, image_size=16, patch_size=8),
        text_config=LlamaConfig(
            **small, num_key_value_heads=2, vocab_size=len(vocab), pad_token_id=0, bos_token_id=2, eos_token_id=3
        ),
        image_token_index=vocab["<image>"],
        vision_feature_layer=-1,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llava")
    LlavaForConditionalGeneration(config).save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


# ---------------------------------------------------------------------------------------------------------------------
# JPEG
# ---------------------------------------------------------------------------------------------------------------------


def test_jpeg_compressibility_ranks_a_flat_image_above_noise():
    flat = Image.new("RGB", (64, 64), (120, 60, 200))
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    flat_score, noise_score = JpegCompressibility()([flat, noise], ["x", "x"])
    assert flat_score > noise_score


def test_jpeg_incompressibility_is_the_size_in_kilobytes_and_the_negated_compressibility():
    images = as_pil(images_uint8())
    sizes = JpegIncompressibility()(images, PROMPTS)
    assert all(s > 0 for s in sizes)
    assert JpegCompressibility()(images, PROMPTS) == [-s for s in sizes]


def test_jpeg_scores_a_tensor_batch_like_its_pil_images():
    images = images_uint8()
    assert JpegCompressibility()(images, PROMPTS) == JpegCompressibility()(as_pil(images), PROMPTS)


# ---------------------------------------------------------------------------------------------------------------------
# CLIP score, PickScore
# ---------------------------------------------------------------------------------------------------------------------


def test_clip_score_from_a_local_directory_gives_one_finite_deterministic_score_per_image(clip_dir):
    images = images_uint8()
    scores = CLIPScore(clip_dir, device="cpu")(images, PROMPTS)
    assert_valid_scores(scores, 3)
    assert CLIPScore(clip_dir, device="cpu")(images, PROMPTS) == scores


def test_clip_score_is_the_cosine_of_the_clip_models_embeddings(clip_dir):
    from transformers import CLIPModel

    images = images_uint8()
    model = CLIPModel.from_pretrained(clip_dir).eval()
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    tokens = tiny_clip_tokenizer()(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        image_embeds = model.get_image_features(pixel_values=(images - mean) / std).pooler_output
        text_embeds = model.get_text_features(**tokens).pooler_output
    expected = torch.nn.functional.cosine_similarity(image_embeds, text_embeds, dim=-1)

    scores = CLIPScore(clip_dir, device="cpu", scale=100.0)(images, PROMPTS)
    torch.testing.assert_close(torch.tensor(scores), 100 * expected, rtol=1e-4, atol=1e-4)


def test_model_rewards_score_pil_images_like_the_same_tensor(clip_dir):
    images = images_uint8()
    reward = CLIPScore(clip_dir, device="cpu")
    torch.testing.assert_close(torch.tensor(reward(as_pil(images), PROMPTS)), torch.tensor(reward(images, PROMPTS)))


def test_images_of_another_size_are_resized_and_center_cropped(clip_dir):
    scores = CLIPScore(clip_dir, device="cpu")(as_pil(images_uint8(size=48)) + [Image.new("RGB", (80, 40))], ["a"] * 4)
    assert_valid_scores(scores, 4)


def test_torch_preprocessing_matches_the_models_own_image_processor(clip_dir):
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(clip_dir)
    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)).resize((w, h), Image.BILINEAR)
        for h, w in [(48, 80), (90, 40), (32, 32), (200, 150)]
    ]
    expected = processor(images=images, return_tensors="pt")["pixel_values"]
    pixels = ClipStylePreprocessor.from_image_processor(processor)(images, device="cpu", dtype=torch.float32)
    assert pixels.shape == expected.shape
    # Up to uint8 round-off (PIL resizes 8-bit images) and filter details: 1/255 is ~0.015 after normalisation.
    assert (pixels - expected).abs().mean() < 0.01
    assert (pixels - expected).abs().max() < 0.05


def test_batch_size_does_not_change_the_scores(clip_dir):
    images = images_uint8(count=5)
    prompts = ["a red cat", "a blue dog", "a red cat", "cat", "dog"]
    whole = CLIPScore(clip_dir, device="cpu", batch_size=8)(images, prompts)
    chunked = CLIPScore(clip_dir, device="cpu", batch_size=2)(images, prompts)
    torch.testing.assert_close(torch.tensor(chunked), torch.tensor(whole))


def test_model_rewards_load_lazily_on_first_call_in_float32_on_cpu(clip_dir):
    reward = CLIPScore(clip_dir, device="cpu")
    assert not reward.is_loaded
    reward(images_uint8(count=1), ["a"])
    assert reward.is_loaded and reward.dtype == torch.float32
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in reward.model.parameters())


def test_pickscore_loads_model_and_processor_from_separate_locations(clip_dir, tmp_path):
    from transformers import CLIPModel

    # Like yuvalkirstain/PickScore_v1, the model directory has no tokenizer or image processor.
    CLIPModel.from_pretrained(clip_dir).save_pretrained(tmp_path)
    images = images_uint8()
    scores = PickScore(str(tmp_path), processor_name_or_path=clip_dir, device="cpu")(images, PROMPTS)
    assert_valid_scores(scores, 3)
    # Cosine without the learned temperature: the plain CLIP score of the same weights.
    torch.testing.assert_close(torch.tensor(scores), torch.tensor(CLIPScore(clip_dir, device="cpu")(images, PROMPTS)))


# ---------------------------------------------------------------------------------------------------------------------
# Aesthetic
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def aesthetic_mlp():
    torch.manual_seed(0)
    return RewardMLP(in_features=16).eval()


@pytest.mark.parametrize("filename", ["aesthetic-model.pth", "aesthetic-model.safetensors"])
def test_aesthetic_loads_its_mlp_from_pth_or_safetensors(clip_dir, aesthetic_mlp, tmp_path, filename):
    from safetensors.torch import save_file

    state = aesthetic_mlp.state_dict()
    if filename.endswith(".pth"):
        torch.save(state, tmp_path / filename)
    else:
        save_file(state, tmp_path / filename)
    images = images_uint8()
    reward = AestheticScore(str(tmp_path), clip_model_name_or_path=clip_dir, device="cpu")
    scores = reward(images, PROMPTS)
    assert_valid_scores(scores, 3)
    assert reward(images, PROMPTS) == scores
    # The MLP reads the L2-normalised CLIP image embedding.
    embeds = CLIPScore(clip_dir, device="cpu").load()._embed_images(images)
    torch.testing.assert_close(torch.tensor(scores), aesthetic_mlp(embeds), rtol=1e-5, atol=1e-6)


def test_aesthetic_ignores_the_prompt(clip_dir, aesthetic_mlp, tmp_path):
    torch.save(aesthetic_mlp.state_dict(), tmp_path / "aesthetic-model.pth")
    reward = AestheticScore(str(tmp_path), clip_model_name_or_path=clip_dir, device="cpu")
    images = images_uint8()
    assert reward(images, PROMPTS) == reward(images, ["something else"] * 3)


def test_aesthetic_refuses_a_clip_model_of_another_embedding_size(clip_dir, tmp_path):
    torch.save(RewardMLP(in_features=768).state_dict(), tmp_path / "aesthetic-model.pth")
    with pytest.raises(ValueError, match="768-d"):
        AestheticScore(str(tmp_path), clip_model_name_or_path=clip_dir, device="cpu").load()


# ---------------------------------------------------------------------------------------------------------------------
# HPSv2
# ---------------------------------------------------------------------------------------------------------------------


def test_hpsv2_scores_a_converted_open_clip_checkpoint_like_the_clip_model_it_holds(clip_dir, hps_checkpoint_dir):
    images = images_uint8()
    reward = HPSv2(hps_checkpoint_dir, config_name_or_path=clip_dir, device="cpu")
    scores = reward(images, PROMPTS)
    assert_valid_scores(scores, 3)
    expected = CLIPScore(clip_dir, device="cpu")(images, PROMPTS)
    torch.testing.assert_close(torch.tensor(scores), torch.tensor(expected), rtol=1e-5, atol=1e-5)


def test_open_clip_clean_fixes_entities_quotes_width_and_spacing_like_open_clip():
    from trl_drpo.rewards.hps import open_clip_clean

    assert open_clip_clean("A  \u201ccat\u201d &amp;amp; \uff24\uff2f\uff27\n") == 'a "cat" & dog'


def test_hpsv2_scores_a_prompt_as_its_open_clip_cleaned_text(clip_dir, hps_checkpoint_dir):
    images = images_uint8()[:1]
    reward = HPSv2(hps_checkpoint_dir, config_name_or_path=clip_dir, device="cpu")
    assert reward(images, ["a \u201ccat\u201d &amp; a dog"]) == reward(images, ['a "cat" & a dog'])


def test_hpsv2_reloads_a_saved_converted_model_directly(clip_dir, hps_checkpoint_dir, tmp_path):
    images = images_uint8()
    converted = HPSv2(hps_checkpoint_dir, config_name_or_path=clip_dir, device="cpu").load()
    converted.model.save_pretrained(tmp_path)
    reloaded = HPSv2(str(tmp_path), config_name_or_path=clip_dir, device="cpu")
    assert reloaded(images, PROMPTS) == converted(images, PROMPTS)


def test_hpsv2_refuses_a_checkpoint_with_missing_weights(clip_dir, tmp_path):
    from transformers import CLIPModel

    state = _to_open_clip_layout(CLIPModel.from_pretrained(clip_dir).state_dict())
    del state["visual.ln_post.weight"]
    torch.save({"state_dict": state}, tmp_path / "HPS_v2_compressed.pt")
    with pytest.raises(ValueError, match="post_layernorm.weight"):
        HPSv2(str(tmp_path), config_name_or_path=clip_dir, device="cpu").load()


def test_open_clip_conversion_rejects_towers_it_does_not_know():
    with pytest.raises(ValueError, match="Unrecognised open_clip keys"):
        convert_open_clip_state_dict({"visual.trunk.blocks.0.attn.qkv.weight": torch.zeros(3, 1)})


def test_hpsv2_version_picks_the_checkpoint_file():
    assert HPSv2().checkpoint_name == "HPS_v2_compressed.pt"
    assert get_reward("hpsv2.1").checkpoint_name == "HPS_v2.1_compressed.pt"
    with pytest.raises(ValueError, match="v2.0"):
        HPSv2(version="v3")


# ---------------------------------------------------------------------------------------------------------------------
# ImageReward
# ---------------------------------------------------------------------------------------------------------------------


def test_image_reward_loads_every_weight_of_an_original_checkpoint(image_reward_dirs):
    model_dir, tokenizer_dir, original = image_reward_dirs
    reward = ImageReward(model_dir, tokenizer_name_or_path=tokenizer_dir, vision_config=TINY_BLIP_VISION, device="cpu")
    loaded = reward.load().model.state_dict()
    expected = original.state_dict()
    assert loaded.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(loaded[key], value, msg=key)


def test_image_reward_gives_one_finite_deterministic_score_per_image(image_reward_dirs):
    model_dir, tokenizer_dir, _ = image_reward_dirs
    kwargs = dict(tokenizer_name_or_path=tokenizer_dir, vision_config=TINY_BLIP_VISION, device="cpu")
    images = images_uint8()
    scores = ImageReward(model_dir, **kwargs)(images, PROMPTS)
    assert_valid_scores(scores, 3)
    assert ImageReward(model_dir, **kwargs)(as_pil(images), PROMPTS) == pytest.approx(scores, abs=1e-5)


def test_image_reward_standardises_with_the_published_mean_and_std(image_reward_dirs):
    model_dir, tokenizer_dir, _ = image_reward_dirs
    kwargs = dict(tokenizer_name_or_path=tokenizer_dir, vision_config=TINY_BLIP_VISION, device="cpu")
    images = images_uint8()
    raw = torch.tensor(ImageReward(model_dir, normalize=False, **kwargs)(images, PROMPTS))
    normalised = torch.tensor(ImageReward(model_dir, **kwargs)(images, PROMPTS))
    torch.testing.assert_close(normalised, (raw - IMAGE_REWARD_MEAN) / IMAGE_REWARD_STD)


# ---------------------------------------------------------------------------------------------------------------------
# VLM judge
# ---------------------------------------------------------------------------------------------------------------------


def test_vlm_judge_score_is_a_probability(vlm_dir):
    images = images_uint8(size=24)
    judge = VLMJudge(vlm_dir, device="cpu")
    scores = judge(images, PROMPTS)
    assert_valid_scores(scores, 3)
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert VLMJudge(vlm_dir, device="cpu")(as_pil(images), PROMPTS) == pytest.approx(scores, abs=1e-6)


def test_vlm_judge_normalises_yes_over_yes_and_no_next_token_logits(vlm_dir):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    images = as_pil(images_uint8(count=1, size=24))
    prompt = "a red cat"
    score = VLMJudge(vlm_dir, device="cpu")(images, [prompt])[0]

    processor = AutoProcessor.from_pretrained(vlm_dir)
    model = AutoModelForImageTextToText.from_pretrained(vlm_dir).eval()
    question = f"Does this image match the prompt '{prompt}'? Answer yes or no."
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    with torch.no_grad():
        logits = model(**processor(images=images, text=[text], return_tensors="pt")).logits[0, -1]
    vocab = {word: i for i, word in enumerate(VLM_WORDS)}
    p_yes = logits[[vocab["yes"], vocab["Yes"]]].exp().sum()
    p_no = logits[[vocab["no"], vocab["No"]]].exp().sum()
    assert score == pytest.approx((p_yes / (p_yes + p_no)).item(), abs=1e-5)


def test_vlm_judge_question_must_have_a_prompt_placeholder():
    with pytest.raises(ValueError, match="{prompt}"):
        VLMJudge(question="Is this image good?")


# ---------------------------------------------------------------------------------------------------------------------
# Loading safety
# ---------------------------------------------------------------------------------------------------------------------


class _Exploit:
    """Unpickling this object would call ``open(marker, "w")``: a stand-in for arbitrary code."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return builtins.open, (self.marker, "w")


@pytest.mark.parametrize(
    "make_reward, filename",
    [
        (lambda d, clip: AestheticScore(d, clip_model_name_or_path=clip, device="cpu"), "aesthetic-model.pth"),
        (lambda d, clip: HPSv2(d, config_name_or_path=clip, device="cpu"), "HPS_v2_compressed.pt"),
        (lambda d, clip: ImageReward(d, tokenizer_name_or_path=clip, device="cpu"), "ImageReward.pt"),
    ],
    ids=["aesthetic", "hpsv2", "image_reward"],
)
def test_loading_a_malicious_pickle_never_runs_its_code(clip_dir, tmp_path, make_reward, filename):
    marker = tmp_path / "pwned"
    torch.save({"layers.0.weight": torch.zeros(1), "payload": _Exploit(str(marker))}, tmp_path / filename)
    with pytest.raises(UnsafeCheckpointError, match="Refusing to load"):
        make_reward(str(tmp_path), clip_dir).load()
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------------------------------


def test_every_builtin_reward_is_registered():
    expected = {"jpeg_compressibility", "jpeg_incompressibility", "aesthetic", "clip_score", "pickscore", "hpsv2"}
    expected |= {"hpsv2.1", "image_reward", "vlm_judge"}
    assert expected <= set(available_rewards())


@pytest.mark.parametrize("name", sorted(REWARDS))
def test_builtin_rewards_build_by_name_without_loading_anything(name):
    reward = get_reward(name)  # offline: this would fail if construction touched the Hub
    assert reward.name == name
    assert getattr(reward, "is_loaded", False) is False
    assert reward.input_format in {"pil", "pt"}


def test_get_reward_accepts_aliases_case_and_dashes():
    assert isinstance(get_reward("PickScore"), PickScore)
    assert isinstance(get_reward("clip"), CLIPScore)
    assert isinstance(get_reward("jpeg-compressibility"), JpegCompressibility)


def test_unknown_reward_name_lists_the_available_ones():
    with pytest.raises(KeyError) as error:
        get_reward("pixscore")
    message = str(error.value)
    assert "pixscore" in message
    assert all(name in message for name in available_rewards())


def test_register_reward_adds_a_factory_and_refuses_to_shadow_one():
    @register_reward("test_constant_reward")
    def constant(value: float = 1.0):
        return lambda images, prompts: [value] * len(prompts)

    try:
        assert get_reward("test_constant_reward", value=2.0)(None, ["a", "b"]) == [2.0, 2.0]
        with pytest.raises(ValueError, match="already registered"):
            register_reward("test_constant_reward", constant)
        with pytest.raises(ValueError, match="already registered"):
            register_reward("pickscore", constant)
    finally:
        REWARDS.pop("test_constant_reward")


def test_load_rewards_parses_names_callables_and_mappings_with_weights():
    def custom(images, prompts):
        return [0.0] * len(prompts)

    funcs, weights = load_rewards(["pickscore", custom], weights=[0.7, 0.3])
    assert isinstance(funcs[0], PickScore) and funcs[1] is custom and weights == [0.7, 0.3]

    funcs, weights = load_rewards({"pickscore": 2.0, "aesthetic": 1.0})
    assert [type(f) for f in funcs] == [PickScore, AestheticScore] and weights == [2.0, 1.0]

    funcs, weights = load_rewards(
        [{"name": "clip_score", "weight": 0.5, "batch_size": 4}, "trl_drpo.rewards:JpegCompressibility"]
    )
    assert funcs[0].batch_size == 4 and isinstance(funcs[1], JpegCompressibility) and weights == [0.5, 1.0]

    funcs, weights = load_rewards("jpeg_compressibility")
    assert len(funcs) == 1 and weights == [1.0]


@pytest.mark.parametrize(
    "specs, weights, error",
    [
        (["pickscore", "aesthetic"], [1.0], "one weight per reward"),
        (["pickscore"], [-1.0], "non-negative"),
        ([{"name": "pickscore", "weight": 1.0}], [1.0], "use one of them"),
        ([{"batch_size": 4}], None, "'name' key"),
        ([], None, "No rewards"),
    ],
)
def test_load_rewards_rejects_bad_specs(specs, weights, error):
    with pytest.raises(ValueError, match=error):
        load_rewards(specs, weights)


def test_reward_rejects_a_prompt_count_that_does_not_match_the_images():
    with pytest.raises(ValueError, match="one prompt per image"):
        JpegCompressibility()(images_uint8(count=2), ["only one"] * 3)


# ---------------------------------------------------------------------------------------------------------------------
# Inside the trainer
# ---------------------------------------------------------------------------------------------------------------------


def test_a_builtin_model_reward_by_name_drives_a_short_drpo_trainer_run(clip_dir, tmp_path):
    from trl_drpo import DrPOTrainer
    from trl_drpo.tiny_pipelines import tiny_sd_pipeline

    from kit import tiny_drpo_config

    funcs, weights = load_rewards(
        [{"name": "clip_score", "model_name_or_path": clip_dir, "device": "cpu"}, "jpeg_compressibility"]
    )
    config = tiny_drpo_config(tmp_path / "out", per_device_train_batch_size=1, reward_weights=weights)
    trainer = DrPOTrainer(tiny_sd_pipeline(), funcs, config, train_dataset=PROMPTS)
    trainer.train()
    logged = {key for entry in trainer.state.log_history for key in entry}
    assert {"rewards/clip_score/mean", "rewards/jpeg_compressibility/mean"} <= logged
