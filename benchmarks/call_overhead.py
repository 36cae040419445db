"""What the pipeline's own call costs over the hand-written one-step path, for SD-family pipelines.

`trl_drpo` generates candidates through the pipeline's undecorated `__call__` (the reference for every family) and,
for SD/SDXL with the plain one-step call and an Euler/DDIM scheduler, through a hand-written copy of the scheduler's
step that skips the call's input checks, device lookups and scheduler set-up. This measures both on the same
prompts and noise, forward with gradient (as the one-graph training step runs it) and without, and reports the
median seconds per call and the difference per call:

    python -m benchmarks.call_overhead

writes `benchmarks/results/call_overhead.json` and prints a markdown table. One torch thread, median of `--repeats`
after a warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.common import machine_info, markdown_table, time_call, torch_threads


RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "call_overhead.json")


def _pipelines() -> dict[str, Callable[[], Any]]:
    from trl_drpo.tiny_pipelines import tiny_sd_pipeline, tiny_sdxl_pipeline
    from trl_drpo.worlds.digits import load_pipeline

    return {"tiny SD (32 px)": tiny_sd_pipeline, "tiny SDXL (32 px)": tiny_sdxl_pipeline, "digit world": load_pipeline}


def measure(pipe: Any, batch: int = 16, repeats: int = 7) -> dict[str, float]:
    """Median seconds per `one_step` of `batch` candidates: fast path and generic call, with and without gradient."""
    from trl_drpo.generators import OneStepGenerator

    gen = OneStepGenerator.from_pipeline(pipe)
    if gen.fast_step(gen.device) is None:
        raise ValueError(f"{type(pipe).__name__} with {type(pipe.scheduler).__name__} has no hand-written fast path.")
    gen.add_lora(rank=4, alpha=4)
    embeds = gen.encode_prompts(["a 7"] * batch)
    noise = gen.make_noise(batch, torch.Generator().manual_seed(0))
    paths = {
        "fast": lambda: gen.one_step(gen.denoiser, embeds, noise),
        # The family-independent path: the pipeline's own call, as for every pipeline without a fast path.
        "call": lambda: OneStepGenerator.one_step(gen, gen.denoiser, embeds, noise, torch.Generator().manual_seed(0)),
    }
    torch.testing.assert_close(paths["fast"](), paths["call"](), rtol=0, atol=1e-5)  # the same computation
    out: dict[str, float] = {}
    for grad in (True, False):
        for name, fn in paths.items():
            with torch.set_grad_enabled(grad):
                fn()  # warm-up
                seconds = [time_call(fn) for _ in range(repeats)]
            out[f"{name}_{'grad' if grad else 'no_grad'}_s"] = statistics.median(seconds)
    for mode in ("grad", "no_grad"):
        out[f"overhead_{mode}_ms"] = 1e3 * (out[f"call_{mode}_s"] - out[f"fast_{mode}_s"])
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the measurement on every pipeline, write the JSON (unless `--no-save`) and print the table."""
    parser = argparse.ArgumentParser(description="Generic pipeline call vs the hand-written one-step path.")
    parser.add_argument("--batch", type=int, default=16, help="Candidates per call.")
    parser.add_argument("--repeats", type=int, default=7, help="Timed calls per path (median reported).")
    parser.add_argument("--no-save", action="store_true", help="Print only; do not write the results file.")
    args = parser.parse_args(argv)
    rows: dict[str, dict[str, float]] = {}
    with torch_threads(1):
        for name, build in _pipelines().items():
            rows[name] = measure(build(), batch=args.batch, repeats=args.repeats)
    table = markdown_table(
        ["pipeline", "fast path, grad (ms)", "call, grad (ms)", "overhead (ms)", "fast, no grad", "call, no grad"],
        [
            [
                name,
                f"{1e3 * r['fast_grad_s']:.1f}",
                f"{1e3 * r['call_grad_s']:.1f}",
                f"{r['overhead_grad_ms']:+.1f}",
                f"{1e3 * r['fast_no_grad_s']:.1f}",
                f"{1e3 * r['call_no_grad_s']:.1f}",
            ]
            for name, r in rows.items()
        ],
    )
    result = {"machine": machine_info(), "batch": args.batch, "repeats": args.repeats, "rows": rows, "table": table}
    if not args.no_save:
        with open(RESULTS, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=1)
    print(table)
    return result


if __name__ == "__main__":
    main()
