#!/usr/bin/env python
"""Run benchmark suites; write one JSONL record per measurement, then charts.

    python bench/run.py [--suite NAME ...] [--device auto|cpu|cuda] [--quick] [--out DIR] [--no-plot] [--list]

One file per suite: ``<out>/<suite>_<device>_<UTC timestamp>.jsonl``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import pkgutil
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if __package__ in (None, ""):  # run as a script: import bench.* (and llama_kernels) from the repo root
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import bench.suites  # noqa: E402
from bench.common import (  # noqa: E402
    SUITES, Bench, Item, SuiteContext, Timing, cpu_samples, steady_cpu_allocator, time_cpu, time_cuda_graph,
    time_gpu,
)

RECORD_FIELDS = (
    "suite", "impl", "status", "reason", "case", "dtype", "pass",
    "timer", "time_ms", "min_ms", "p20_ms", "p80_ms", "reps",
    "bytes", "gbps", "flops", "tflops", "tokens", "tokens_per_s", "peak_mem_bytes", "device", "env",
)

# Timer settings: (full, quick).
CPU_TIMER = ({"budget_s": 0.5, "warmup_s": 0.1}, {"budget_s": 0.1, "warmup_s": 0.02})
GPU_TIMER = ({"warmup_ms": 25, "rep_ms": 100}, {"warmup_ms": 10, "rep_ms": 30})
GRAPH_TIMER = ({"rep_ms": 100, "replays": 10}, {"rep_ms": 30, "replays": 5})


def load_suites() -> None:
    """Import every module of ``bench.suites`` so that its suites register."""
    for module in pkgutil.iter_modules(bench.suites.__path__):
        importlib.import_module(f"{bench.suites.__name__}.{module.name}")


def environment(device: torch.device, timestamp: str, quick: bool, cpu_allocator: str | None) -> dict:
    """Tags shared by every record of a run."""
    commit, dirty = _git_state()
    return {
        "device_name": _device_name(device),
        "cpu_allocator": cpu_allocator,
        "load_avg_1min": round(os.getloadavg()[0], 2),  # CPU timings are only as quiet as the host
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _triton_version(),
        "python": platform.python_version(),
        "llama_kernels_build_info": _llama_kernels_build_info(),
        "git_commit": commit,
        "git_dirty": dirty,
        "timestamp": timestamp,
        "quick": quick,
    }


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def _llama_kernels_build_info():
    try:
        import llama_kernels

        return llama_kernels.build_info()
    except Exception:
        return None


def _git_state() -> tuple[str | None, bool | None]:
    """Short commit hash and whether tracked files differ from it; (None, None) outside git."""

    def git(*args: str) -> str:
        return subprocess.run(["git", "--no-optional-locks", *args], cwd=ROOT, capture_output=True,
                              text=True, check=True, timeout=10).stdout.strip()

    try:
        return git("rev-parse", "--short", "HEAD"), bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None, None


def measure(item: Bench, ctx: SuiteContext) -> dict:
    """Time one Bench with the timer fitting the device; the record's measurement fields."""
    calls = item.setup()
    if not ctx.is_cuda:
        timer, timing = "perf_counter", time_cpu(calls, **CPU_TIMER[ctx.quick])
    elif item.cuda_graph:
        timer, timing = "cuda_graph", time_cuda_graph(calls, **GRAPH_TIMER[ctx.quick])
    else:
        timer, timing = "do_bench", time_gpu(calls, **GPU_TIMER[ctx.quick])
    peak = _cuda_peak_bytes(calls[0]) if ctx.is_cuda else None
    return _fields(item, timer, timing, peak)


def _fields(item: Bench, timer: str, timing: Timing, peak: int | None) -> dict:
    seconds = timing.median_ms * 1e-3
    return {
        "timer": timer,
        "time_ms": timing.median_ms,
        "min_ms": timing.min_ms,
        "p20_ms": timing.p20_ms,
        "p80_ms": timing.p80_ms,
        "reps": timing.reps,
        "gbps": item.bytes / seconds / 1e9 if item.bytes else None,
        "tflops": item.flops / seconds / 1e12 if item.flops else None,
        "tokens_per_s": item.tokens / seconds if item.tokens else None,
        "peak_mem_bytes": peak,
    }


def _cuda_peak_bytes(call) -> int:
    """Peak bytes allocated during one call beyond what was allocated before it (inputs)."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    call()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def _record(suite: str, item: Item, ctx: SuiteContext, env: dict) -> dict:
    """A record with the item's description and no measurement yet."""
    record = dict.fromkeys(RECORD_FIELDS)
    record.update(suite=suite, impl=item.impl, device=ctx.device.type, env=env)
    if not isinstance(item, Bench):
        record.update(status=item.status, reason=item.reason)
    else:
        record.update({"case": item.case, "dtype": item.dtype, "pass": item.pass_,
                       "bytes": item.bytes, "flops": item.flops, "tokens": item.tokens})
    return record


def _error(exc: Exception) -> dict:
    return {"status": "error", "reason": f"{type(exc).__name__}: {exc}"[:2000]}


