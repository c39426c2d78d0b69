"""Timing helpers for scripts/benchmark.py: warm-up, repeats, peak memory, counted FLOPs.

Every figure is a measurement: wall-clock seconds after warm-up (median, min and max over
repeats), the peak memory the timed runs reached, and FLOPs counted by running the code
under torch's FLOP counter (conv + matmul only, the paper's convention, x2 for FLOPs).

On a virtual machine the hypervisor can hand the CPUs to other guests ("steal" time): one
2-core VM read a 2048^3 bf16 matmul at 389 GFLOP/s best but 251 median with 24 % of its
CPU time stolen. Every timing therefore records the share of CPU time stolen while it ran
(Linux ``/proc/stat``), so a reader can tell a slow result from a contended one.
"""
from __future__ import annotations

import math
import resource
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

from conchshell.nn.direct import direct_convolutions
from conchshell.utils.host_memory import release_free_memory
from conchshell.utils.profile import count_macs

_PROC_STATUS = Path("/proc/self/status")
_PROC_STAT = Path("/proc/stat")
_CLEAR_REFS = Path("/proc/self/clear_refs")


@dataclass
class Timing:
    """Seconds of each timed repeat, their summary, and the peak memory they reached."""

    seconds: list[float]
    peak_memory_bytes: int | None = None
    # How the peak was measured (see PeakMemory): cuda_allocated, cpu_vmhwm or cpu_maxrss.
    memory_kind: str = "none"
    # Share of all CPU time the hypervisor gave to other guests during the timed repeats
    # (see CpuSteal); None where the system does not report it.
    cpu_steal_fraction: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def min(self) -> float:
        return min(self.seconds)

    @property
    def max(self) -> float:
        return max(self.seconds)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(median_s=self.median, min_s=self.min, max_s=self.max)
        return data


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so a wall-clock reading covers it (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def parse_steal_ticks(stat_text: str) -> tuple[int, int] | None:
    """(stolen, total) clock ticks of all CPUs from the text of ``/proc/stat``; None when
    its first line is not the aggregate ``cpu`` line with a steal column (kernels < 2.6.11).

    The total is user + nice + system + idle + iowait + irq + softirq + steal: guest time
    is already counted in user and nice, so the columns after steal are left out."""
    fields = stat_text.split("\n", 1)[0].split()
    if len(fields) < 9 or fields[0] != "cpu":
        return None
    ticks = [int(value) for value in fields[1:9]]
    return ticks[7], sum(ticks)


class CpuSteal:
    """Context manager: ``fraction`` = the share of CPU time stolen by the hypervisor while
    the block ran (all CPUs; None where ``/proc/stat`` is missing or no tick passed)."""

    def __init__(self) -> None:
        self.fraction: float | None = None
        self._start: tuple[int, int] | None = None

    @staticmethod
    def _read() -> tuple[int, int] | None:
        try:
            return parse_steal_ticks(_PROC_STAT.read_text())
        except (OSError, ValueError):
            return None

    def __enter__(self) -> "CpuSteal":
        self._start = self._read()
        return self

    def __exit__(self, *exc: Any) -> None:
        end = self._read()
        if self._start is None or end is None or end[1] <= self._start[1]:
            return
        self.fraction = (end[0] - self._start[0]) / (end[1] - self._start[1])


def _status_kib(field_name: str) -> int | None:
    try:
        for line in _PROC_STATUS.read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_cpu_high_water_mark() -> bool:
    """Reset VmHWM to the current RSS (Linux clear_refs "5"); False where not permitted."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


class PeakMemory:
    """Context manager measuring the peak memory of the code it wraps.

    CUDA: the caching allocator's peak (``max_memory_allocated``) above what was allocated
    on entry. CPU: tracemalloc cannot see torch's allocations, so free heap pages are handed
    back to the OS (they would hide the rise: see ``conchshell.utils.host_memory``), the
    process's resident-set high-water mark (VmHWM) is reset on entry and read on exit;
    ``peak_bytes`` is the rise over the RSS at entry, which includes allocator caching and
    anything other threads touch. Pages handed back are faulted in again inside the block,
    so do not time what it wraps. Where the reset is not permitted, the lifetime max RSS is
    reported instead (``kind == "cpu_maxrss"``: an upper bound, not a per-region figure).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_bytes: int | None = None
        self.kind = "none"
        self._baseline = 0

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._baseline = torch.cuda.memory_allocated(self.device)
            self.kind = "cuda_allocated"
            return self
        release_free_memory()
        if _reset_cpu_high_water_mark() and _status_kib("VmRSS") is not None:
            self._baseline = (_status_kib("VmRSS") or 0) * 1024
            self.kind = "cpu_vmhwm"
        else:
            self.kind = "cpu_maxrss"
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.kind == "cuda_allocated":
            synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._baseline
        elif self.kind == "cpu_vmhwm":
            self.peak_bytes = max(0, (_status_kib("VmHWM") or 0) * 1024 - self._baseline)
        else:
            self.peak_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def time_call(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 1) -> Timing:
    """Run ``fn`` ``warmup`` times untimed, once more under PeakMemory (untimed: on CPU it
    starts from handed-back pages), then ``repeats`` timed runs.

    The last result is kept in ``Timing.extra["result"]`` so callers can chain stages or
    compare outputs without an extra run.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    synchronize(device)
    with PeakMemory(device) as memory:
        fn()
    seconds = []
    result = None
    with CpuSteal() as steal:
        for _ in range(repeats):
            start = time.perf_counter()
            result = fn()
            synchronize(device)
            seconds.append(time.perf_counter() - start)
    return Timing(seconds, memory.peak_bytes, memory.kind, steal.fraction, {"result": result})


def conv_backward_flops(grad_out_shape: Sequence[int], x_shape: Sequence[int], w_shape: Sequence[int],
                        _bias: Any, _stride: Any, _padding: Any, _dilation: Any, transposed: bool,
                        _output_padding: Any, _groups: int, output_mask: Sequence[bool],
                        out_shape: Any = None, **kwargs: Any) -> int:
    """FLOPs of ``aten.convolution_backward``: one forward's worth per gradient computed.

    torch's own formula (2.13) counts the weight gradient of a grouped convolution as if it
    were ungrouped, ``groups`` times too many FLOPs: 256x for the discriminator's widest
    layers, which made a Deep training step look 5x costlier than it is. Both the input
    gradient and the weight gradient multiply every weight with every output position
    once, exactly like the forward, so each costs the forward's FLOPs.
    """
    spatial = x_shape[2:] if transposed else grad_out_shape[2:]
    forward = 2 * grad_out_shape[0] * math.prod(w_shape) * math.prod(spatial)
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def count_flops(fn: Callable[[], Any], with_grad: bool = False) -> tuple[int, Any]:
    """FLOPs of one call (conv + matmul, 2 per MAC) and its result.

    Inference uses :func:`conchshell.utils.profile.count_macs` (x2); ``with_grad=True``
    counts a call that needs autograd (a training step, backward convs included), which
    count_macs cannot since it runs under ``no_grad``; its convolution backward uses
    :func:`conv_backward_flops` (groups handled). Both count rewritten convolutions as the
    plain ones (:func:`conchshell.nn.direct.direct_convolutions`).
    """
    if not with_grad:
        box: list[Any] = []
        macs = count_macs(lambda: box.append(fn()))
        return 2 * macs, box[0]
    counter = FlopCounterMode(display=False,
                              custom_mapping={torch.ops.aten.convolution_backward: conv_backward_flops})
    with counter, direct_convolutions():
        result = fn()
    return counter.get_total_flops(), result


def matmul_ceiling(device: torch.device, dtype: torch.dtype, size: int, repeats: int = 5,
                   warmup: int = 2) -> dict[str, Any]:
    """FLOP/s of a large square matmul: the practical ceiling the pipeline is measured against.

    Reported as the best (max) rate over repeats, since a ceiling is what the hardware can
    reach; the median is kept too (the machine may be shared).
    """
    generator = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    timing = time_call(lambda: torch.mm(a, b), device, repeats, warmup)
    flops = 2 * size**3
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "size": size,
        "flops": flops,
        "seconds": timing.seconds,
        "flops_per_s": flops / timing.min,
        "median_flops_per_s": flops / timing.median,
        "cpu_steal_fraction": timing.cpu_steal_fraction,
    }


def copy_bandwidth(device: torch.device, num_bytes: int | None = None, repeats: int = 5,
                   warmup: int = 2) -> dict[str, Any]:
    """Bytes/s (read + written) of copying one large contiguous buffer into another: the
    ceiling of the memory-bound passes (copies, activations, casts). Best over repeats, the
    median kept too. On a shared VM it moves with the neighbours' traffic, which the CPU
    steal does not show (one 2-core VM: 44 GB/s in one hour, 22-35 the next).

    ``num_bytes`` defaults to 256 MiB on CPU and 4 GiB on CUDA: at a few TB/s a 256 MiB copy
    takes a tenth of a millisecond, which the timer's own overhead would distort."""
    if num_bytes is None:
        num_bytes = 4 * 2**30 if device.type == "cuda" else 256 * 2**20
    source = torch.ones(num_bytes, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    timing = time_call(lambda: target.copy_(source), device, repeats, warmup)
    moved = 2 * num_bytes
    return {
        "bytes": num_bytes,
        "seconds": timing.seconds,
        "bytes_per_s": moved / timing.min,
        "median_bytes_per_s": moved / timing.median,
        "cpu_steal_fraction": timing.cpu_steal_fraction,
    }


def format_bytes(num_bytes: int | None) -> str:
    if num_bytes is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(num_bytes) < 1024 or unit == "GiB":
            return f"{num_bytes:.0f}{unit}" if unit == "B" else f"{num_bytes:.1f}{unit}"
        num_bytes /= 1024
    return f"{num_bytes:.1f}GiB"
