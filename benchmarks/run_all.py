"""Run every benchmark, check the issue's targets, and write `results/results.json` and `results/summary.md`.

    .venv/bin/python -m benchmarks.run_all                  # full run (a few minutes on 2 CPU cores)
    .venv/bin/python -m benchmarks.run_all --update-readme  # ... and paste the summary into benchmarks/README.md
    .venv/bin/python -m benchmarks.run_all --quick          # tiny architectures everywhere (smoke run, seconds)

GPU parts run where CUDA is available and are reported as skipped otherwise.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from . import cost, scaling
from .common import COMPONENTS, machine_info, markdown_table, tera


RESULTS_DIR = Path(__file__).resolve().parent / "results"
README = Path(__file__).resolve().parent / "README.md"
GPU_RESULTS = RESULTS_DIR / "gpu.json"
"""The GPU parts measured on a GPU machine (`--only gpu`), used by runs on machines without CUDA."""
README_START = "<!-- results:start -->"
README_END = "<!-- results:end -->"

FLOPS_RATIO_TARGET = 3.5
FAST_RATIO_TARGET = 3.51  # the "fast" preset against the paper's checkpointing DRaFT (issue 14)
MATCHED_PAIRS = (
    ("drpo", "draft"),
    ("drpo-chunk8", "draft"),
    ("drpo-paper", "draft-paper"),
    ("drpo-tinyvae", "draft"),
    ("drpo-224", "draft"),
    ("drpo-fast", "draft"),
    ("drpo-fast", "draft-paper"),
)
"""(DrPO method, DRaFT method) pairs whose FLOPs ratio is a target row."""
FIELD_SHARE_TARGET = 0.02
MEMORY_FLAT_TARGET = 0.10


# ----------------------------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------------------------


def _stage(log: Any) -> Any:
    def stage(name: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        tick = time.perf_counter()
        value = fn(*args, **kwargs)
        log(f"[run_all] {name}: {time.perf_counter() - tick:.1f}s")
        return value

    return stage


def run(quick: bool = False, log: Any = print, gpu_results: Path | None = GPU_RESULTS) -> dict[str, Any]:
    """All measurements as one JSON-ready dict. `quick` uses tiny architectures and fewer sizes (for tests).

    Without CUDA here, the GPU parts come from `gpu_results` (written by ``--only gpu`` on a GPU machine) if that
    file exists; they keep the GPU machine's description.
    """
    start = time.perf_counter()
    results: dict[str, Any] = {"machine": machine_info(), "quick": quick}
    stage = _stage(log)
    grid = (("sd-turbo", ("drpo", "draft")),) if quick else cost.DEFAULT_FLOP_GRID
    results["flops"] = stage("FLOPs per update (meta)", cost.update_flops, grid=grid, tiny=quick)
    results["cpu_tiny"] = stage(
        "CPU wall-clock and memory (tiny)",
        cost.cpu_tiny,
        k=8 if quick else cost.NUM_GENERATIONS,
        repeats=1 if quick else 3,
        rewards=("pickscore",) if quick else cost.REWARDS,
    )
    field = stage(
        "field scaling",
        scaling.field_scaling,
        ks=(8, 16) if quick else scaling.FIELD_KS,
        tokens=(1, 4) if quick else scaling.FIELD_TOKENS,
        repeats=1 if quick else 3,
        tiny=quick,
    )
    field["share_of_update"] = _field_shares(results["flops"], field)
    results["field"] = field
    ks = (8, 16) if quick else scaling.MEMORY_KS
    results["memory_cpu"] = stage("memory vs K (CPU, tiny)", scaling.memory_vs_k_cpu, ks=ks)
    results["memory_meta"] = stage("memory vs K (meta, real size)", scaling.memory_vs_k_meta, ks=ks, tiny=quick)
    if torch.cuda.is_available() or gpu_results is None or not gpu_results.is_file():
        results.update(run_gpu(log, ks=ks))
    else:
        results.update(load_gpu_results(gpu_results))
        log(f"[run_all] GPU parts from {gpu_results}")
    results["targets"] = evaluate_targets(results)
    results["elapsed_seconds"] = round(time.perf_counter() - start, 1)
    return results


def run_gpu(
    log: Any = print,
    ks: Sequence[int] = scaling.MEMORY_KS,
    on_part: Any = None,
    real_size_kwargs: Mapping[str, Any] | None = None,
    memory_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The GPU parts only (real-size update time and memory, memory vs K); each says "skipped" without CUDA.

    `on_part(results)` is called after each part, so that a run cut short still leaves what it measured. The
    kwargs go to `cost.gpu_real_size` and `scaling.memory_vs_k_gpu` (`device="cpu", tiny=True` for tests).
    """
    stage = _stage(log)
    results: dict[str, Any] = {}
    results["gpu_real_size"] = stage("GPU real size", cost.gpu_real_size, **(real_size_kwargs or {}))
    if on_part is not None:
        on_part(results)
    results["memory_gpu"] = stage("memory vs K (GPU)", scaling.memory_vs_k_gpu, ks=ks, **(memory_kwargs or {}))
    if on_part is not None:
        on_part(results)
    return results


