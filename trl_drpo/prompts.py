"""Prompt datasets: from a list, a `datasets` dataset, a local file or a Hub dataset id."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from datasets import Dataset, IterableDataset, load_dataset


_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


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
        if os.path.isfile(source) and extension in _FILE_BUILDERS:
            builder = _FILE_BUILDERS[extension]
            dataset = load_dataset(builder, data_files={split: source}, split=split)
            if builder == "text":
                dataset = dataset.filter(lambda row: bool(row["text"].strip()))
                dataset = dataset.rename_column("text", prompt_column)
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
    check_prompt_dataset(dataset, prompt_column)
    return dataset


def check_prompt_dataset(dataset: Dataset | IterableDataset, prompt_column: str) -> None:
    """Raise a clear `ValueError` if ``dataset`` is empty or lacks the prompt column."""
    columns = dataset.column_names
    if columns is not None and prompt_column not in columns:
        raise ValueError(
            f"The prompt dataset has no column {prompt_column!r} (columns: {columns}). Set `prompt_column` in "
            "DrPOConfig to the column that holds the prompts."
        )
    if isinstance(dataset, Dataset) and len(dataset) == 0:
        raise ValueError("The prompt dataset is empty: DrPO needs at least one prompt to train on.")
    if isinstance(dataset, IterableDataset) and next(iter(dataset.take(1)), None) is None:
        raise ValueError("The prompt dataset is empty: DrPO needs at least one prompt to train on.")


class PromptCollator:
    """Collate rows into ``{"prompt": [...], <column>: [...]}``, renaming the prompt column to ``prompt``."""

    def __init__(self, prompt_column: str = "prompt") -> None:
        self.prompt_column = prompt_column

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
        batch = {key: [row[key] for row in rows] for key in rows[0]}
        batch["prompt"] = batch.pop(self.prompt_column)
        return batch
