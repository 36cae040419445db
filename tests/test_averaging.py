"""The moving average of the trained weights (`DrPOConfig.use_ema`, `trl_drpo.averaging`)."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch
from transformers import TrainerCallback

from trl_drpo import DrPOConfig, DrPOTrainer
from trl_drpo.averaging import EMA_DIR, WeightAverage
from trl_drpo.hub import LORA_WEIGHT_NAME, CheckpointPushCallback
from trl_drpo.tiny_pipelines import tiny_sd_pipeline

from kit import lora_state, mean_brightness, straight_and_resumed_runs, tiny_drpo_config


PROMPTS = ["a red apple", "a blue car"]


def set_weight(layer: torch.nn.Linear, value: float) -> None:
    with torch.no_grad():
        layer.weight.fill_(value)


def test_the_average_is_the_plain_mean_over_its_first_horizon_then_exponential():
    layer = torch.nn.Linear(1, 1, bias=False)
    average = WeightAverage(layer, decay=0.5)  # horizon 1 / (1 - 0.5) = 2 updates
    for value in (2.0, 4.0):
        set_weight(layer, value)
        average.step()
    with average.applied():
        assert layer.weight.item() == pytest.approx(3.0)  # (2 + 4) / 2
    set_weight(layer, 7.0)
    average.step()
    with average.applied():
        assert layer.weight.item() == pytest.approx(0.5 * 3.0 + 0.5 * 7.0)
    assert average.num_updates == 3


def test_applied_puts_the_trained_weights_back_even_after_an_error():
    layer = torch.nn.Linear(1, 1, bias=False)
    average = WeightAverage(layer, decay=0.9)
    set_weight(layer, 1.0)
    average.step()
    set_weight(layer, 5.0)
    with pytest.raises(RuntimeError), average.applied():
        assert layer.weight.item() == pytest.approx(1.0)
        raise RuntimeError("evaluation failed")
    assert layer.weight.item() == 5.0


def test_only_trainable_parameters_are_averaged():
    model = torch.nn.Sequential(torch.nn.Linear(1, 1), torch.nn.Linear(1, 1))
    model[0].requires_grad_(False)
    assert WeightAverage(model, decay=0.9).names == ["1.weight", "1.bias"]


def safetensors_io(model: torch.nn.Module):
    """A model's weights written to and read from ``folder/model.safetensors``, as a trainer's saving would."""
    from safetensors.torch import load_model, save_model

    def write(folder: str) -> None:
        save_model(model, os.path.join(folder, "model.safetensors"))

    def read(folder: str) -> None:
        load_model(model, os.path.join(folder, "model.safetensors"))

    return write, read


def test_the_saved_average_loads_back_with_its_update_count_and_leaves_the_models_weights(tmp_path):
    layer = torch.nn.Linear(2, 2)
    average = WeightAverage(layer, decay=0.9)
    for _ in range(3):
        set_weight(layer, torch.rand(()).item())
        average.step()
    write, _ = safetensors_io(layer)
    average.save(str(tmp_path), write)
    other = torch.nn.Linear(2, 2)
    own = {name: value.clone() for name, value in other.state_dict().items()}
    restored = WeightAverage(other, decay=0.9)
    assert restored.load(str(tmp_path), safetensors_io(other)[1]) and restored.num_updates == 3
    for mine, theirs in zip(restored.ema.shadow_params, average.ema.shadow_params):
        torch.testing.assert_close(mine, theirs)
    assert all(torch.equal(other.state_dict()[name], value) for name, value in own.items())


def test_the_average_is_saved_the_way_the_model_is_saved(tmp_path):
    layer = torch.nn.Linear(1, 1, bias=False)
    average = WeightAverage(layer, decay=0.5)
    for value in (2.0, 4.0):
        set_weight(layer, value)
        average.step()
    average.save(str(tmp_path), safetensors_io(layer)[0])
    from safetensors.torch import load_file

    assert load_file(os.path.join(tmp_path, EMA_DIR, "model.safetensors"))["weight"].item() == pytest.approx(3.0)
    assert layer.weight.item() == 4.0


def test_a_folder_without_an_average_loads_nothing(tmp_path):
    layer = torch.nn.Linear(2, 2)
    assert not WeightAverage(layer, decay=0.9).load(str(tmp_path), safetensors_io(layer)[1])


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.5, 1.5])
def test_an_ema_decay_outside_zero_one_is_rejected_naming_the_range(tmp_path, decay):
    with pytest.raises(ValueError, match=r"ema_decay must be in \(0, 1\)"):
        DrPOConfig(output_dir=str(tmp_path), ema_decay=decay)


class RecordWeights(TrainerCallback):
    """The LoRA weights after each optimizer update."""

    def __init__(self) -> None:
        self.states: list[dict[str, torch.Tensor]] = []
        self.trainer = None

    def on_step_end(self, args, state, control, **kwargs):
        self.states.append(lora_state(self.trainer))


def test_after_training_the_model_and_the_saved_adapter_hold_the_average(tmp_path):
    from safetensors.torch import load_file

    config = tiny_drpo_config(tmp_path / "out", max_steps=3, use_ema=True, ema_decay=0.9)
    record = RecordWeights()
    trainer = DrPOTrainer(tiny_sd_pipeline(), mean_brightness, config, train_dataset=PROMPTS, callbacks=[record])
    record.trainer = trainer
    trainer.train()
    final = lora_state(trainer)
    for name in final:  # three updates, within the horizon of ten: the plain mean
        mean = torch.stack([state[name] for state in record.states]).mean(dim=0)
        torch.testing.assert_close(final[name], mean)
    assert any(not torch.equal(final[name], record.states[-1][name]) for name in final)
    trainer.save_model(config.output_dir)
    saved = load_file(os.path.join(config.output_dir, LORA_WEIGHT_NAME))
    assert sum(tensor.numel() for tensor in saved.values()) == sum(tensor.numel() for tensor in final.values())


def test_evaluation_during_training_renders_the_average_and_puts_the_trained_weights_back(tmp_path):
    config = tiny_drpo_config(tmp_path / "out", max_steps=2, use_ema=True, eval_prompts=["a red apple"])
    trainer = DrPOTrainer(tiny_sd_pipeline(), mean_brightness, config, train_dataset=PROMPTS)
    seen: list[dict[str, torch.Tensor]] = []
    original = trainer._score

    def spy(prompts, adapter):
        seen.append(lora_state(trainer))
        return original(prompts, adapter)

    trainer._score = spy
    trainer.train()  # the model now holds the average of the two updates' weights
    trained = lora_state(trainer)
    with trainer.ema_weights():
        averaged = lora_state(trainer)
    assert all(torch.equal(averaged[name], trained[name]) for name in trained)
    trainer.evaluate()
    assert all(torch.equal(seen[0][name], averaged[name]) for name in trained)
    assert all(torch.equal(lora_state(trainer)[name], trained[name]) for name in trained)


def test_a_checkpoint_holds_the_average_and_resuming_from_it_equals_the_uninterrupted_run(tmp_path):
    straight, resumed = straight_and_resumed_runs(tmp_path, PROMPTS, use_ema=True, ema_decay=0.5)
    assert os.path.isfile(os.path.join(resumed.args.output_dir, "checkpoint-2", EMA_DIR, LORA_WEIGHT_NAME))
    expected, actual = lora_state(straight), lora_state(resumed)
    for name in expected:  # tolerance: float32 round-off only
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-6)


def test_a_checkpoints_average_is_an_adapter_that_diffusers_loads(tmp_path):
    from safetensors.torch import load_file

    config = tiny_drpo_config(tmp_path, max_steps=2, save_strategy="steps", save_steps=2, use_ema=True)
    trainer = DrPOTrainer(tiny_sd_pipeline(), mean_brightness, config, train_dataset=PROMPTS)
    trainer.train()
    trainer.save_model(config.output_dir)  # the average of both updates, as is the checkpoint's copy of it
    averaged = os.path.join(tmp_path, "checkpoint-2", EMA_DIR)
    final = load_file(os.path.join(tmp_path, LORA_WEIGHT_NAME))
    copy = load_file(os.path.join(averaged, LORA_WEIGHT_NAME))
    assert final.keys() == copy.keys() and all(torch.equal(final[key], copy[key]) for key in final)
    pipe = tiny_sd_pipeline()
    pipe.load_lora_weights(averaged)
    assert pipe.get_active_adapters()


def test_pushes_during_training_carry_the_checkpoints_average(tmp_path, monkeypatch):
    checkpoint = tmp_path / "checkpoint-3"
    (checkpoint / EMA_DIR).mkdir(parents=True)
    pushed: list[tuple[str, str | None]] = []
    monkeypatch.setattr(
        "trl_drpo.hub.upload_model_files", lambda folder, **kw: pushed.append((folder, kw.get("path_in_repo")))
    )
    trainer = SimpleNamespace(hub_model_id="user/tiny")
    args = SimpleNamespace(output_dir=str(tmp_path), hub_token=None, hub_revision=None)
    state = SimpleNamespace(is_world_process_zero=True, global_step=3)
    CheckpointPushCallback(trainer, "checkpoint").on_save(args, state, None)
    assert pushed == [(str(checkpoint / EMA_DIR), None), (str(checkpoint / EMA_DIR), "last-checkpoint")]


def test_only_the_cards_of_averaged_weights_say_they_are_the_average(tmp_path):
    config = tiny_drpo_config(tmp_path, max_steps=2, save_strategy="steps", save_steps=2, use_ema=True)
    trainer = DrPOTrainer(tiny_sd_pipeline(), mean_brightness, config, train_dataset=PROMPTS)
    trainer.train()
    trainer.save_model()  # the model holds the average once training has ended

    def card(*folder: str) -> str:
        return " ".join(open(os.path.join(tmp_path, *folder, "README.md"), encoding="utf-8").read().split())

    assert "moving average" not in card("checkpoint-2")  # the trained weights, which training resumes from
    assert "are a moving average of the trained weights" in card("checkpoint-2", EMA_DIR)
    assert "are a moving average of the trained weights" in card()


@pytest.mark.parametrize(
    "saved_with_ema, resumed_with_ema, warning",
    [
        (False, True, "saved without use_ema"),  # the average starts at the resumed weights
        (True, False, "use_ema is off"),  # the checkpoint's average is not continued
    ],
)
def test_resuming_across_a_change_of_use_ema_warns_what_becomes_of_the_average(
    tmp_path, caplog, saved_with_ema, resumed_with_ema, warning
):
    common = dict(save_strategy="steps", save_steps=2, max_steps=2)
    config = tiny_drpo_config(tmp_path, **common, use_ema=saved_with_ema)
    DrPOTrainer(tiny_sd_pipeline(), mean_brightness, config, train_dataset=PROMPTS).train()
    config = tiny_drpo_config(tmp_path, **{**common, "max_steps": 3, "use_ema": resumed_with_ema})
    resumed = DrPOTrainer(tiny_sd_pipeline(), mean_brightness, config, train_dataset=PROMPTS)
    resumed.train(resume_from_checkpoint=os.path.join(tmp_path, "checkpoint-2"))
    assert warning in caplog.text
