"""Prompt datasets (`trl_drpo.prompts.load_prompt_dataset`): lists, datasets and local files."""

from __future__ import annotations

import pytest
from datasets import Dataset

from trl_drpo.prompts import held_out_prompts, load_prompt_dataset


EXPECTED = ["a cat", "a red car", "ünïcödé prompt"]


@pytest.mark.parametrize(
    "content",
    [
        "a cat\na red car\nünïcödé prompt\n".encode(),
        "a cat\r\na red car\r\nünïcödé prompt\r\n".encode(),  # Windows line endings
        "a cat\ra red car\rünïcödé prompt".encode(),  # old Mac line endings, no final newline
        "\ufeffa cat\na red car\nünïcödé prompt\n".encode(),  # UTF-8 byte-order mark
        "a cat\r\nа red car\r\nünïcödé prompt".replace("а", "a").encode("utf-16"),  # UTF-16 with its mark
        "\n  a cat  \n\n\t\na red car\t\n   \nünïcödé prompt\n\n".encode(),  # blank lines, stray whitespace
    ],
    ids=["lf", "crlf", "cr", "utf8-bom", "utf16", "blank-lines"],
)
def test_a_text_file_gives_one_clean_prompt_per_line(tmp_path, content):
    path = tmp_path / "prompts.txt"
    path.write_bytes(content)
    assert load_prompt_dataset(str(path))["prompt"] == EXPECTED


def test_a_text_file_feeds_a_custom_prompt_column(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a cat\n")
    assert load_prompt_dataset(str(path), prompt_column="caption")["caption"] == ["a cat"]


@pytest.mark.parametrize("content", [b"", b"\n\n  \r\n", b"\xef\xbb\xbf\n"])
def test_a_file_without_prompts_is_a_clear_error_naming_it(tmp_path, content):
    path = tmp_path / "empty.txt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"'.*empty.txt' is empty: it holds no prompts"):
        load_prompt_dataset(str(path))


def test_a_file_that_is_not_text_is_a_clear_error_naming_it(tmp_path):
    path = tmp_path / "binary.txt"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\xfa")
    with pytest.raises(ValueError, match=r"'.*binary.txt' is not UTF-8 text"):
        load_prompt_dataset(str(path))


def test_a_csv_file_without_the_prompt_column_names_it_and_the_fix(tmp_path):
    path = tmp_path / "prompts.csv"
    path.write_text("caption\na cat\n")
    with pytest.raises(ValueError, match=r"'.*prompts.csv' has no column 'prompt'.*prompt_column"):
        load_prompt_dataset(str(path))


def test_lists_and_datasets_pass_through():
    assert load_prompt_dataset(["a", "b"])["prompt"] == ["a", "b"]
    dataset = Dataset.from_dict({"prompt": ["x"]})
    assert load_prompt_dataset(dataset) is dataset


def test_held_out_prompts_come_from_the_dataset_when_named_else_from_the_list(tmp_path):
    path = tmp_path / "held_out.txt"
    path.write_text("a house\na tree\na boat\n")
    dataset, prompts = held_out_prompts(str(path), ["ignored"], max_prompts=2)
    assert prompts == ["a house", "a tree"] and len(dataset) == 2
    assert held_out_prompts(None, ["a cat", "a dog"], max_prompts=1) == (None, ["a cat"])
    assert held_out_prompts(None, None) == (None, [])
