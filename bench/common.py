"""Building blocks for benchmark suites: registry, measurement specs, timers.

A suite is a function decorated with ``@suite("name")`` in a module under
``bench/suites/``. It receives a :class:`SuiteContext` and returns a list of
:class:`Bench` (something to time) and :class:`Unavailable` (an impl that cannot
run here, recorded once with its reason). ``bench/run.py`` times each Bench with
the timer that fits the device and writes one JSONL record per item. A ``setup`` may return
its calls as :class:`Calls`, with fields known only once it has built them (a model's trainable
parameter count, say); they go into the record's ``extra``.
"""

from __future__ import annotations

import ctypes
import itertools
import math
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable, ContextManager, Sequence, TypeVar, Union

import numpy as np
import torch

Call = Callable[[], object]
T = TypeVar("T")

DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def dtype_name(dtype: torch.dtype) -> str:
    """Short name used in records: fp32, fp16, bf16 (else torch's name)."""
    return DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


@dataclass(frozen=True)
class Bench:
    """One measurement: ``setup()`` builds inputs and returns the calls to time.

    ``setup`` returns one zero-argument call per input copy (see
    :func:`rotating_copies`), a list or :class:`Calls`; timers cycle through them. ``bytes``/``flops``/``tokens``
    are the work of one call, used for GB/s, TFLOP/s and tokens/s. ``cuda_graph`` selects the
    CUDA-graph timer on GPU (for launch-bound, decode-sized ops).
    """

    impl: str
    case: dict
    dtype: str
    pass_: str
    setup: Callable[[], Sequence[Call]]
    bytes: int | None = None
    flops: int | None = None
    tokens: int | None = None
    cuda_graph: bool = False


class Calls(list):
    """What ``Bench.setup`` may return instead of a plain list: the calls, and ``extra`` fields
    measured while building them (numbers or short strings), recorded in the record's ``extra``."""

    def __init__(self, calls: Sequence[Call], **extra):
        super().__init__(calls)
        self.extra = extra


def extra_fields(calls: Sequence[Call]) -> dict | None:
    """The ``extra`` fields that a setup's calls carry (:class:`Calls`), None for a plain list."""
    return dict(calls.extra) if isinstance(calls, Calls) and calls.extra else None


@dataclass(frozen=True)
class Unavailable:
    """An impl that cannot be measured here; ``status`` is "missing" or "error"."""

    impl: str
    reason: str
    status: str = "missing"


Item = Union[Bench, Unavailable]


@dataclass(frozen=True)
class SuiteContext:
    """What a suite may depend on: the target device and the size of the run.

    ``quick``: the smoke run; ``full``: every case (``--full``); neither: the default run, whose
    items the runner narrows to the suite's headline cases."""

    device: torch.device
    quick: bool
    full: bool = False

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    @cached_property
    def cache_bytes(self) -> int:
        """Last-level cache size of the device (GPU L2, CPU L3), 0 if unknown."""
        if self.is_cuda:
            props = torch.cuda.get_device_properties(self.device)
            return getattr(props, "L2_cache_size", 0) or 64 * 2**20
        return _cpu_llc_bytes()

    def rotating(self, factory: Callable[[], T], nbytes: int) -> list[T]:
        """:func:`rotating_copies` sized against this device's cache."""
        return rotating_copies(factory, nbytes, self.cache_bytes)


SuiteFn = Callable[[SuiteContext], list[Item]]
Headline = Callable[[SuiteContext, Bench], bool]
SUITES: dict[str, SuiteFn] = {}

# Impls whose names start with one of these are ours; every other measured impl is a peer, except a
# suite's references (rooflines such as a plain copy of the same bytes), which are neither. Records
# made before the ops package was named llama_kernels call ours "kernels-*".
OURS_PREFIXES = ("llama_kernels", "kernels")


@dataclass(frozen=True)
class HeadlineRatio:
    """A figure for the report's headline table beside (or, for a suite without ours and peers,
    instead of) the speedups: per case, the record field ``field`` of impl ``num`` over the same
    field of impl ``den`` (QLoRA's peak memory over full fine-tuning's, say). ``target``: the
    value the ratio should stay at or below, on devices of type ``target_device`` (every device
    when None); ``label``: how the report names the field; ``plus``: an ``extra`` field added to
    ``field`` in each record first (the resident bytes a method keeps between steps, added to the
    step's own peak)."""

    field: str
    num: str
    den: str
    target: float | None = None
    target_device: str | None = None
    label: str = ""
    plus: str | None = None

    def value(self, record: dict) -> float | None:
        """The record's figure: ``field``, plus the ``extra`` field ``plus`` where set (None if either is missing)."""
        value = record.get(self.field)
        if value is None or self.plus is None:
            return value
        added = (record.get("extra") or {}).get(self.plus)
        return None if added is None else value + added


