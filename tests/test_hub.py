"""Model cards and the Hub: the card's metadata and content, no secrets, and a real HTTP round trip through a
loopback fake of the Hub (push_to_hub, then load_lora_weights("user/repo") in a fresh process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from huggingface_hub import ModelCard

from trl_drpo import DrPOConfig, DrPOTrainer
from trl_drpo.hub import LORA_WEIGHT_NAME
from trl_drpo.model_card import render_model_card
from trl_drpo.tiny_pipelines import tiny_sd_pipeline

from fake_hub import FakeHub, git_blob_sha1
from kit import mean_brightness, tiny_drpo_config, with_kit_on_path


SECRET = "hf_secretTOKENdoNotLeak0123456789"
TAGS = ["trl", "drpo", "lora", "text-to-image", "diffusers", "diffusers-training"]
EVAL_METRICS = {
    "eval_reward": 0.25,
    "eval_base_reward": 0.125,
    "eval_rewards/pickscore/mean": 21.5,
    "eval_base_rewards/pickscore/mean": 21.0,
    "eval_rewards/aesthetic/mean": 5.5,
    "eval_base_rewards/aesthetic/mean": 5.25,
    "eval_runtime": 3.0,
}


def config(tmp_path, **overrides) -> DrPOConfig:
    values = dict(max_steps=1, eval_seeds=[7, 8], hub_token=SECRET)
    return tiny_drpo_config(tmp_path / "sd-turbo-drpo", **{**values, **overrides})


def sd_turbo_like_pipeline():
    """The tiny pipeline, named as if loaded from the Hub (what `DiffusionPipeline.from_pretrained` records)."""
    pipe = tiny_sd_pipeline()
    pipe.register_to_config(_name_or_path="stabilityai/sd-turbo")
    return pipe


def render(tmp_path, **kwargs) -> ModelCard:
    defaults = dict(
        pipeline=sd_turbo_like_pipeline(),
        args=config(
            tmp_path, hub_model_id="alice/sd-turbo-drpo", dataset_name="sayakpaul/pick-a-pic-v2-unique-prompts"
        ),
        reward_names=["pickscore", "aesthetic"],
        reward_weights=[3.0, 1.0],
        tags=TAGS,
        eval_metrics=EVAL_METRICS,
        sample_grid="samples.png",
    )
    defaults.update(kwargs)
    return render_model_card(**defaults)


# ----------------------------------------------------------------------------------------------------------------
# The model card
# ----------------------------------------------------------------------------------------------------------------


def test_card_metadata_is_that_of_a_diffusers_lora_for_text_to_image(tmp_path):
    data = render(tmp_path).data.to_dict()
    assert data["library_name"] == "diffusers"
    assert data["pipeline_tag"] == "text-to-image"
    assert data["base_model"] == "stabilityai/sd-turbo"
    assert set(TAGS) <= set(data["tags"])
    assert data["datasets"] == ["sayakpaul/pick-a-pic-v2-unique-prompts"]
    assert data["license"] == "apache-2.0"


def test_card_lists_the_rewards_with_their_normalised_weights(tmp_path):
    text = str(render(tmp_path))
    assert "| `pickscore` | 0.75 |" in text
    assert "| `aesthetic` | 0.25 |" in text


def test_card_lists_the_key_hyperparameters(tmp_path):
    text = str(render(tmp_path))
    for row in (
        "| learning_rate | `0.001` |",
        "| num_generations | `4` |",
        "| num_positives | `1` |",
        "| reference_loss_weight | `0.2` |",
        "| preference_radii | `[0.02, 0.05, 0.2]` |",
        "| lora_rank | `4` |",
        "| lr_scheduler_type | `constant_with_warmup` |",
        "| mixed_precision | `fp32` |",
    ):
        assert row in text, row


def test_card_shows_dict_hyperparameters_as_the_json_a_flag_takes(tmp_path):
    args = config(tmp_path, feature_weights={"mid_block": 0.5})
    assert '| feature_weights | `{"mid_block": 0.5}` |' in str(render(tmp_path, args=args))


def test_card_describes_extra_anchor_candidates_only_when_the_run_drew_them(tmp_path):
    assert "without gradient" not in str(render(tmp_path))
    text = " ".join(str(render(tmp_path, args=config(tmp_path, num_anchor_generations=8))).split())
    assert (
        "candidates per prompt from independent noise and 8 more without gradient (`num_anchor_generations`)" in text
    )


def test_card_names_the_ema_decay_only_when_the_saved_weights_are_a_moving_average(tmp_path):
    assert "ema_decay" not in str(render(tmp_path)) and "moving average" not in str(render(tmp_path))
    averaged = config(tmp_path, hub_model_id="alice/sd-turbo-drpo", use_ema=True, ema_decay=0.995)
    text = " ".join(str(render(tmp_path, args=averaged)).split())
    assert "| ema_decay | `0.995` |" in text
    assert "a moving average of the trained weights (`ema_decay` 0.995, over about the last 200 updates)" in text


@pytest.mark.parametrize(
    "negative_weight, reference_loss_weight, field",
    [
        (3000.0, 0.2, "pulls towards the best candidates, pushes away from the worst, and stays anchored to the base"),
        (0.0, 0.2, "pulls towards the best candidates and stays anchored to the base model's samples"),
        (3000.0, 0.0, "pulls towards the best candidates and pushes away from the worst."),
        (0.0, 0.0, "pulls towards the best candidates."),
    ],
)
def test_card_describes_only_the_drift_terms_the_run_weighs(tmp_path, negative_weight, reference_loss_weight, field):
    args = config(
        tmp_path, hub_model_id="a/b", negative_weight=negative_weight, reference_loss_weight=reference_loss_weight
    )
    text = " ".join(str(render(tmp_path, args=args)).split())
    assert f"drift field that {field}" in text


def test_card_reports_base_and_tuned_rewards_with_the_change(tmp_path):
    text = str(render(tmp_path))
    assert "seeds [7, 8]" in text
    assert "| reward (weighted mean) | 0.125 | 0.25 | +0.125 |" in text
    assert "| pickscore | 21 | 21.5 | +0.5 |" in text
    assert "| aesthetic | 5.25 | 5.5 | +0.25 |" in text
    assert "runtime" not in text


def test_card_introduces_an_evaluation_of_the_users_own_with_its_description(tmp_path):
    text = str(render(tmp_path, eval_description="Pass rates (%) on 360 held-out captions:"))
    assert "Pass rates (%) on 360 held-out captions:" in text and "seeds [7, 8]" not in text
    assert "| pickscore | 21 | 21.5 | +0.5 |" in text


def test_card_without_an_evaluation_has_no_evaluation_section(tmp_path):
    assert "## Evaluation" not in str(render(tmp_path, eval_metrics={}))


def test_card_shows_the_sample_grid(tmp_path):
    assert "![samples](samples.png)" in str(render(tmp_path))
    assert "![samples]" not in str(render(tmp_path, sample_grid=None))


def test_card_quick_start_loads_the_adapter_onto_the_base_model(tmp_path):
    text = str(render(tmp_path))
    assert 'AutoPipelineForText2Image.from_pretrained("stabilityai/sd-turbo"' in text
    assert 'pipe.load_lora_weights("alice/sd-turbo-drpo")' in text
    assert "num_inference_steps=1, guidance_scale=0.0" in text


def test_card_quick_start_loads_the_base_in_the_half_precision_it_was_trained_in(tmp_path):
    assert "dtype=torch.float16" in str(render(tmp_path))
    bf16 = str(render(tmp_path, args=config(tmp_path, bf16=True)))  # FLUX and SANA publish bf16 weights
    assert "dtype=torch.bfloat16" in bf16 and "float16)" not in bf16.replace("bfloat16)", "")


def test_card_links_a_hub_base_and_names_a_folder_base_without_a_link(tmp_path):
    assert "[stabilityai/sd-turbo](https://huggingface.co/stabilityai/sd-turbo)" in str(render(tmp_path))
    folder = tiny_sd_pipeline()
    folder.register_to_config(_name_or_path=str(tmp_path / "my-base"))
    text = str(render(tmp_path, pipeline=folder))
    assert "](#)" not in text and "A LoRA adapter for my-base (a local folder), preference-tuned" in text
    assert 'from_pretrained("path/to/my-base"' in text and str(tmp_path) not in text


def test_card_quick_start_prompts_with_an_evaluation_prompt(tmp_path):
    text = str(render(tmp_path, args=config(tmp_path, eval_prompts=['a "red" 7 above a 2'])))
    assert 'pipe("a \\"red\\" 7 above a 2", num_inference_steps=1' in text


def test_card_quick_start_uses_the_repo_the_trainer_pushed_to(tmp_path):
    text = str(render(tmp_path, args=config(tmp_path), repo_id="bob/pushed"))
    assert 'pipe.load_lora_weights("bob/pushed")' in text


def test_card_lists_framework_versions_and_the_citation(tmp_path):
    text = str(render(tmp_path))
    for package in ("diffusers", "transformers", "peft", "trl", "torch"):
        assert f"- {package}: " in text
    assert "@article{jiang2026drpo" in text and "arXiv:2606.02521" in text


def test_card_never_contains_the_hub_token(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_envTOKENdoNotLeak9876543210")
    # A token smuggled into a user-supplied string is scrubbed too.
    args = config(tmp_path, dataset_name=f"https://example.com/prompts.txt?token={SECRET}")
    text = str(render(tmp_path, args=args, model_name="hf_envTOKENdoNotLeak9876543210"))
    assert SECRET not in text
    assert "hf_envTOKENdoNotLeak9876543210" not in text
    assert "hub_token" not in text


def test_card_names_a_local_prompt_file_without_its_path(tmp_path):
    prompts = tmp_path / "private" / "my_prompts.txt"
    prompts.parent.mkdir()
    prompts.write_text("a cat\n")
    card = render(tmp_path, args=config(tmp_path, dataset_name=str(prompts)))
    assert "`my_prompts.txt`" in str(card)
    assert str(prompts.parent) not in str(card)
    assert "datasets" not in card.data.to_dict()


def test_card_of_a_pipeline_without_a_hub_id_has_no_base_model_metadata(tmp_path):
    card = render(tmp_path, pipeline=tiny_sd_pipeline())
    assert "base_model" not in card.data.to_dict()
    assert card.data.to_dict()["library_name"] == "diffusers"


def test_save_model_writes_card_and_config_without_the_token(tmp_path):
    trainer = DrPOTrainer(
        sd_turbo_like_pipeline(), mean_brightness, config(tmp_path), train_dataset=["a cat", "a dog"]
    )
    trainer.save_model()
    out = trainer.args.output_dir
    card = ModelCard.load(os.path.join(out, "README.md"))
    assert card.data.to_dict()["base_model"] == "stabilityai/sd-turbo"
    assert set(TAGS) <= set(card.data.to_dict()["tags"])
    for name in os.listdir(out):
        assert SECRET not in open(os.path.join(out, name), "rb").read().decode("latin-1"), name


def test_the_saved_adapter_gets_the_file_mode_of_the_other_saved_files(tmp_path):
    trainer = DrPOTrainer(tiny_sd_pipeline(), mean_brightness, config(tmp_path), train_dataset=["a cat", "a dog"])
    trainer.save_model()
    out = trainer.args.output_dir
    mode = os.stat(os.path.join(out, "drpo_config.json")).st_mode & 0o777
    assert os.stat(os.path.join(out, LORA_WEIGHT_NAME)).st_mode & 0o777 == mode


# ----------------------------------------------------------------------------------------------------------------
# The fake Hub itself
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture
def hub_api(monkeypatch):
    from huggingface_hub import HfApi, constants

    # Read at import by huggingface_hub; the round trip below sets it through the environment instead.
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    with FakeHub() as hub:
        yield hub, HfApi(endpoint=hub.url, token="hf_test")


def test_fake_hub_round_trips_regular_and_lfs_files_through_huggingface_hub(hub_api, tmp_path):
    from huggingface_hub import hf_hub_download, snapshot_download

    hub, api = hub_api
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "weights.safetensors").write_bytes(os.urandom(4096))
    (folder / "README.md").write_text("---\nlibrary_name: diffusers\n---\n# hello\n")
    (folder / "sub" / "config.json").write_text('{"a": 1}')
    repo = api.create_repo("round-trip")
    assert repo.repo_id == "user/round-trip"
    commit = api.upload_folder(repo_id="user/round-trip", folder_path=folder, commit_message="upload")

    stored = hub.repo("user/round-trip").head
    assert stored.oid == commit.oid
    assert stored.files["weights.safetensors"].lfs and not stored.files["README.md"].lfs
    assert any(r.method == "PUT" and r.path.startswith("/__lfs/") for r in hub.requests), "LFS upload expected"

    cache = tmp_path / "cache"
    path = hf_hub_download("user/round-trip", "weights.safetensors", endpoint=hub.url, cache_dir=cache)
    assert open(path, "rb").read() == (folder / "weights.safetensors").read_bytes()
    snapshot = snapshot_download("user/round-trip", endpoint=hub.url, cache_dir=tmp_path / "cache2")
    assert open(os.path.join(snapshot, "sub", "config.json")).read() == '{"a": 1}'
    assert api.model_info("user/round-trip").sha == commit.oid


def test_fake_hub_skips_unchanged_files_like_the_hub(hub_api, tmp_path):
    hub, api = hub_api
    (tmp_path / "a.txt").write_text("same")
    api.create_repo("user/same")
    first = api.upload_folder(repo_id="user/same", folder_path=tmp_path, commit_message="one")
    second = api.upload_folder(repo_id="user/same", folder_path=tmp_path, commit_message="two")
    assert first.oid == second.oid and len(hub.repo("user/same").commits) == 2  # initial + one


def test_fake_hub_refuses_writes_without_a_token():
    import urllib.error
    import urllib.request

    with FakeHub() as hub:
        request = urllib.request.Request(f"{hub.url}/api/repos/create", data=b'{"name": "x"}', method="POST")
        with pytest.raises(urllib.error.HTTPError) as error:
            urllib.request.urlopen(request, timeout=10)
        assert error.value.code == 401
        assert not hub.repos


def test_fake_hub_reports_missing_files_the_way_huggingface_hub_expects(hub_api, tmp_path):
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError

    hub, api = hub_api
    api.create_repo("user/empty")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("user/empty", "nope.bin", endpoint=hub.url, cache_dir=tmp_path)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("user/missing", "nope.bin", endpoint=hub.url, cache_dir=tmp_path)


def test_fake_hub_shuts_itself_down_after_its_lifetime():
    hub = FakeHub(lifetime_s=0.2).start()
    deadline = time.time() + 10
    while hub.is_running and time.time() < deadline:
        time.sleep(0.05)
    assert not hub.is_running


def test_git_blob_ids_match_git():
    # `git hash-object` of "hello\n".
    assert git_blob_sha1(b"hello\n") == "ce013625030ba8dba906f756967f9e9ca394464a"


# ----------------------------------------------------------------------------------------------------------------
# The round trip: push_to_hub in one process, load_lora_weights("user/repo") in a fresh one
# ----------------------------------------------------------------------------------------------------------------


PUSH_SCRIPT = """
import sys, torch
from safetensors.torch import save_file
from trl_drpo import DrPOConfig, DrPOTrainer
from trl_drpo.model_card import save_sample_grid
from kit import mean_brightness, tiny_drpo_config
from trl_drpo.tiny_pipelines import tiny_sd_pipeline

