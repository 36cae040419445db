"""Preference datasets for offline DrPO: rows of a prompt, a chosen image and a rejected image (docs/method.md §9).

Accepted forms, all turned into a `datasets.Dataset` with columns ``prompt``, ``chosen``, ``rejected`` and
``preference_id`` (the row's index, the key under which its encoded images are cached):

- a `datasets.Dataset` whose image columns hold PIL images (`datasets.Image` features) or ``{"bytes", "path"}``
  dicts;
- a local ``.parquet`` file (images as `datasets.Image` bytes, as `Dataset.to_parquet` writes them) or a
  ``.json``/``.jsonl``/``.csv`` file whose image columns hold file paths, relative to the file's folder or absolute;
- a Hub dataset id (with ``split`` and ``config_name``).

Every image is opened and converted to RGB once when the dataset is loaded, so that a missing, unreadable or
unconvertible image stops the run before any model works, with an error naming the row and the column.
"""

from __future__ import annotations

import io
import os
from typing import Any

from PIL import Image


CHOSEN_COLUMN = "chosen"
REJECTED_COLUMN = "rejected"
PREFERENCE_ID_COLUMN = "preference_id"
IMAGE_COLUMNS = (CHOSEN_COLUMN, REJECTED_COLUMN)
_TABLE_FORMATS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv"}


def is_preference_dataset(dataset: Any) -> bool:
    """Whether `dataset` (a `datasets.Dataset` / `IterableDataset`) has the ``chosen`` and ``rejected`` columns."""
    names = getattr(dataset, "column_names", None) or []
    return all(column in names for column in IMAGE_COLUMNS)


def to_rgb_image(value: Any, base_dir: str | None = None) -> Image.Image:
    """One dataset cell as an RGB PIL image: a PIL image, raw bytes, a ``{"bytes", "path"}`` dict (`datasets.Image`
    without decoding) or a file path (relative paths are taken from `base_dir`). Raises `ValueError` saying why."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        value = Image.open(io.BytesIO(value))
    elif isinstance(value, (str, os.PathLike)):
        path = os.fspath(value)
        if base_dir is not None and not os.path.isabs(path):
            path = os.path.join(base_dir, path)
        if not os.path.isfile(path):
            raise ValueError(f"no image file at {path!r}")
        value = Image.open(path)
    if not isinstance(value, Image.Image):
        raise ValueError(f"expected an image (PIL, bytes or a file path), got {type(value).__name__}")
    value.load()  # a truncated or corrupt file fails here, not in the middle of training
    return value.convert("RGB")


def load_preference_dataset(
    source: Any, prompt_column: str = "prompt", split: str = "train", config_name: str | None = None
) -> Any:
    """A checked preference `datasets.Dataset` from any accepted form (see the module docstring).

    Raises:
        ValueError: a column is missing, or a row's image is missing, unreadable or not convertible to RGB (the
            message names the row and the column).
    """
    import datasets

    base_dir = None
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        extension = os.path.splitext(path)[1].lower()
        if os.path.isfile(path) and extension in _TABLE_FORMATS:
            base_dir = os.path.dirname(os.path.abspath(path))
            source = datasets.load_dataset(_TABLE_FORMATS[extension], data_files=path, split="train")
        else:
            source = datasets.load_dataset(path, config_name, split=split)
    if not isinstance(source, datasets.Dataset):
        raise TypeError(
            f"A preference dataset must be a datasets.Dataset or a path/Hub id, got {type(source).__name__}."
        )
    missing = [column for column in (prompt_column, *IMAGE_COLUMNS) if column not in source.column_names]
    if missing:
        raise ValueError(
            f"The preference dataset has no {missing} column(s) (it has {source.column_names}): offline DrPO needs "
            f"{prompt_column!r}, {CHOSEN_COLUMN!r} and {REJECTED_COLUMN!r}."
        )
    # Read the cells undecoded, so that a bad file is reported by this check rather than by `datasets`.
    raw = source
    for column in IMAGE_COLUMNS:
        if isinstance(raw.features.get(column), datasets.Image):
            raw = raw.cast_column(column, datasets.Image(decode=False))
    for index, row in enumerate(raw.select_columns([prompt_column, *IMAGE_COLUMNS])):
        if not isinstance(row[prompt_column], str) or not row[prompt_column].strip():
            raise ValueError(f"Row {index} of the preference dataset has no prompt in {prompt_column!r}.")
        for column in IMAGE_COLUMNS:
            try:
                to_rgb_image(row[column], base_dir)
            except Exception as err:  # PIL raises many kinds; all mean the same to the user
                raise ValueError(
                    f"Row {index} of the preference dataset: its {column!r} image is unusable: {err}"
                ) from err
    if base_dir is not None:  # paths become absolute, so that rows can be read from anywhere later
        source = source.map(
            lambda row: {
                column: _absolute(row[column], base_dir) for column in IMAGE_COLUMNS if isinstance(row[column], str)
            }
        )
    if PREFERENCE_ID_COLUMN not in source.column_names:
        source = source.add_column(PREFERENCE_ID_COLUMN, list(range(len(source))))
    return source


def _absolute(path: str, base_dir: str) -> str:
    return path if os.path.isabs(path) else os.path.join(base_dir, path)


class PreferenceLatents:
    """The chosen and rejected images of preference rows as latents, each row encoded once by `encode` (e.g.
    `OneStepGenerator.encode_images`: a list of PIL images to `(N, C, h, w)` latents) and kept on the CPU."""

    def __init__(self, encode: Any) -> None:
        self._encode = encode
        self._cache: dict[int, tuple[Any, Any]] = {}

    def __len__(self) -> int:
        """Rows encoded so far."""
        return len(self._cache)

    def __call__(self, columns: dict[str, list[Any]]) -> tuple[Any, Any]:
        """`(chosen, rejected)` latents `(B, 1, C, h, w)` for a batch's `columns` (the dataset's columns as lists,
        `preference_id` among them)."""
        import torch

        pairs = []
        for row, chosen, rejected in zip(
            columns[PREFERENCE_ID_COLUMN], columns[CHOSEN_COLUMN], columns[REJECTED_COLUMN]
        ):
            if row not in self._cache:
                latents = self._encode([to_rgb_image(chosen), to_rgb_image(rejected)]).cpu()
                self._cache[row] = (latents[0], latents[1])
            pairs.append(self._cache[row])
        return tuple(torch.stack([pair[i] for pair in pairs])[:, None] for i in range(2))