def run_item(suite: str, item: Item, ctx: SuiteContext, env: dict) -> dict:
    """Measure one item into a full record; failures become status "error"."""
    record = _record(suite, item, ctx, env)
    if not isinstance(item, Bench):
        return record
    try:
        record.update(measure(item, ctx), status="ok")
    except Exception as exc:
        record.update(_error(exc))
    finally:
        if ctx.is_cuda:
            with contextlib.suppress(RuntimeError):  # a sticky CUDA error is recorded already
                torch.cuda.empty_cache()
    return record


def run_rounds(suite: str, items: list[Item], ctx: SuiteContext, env: dict, rounds: int,
               show: Callable[[Item], object], done: Callable[[], object]) -> list[dict]:
    """CPU timing in `rounds` passes over all the items, each pass with 1/rounds of the time
    budget; each record pools its item's samples from every pass. A busy spell of the host
    then touches every impl of a case alike, instead of whichever happened to run in it.
    Every item's inputs stay allocated until the last pass."""
    settings = dict(CPU_TIMER[ctx.quick])
    settings["budget_s"] /= rounds
    calls: dict[int, Sequence] = {}
    samples: dict[int, list[float]] = {i: [] for i in range(len(items))}
    errors: dict[int, Exception] = {}
    for _ in range(rounds):
        for i, item in enumerate(items):
            show(item)
            if isinstance(item, Bench) and i not in errors:
                try:
                    if i not in calls:
                        calls[i] = item.setup()
                    samples[i] += cpu_samples(calls[i], min_reps=max(1, -(-5 // rounds)), **settings)
                except Exception as exc:
                    errors[i] = exc
            done()
    records = []
    for i, item in enumerate(items):
        record = _record(suite, item, ctx, env)
        if isinstance(item, Bench):
            if i in errors:
                record.update(_error(errors[i]))
            else:
                record.update(_fields(item, "perf_counter", Timing.from_samples(samples[i]), None), status="ok")
        records.append(record)
    return records


def _describe(item: Item) -> str:
    if isinstance(item, Bench):
        return f"{item.impl} {item.pass_} {'x'.join(map(str, item.case.values()))} {item.dtype}"
    return item.impl


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", action="append", metavar="NAME", help="suite to run (repeatable; default: all)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: cuda when available, else cpu")
    parser.add_argument("--quick", action="store_true", help="fewer shapes and repetitions")
    parser.add_argument("--out", type=Path, default=HERE / "out", help="output folder (default: bench/out)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="CPU: time every item of a suite in this many passes, pooling the samples "
                             "(steadier ratios on a shared host)")
    parser.add_argument("--no-plot", action="store_true", help="skip charts and summary.md")
    parser.add_argument("--list", action="store_true", help="list suites and exit")
    args = parser.parse_args(argv)
    load_suites()
    unknown = sorted(set(args.suite or ()) - SUITES.keys())
    if unknown:
        parser.error(f"unknown suite(s) {', '.join(unknown)}; known: {', '.join(sorted(SUITES))}")
    if args.rounds < 1:
        parser.error(f"--rounds: expected a positive count, got {args.rounds}")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    elif args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is False")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        print("\n".join(sorted(SUITES)))
        return 0

    torch.manual_seed(0)
    ctx = SuiteContext(torch.device(args.device), args.quick)
    now = datetime.now(timezone.utc)
    cpu_allocator = None if ctx.is_cuda else steady_cpu_allocator()
    env = environment(ctx.device, now.isoformat(timespec="seconds"), args.quick, cpu_allocator)
    plans = {name: SUITES[name](ctx) for name in dict.fromkeys(args.suite or sorted(SUITES))}

    if not ctx.is_cuda and env["load_avg_1min"] > 0.5 * (os.cpu_count() or 1):
        print(f"warning: host load {env['load_avg_1min']} on {os.cpu_count()} cores; CPU timings will be noisy",
              file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    written = []
    rounds = 1 if ctx.is_cuda else args.rounds
    env["rounds"] = rounds  # passes per item whose samples each record pools (see run_rounds)
    with tqdm(total=rounds * sum(map(len, plans.values())), unit="bench", dynamic_ncols=True) as bar:
        for name, items in plans.items():
            path = args.out / f"{name}_{args.device}_{now:%Y%m%dT%H%M%SZ}.jsonl"
            statuses = []
            with path.open("w") as f:
                def write(record):
                    f.write(json.dumps(record, default=str) + "\n")
                    f.flush()  # a record per item as it comes, so an interrupted run keeps what it measured
                    statuses.append(record["status"])

                def show(item, name=name):
                    bar.set_postfix_str(f"{name}: {_describe(item)}")

                if rounds > 1:
                    for record in run_rounds(name, items, ctx, env, rounds, show, bar.update):
                        write(record)
                else:
                    for item in items:
                        show(item)
                        write(run_item(name, item, ctx, env))
                        bar.update()
            counts = ", ".join(f"{statuses.count(s)} {s}" for s in dict.fromkeys(statuses))
            bar.write(f"{path} ({counts})")
            written.append(path)

    if not args.no_plot:
        from bench.plot import make_report

        for path in make_report(written, args.out):
            print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
