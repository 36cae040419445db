"""Prompt datasets: from a list, a `datasets` dataset, a local file or a Hub dataset id."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from datasets import Dataset, IterableDataset, load_dataset


_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
_BOMS = (("utf-8-sig", b"\xef\xbb\xbf"), ("utf-32", b"\xff\xfe\x00\x00"), ("utf-32", b"\x00\x00\xfe\xff"))
_BOMS += (("utf-16", b"\xff\xfe"), ("utf-16", b"\xfe\xff"))


def read_prompt_lines(path: str) -> list[str]:
    """The prompts of a text file, one per line: a byte-order mark (UTF-8/16/32) honoured, any line ending (LF,
    CRLF, CR), surrounding whitespace stripped, blank lines dropped. Undecodable bytes raise a `ValueError` naming
    the file."""
    with open(path, "rb") as handle:
        raw = handle.read()
    encoding = next((name for name, bom in _BOMS if raw.startswith(bom)), "utf-8")
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as err:
        raise ValueError(f"Prompt file {path!r} is not UTF-8 text ({err}); save it as UTF-8.") from err
    return [line.strip() for line in text.lstrip("\ufeff").splitlines() if line.strip()]


def load_prompt_dataset(
    source: str | Sequence[str] | Dataset | IterableDataset,
    *,
    prompt_column: str = "prompt",
    split: str = "train",
    config_name: str | None = None,
) -> Dataset | IterableDataset:
    """Return a dataset whose rows hold a ``prompt_column`` of strings.

    ``source`` may be a list of strings, a `datasets.Dataset` / `IterableDataset`, a local file (``.txt`` with one
    prompt per line, ``.json``, ``.jsonl``, ``.csv``, ``.parquet``), a local directory or a Hub dataset id. Raises a
    `ValueError` naming the fix when the dataset is empty or has no such column.
    """
    if isinstance(source, (Dataset, IterableDataset)):
        dataset = source
    elif isinstance(source, str):
        extension = os.path.splitext(source)[1].lower()
        if os.path.isfile(source) and extension == ".txt":
            dataset = Dataset.from_dict({prompt_column: read_prompt_lines(source)})
        elif os.path.isfile(source) and extension in _FILE_BUILDERS:
            dataset = load_dataset(_FILE_BUILDERS[extension], data_files={split: source}, split=split)
        elif os.path.isfile(source):
            raise ValueError(f"Unsupported prompt file {source!r}: use one of {sorted(_FILE_BUILDERS)}.")
        else:
            dataset = load_dataset(source, config_name, split=split)
    elif isinstance(source, Sequence):
        prompts = list(source)
        if not all(isinstance(p, str) for p in prompts):
            raise ValueError("A list of prompts must hold strings only.")
        dataset = Dataset.from_dict({prompt_column: prompts})
    else:
        raise TypeError(
            f"Cannot read prompts from {type(source).__name__}: pass a list of strings, a datasets.Dataset, a local "
            "file or a dataset id."
        )
    check_prompt_dataset(dataset, prompt_column, source if isinstance(source, str) else None)
    return dataset


def check_prompt_dataset(dataset: Dataset | IterableDataset, prompt_column: str, name: str | None = None) -> None:
    """Raise a clear `ValueError` if ``dataset`` (read from ``name``, when given) is empty or lacks the prompt
    column."""
    what = f"The prompt dataset {name!r}" if name else "The prompt dataset"
    columns = dataset.column_names
    if columns is not None and prompt_column not in columns:
        raise ValueError(
            f"{what} has no column {prompt_column!r} (columns: {columns}). Set `prompt_column` in "
            "DrPOConfig to the column that holds the prompts."
        )
    empty = (isinstance(dataset, Dataset) and len(dataset) == 0) or (
        isinstance(dataset, IterableDataset) and next(iter(dataset.take(1)), None) is None
    )
    if empty:
        raise ValueError(f"{what} is empty: it holds no prompts, and DrPO needs at least one to train on.")


class PromptCollator:
    """Collate rows into ``{"prompt": [...], <column>: [...]}``, renaming the prompt column to ``prompt``."""

    def __init__(self, prompt_column: str = "prompt") -> None:
        self.prompt_column = prompt_column

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
        batch = {key: [row[key] for row in rows] for key in rows[0]}
        batch["prompt"] = batch.pop(self.prompt_column)
        return batch


def held_out_prompts(
    dataset_name: str | None,
    prompts: Sequence[str] | None = None,
    prompt_column: str = "prompt",
    split: str = "test",
    max_prompts: int | None = None,
) -> tuple[Dataset | None, list[str]]:
    """The held-out evaluation prompts of a run: the first `max_prompts` (all when None) rows of the prompt dataset
    `dataset_name` (anything `load_prompt_dataset` takes) when given, else of the list `prompts`.

    Returns `(dataset, prompts)`: the `Dataset` (None when the prompts came from the list) and the prompts as strings.
    """
    if dataset_name:
        dataset = load_prompt_dataset(dataset_name, prompt_column=prompt_column, split=split)
        if max_prompts is not None:
            dataset = dataset.select(range(min(max_prompts, len(dataset))))
        return dataset, [row[prompt_column] for row in dataset]
    return None, list(prompts or [])[:max_prompts]