out, secret = sys.argv[1], sys.argv[2]
config = tiny_drpo_config(out, learning_rate=3e-2, eval_prompts=["a house", "a tree"], eval_seeds=[1, 2],
                          hub_model_id="user/drpo-tiny", hub_token=secret)
trainer = DrPOTrainer(tiny_sd_pipeline(), mean_brightness, config, train_dataset=["a red apple", "a blue car"])
trainer.train()
trainer.evaluate()
save_sample_grid(trainer, ["a house", "a tree"], [1, 2], out + "/samples.png")
commit = trainer.push_to_hub(sample_grid="samples.png")
print("COMMIT", commit.oid)

noise = trainer.generator.make_noise(2, torch.Generator().manual_seed(7))
tuned = trainer.generator.pipeline(["a house", "a tree"], num_inference_steps=1, guidance_scale=0.0, latents=noise,
                                   output_type="pt").images
save_file({"noise": noise.contiguous(), "tuned": tuned.contiguous()}, out + "/../expected.safetensors")
"""

PULL_SCRIPT = """
import sys
from safetensors.torch import load_file, save_file
from kit import mean_brightness, tiny_drpo_config
from trl_drpo.tiny_pipelines import tiny_sd_pipeline

expected = load_file(sys.argv[1])
pipe = tiny_sd_pipeline()
kwargs = dict(num_inference_steps=1, guidance_scale=0.0, latents=expected["noise"], output_type="pt")
base = pipe(["a house", "a tree"], **kwargs).images
pipe.load_lora_weights("user/drpo-tiny")
loaded = pipe(["a house", "a tree"], **kwargs).images
save_file({"base": base.contiguous(), "loaded": loaded.contiguous()}, sys.argv[2])
"""


def _run(name: str, script: str, args: list[str], env: dict[str, str], tmp_path) -> subprocess.CompletedProcess:
    path = tmp_path / f"{name}.py"
    path.write_text(script)
    result = subprocess.run(
        [sys.executable, str(path), *args], env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.mark.slow
def test_push_to_hub_then_load_lora_weights_from_the_hub_reproduces_the_tuned_images(tmp_path):
    from safetensors.torch import load_file

    with FakeHub() as hub:
        base_env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "HUGGING"))}
        env = {**base_env, **hub.env(tmp_path / "hf_home", token="hf_dummy_env_token"), "OMP_NUM_THREADS": "1"}
        env = with_kit_on_path(env)
        pushed = _run("push", PUSH_SCRIPT, [str(tmp_path / "out"), SECRET], env, tmp_path)
        # A fresh process with an empty cache: everything it loads comes over HTTP.
        pull_env = {**env, "HF_HOME": str(tmp_path / "hf_home_pull")}
        outputs = [str(tmp_path / "expected.safetensors"), str(tmp_path / "loaded.safetensors")]
        _run("pull", PULL_SCRIPT, outputs, pull_env, tmp_path)

        files = hub.files("user/drpo-tiny")
        requests = list(hub.requests)
        repo = hub.repo("user/drpo-tiny")

    # What was pushed: the adapter (through LFS, as on the Hub), the card with its grid, the config.
    assert {LORA_WEIGHT_NAME, "README.md", "samples.png", "drpo_config.json"} <= set(files)
    assert repo.head.files[LORA_WEIGHT_NAME].lfs and repo.head.files["samples.png"].lfs
    assert f"COMMIT {repo.head.oid}" in pushed.stdout
    card = ModelCard(files["README.md"].decode())
    assert card.data.to_dict()["library_name"] == "diffusers"
    assert "![samples](samples.png)" in card.text
    assert 'pipe.load_lora_weights("user/drpo-tiny")' in card.text
    assert "## Evaluation" in card.text
    assert json.loads(files["drpo_config.json"])["num_generations"] == 4

    # The token authenticated the writes and appears in no uploaded file.
    writes = [r for r in requests if r.method == "POST" and "/commit/" in r.path]
    assert writes and all(r.authorization == f"Bearer {SECRET}" for r in writes)
    for name, content in files.items():
        assert SECRET.encode() not in content, name

    # The fresh pipeline downloaded the adapter and renders exactly the tuned images.
    assert any(r.method == "GET" and r.path.endswith(f"/resolve/main/{LORA_WEIGHT_NAME}") for r in requests)
    expected, loaded = load_file(tmp_path / "expected.safetensors"), load_file(tmp_path / "loaded.safetensors")
    torch.testing.assert_close(loaded["loaded"], expected["tuned"], rtol=0, atol=1e-5)
    assert (loaded["loaded"] - loaded["base"]).abs().max() > 1e-4, "the adapter must change the images"


TRAIN_AND_PUSH_SCRIPT = """
import sys
from trl_drpo import DrPOTrainer
from kit import mean_brightness, tiny_drpo_config
from trl_drpo.tiny_pipelines import tiny_sd_pipeline

