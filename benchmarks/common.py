"""Measurement helpers shared by the benchmarks: per-component FLOPs and wall-clock, peak memory, machine info.

How things are measured (quoted in the README):

- FLOPs: `torch.utils.flop_counter.FlopCounterMode`, which counts matrix products, convolutions and attention (2 FLOPs
  per multiply-add, backward included when `backward()` runs inside it) and ignores element-wise work. On the `meta`
  device nothing is computed, so real architectures cost nothing to count.
- Wall-clock: `time.perf_counter` around each component, with `torch.cuda.synchronize()` on both sides on a GPU.
- Peak memory on CPU: `CPUPeakMemory` replays the allocation events of torch's CPU allocator recorded by
  `torch.profiler` (`profile_memory=True`) and reports the highest level reached above the level at entry.
  `tracemalloc` cannot see torch's C++ allocator, and RSS deltas are dominated by allocator caching at these sizes.
- Peak memory on GPU: `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`, minus the level at entry.
- Activation memory of an autograd graph: `SavedTensorBytes` sums the distinct storages autograd saves for backward
  (parameters excluded) through `torch.autograd.graph.saved_tensors_hooks`; it works on `meta` tensors, which gives
  real-size numbers without a GPU.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from trl_drpo.step import StepHooks


COMPONENTS = ("generation", "decode", "reward", "features", "field", "backward")
"""Top-level components of an update; meter names are `component` or `component/detail`."""


# ----------------------------------------------------------------------------------------------------------------
# Component meter
# ----------------------------------------------------------------------------------------------------------------


def synchronize(device: torch.device | str | None) -> None:
    """Wait for queued GPU work, so that a timer brackets the work and not just its launch."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class Meter:
    """Accumulates FLOPs and seconds per named component across a step.

    Use as `with meter("generation/rollout"): ...`. Names before the first `/` are the components of
    :data:`COMPONENTS`; :meth:`totals` sums their details. Meters are not nested.

    Args:
        count_flops: run each component under a `FlopCounterMode` (slows real computation; use for `meta` runs).
        device: the device whose queue is synchronised around each component (CUDA only).
    """

    def __init__(self, count_flops: bool = False, device: torch.device | str | None = None) -> None:
        self.count_flops = count_flops
        self.device = device
        self.flops: dict[str, int] = defaultdict(int)
        self.seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        synchronize(self.device)
        start = time.perf_counter()
        if self.count_flops:
            with FlopCounterMode(display=False) as counter:
                yield
            self.flops[name] += int(counter.get_total_flops())
        else:
            yield
        synchronize(self.device)
        self.seconds[name] += time.perf_counter() - start

    @staticmethod
    def _totals(values: Mapping[str, float]) -> dict[str, float]:
        out: dict[str, float] = dict.fromkeys(COMPONENTS, 0)
        for name, value in values.items():
            out[name.split("/", 1)[0]] = out.get(name.split("/", 1)[0], 0) + value
        return out

    def flop_totals(self) -> dict[str, int]:
        """FLOPs per top-level component (every component of :data:`COMPONENTS` present, zeros included)."""
        return {k: int(v) for k, v in self._totals(self.flops).items()}

    def second_totals(self) -> dict[str, float]:
        """Seconds per top-level component."""
        return self._totals(self.seconds)


class NullMeter(Meter):
    """A meter that measures nothing (for steps run only for their effect)."""

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        yield


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run torch's CPU kernels on `count` threads inside the block.

    The tiny models are dominated by per-op overhead; one thread keeps their timings stable on a shared machine,
    where spinning intra-op threads would mostly measure the other tenants.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def median_dicts(runs: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """Key-wise median of several measurements."""
    runs = list(runs)
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


# ----------------------------------------------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------------------------------------------


class CPUPeakMemory:
    """Peak bytes held by torch's CPU allocator inside the block, above the level at entry.

    The allocation and free events recorded by `torch.profiler` (`profile_memory=True`) are replayed in time order;
    the peak of their running sum is the answer. Memory allocated before the block and freed inside it counts
    negatively, so the result is exactly "how much higher than at entry did it get".
    """

    def __init__(self) -> None:
        self.peak_bytes = 0
        self._profile: Any = None

    def __enter__(self) -> CPUPeakMemory:
        from torch.profiler import ProfilerActivity, profile

        self._profile = profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False)
        self._profile.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._profile.__exit__(*exc)
        events = [
            (event.start_ns(), event.nbytes())
            for event in self._profile.profiler.kineto_results.events()
            if event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU
        ]
        level = peak = 0
        for _, nbytes in sorted(events):
            level += nbytes
            peak = max(peak, level)
        self.peak_bytes = peak


