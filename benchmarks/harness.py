"""Timing, memory and FLOP measurement for the benchmarks (no model code here).

Timing: ``time.perf_counter`` around one call, warm-up rounds first, the implementations of a case called in
turn so that load changes on a shared machine hit both alike, and the median of each one's repeats. Each round
starts one implementation later than the one before (ours, theirs | theirs, ours | ...): with a fixed order the
call that came first in its round was measured 4-8% slower on the SD-v1-shaped training step (each side run first
in turn: ours/diffusers 1.08 with ours first, 0.96 with diffusers first), which the rotation cancels.
"""

from __future__ import annotations

import os
import resource
import statistics
import time
from typing import Any, Callable, Mapping, Optional

import torch


def median_or_none(values) -> Optional[float]:
    values = list(values)
    return statistics.median(values) if values else None


def alternate(
    fns: Mapping[str, Callable[[], Any]],
    warmup: int,
    min_repeats: int,
    max_repeats: int,
    budget_s: float,
) -> dict[str, list[float]]:
    """Seconds of each call of each function, called round-robin, round ``r`` starting at function ``r mod n``
    of ``fns`` (so each is first in its round equally often over ``n`` rounds).

    ``warmup`` untimed rounds first; then as many timed rounds as fit ``budget_s`` (judged from the last warm-up
    round), clamped to ``[min_repeats, max_repeats]`` and rounded up to a multiple of ``len(fns)``.
    """
    if not fns:
        return {}
    round_s = None
    for _ in range(max(0, warmup)):
        start = time.perf_counter()
        for fn in fns.values():
            fn()
        round_s = time.perf_counter() - start
    repeats = max_repeats if round_s is None or round_s <= 0 else int(budget_s // round_s)
    repeats = max(min_repeats, min(max_repeats, repeats))
    repeats = -(-repeats // len(fns)) * len(fns)  # whole rotations: each function first equally often
    times: dict[str, list[float]] = {name: [] for name in fns}
    items = list(fns.items())
    for r in range(repeats):
        for name, fn in items[r % len(items):] + items[:r % len(items)]:
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def matmul_gflops(n: int = 2048, dtype: torch.dtype = torch.float32, repeats: int = 5) -> float:
    """Achieved GFLOP/s of an ``n x n @ n x n`` matmul (``2 n^3`` FLOPs), median of ``repeats`` after one warm-up."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dtype)
    b = torch.randn(n, n, generator=g).to(dtype)
    out = torch.empty(n, n, dtype=dtype)
    torch.matmul(a, b, out=out)
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        torch.matmul(a, b, out=out)
        times.append(time.perf_counter() - start)
    return 2.0 * n**3 / statistics.median(times) / 1e9


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of ``fn`` by ``torch.utils.flop_counter.FlopCounterMode`` (matmuls and convolutions).

    Our attention runs on the ``math`` backend while counting: the counter has no formula for the CPU SDPA
    kernel and would count attention as 0. The function computed is the same, so the count holds for either.
    """
    from torch.utils.flop_counter import FlopCounterMode

    from ldm.modules.attention import attention_backend

    with attention_backend("math"), FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def current_rss_mb() -> float:
    """Resident set size of this process now, in MiB (psutil, else /proc/self/statm)."""
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB.

    Linux: ``VmHWM`` of /proc/self/status, the high-water mark of this process's own address space.
    ``ru_maxrss`` is not used there: Linux carries it over fork + exec, so a child started by a large parent
    reports at least the parent's RSS at the fork. Elsewhere ``ru_maxrss`` (KiB, bytes on macOS).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**10  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if os.uname().sysname == "Darwin" else peak / 2**10


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# ---------------------------------------------------------------------------------------------------- formatting


def fmt_time(seconds: Optional[float], per: str = "") -> str:
    if seconds is None:
        return "—"
    if per:
        return f"{seconds:.2f} s/{per}"
    if seconds >= 10:
        return f"{seconds:.1f} s"
    if seconds >= 1e-2:
        return f"{seconds * 1e3:.0f} ms"
    return f"{seconds * 1e3:.2f} ms"


def fmt_num(value: Optional[float], spec: str = ".3g") -> str:
    return "—" if value is None else format(value, spec)


def fmt_pair(a: Optional[float], b: Optional[float], spec: str = ".0f") -> str:
    if a is None and b is None:
        return "—"
    return fmt_num(a, spec) if b is None else f"{fmt_num(a, spec)} / {fmt_num(b, spec)}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)
