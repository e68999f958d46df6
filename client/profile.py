"""A device's profile: the memory it can give a model, its compute score, and its latency target.

The compute score is relative to the catalog's reference CPU (the catalog's `latency_ms` are measured there, so a
variant runs in about `latency_ms / compute` on the device). `benchmark_compute` estimates it from a short
float32 matmul benchmark: REFERENCE_GFLOPS is what that benchmark reaches on the 2-core machines the reference
catalogs are built on, so 1.0 means "like the build machine". The matrices are 64x64 on purpose: BLAS runs them on
one thread, and multi-threaded BLAS collapses (measured: from ~200 to 0.1 GFLOP/s) when other processes share the
cores. Simulated devices take their profile from the fleet config instead.
"""
from __future__ import annotations

import os
import time

import numpy as np

from shared.config import DeviceConfig
from shared.messages import Profile

AGENT_VERSION = "0.1.0"
REFERENCE_GFLOPS = 100.0
BENCH_N = 64


def benchmark_compute(seconds: float = 0.3) -> float:
    """Compute score from `seconds` of 64x64 float32 matmuls (best of several short runs: less noise)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((BENCH_N, BENCH_N), dtype=np.float32)
    b = rng.standard_normal((BENCH_N, BENCH_N), dtype=np.float32)
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start, reps = time.perf_counter(), 50
        for _ in range(reps):
            a @ b
        best = max(best, 2 * BENCH_N**3 * reps / (time.perf_counter() - start) / 1e9)
    return round(best / REFERENCE_GFLOPS, 3)


def available_memory_mb() -> float:
    """MemAvailable from /proc/meminfo (Linux); otherwise free physical pages."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / (1 << 20)


def device_profile(device: DeviceConfig | None, measure: bool = False, latency_ms: float | None = None) -> Profile:
    """The configured profile, or a measured one (`measure`, or a device missing from the config)."""
    if device is not None and not measure:
        return Profile(device.memory_mb, device.compute, device.latency_ms, agent_version=AGENT_VERSION,
                       storage_mb=device.storage_mb)
    target = latency_ms if latency_ms is not None else (device.latency_ms if device else None)
    return Profile(round(available_memory_mb(), 1), benchmark_compute(), target, agent_version=AGENT_VERSION,
                   storage_mb=device.storage_mb if device else None)


def budget_changed(old: Profile, new: Profile, memory_tolerance: float = 0.1, compute_tolerance: float = 0.25) -> bool:
    """Worth a new enrollment: memory moved by more than 10 %, compute (a noisier measurement) by more than 25 %."""
    return (abs(new.memory_mb - old.memory_mb) > memory_tolerance * old.memory_mb
            or abs(new.compute - old.compute) > compute_tolerance * old.compute
            or new.latency_ms != old.latency_ms)
