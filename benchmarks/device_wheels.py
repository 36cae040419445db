"""Fetch the wheels a bare CUDA machine needs to run the GPU benchmarks, at the versions installed here.

A GPU machine with PyTorch but no network (and no diffusers or datasets) can run `benchmarks.run_all --only gpu` once
these wheels are installed next to its own torch; they are pure Python (or abi3) and pinned to this environment's
versions, so both machines run the same library code:

    .venv/bin/python -m benchmarks.device_wheels    # here: writes .whl/ (git-ignored), about 26 MB
    bash benchmarks/gpu_device.sh                   # there, from the repository root, with .whl/ copied along

then copy the `gpu.json` it writes to `benchmarks/results/` and run `make bench` here: the tables take their GPU
parts from it.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path


PACKAGES = (
    "diffusers",
    "importlib_metadata",
    "transformers",
    "tokenizers",
    "regex",
    "peft",
    "accelerate",
    "safetensors",
    "datasets",
    "dill",
    "multiprocess",
    "fsspec",
)
"""What `trl_drpo` and `benchmarks` import beyond what a PyTorch image has (torch, numpy, pillow, pandas, pyarrow,
huggingface_hub >= 1.32, ...), with the pinned requirements transformers, diffusers and datasets check at import.
huggingface_hub stays the machine's own: the benchmarks never reach the Hub, and its 2.x needs packages such an image
lacks."""

PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")


def pinned(packages: Sequence[str] = PACKAGES) -> list[str]:
    """`name==version` for each package, at the version installed in this environment."""
    return [f"{name}=={version(name)}" for name in packages]


def download_command(dest: Path, python_version: str, packages: Sequence[str] = PACKAGES) -> list[str]:
    """The `pip download` command for binary wheels of `packages` for CPython `python_version` on x86-64 Linux."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(dest)]
    command += ["--python-version", python_version, "--implementation", "cp"]
    for platform in PLATFORMS:
        command += ["--platform", platform]
    return command + pinned(packages)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dest", type=Path, default=Path(".whl"), help="output folder (default .whl)")
    parser.add_argument("--python-version", default="3.12", help="the GPU machine's Python (default 3.12)")
    args = parser.parse_args(argv)
    subprocess.run(download_command(args.dest, args.python_version), check=True)
    print(f"wheels for Python {args.python_version} in {args.dest}/")


if __name__ == "__main__":
    main()
