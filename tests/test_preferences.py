"""Offline DrPO: preference datasets in every accepted form, their checks, and training from chosen/rejected pairs."""

from __future__ import annotations

import json

import pytest
import torch
from datasets import Dataset, Features, Value
from datasets import Image as ImageFeature
from PIL import Image

from trl_drpo import DrPOTrainer
from trl_drpo.hub import LORA_WEIGHT_NAME
from trl_drpo.preferences import PREFERENCE_ID_COLUMN, load_preference_dataset
from trl_drpo.tiny_pipelines import tiny_sd_pipeline

from kit import lora_state, mean_brightness, tiny_drpo_config


FEATURES = Features({"prompt": Value("string"), "chosen": ImageFeature(), "rejected": ImageFeature()})


def solid(value: int, size: int = 32) -> Image.Image:
    return Image.new("RGB", (size, size), (value, value, value))


def noise_image(seed: int = 0, size: int = 32) -> Image.Image:
    pixels = torch.randint(0, 256, (size, size, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def pil_dataset(n: int = 2) -> Dataset:
    rows = {"prompt": [f"prompt {i}" for i in range(n)], "chosen": [solid(255)] * n, "rejected": [noise_image()] * n}
    return Dataset.from_dict(rows, features=FEATURES)


def write_jsonl(tmp_path, rows: list[dict]) -> str:
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_a_dataset_of_pil_images_loads_with_a_row_id():
    dataset = load_preference_dataset(pil_dataset(3))
    assert dataset[PREFERENCE_ID_COLUMN] == [0, 1, 2]
    assert dataset[1]["chosen"].size == (32, 32)


def test_a_parquet_file_with_image_bytes_loads(tmp_path):
    pil_dataset(2).to_parquet(str(tmp_path / "pairs.parquet"))
    dataset = load_preference_dataset(str(tmp_path / "pairs.parquet"))
    assert len(dataset) == 2 and dataset[0]["prompt"] == "prompt 0"


def test_a_jsonl_file_with_relative_image_paths_loads_and_keeps_absolute_paths(tmp_path):
    (tmp_path / "img").mkdir()
    solid(200).save(tmp_path / "img" / "good.png")
    solid(10).save(tmp_path / "img" / "bad.png")
    path = write_jsonl(tmp_path, [{"prompt": "a cat", "chosen": "img/good.png", "rejected": "img/bad.png"}])
    dataset = load_preference_dataset(path)
    assert dataset[0]["chosen"] == str(tmp_path / "img" / "good.png")


def test_a_missing_image_file_names_its_row_and_column(tmp_path):
    solid(200).save(tmp_path / "good.png")
    rows = [{"prompt": "a", "chosen": "good.png", "rejected": "good.png"}]
    rows.append({"prompt": "b", "chosen": "good.png", "rejected": "missing.png"})
    with pytest.raises(ValueError, match=r"Row 1 .*'rejected'.*missing\.png"):
        load_preference_dataset(write_jsonl(tmp_path, rows))


def test_corrupt_image_bytes_name_their_row_and_column(tmp_path):
    good = pil_dataset(1)[0]["chosen"]
    rows = {"prompt": ["a", "b"], "chosen": [good, {"bytes": b"not an image", "path": None}], "rejected": [good, good]}
    Dataset.from_dict(rows, features=FEATURES).to_parquet(str(tmp_path / "pairs.parquet"))
    with pytest.raises(ValueError, match=r"Row 1 .*'chosen'"):
        load_preference_dataset(str(tmp_path / "pairs.parquet"))


def test_a_dataset_without_the_image_columns_names_them():
    with pytest.raises(ValueError, match=r"'chosen' and 'rejected'"):
        load_preference_dataset(Dataset.from_dict({"prompt": ["a"], "chosen": ["x.png"]}))


def test_a_preference_dataset_with_a_reward_is_refused(tmp_path):
    with pytest.raises(ValueError, match="reward_funcs=None"):
        DrPOTrainer(tiny_sd_pipeline(), mean_brightness, tiny_drpo_config(tmp_path), train_dataset=pil_dataset())


def test_extra_anchor_candidates_are_refused_offline(tmp_path):
    config = tiny_drpo_config(tmp_path, num_anchor_generations=2)
    with pytest.raises(ValueError, match="offline DrPO.*set num_anchor_generations=0"):
        DrPOTrainer(tiny_sd_pipeline(), None, config, train_dataset=pil_dataset())


def own_samples(pipe, prompt: str) -> tuple[Image.Image, Image.Image]:
    """Two images of `pipe` itself (the way a preference set of a model's own samples is made)."""
    draws = [torch.Generator().manual_seed(seed) for seed in (1, 2)]
    return tuple(pipe([prompt] * 2, num_inference_steps=1, guidance_scale=0.0, generator=draws).images)


def feature_distances(trainer: DrPOTrainer, prompts: list[str], anchors: tuple) -> tuple[float, float]:
    """Mean feature distance of fixed-noise samples to the features of the chosen and of the rejected images."""
    gen = trainer.generator
    with torch.no_grad():
        embeds = gen.encode_prompts(prompts)
        samples = gen.sample(embeds, gen.make_noise(len(prompts), torch.Generator().manual_seed(5)))
        anchors = gen.encode_images(list(anchors))
        ours = trainer.feature_map(samples, embeds)
        theirs = trainer.feature_map(anchors, embeds.select(torch.tensor([0, 0])))
    distances = [
        [(ours[key] - theirs[key][i : i + 1]).flatten(1).norm(dim=1).mean().item() for key in ours] for i in (0, 1)
    ]
    return sum(distances[0]) / len(ours), sum(distances[1]) / len(ours)


def test_offline_steps_move_samples_towards_the_chosen_images_relative_to_the_rejected(tmp_path):
    # A pretrained one-step pipeline (the digit world's), whose VAE encodes images where its samples live.
    from trl_drpo.worlds.digits import load_pipeline

    chosen, rejected = own_samples(load_pipeline(), "a 7")
    rows = {"prompt": ["a 7", "a 7"], "chosen": [chosen] * 2, "rejected": [rejected] * 2}
    config = tiny_drpo_config(
        tmp_path, max_steps=8, learning_rate=2e-3, reference_loss_weight=0.0, feature_map="latent"
    )
    torch.manual_seed(0)
    trainer = DrPOTrainer(load_pipeline(), None, config, train_dataset=Dataset.from_dict(rows, features=FEATURES))
    before = feature_distances(trainer, ["a 7"] * 8, (chosen, rejected))
    trainer.train()
    after = feature_distances(trainer, ["a 7"] * 8, (chosen, rejected))
    # The candidates' own repulsion may spread the samples away from both images; the preference is in the margin.
    assert after[1] - after[0] > before[1] - before[0] + 0.1, (before, after)
    assert len(trainer._preference_latents) == 2  # each row's images were encoded once


def test_an_offline_run_saves_a_loadable_adapter_and_refuses_to_evaluate(tmp_path):
    trainer = DrPOTrainer(tiny_sd_pipeline(), None, tiny_drpo_config(tmp_path), train_dataset=pil_dataset(2))
    trainer.train()
    trainer.save_model(str(tmp_path))
    pipe = tiny_sd_pipeline()
    pipe.load_lora_weights(str(tmp_path), weight_name=LORA_WEIGHT_NAME)
    with pytest.raises(ValueError, match="offline"):
        trainer.evaluate()


def test_a_resumed_offline_run_equals_an_uninterrupted_one(tmp_path):
    def run(output_dir, max_steps, resume=None):
        config = tiny_drpo_config(output_dir, max_steps=4, save_strategy="steps", save_steps=2)
        trainer = DrPOTrainer(tiny_sd_pipeline(), None, config, train_dataset=pil_dataset(4))
        trainer.args.max_steps = max_steps
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    straight = run(tmp_path / "a", 4)
    run(tmp_path / "b", 2)
    resumed = run(tmp_path / "b", 4, resume=str(tmp_path / "b" / "checkpoint-2"))
    assert resumed.state.global_step == 4
    expected, actual = lora_state(straight), lora_state(resumed)
    for name in expected:  # tolerance: float32 round-off only
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-6)


def test_an_offline_runs_card_describes_its_preference_pairs_and_quick_starts_with_a_trained_prompt(tmp_path):
    trainer = DrPOTrainer(
        tiny_sd_pipeline(), None, tiny_drpo_config(tmp_path, max_steps=1), train_dataset=pil_dataset()
    )
    trainer.train()
    trainer.save_model(str(tmp_path))
    card = (tmp_path / "README.md").read_text()
    assert "## Preference data" in card and "## Rewards" not in card and "z-scored" not in card
    assert "pulls towards the encoded chosen image" in card
    assert 'pipe("prompt 0",' in card
