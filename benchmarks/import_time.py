"""How long importing `trl_drpo` takes, against importing only the libraries it cannot start without.

Each statement runs in a fresh interpreter (nothing cached in the process), `--repeats` times; the median wall-clock
is reported, with the share of it that `trl_drpo`'s own modules take (from `python -X importtime`):

    python -m benchmarks.import_time

writes `benchmarks/results/import_time.json` and prints a markdown table. The floor is what a Trainer-based diffusers
trainer imports anyway: torch, transformers' `Trainer` (which itself imports peft, bitsandbytes where installed, and
datasets), diffusers' pipelines and peft.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

from benchmarks.common import machine_info, markdown_table


RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "import_time.json")

STATEMENTS = {
    "the floor: torch, transformers.Trainer, diffusers' StableDiffusionPipeline, peft, datasets": (
        "import torch, peft, datasets; from transformers import Trainer; from diffusers import StableDiffusionPipeline"
    ),
    "from trl_drpo import DrPOConfig": "from trl_drpo import DrPOConfig",
    "from trl_drpo import DrPOTrainer": "from trl_drpo import DrPOTrainer",
    "import trl_drpo.drift, trl_drpo.objective, trl_drpo.ranking (the pure math)": (
        "import trl_drpo.drift, trl_drpo.objective, trl_drpo.ranking"
    ),
}


def own_share(statement: str) -> float:
    """Seconds of `statement`'s import spent in `trl_drpo`'s own modules (their self time, `-X importtime`)."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", statement], capture_output=True, text=True, check=True
    )
    total = 0
    for line in result.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        self_us, _, name = line[len("import time:") :].split("|")
        if name.strip().startswith("trl_drpo") and self_us.strip().isdigit():
            total += int(self_us)
    return total / 1e6


def measure(statement: str, repeats: int) -> dict[str, float]:
    """Median wall-clock seconds of a fresh interpreter running `statement`, and `trl_drpo`'s own share."""
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", statement], capture_output=True, check=True)
        seconds.append(time.perf_counter() - start)
    return {"seconds": statistics.median(seconds), "trl_drpo_seconds": own_share(statement)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=RESULTS, help="Where to write the JSON results.")
    args = parser.parse_args(argv)
    rows = {label: measure(statement, args.repeats) for label, statement in STATEMENTS.items()}
    report = {"machine": machine_info(), "repeats": args.repeats, "imports": rows}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    table = [[label, f"{r['seconds']:.2f}", f"{r['trl_drpo_seconds']:.2f}"] for label, r in rows.items()]
    print(markdown_table(["import", "seconds (median)", "of which trl_drpo's own modules"], table))
    return report


if __name__ == "__main__":
    main()
