"""Helpers shared by the benchmarks: the machine's matmul rate, its description, timing, ratios.

Absolute times on a shared CPU drift by 10-15 % between runs, so every benchmark times pglm and
its peer interleaved (A B A B ...) in one process and reports medians and their ratio
(docs/design.md, "Performance: how it is measured").
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version

import torch


def matmul_gflops(n: int = 2048, repeats: int = 10) -> float:
    """fp32 n×n matmul rate in GFLOP/s: median of `repeats` after two warm-up calls."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(2):
        a @ b
    return 2 * n**3 / median_time(lambda: a @ b, repeats) / 1e9


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "absent"


def environment() -> dict:
    """Date, machine and library versions, for the head of every benchmark's output."""
    return {
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "trl": _version("trl"),
        "python": platform.python_version(),
    }


def add_threads_flag(ap) -> None:
    """--threads N: torch.set_num_threads for both sides (under load the default 2 can stall, docs/benchmarks.md)."""
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for both sides (default: torch's)")


def start(args) -> None:
    """Apply --threads, then print the environment line every benchmark's output starts with."""
    if args.threads:
        torch.set_num_threads(args.threads)
    print(environment_line())


def environment_line() -> str:
    return "  ".join(f"{k} {v}" for k, v in environment().items())


def median_time(fn: Callable[[], object], repeats: int) -> float:
    """Median wall-clock seconds of `repeats` calls of fn()."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each fn, timed in turn (A B A B ...) so drift hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def print_ratio(label: str, ours: float, peer: float, target: float | None = None) -> None:
    """One line: label, both figures, ours/peer, and whether a target ratio is met."""
    ratio = ours / peer
    verdict = "" if target is None else f"  (target ≥ {target:g}×: {'met' if ratio >= target else 'MISSED'})"
    print(f"{label}: pglm {ours:,.0f}  peer {peer:,.0f}  ratio {ratio:.2f}×{verdict}")
    sys.stdout.flush()