class CUDAPeakMemory:
    """Peak bytes allocated on a CUDA device inside the block, above the level at entry."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.peak_bytes = 0
        self._start = 0

    def __enter__(self) -> CUDAPeakMemory:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self._start = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc: Any) -> None:
        torch.cuda.synchronize(self.device)
        self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._start


def peak_memory(device: torch.device | str) -> CPUPeakMemory | CUDAPeakMemory:
    """The peak-memory probe for `device` (profiler replay on CPU, allocator statistics on CUDA)."""
    device = torch.device(device)
    return CUDAPeakMemory(device) if device.type == "cuda" else CPUPeakMemory()


class SavedTensorBytes:
    """Bytes of activations autograd saves for backward, per graph, parameters excluded.

    Wrap each graph's forward in `with tracker.graph(): ...`; storages are counted once however many views of them
    are saved. `peak_bytes` is the largest graph (graphs are assumed freed by their backward before the next one).
    """

    def __init__(self, modules: Iterable[nn.Module] = ()) -> None:
        self._excluded = {p.untyped_storage()._cdata for m in modules for p in m.parameters()}
        self.graph_bytes: list[int] = []

    @property
    def peak_bytes(self) -> int:
        return max(self.graph_bytes, default=0)

    @contextlib.contextmanager
    def graph(self) -> Iterator[None]:
        storages: dict[int, int] = {}

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            storage = tensor.untyped_storage()
            if storage._cdata not in self._excluded:
                storages[storage._cdata] = storage.nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            yield
        self.graph_bytes.append(sum(storages.values()))


# ----------------------------------------------------------------------------------------------------------------
# Meta-device support for the generator
# ----------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def fused_attention_on_meta() -> Iterator[None]:
    """Run `F.scaled_dot_product_attention` on `meta` tensors as the fused kernel a GPU runs.

    On `meta` the call otherwise falls back to the math decomposition: slow to trace op by op, and it saves the
    L x L attention matrix for backward, which no GPU kernel does. Inside this context a 4-D meta call goes to
    `aten._scaled_dot_product_efficient_attention` instead (it has meta kernels and a derivative): autograd then
    saves q, k, v, the output and the log-sum-exp, and `FlopCounterMode` applies its fused-attention formulas
    (backward = 2.5x forward, the recomputation of the scores included). Other tensors take the original path.
    """
    original = F.scaled_dot_product_attention

    def attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        if query.device.type != "meta" or query.ndim != 4:
            return original(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, **kwargs)
        if key.shape[1] != query.shape[1]:  # grouped-query attention: the kernel wants one key head per query head
            repeat = query.shape[1] // key.shape[1]
            key, value = key.repeat_interleave(repeat, dim=1), value.repeat_interleave(repeat, dim=1)
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            attn_mask = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device)
        if attn_mask is not None:
            attn_mask = attn_mask.expand(query.shape[0], query.shape[1], query.shape[2], key.shape[2])
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
        return torch.ops.aten._scaled_dot_product_efficient_attention(
            query, key, value, attn_mask, grad, dropout_p, is_causal, scale=scale
        )[0]

    F.scaled_dot_product_attention = attention
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def real_or_random(tensor: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """`tensor` itself, or standard-normal CPU values of its shape when it is a `meta` tensor.

    Ranking and the drift field need values (they check for NaNs and sort); on `meta` their FLOPs are counted on
    random CPU stand-ins of the right shape, which is what the field costs whatever the values.
    """
    if tensor.device.type != "meta":
        return tensor
    return torch.randn(tensor.shape, generator=generator, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------------------------
# Machine and formatting
# ----------------------------------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    """CPU model, cores, memory, torch/diffusers/transformers versions, GPU (if any), date."""
    import diffusers
    import transformers

    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    memory_gib = None
    with contextlib.suppress(ImportError):
        import psutil

        memory_gib = round(psutil.virtual_memory().total / 2**30, 1)
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": memory_gib,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return info


def tera(value: float) -> float:
    """FLOPs -> TFLOPs, rounded for tables."""
    return round(value / 1e12, 3)


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def time_call(fn: Callable[[], Any], device: torch.device | str | None = None) -> float:
    """Seconds taken by `fn()`, synchronised on a GPU."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def benchmark_step(
    rank_fn: Callable[[torch.Tensor, Sequence[str]], torch.Tensor],
    meter: Meter | None = None,
    saved: SavedTensorBytes | None = None,
) -> tuple[Callable[[torch.Tensor, list[str]], tuple[torch.Tensor, torch.Tensor]], StepHooks]:
    """The scorer and hooks with which the benchmarks run `trl_drpo.step`: a rank-only reward `rank_fn`
    (`(B*K,)` scores, no gradient), `meter` around each component, `saved` counting each regenerated chunk's
    activations, and random stand-in values wherever ranking and the field meet `meta` tensors (`real_or_random`)."""
    stand_in = torch.Generator().manual_seed(0)

    def materialize(tensor: torch.Tensor) -> torch.Tensor:
        return real_or_random(tensor, stand_in)

    def scorer(images: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        # Random weights may overflow to non-finite scores; ranking needs finite ones.
        scores = torch.nan_to_num(materialize(rank_fn(images, prompts)).float().cpu())[None]
        return scores, scores[0]

    graph = {"graph": saved.graph} if saved is not None else {}
    return scorer, StepHooks(meter=meter or NullMeter(), materialize=materialize, **graph)