@dataclass(frozen=True)
class SuiteInfo:
    """What the runner and the report know about a suite beyond its items.

    ``headline(ctx, bench)`` picks the items of the default run (every impl of a few cases that
    say where the suite stands); ``--full`` runs every item. ``references`` name impls that are
    rooflines, not peers: the report uses them for the fraction of the roofline and leaves them
    out of the speedups. ``ratio``: a :class:`HeadlineRatio` the report's headline shows.
    """

    name: str
    headline: Headline | None = None
    references: tuple[str, ...] = ()
    ratio: HeadlineRatio | None = None


SUITE_INFO: dict[str, SuiteInfo] = {}


def suite(name: str, *, headline: Headline | None = None, references: Sequence[str] = (),
          ratio: HeadlineRatio | None = None) -> Callable[[SuiteFn], SuiteFn]:
    """Register a suite under ``name``; see :class:`SuiteInfo` for ``headline``, ``references``
    and ``ratio``."""

    def register(fn: SuiteFn) -> SuiteFn:
        if name in SUITES:
            raise ValueError(f"suite {name!r} registered twice")
        SUITES[name] = fn
        SUITE_INFO[name] = SuiteInfo(name, headline, tuple(references), ratio)
        return fn

    return register


def suite_info(name: str) -> SuiteInfo:
    """The registered info of ``name``; a bare one (every case a headline, no references) if none."""
    return SUITE_INFO.get(name) or SuiteInfo(name)


def is_ours(impl: str) -> bool:
    return impl.startswith(OURS_PREFIXES)


def headline_items(name: str, ctx: SuiteContext, items: list[Item]) -> list[Item]:
    """The items of the default run: every Unavailable, and the Benches the suite calls headline.

    A suite without a headline rule, or whose rule keeps nothing here, runs whole."""
    rule = suite_info(name).headline
    if rule is None:
        return items
    kept = [i for i in items if not isinstance(i, Bench) or rule(ctx, i)]
    return kept if any(isinstance(i, Bench) for i in kept) else items


def rotating_copies(
    factory: Callable[[], T], nbytes: int, cache_bytes: int, factor: float = 2.0, max_copies: int = 64
) -> list[T]:
    """Enough independent inputs (``nbytes`` each) to span ``factor`` x the cache.

    Cycling through them keeps a call from finding its operands still cached
    by the previous call (a 32 MB weight fits in a 50 MB L2). ``max_copies``
    bounds tiny inputs, whose time is launch latency anyway.
    """
    count = max(1, min(max_copies, math.ceil(factor * cache_bytes / max(nbytes, 1))))
    return [factory() for _ in range(count)]


def with_backward(forward: Call, wrt: Sequence[torch.Tensor], grad_output: torch.Tensor) -> Call:
    """A call running ``forward()`` and the gradients w.r.t. ``wrt`` (no .grad accumulation)."""
    return lambda: torch.autograd.grad(forward(), wrt, grad_output)


@dataclass(frozen=True)
class Timing:
    """Per-call time statistics in milliseconds."""

    median_ms: float
    min_ms: float
    p20_ms: float
    p80_ms: float
    reps: int | None = None

    @classmethod
    def from_samples(cls, samples_ms: Sequence[float], reps: int | None = None) -> Timing:
        p0, p20, p50, p80 = np.percentile(np.asarray(samples_ms), [0, 20, 50, 80])
        return cls(float(p50), float(p0), float(p20), float(p80), reps or len(samples_ms))


def _cycle(calls: Sequence[Call]) -> Call:
    if len(calls) == 1:
        return calls[0]
    nxt = itertools.cycle(calls).__next__
    return lambda: nxt()()


def time_cpu(calls: Sequence[Call], *, budget_s: float = 0.5, warmup_s: float = 0.1,
             min_reps: int = 5, max_reps: int = 10_000, max_s: float | None = None) -> Timing:
    """Wall-clock per call: warm up, then time single calls until the budget is spent."""
    return Timing.from_samples(cpu_samples(calls, budget_s=budget_s, warmup_s=warmup_s, min_reps=min_reps,
                                           max_reps=max_reps, max_s=max_s))


