"""Timing a call the same way everywhere (device bench, latency benchmark). No torch here: the ONNX
Runtime-only benchmark workers import it."""

from __future__ import annotations

import time
from typing import Callable

import numpy as np


def time_calls(call: Callable[[], object], runs: int, warmup: int = 2) -> np.ndarray:
    """Seconds taken by each of `runs` calls, after `warmup` untimed ones (first calls pay for
    allocations and ONNX Runtime's graph set-up)."""
    for _ in range(warmup):
        call()
    times = np.empty(runs)
    for i in range(runs):
        started = time.perf_counter()
        call()
        times[i] = time.perf_counter() - started
    return times


def time_per_call(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    """Median seconds of one call of `fn` over `repeats` timed calls after `warmup` untimed ones."""
    return float(np.median(time_calls(fn, repeats, warmup)))