out, secret = sys.argv[1], sys.argv[2]
config = tiny_drpo_config(out, max_steps=2, save_strategy="steps", save_steps=1, push_to_hub=True,
                          hub_model_id="user/tiny", hub_token=secret, hub_strategy="checkpoint")
trainer = DrPOTrainer(tiny_sd_pipeline(), mean_brightness, config, train_dataset=["a red apple", "a blue car"])
trainer.train()
trainer.push_to_hub()
"""


@pytest.mark.slow
def test_pushes_during_training_carry_the_adapter_and_card_and_nothing_pickled_secret_or_local(tmp_path):
    out = tmp_path / "out"
    with FakeHub() as hub:
        base_env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "HUGGING"))}
        env = with_kit_on_path({**base_env, **hub.env(tmp_path / "hf_home", token=None), "OMP_NUM_THREADS": "1"})
        _run("train_and_push", TRAIN_AND_PUSH_SCRIPT, [str(out), SECRET], env, tmp_path)
        commits = list(hub.repo("user/tiny").commits)

    messages = [commit.message for commit in commits]
    assert {"Training in progress, step 1", "Training in progress, step 2"} <= set(messages)
    for commit in commits[1:]:  # every commit after the repo's creation is a loadable model with its card
        assert {LORA_WEIGHT_NAME, "README.md"} <= set(commit.files), commit.message
        for name, stored in commit.files.items():
            assert not name.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle")), name
            assert SECRET.encode() not in stored.content, name
            assert str(tmp_path).encode() not in stored.content, name
    assert f"last-checkpoint/{LORA_WEIGHT_NAME}" in commits[-1].files
    assert commits[-1].files[LORA_WEIGHT_NAME].content == (out / LORA_WEIGHT_NAME).read_bytes()  # the final push
    assert not list(out.rglob("training_args.bin"))


def test_a_readme_the_trainer_did_not_write_is_never_overwritten(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("# My project\n")
    with pytest.raises(FileExistsError, match=r"README.md exists and was not written by trl_drpo.*another output_dir"):
        DrPOTrainer(tiny_sd_pipeline(), mean_brightness, tiny_drpo_config(out), train_dataset=["a cat"])
    assert (out / "README.md").read_text() == "# My project\n"


def test_the_trainers_own_card_is_rewritten_on_the_next_save(tmp_path):
    config = tiny_drpo_config(tmp_path / "out", max_steps=1)
    trainer = DrPOTrainer(tiny_sd_pipeline(), mean_brightness, config, train_dataset=["a cat", "a dog"])
    trainer.save_model()
    trainer.create_model_card(sample_grid="samples.png")
    assert "samples.png" in (tmp_path / "out" / "README.md").read_text()


def test_saved_config_and_card_name_local_folders_without_their_paths(tmp_path):
    from diffusers import StableDiffusionPipeline

    tiny_sd_pipeline().save_pretrained(tmp_path / "my-base")
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "my-base")
    out = tmp_path / "private" / "out"
    config = tiny_drpo_config(out, max_steps=1)
    trainer = DrPOTrainer(pipe, mean_brightness, config, train_dataset=["a cat", "a dog"])
    trainer.save_model()
    for name in ("drpo_config.json", "README.md"):
        text = (out / name).read_text()
        assert str(tmp_path) not in text, name
    assert "my-base" in (out / "README.md").read_text()
    assert json.loads((out / "drpo_config.json").read_text())["output_dir"] == "out"