def cpu_samples(calls: Sequence[Call], *, budget_s: float = 0.5, warmup_s: float = 0.1,
                min_reps: int = 5, max_reps: int = 10_000, max_s: float | None = None) -> list[float]:
    """The per-call wall-clock samples (ms) behind :func:`time_cpu`.

    Not `torch.utils.benchmark.Timer.blocked_autorange`, which times blocks of calls and reports
    block means: the records keep the spread of single calls (p20/p80), which is what shows a
    busy host, and `--rounds` pools these samples across passes. The calls timed here take 10 µs
    or more, so the clock's own cost (well under 1 µs) does not need blocks to amortize it.
    `bench/micro` uses pytest-benchmark, which calibrates rounds itself, for single kernels.

    Warm-up takes two calls, or one when that one alone outlasts ``warmup_s`` (a whole generation,
    say). ``max_s`` bounds slow items: past it, three samples are enough (``min_reps`` otherwise)."""
    fn = _cycle(calls)
    start = time.perf_counter()
    deadline = start + warmup_s
    for i in itertools.count() if warmup_s > 0 else ():  # warmup_s=0: the caller has warmed up
        fn()
        now = time.perf_counter()
        if now >= deadline and (i >= 1 or now - start > warmup_s * 5):
            break
    samples = []
    start = time.perf_counter()
    deadline = start + budget_s
    enough = min(min_reps, 3)
    while len(samples) < max_reps and (len(samples) < min_reps or time.perf_counter() < deadline):
        if max_s is not None and len(samples) >= enough and time.perf_counter() - start > max_s:
            break
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return samples


def time_gpu(calls: Sequence[Call], *, warmup_ms: float = 25, rep_ms: float = 100) -> Timing:
    """Per-call CUDA time via ``triton.testing.do_bench`` (flushes L2 before each call)."""
    from triton.testing import do_bench

    p50, p0, p20, p80 = do_bench(_cycle(calls), warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.0, 0.2, 0.8])
    return Timing(p50, p0, p20, p80)


def time_cuda_graph(calls: Sequence[Call], *, rep_ms: float = 100, replays: int = 10,
                    max_captured: int = 2000) -> Timing:
    """Per-call CUDA time with launch overhead removed: many calls captured in one graph.

    The graph holds ``n`` calls cycling through ``calls``; each of ``replays``
    replays gives one sample of (replay time / n).

    `triton.testing.do_bench_cudagraph` measures the same way (side-stream warm-up, a 5-call
    estimate, unrolled calls in one graph, 10 replays) with one callable. This one stays because
    it warms up every rotating copy before capture, not just the first call; captures whole
    rounds, so each copy is replayed equally often; and caps the captured calls (a 5 µs op at
    rep=100 ms would otherwise unroll 20,000 calls into one graph).
    """
    calls = list(calls)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside capture: compile, autotune, allocator
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(side)

    probe = calls * math.ceil(5 / len(calls))
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for call in probe:
        call()
    end.record()
    end.synchronize()
    eager_ms = start.elapsed_time(end) / len(probe)

    rounds = max(1, min(max_captured // len(calls), math.ceil(rep_ms / replays / max(eager_ms, 1e-3) / len(calls))))
    n = rounds * len(calls)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls * rounds:
            call()
    graph.replay()
    torch.cuda.synchronize()

    samples = []
    for _ in range(replays):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / n)
    return Timing.from_samples(samples, reps=n * replays)


def steady_cpu_allocator() -> str | None:
    """Keep glibc malloc from handing large blocks back to the OS after each free.

    By default a large tensor may be a fresh mmap, page-faulted on every call,
    depending on allocation history: eager ops with big temporaries then time
    2-10x slower at random. Pinning the thresholds (the CPU analog of CUDA's
    caching allocator) makes CPU timings reproducible. Returns what was set,
    or None where malloc is not glibc's.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return None
    m_trim_threshold, m_mmap_threshold = -1, -3
    for threshold in (1 << 30, 32 << 20):  # newer glibc accepts 1 GiB, older caps at 32 MiB
        if mallopt(m_mmap_threshold, threshold) == 1 and mallopt(m_trim_threshold, threshold) == 1:
            return f"glibc mallopt: mmap and trim thresholds {threshold >> 20} MiB"
    return None


def _cpu_llc_bytes() -> int:
    """Size of the highest-level CPU cache from sysfs (Linux), 0 if unknown."""
    best_level, best_size = 0, 0
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            level = int((index / "level").read_text())
            size = (index / "size").read_text().strip()
        except (OSError, ValueError):
            continue
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(size[-1:], 1)
        if level > best_level and size.rstrip("KMG").isdigit():
            best_level, best_size = level, int(size.rstrip("KMG")) * scale
    return best_size


def within(context: Callable[[], ContextManager] | None, call: Callable[[], object]) -> Callable[[], object]:
    """`call` run inside `context()` (a forced backend, say), or `call` itself when there is none."""
    if context is None:
        return call

    def run():
        with context():
            return call()

    return run
