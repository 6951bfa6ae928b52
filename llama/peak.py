"""Peak memory of one call, beyond what was held before it: what the benchmarks and the
classification pipeline report.

    extra = peak_bytes(lambda: step(batch), device)   # bytes, or None where it cannot be measured

CUDA: the caching allocator's peak during the call minus what was allocated before it. CPU: from
the profiler's memory events, each op's own allocations net of its frees, summed in time order;
memory a kernel allocates outside torch's allocator is not seen.
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Callable, Optional, Union

import torch

__all__ = ["cpu_peak_bytes", "cuda_peak_bytes", "peak_bytes"]


def cuda_peak_bytes(call: Callable[[], object]) -> int:
    """Peak bytes allocated during one call beyond what was allocated before it (inputs)."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    call()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 (the profiler's start/stop lines) for the duration of the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def cpu_peak_bytes(call: Callable[[], object]) -> Optional[int]:
    """Peak bytes torch's CPU allocator holds during one call beyond what it held before (inputs);
    None where the profiler cannot run."""
    from torch.profiler import ProfilerActivity, profile

    try:
        with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            call()
        events = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events())
    except Exception:  # noqa: BLE001 - a profiler that cannot run here leaves the figure unknown
        return None
    current = peak = 0
    for _, delta in events:
        current += delta
        peak = max(peak, current)
    return peak


def peak_bytes(call: Callable[[], object], device: Union[str, torch.device]) -> Optional[int]:
    """The peak of one call on `device` (cuda or cpu), beyond what was held before it."""
    return cuda_peak_bytes(call) if torch.device(device).type == "cuda" else cpu_peak_bytes(call)