def write_gpu(path: Path, **run_kwargs: Any) -> Path:
    """Run the GPU parts and write them with this machine's description to `path`, after each part."""
    machine = machine_info()
    path.parent.mkdir(parents=True, exist_ok=True)

    def save(results: Mapping[str, Any]) -> None:
        path.write_text(json.dumps({"machine": machine, **results}, indent=2) + "\n")

    save(run_gpu(on_part=save, **run_kwargs))
    return path


def load_gpu_results(path: Path) -> dict[str, Any]:
    """The GPU parts of a ``--only gpu`` run, each tagged with the machine that measured them."""
    saved = json.loads(path.read_text())
    return {key: {**saved[key], "machine": saved["machine"]} for key in ("gpu_real_size", "memory_gpu")}


def _drpo_row(flops: Mapping[str, Any], pipeline: str, reward: str, method: str = "drpo") -> Mapping[str, Any] | None:
    for row in flops["rows"]:
        if (row["pipeline"], row["reward"], row["method"]) == (pipeline, reward, method):
            return row
    return None


def _field_shares(flops: Mapping[str, Any], field: Mapping[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Field share of an SD-Turbo DrPO update vs K, for each reward (per-image cost from the FLOP rows)."""
    shares = {}
    for reward in cost.REWARDS:
        row = _drpo_row(flops, field["setting"]["pipeline"], reward)
        if row is None:
            continue
        per_update = row["flops_per_update"]
        per_image = (per_update["total"] - per_update["field"]) / cost.IMAGES_PER_UPDATE
        shares[reward] = scaling.field_share(field["vs_k"], per_image)
    return shares


# ----------------------------------------------------------------------------------------------------------------
# Targets
# ----------------------------------------------------------------------------------------------------------------


def evaluate_targets(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each with its number and whether it is met (`None`: reported, no threshold)."""
    flops = results["flops"]
    checks: list[dict[str, Any]] = []
    for row in flops["rows"]:
        if cost.METHODS[row["method"]]["family"] != "drpo":
            continue
        for draft, ratio in row["ratio_vs"].items():
            if (row["method"], draft) not in MATCHED_PAIRS:
                continue
            fast = (row["method"], draft) == ("drpo-fast", "draft-paper")
            target = FAST_RATIO_TARGET if fast else FLOPS_RATIO_TARGET
            hps = row["reward"] == "hpsv3"
            checks.append(
                {
                    "target": f"FLOPs per update, DRaFT / DrPO >= {target}" if hps else "FLOPs ratio",
                    "case": f"{row['pipeline']}, {row['reward']}, {draft} / {row['method']}",
                    "value": ratio,
                    "met": ratio >= target if hps else None,
                }
            )
        share = row["features_field_share"]
        checks.append(
            {
                "target": f"features + field <= {FIELD_SHARE_TARGET:.0%} of an update (K=24)",
                "case": f"{row['pipeline']}, {row['reward']}, {row['method']} "
                f"({cost.METHODS[row['method']]['feature_map']} features; forward + feature backward + field)",
                "value": share["with_feature_backward"],
                "met": share["with_feature_backward"] <= FIELD_SHARE_TARGET,
            }
        )
        checks.append(
            {
                "target": f"field alone <= {FIELD_SHARE_TARGET:.0%} of an update (K=24)",
                "case": f"{row['pipeline']}, {row['reward']}, {row['method']}",
                "value": share["field_only"],
                "met": share["field_only"] <= FIELD_SHARE_TARGET,
            }
        )
    checks += _memory_checks("memory_cpu", results["memory_cpu"], "gradient_pass_peak_bytes", "CPU allocator, tiny")
    # Not a target (the target is the gradient pass), but what a user sees: the whole step, phase (a) chunked too.
    label = "CPU allocator, tiny, whole micro-step (rollout and gradient pass)"
    for check in _memory_checks("memory_cpu", results["memory_cpu"], "step_peak_bytes", label):
        checks.append({**check, "target": check["target"].replace("pass", "step"), "met": None})
    checks += _memory_checks(
        "memory_meta", results["memory_meta"], "saved_activation_bytes", "saved activations, real size (meta)"
    )
    if "rows" in results["memory_gpu"]:
        checks += _memory_checks("memory_gpu", results["memory_gpu"], "gradient_pass_peak_bytes", "GPU, real size")
    return checks


def _memory_checks(name: str, block: Mapping[str, Any], field: str, label: str) -> list[dict[str, Any]]:
    rows = [r for r in block["rows"] if field in r]
    ks = sorted({r["k"] for r in rows})
    if len(ks) < 2:
        return []
    lo, hi = ks[0], ks[-1]
    out = []
    chunked_lo, chunked_hi = _pick(rows, lo, True, field), _pick(rows, hi, True, field)
    if chunked_lo and chunked_hi:
        growth = chunked_hi / chunked_lo - 1
        out.append(
            {
                "target": f"chunked pass peak memory within {MEMORY_FLAT_TARGET:.0%} from K={lo} to K={hi}",
                "case": f"{label}: {field}",
                "value": round(growth, 4),
                "met": abs(growth) <= MEMORY_FLAT_TARGET,
            }
        )
    graph_lo, graph_hi = _pick(rows, lo, False, field), _pick(rows, hi, False, field)
    if graph_lo and graph_hi:
        growth = graph_hi / graph_lo - 1
        out.append(
            {
                "target": f"one-graph pass grows from K={lo} to K={hi}",
                "case": f"{label}: {field}",
                "value": round(growth, 4),
                "met": growth > MEMORY_FLAT_TARGET,
            }
        )
    return out


# ----------------------------------------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------------------------------------


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value / 2**20:.2f}"


def _gb(value: float | None) -> str:
    return "-" if value is None else f"{value / 2**30:.1f}"


def _met(met: bool | None) -> str:
    return {True: "met", False: "**MISSED**", None: "reported"}[met]


def render_markdown(results: Mapping[str, Any]) -> str:
    """The summary tables (what the README quotes)."""
    machine = results["machine"]
    flops = results["flops"]
    setting = flops["setting"]
    parts = [
        f"Machine: {machine['cpu']}, {machine['cpu_cores']} cores, {machine['memory_gib']} GiB; GPU: "
        f"{machine['gpu'] or 'none'}; torch {machine['torch']}, diffusers {machine['diffusers']}, transformers "
        f"{machine['transformers']}; {machine['date']}; whole run {results.get('elapsed_seconds', '?')} s"
        + (" (quick mode: tiny architectures, numbers meaningless)" if results.get("quick") else "")
        + ".",
        "",
        "### Targets",
        "",
        markdown_table(
            ["target", "case", "value", "status"],
            [[c["target"], c["case"], c["value"], _met(c["met"])] for c in results["targets"]],
        ),
        "",
        f"### FLOPs per optimizer update ({setting['images_per_update']} images = {setting['world_size']} GPUs x "
        f"{setting['accumulation_steps']} micro-steps x {setting['prompts_per_micro_step']} prompt x K="
        f"{setting['num_generations']}, 512 px), TFLOPs",
        "",
        f"Counted on `meta` with `FlopCounterMode` (matmul/conv/attention; element-wise ignored). HPSv3-sized reward: "
        f"{setting['hpsv3_assumption']}.",
        "",
    ]
    header = ["pipeline", "reward", "method", *COMPONENTS, "total", "DRaFT / this"]
    rows = []
    for row in flops["rows"]:
        per = row["flops_per_update"]
        ratio = ", ".join(f"{k}: {v:.2f}x" for k, v in row.get("ratio_vs", {}).items())
        cells = [tera(per[c]) for c in COMPONENTS]
        rows.append([row["pipeline"], row["reward"], row["method"], *cells, tera(per["total"]), ratio])
    parts += [markdown_table(header, rows), ""]
    split_rows = []
    for r in flops["rows"]:
        split = ", ".join(f"{k} {tera(v)}" for k, v in r["backward_split_per_update"].items())
        split_rows.append([r["pipeline"], r["reward"], r["method"], split])
    parts += [
        "Backward by module (TFLOPs per update; reward, decode and features from isolated one-image passes, "
        "denoiser = the rest):",
        "",
        markdown_table(["pipeline", "reward", "method", "backward split"], split_rows),
        "",
    ]
    cpu = results["cpu_tiny"]
    parts += [
        f"### Wall-clock and peak memory, CPU, tiny pipelines (one micro-step, K={cpu['setting']['num_generations']}, "
        f"median of {cpu['setting']['repeats']}, {cpu['setting']['torch_threads']} thread)",
        "",
        f"Memory: {cpu['setting']['memory_method']}. Tiny models are dominated by per-op overhead: these seconds say "
        "nothing about real-size speed.",
        "",
        markdown_table(
            ["reward", "method", "chunk", *COMPONENTS, "total s", "peak MiB"],
            [
                [
                    r["reward"],
                    r["method"],
                    r["chunk"] or "all",
                    *(f"{r['seconds'][c]:.3f}" for c in COMPONENTS),
                    f"{r['seconds']['total']:.3f}",
                    _mb(r["peak_cpu_bytes"]),
                ]
                for r in cpu["rows"]
            ],
        ),
        "",
    ]
    parts += _gpu_section(results["gpu_real_size"])
    parts += _field_section(results["field"])
    parts += _memory_section(results)
    return "\n".join(parts).rstrip() + "\n"


def _gpu_section(gpu: Mapping[str, Any]) -> list[str]:
    lines = ["### Real size on GPU (random weights, bf16)", ""]
    if "skipped" in gpu:
        return [*lines, f"Skipped: {gpu['skipped']}.", ""]
    rows = []
    for r in gpu["rows"]:
        if "error" in r:
            rows.append([r["pipeline"], r["reward"], r["method"], r["chunk"], r["error"], "", ""])
            continue
        sec = r["seconds_per_update"]
        rows.append(
            [
                r["pipeline"],
                r["reward"],
                r["method"],
                r["chunk"] or "all",
                ", ".join(f"{c} {sec[c]:.2f}" for c in COMPONENTS if sec[c]),
                f"{sec['total']:.2f}",
                _gb(r["peak_bytes"]),
            ]
        )
    return [
        *lines,
        f"Device: {gpu['setting']['device']}; per-GPU update = {gpu['setting']['micro_steps_per_gpu_update']} "
        f"micro-steps.{_machine_note(gpu)}",
        "",
        markdown_table(["pipeline", "reward", "method", "chunk", "seconds by component", "total s", "peak GiB"], rows),
        "",
    ]


def _field_section(field: Mapping[str, Any]) -> list[str]:
    keys = ", ".join(f"{k} ({v['tokens']}x{v['dim']})" for k, v in field["setting"]["keys"].items())
    shares = field.get("share_of_update", {})
    rows = []
    for i, r in enumerate(field["vs_k"]):
        share_cells = [f"{shares[name][i]['field_share']:.2e}" if name in shares else "-" for name in cost.REWARDS]
        seconds = "-" if r["cpu_seconds"] is None else f"{r['cpu_seconds'] * 1e3:.1f}"
        rows.append([r["k"], f"{r['analytic_flops'] / 1e9:.3f}", seconds, *share_cells])
    token_rows = [
        [
            r["tokens_per_image"],
            f"{r['analytic_flops'] / 1e9:.2f}",
            "-" if r["cpu_seconds"] is None else f"{r['cpu_seconds'] * 1e3:.1f}",
        ]
        for r in field["vs_tokens"]
    ]
    spatial = field["spatial_tokens_default_keys"]
    return [
        "### Drift field cost vs K and tokens per image (one prompt, SD-Turbo default `denoiser` keys)",
        "",
        f"Keys (tokens x dim): {keys}; {field['setting']['anchors']}; reference term on. GFLOPs are the analytic "
        "count, equal to `FlopCounterMode` wherever it was run; CPU ms: median, 1 thread, '-' where too large to run.",
        "",
        markdown_table(["K", "field GFLOPs", "CPU ms", *(f"share of update ({name})" for name in cost.REWARDS)], rows),
        "",
        markdown_table(["tokens per image (K=24)", "field GFLOPs", "CPU ms"], token_rows),
        "",
        f"With `spatial_tokens=True` (tokens {spatial['tokens']}): {spatial['analytic_flops'] / 1e9:.2f} GFLOPs"
        + ("" if spatial["cpu_seconds"] is None else f", {spatial['cpu_seconds'] * 1e3:.1f} ms on the CPU")
        + ".",
        "",
    ]


def _memory_section(results: Mapping[str, Any]) -> list[str]:
    cpu = results["memory_cpu"]
    meta = results["memory_meta"]
    gpu = results["memory_gpu"]

    ks = sorted({r["k"] for r in cpu["rows"]})
    cpu_rows = [
        [
            k,
            _mb(_pick(cpu["rows"], k, True, "gradient_pass_peak_bytes")),
            _mb(_pick(cpu["rows"], k, False, "gradient_pass_peak_bytes")),
            _mb(_pick(cpu["rows"], k, True, "step_peak_bytes")),
            _mb(_pick(cpu["rows"], k, False, "step_peak_bytes")),
            _mb(_pick(cpu["rows"], k, True, "saved_activation_bytes")),
            _mb(_pick(cpu["rows"], k, False, "saved_activation_bytes")),
            _gb(_pick(meta["rows"], k, True, "saved_activation_bytes")),
            _gb(_pick(meta["rows"], k, False, "saved_activation_bytes")),
        ]
        for k in ks
    ]
    lines = [
        f"### Peak memory vs K: chunked gradient pass (chunk {cpu['setting']['chunk']} tiny / "
        f"{meta['setting']['chunk']} real) vs one graph",
        "",
        f"CPU (tiny SD-Turbo): {cpu['setting']['method']}. Real size: {meta['setting']['pipeline']}; "
        f"{meta['setting']['method']}.",
        "",
        markdown_table(
            [
                "K",
                "grad pass chunked MiB",
                "grad pass one-graph MiB",
                "whole step chunked MiB",
                "whole step one-graph MiB",
                "saved act. chunked MiB",
                "saved act. one-graph MiB",
                "real-size saved act. chunked GiB",
                "real-size saved act. one-graph GiB",
            ],
            cpu_rows,
        ),
        "",
    ]
    return lines + _gpu_memory_section(gpu)


def _pick(rows: Sequence[Mapping[str, Any]], k: int, chunked: bool, field: str) -> Any:
    """`field` of the row at `k` that is chunked (or the one-graph row)."""
    for r in rows:
        if r["k"] == k and (r["chunk"] is not None) == chunked:
            return r.get(field)
    return None


def _machine_note(part: Mapping[str, Any]) -> str:
    """Where GPU numbers measured on another machine came from."""
    machine = part.get("machine")
    if not machine:
        return ""
    return (
        f" Measured on {machine['gpu']} ({machine['cpu']}; torch {machine['torch']}, diffusers "
        f"{machine['diffusers']}, transformers {machine['transformers']}) on {machine['date']}."
    )


def _gpu_memory_section(gpu: Mapping[str, Any]) -> list[str]:
    if "skipped" in gpu:
        return [f"GPU: skipped ({gpu['skipped']}).", ""]
    gpu_rows = [
        [
            k,
            _gb(_pick(gpu["rows"], k, True, "gradient_pass_peak_bytes")),
            _gb(_pick(gpu["rows"], k, False, "gradient_pass_peak_bytes")),
        ]
        for k in sorted({r["k"] for r in gpu["rows"]})
    ]
    return [
        f"GPU ({gpu['setting']['device']}): {gpu['setting']['method']}.{_machine_note(gpu)}",
        "",
        markdown_table(["K", "chunked GiB", "one-graph GiB"], gpu_rows),
        "",
    ]


# ----------------------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------------------


def write(results: Mapping[str, Any], out_dir: Path = RESULTS_DIR, update_readme: bool = False) -> Path:
    """Write `results.json` and `summary.md` to `out_dir` (and the README's results section if asked)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    summary = render_markdown(results)
    (out_dir / "summary.md").write_text(summary)
    if update_readme:
        text = README.read_text()
        if README_START not in text or README_END not in text:
            raise ValueError(f"{README} has no {README_START} / {README_END} markers.")
        head, rest = text.split(README_START, 1)
        _, tail = rest.split(README_END, 1)
        README.write_text(f"{head}{README_START}\n{summary}{README_END}{tail}")
    return out_dir / "summary.md"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny architectures and sizes (a smoke run)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="output folder (default benchmarks/results)")
    parser.add_argument("--update-readme", action="store_true", help="paste the summary into benchmarks/README.md")
    parser.add_argument(
        "--only",
        choices=("gpu",),
        help="only the GPU parts, written to OUT/gpu.json; copy it to benchmarks/results/ to use it in the tables",
    )
    args = parser.parse_args(argv)
    if args.only == "gpu":
        path = write_gpu(args.out / GPU_RESULTS.name)
        gpu = json.loads(path.read_text())
        print("\n".join(_gpu_section(gpu["gpu_real_size"]) + _gpu_memory_section(gpu["memory_gpu"])))
        print(f"[run_all] wrote {path}")
        return
    results = run(quick=args.quick)
    path = write(results, args.out, update_readme=args.update_readme and not args.quick)
    print(path.read_text())
    print(f"[run_all] wrote {args.out / 'results.json'} and {path} in {results['elapsed_seconds']} s")


if __name__ == "__main__":
    main()
