"""Timing helpers shared by the kernel benchmarks."""
from __future__ import annotations

import time
from typing import Any, Callable

import torch


class Budget:
    """Wall-clock allowance for a benchmark sweep, so a device call ends inside its limit."""

    def __init__(self, seconds: float) -> None:
        self.end = time.time() + seconds

    def left(self) -> float:
        return self.end - time.time()


def bench_ms(fn: Callable[[], Any], warmup: int = 10, rep: int = 40) -> float:
    """Median ms: triton's do_bench on CUDA (L2 flushed between runs), the best of two runs on CPU."""
    if torch.cuda.is_available():
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return min(times)
