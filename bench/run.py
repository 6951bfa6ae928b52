#!/usr/bin/env python
"""Run benchmark suites; write one JSONL record per measurement, then the report and its charts.

    python bench/run.py [--suite NAME ...] [--device auto|cpu|cuda] [--quick | --full] [--out DIR]
                        [--compare OLD.jsonl ...] [--rounds N] [--no-plot] [--list]

Three sizes of run:

* default: every suite's headline cases (``@suite(..., headline=...)`` in ``bench/suites``), all of
  their impls, with the full timer; a few minutes on a 2-core CPU.
* ``--quick``: the suites' quick case lists (their headline cases among them where they have
  any) with a short timer; a smoke run of a minute or two.
* ``--full``: every case of every suite.

One file per suite: ``<out>/<suite>_<device>_<UTC timestamp>.jsonl``; then ``report.md`` and
``report.html`` (the front page, see ``bench/report.py``), the charts and ``summary.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import pkgutil
import platform
import re
import subprocess
import sys
import time
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
from llama.peak import cpu_peak_bytes, cuda_peak_bytes  # noqa: E402
from bench.common import (  # noqa: E402
    SUITES, Bench, Item, SuiteContext, Timing, cpu_samples, extra_fields, headline_items, steady_cpu_allocator,
    suite_info, time_cpu, time_cuda_graph, time_gpu,
)

RECORD_FIELDS = (
    "suite", "impl", "status", "reason", "case", "dtype", "pass",
    "timer", "time_ms", "min_ms", "p20_ms", "p80_ms", "reps",
    "bytes", "gbps", "flops", "tflops", "tokens", "tokens_per_s", "peak_mem_bytes", "device",
    "load_1min", "wall_s", "extra", "env",
)

# Timer settings: (default and full, quick).
# max_s: past it an item stops at three samples (CPU: whole generations take seconds per call).
CPU_TIMER = ({"budget_s": 0.5, "warmup_s": 0.1, "max_s": 4.0}, {"budget_s": 0.1, "warmup_s": 0.02, "max_s": 1.0})
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


def _load() -> float | None:
    """The host's 1-minute load average now (sampled per record: the host's load moves during a run)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


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
    if not ctx.is_cuda:  # the profiled call (peak memory) first: it is the first of the warm-up calls,
        settings = dict(CPU_TIMER[ctx.quick])  # and the only one where it alone outlasts the warm-up
        start = time.perf_counter()
        peak = cpu_peak_bytes(calls[0])
        if time.perf_counter() - start > 5 * settings["warmup_s"]:
            settings["warmup_s"] = 0.0
        timer, timing = "perf_counter", time_cpu(calls, **settings)
    elif item.cuda_graph:
        timer, timing = "cuda_graph", time_cuda_graph(calls, **GRAPH_TIMER[ctx.quick])
    else:
        timer, timing = "do_bench", time_gpu(calls, **GPU_TIMER[ctx.quick])
    if ctx.is_cuda:
        peak = cuda_peak_bytes(calls[0])
    return {**_fields(item, timer, timing, peak), "extra": extra_fields(calls)}


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
    start = time.perf_counter()
    try:
        record.update(measure(item, ctx), status="ok")
    except Exception as exc:
        record.update(_error(exc))
    finally:
        if ctx.is_cuda:
            with contextlib.suppress(RuntimeError):  # a sticky CUDA error is recorded already
                torch.cuda.empty_cache()
        record.update(wall_s=round(time.perf_counter() - start, 3), load_1min=_load())
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
    wall: dict[int, float] = dict.fromkeys(range(len(items)), 0.0)
    loads: dict[int, float | None] = {}
    for _ in range(rounds):
        for i, item in enumerate(items):
            show(item)
            start = time.perf_counter()
            if isinstance(item, Bench) and i not in errors:
                try:
                    if i not in calls:
                        calls[i] = item.setup()
                    samples[i] += cpu_samples(calls[i], min_reps=max(1, -(-5 // rounds)), **settings)
                except Exception as exc:
                    errors[i] = exc
            wall[i] += time.perf_counter() - start
            loads[i] = _load()
            done()
    records = []
    for i, item in enumerate(items):
        record = _record(suite, item, ctx, env)
        if isinstance(item, Bench):
            if i in errors:
                record.update(_error(errors[i]))
            else:
                peak = cpu_peak_bytes(calls[i][0])
                record.update(_fields(item, "perf_counter", Timing.from_samples(samples[i]), peak),
                              extra=extra_fields(calls[i]), status="ok")
            record.update(wall_s=round(wall[i], 3), load_1min=loads.get(i))
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
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="the suites' quick cases, a short timer (a minute or two)")
    size.add_argument("--full", action="store_true", help="every case of every suite (default: headline cases)")
    parser.add_argument("--out", type=Path, default=HERE / "out", help="output folder (default: bench/out)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="CPU: time every item of a suite in this many passes, pooling the samples "
                             "(steadier ratios on a shared host)")
    parser.add_argument("--compare", nargs="+", type=Path, default=(), metavar="OLD.jsonl",
                        help="earlier records: the report draws before/after for the same cases and flags "
                             "regressions beyond the spread")
    parser.add_argument("--no-roofline", action="store_true",
                        help="skip measuring the device's copy bandwidth and matmul throughput")
    parser.add_argument("--estimate", action="store_true", help="print the plan and its estimated time, and exit")
    parser.add_argument("--no-plot", action="store_true", help="skip the report, charts and summary.md")
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


def mode_of(args: argparse.Namespace) -> str:
    return "quick" if args.quick else "full" if args.full else "default"


def plan(ctx: SuiteContext, names, mode: str) -> dict[str, list[Item]]:
    """The items to run per suite: all of them (full), or the headline ones (default, quick)."""
    plans = {}
    for name in names:
        items = SUITES[name](ctx)
        plans[name] = items if mode == "full" else headline_items(name, ctx, items)
    return plans


# Seconds an item costs besides its timed calls: building inputs, the profiled call, a compile.
SETUP_S = {"cpu": 0.4, "cuda": 1.0}
COMPILE_S = {"cpu": 6.0, "cuda": 20.0}
STARTUP_S = {"cpu": 5.0, "cuda": 10.0}  # measuring the roofline


def _history(device: str, folders) -> dict[tuple, dict]:
    """The latest earlier record per (suite, impl, case, dtype, pass) on this device type."""
    from bench.report import load_records, record_key

    def stamp(path: Path) -> str:
        match = re.search(r"\d{8}T\d{6}Z", path.name)
        return match.group(0) if match else ""

    paths = sorted({p for folder in folders if folder.is_dir() for p in folder.glob("*_*_*.jsonl")}, key=stamp)
    found = {}
    for record in load_records(paths):
        try:
            if record["device"] == device and record["status"] == "ok" and record["time_ms"]:
                found[record_key(record)] = record
                # Any case of the same impl and pass: its throughput sizes a case not recorded yet.
                found[record["suite"], record["impl"], record["dtype"], record["pass"]] = record
        except (KeyError, TypeError):  # not a suite's record (a tuning sweep, say)
            continue
    return found


def _call_s(item: Bench, past: dict | None) -> float:
    """One call's seconds from a past record: its time for the same case, else its throughput."""
    if past is None:
        return 0.0
    if past["case"] == item.case:
        return past["time_ms"] / 1e3
    for work, rate, scale in ((item.tokens, "tokens_per_s", 1), (item.bytes, "gbps", 1e9), (item.flops, "tflops", 1e12)):
        if work and past.get(rate):
            return work / (past[rate] * scale)
    return 0.0


def estimate_s(name: str, item: Item, ctx: SuiteContext, mode: str, history: dict) -> float:
    """Seconds one item will take: its recorded wall time in a run of the same mode when known, else
    the timer's budget, or min_reps calls at its recorded time when that is longer, plus set-up."""
    if not isinstance(item, Bench):
        return 0.0
    device = ctx.device.type
    key = (name, device, item.impl, json.dumps(item.case, sort_keys=True), item.dtype, item.pass_)
    past = history.get(key)
    if past and past.get("wall_s") and (past["env"].get("mode") or "full") == mode:
        return past["wall_s"]
    call_s = _call_s(item, past or history.get((name, item.impl, item.dtype, item.pass_)))
    setup = SETUP_S[device] + (COMPILE_S[device] if "compile" in item.impl else 0.0) + 2 * call_s
    quick = mode == "quick"
    if device == "cpu":
        timer = CPU_TIMER[quick]
        warmup = call_s if call_s > 5 * timer["warmup_s"] else max(timer["warmup_s"], 3 * call_s)
        timed = max(timer["budget_s"], min(5 * call_s, max(timer["max_s"], 3 * call_s)))
        return setup + warmup + timed
    if item.cuda_graph:
        timer = GRAPH_TIMER[quick]
        return setup + 3 * timer["rep_ms"] / 1e3 + 10 * call_s
    timer = GPU_TIMER[quick]
    return setup + (timer["warmup_ms"] + timer["rep_ms"]) / 1e3 + 10 * call_s


def _duration(seconds: float) -> str:
    return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"


def measure_roofline(ctx: SuiteContext, quick: bool) -> dict:
    """The device's copy bandwidth and matmul throughput, measured now (for the report's roofline)."""
    dev = ctx.device
    if ctx.is_cuda:
        numel = 256 * 2**20  # 512 MiB of bf16 per buffer
        src, dst = torch.randn(numel, device=dev, dtype=torch.bfloat16), torch.empty(numel, device=dev,
                                                                                      dtype=torch.bfloat16)
        copy_ms = time_gpu([lambda: dst.copy_(src)]).min_ms
        nbytes = 2 * numel * 2
        matmul, n = {}, 8192
        for dtype, tag in ((torch.bfloat16, "bf16"), (torch.float16, "fp16")):
            a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
            matmul[tag] = 2 * n**3 / (time_gpu([lambda: a @ b]).min_ms * 1e-3) / 1e12
        how = ("dst.copy_(src) of 512 MiB bf16 (read + written bytes), 8192³ torch.matmul; do_bench minimum "
               "(the best the device did)")
    else:
        numel = max(ctx.cache_bytes * 4, 128 * 2**20) // 4  # float32 elements per buffer, well past the L3
        src, dst = torch.randn(numel), torch.empty(numel)
        budget = 0.2 if quick else 0.4
        copy_ms = time_cpu([lambda: dst.copy_(src)], budget_s=budget, warmup_s=0.05, min_reps=3).min_ms
        nbytes = 2 * numel * 4
        n = 1024 if quick else 2048
        a, b = torch.randn(n, n), torch.randn(n, n)
        mm_ms = time_cpu([lambda: a @ b], budget_s=budget, warmup_s=0.05, min_reps=3).min_ms
        matmul = {"fp32": 2 * n**3 / (mm_ms * 1e-3) / 1e12}
        how = (f"dst.copy_(src) of {numel * 4 >> 20} MiB fp32 (read + written bytes), {n}³ fp32 torch.matmul "
               f"on {torch.get_num_threads()} threads; fastest call (the best the host did)")
    return {"copy_gbps": nbytes / (copy_ms * 1e-3) / 1e9, "matmul_tflops": matmul, "how": how}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        print("\n".join(sorted(SUITES)))
        return 0

    torch.manual_seed(0)
    mode = mode_of(args)
    ctx = SuiteContext(torch.device(args.device), mode == "quick", mode == "full")
    now = datetime.now(timezone.utc)
    cpu_allocator = None if ctx.is_cuda else steady_cpu_allocator()
    env = environment(ctx.device, now.isoformat(timespec="seconds"), ctx.quick, cpu_allocator)
    env.update(mode=mode, cpu_count=os.cpu_count())
    plans = plan(ctx, dict.fromkeys(args.suite or sorted(SUITES)), mode)
    rounds = 1 if ctx.is_cuda else args.rounds
    env["rounds"] = rounds  # passes per item whose samples each record pools (see run_rounds)

    history = _history(ctx.device.type, [HERE / "results", args.out])
    per_suite = {name: sum(estimate_s(name, item, ctx, mode, history) for item in items)
                 for name, items in plans.items()}
    benches = sum(isinstance(i, Bench) for items in plans.values() for i in items)
    startup = 0.0 if args.no_roofline else STARTUP_S[ctx.device.type]  # imports done; the roofline to come
    print(f"{mode} run on {env['device_name']}: {benches} measurements in {len(plans)} suite(s), estimated "
          f"{_duration(startup + sum(per_suite.values()) * (1 if rounds == 1 else 1.2))} "
          f"({', '.join(f'{n} {_duration(t)}' for n, t in per_suite.items())}); "
          + ("--quick for a smoke run, " if mode != "quick" else "")
          + ("--full for every case" if mode != "full" else "headline cases only without --full"),
          file=sys.stderr)
    whole = [n for n in plans if mode != "full" and suite_info(n).headline is None]
    if whole:
        print(f"note: {', '.join(whole)} declare(s) no headline cases (@suite(name, headline=...)): run whole",
              file=sys.stderr)
    if args.estimate:
        return 0

    if not ctx.is_cuda and env["load_avg_1min"] > 0.5 * (os.cpu_count() or 1):
        print(f"warning: host load {env['load_avg_1min']} on {os.cpu_count()} cores; CPU timings will be noisy",
              file=sys.stderr)
    if not args.no_roofline:
        env["roofline"] = measure_roofline(ctx, ctx.quick)
    args.out.mkdir(parents=True, exist_ok=True)
    written = []
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

        for path in make_report(written, args.out, args.compare):
            print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
