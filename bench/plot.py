#!/usr/bin/env python
"""Charts (PNG), the front page (report.md, report.html) and a summary table from bench JSONL files.

    python bench/plot.py FILE.jsonl [...] [--out DIR] [--compare OLD.jsonl ...]

The front page and its charts (speedup over each peer, peak memory, fraction of the roofline, and
with --compare the before/after of the same cases) come from `bench/report.py`; this module adds
the per-pass detail charts and summary.md.

Records are grouped into runs (suite, device, timestamp). Per run and pass, one
grouped bar chart: x = case and dtype, bars = impl, y = GB/s (else TFLOP/s,
else time). ``summary.md`` holds a table per run and pass with the speedup of
each of ours ("llama_kernels*" impls) over each peer of the same run: peer time / our
time, and the fields a suite's set-up measured (``extra``) where records have them. Records
with status missing/error are listed there, not plotted.
"""

from __future__ import annotations

import argparse
import itertools
import math
import re
import sys
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
if __package__ in (None, ""):  # run as a script: import bench.* from the repo root
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
    sys.path.insert(0, str(HERE.parent))

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from bench import report  # noqa: E402
from bench.common import OURS_PREFIXES  # noqa: E402  (ours: "llama_kernels*", and "kernels*" in older records)
# Main figure per chart: the first one every record of the pass has.
METRICS = (("tokens_per_s", "tokens/s (higher is better)"), ("gbps", "GB/s (higher is better)"),
           ("tflops", "TFLOP/s (higher is better)"),
           ("time_ms", "time ms (lower is better)"))


def make_report(paths: list[Path], out_dir: Path, compare: list[Path] = ()) -> list[Path]:
    """Write the report (report.md, report.html and their charts), one detail PNG per run and pass,
    and ``summary.md`` into ``out_dir``; the written paths."""
    return report.write_report(paths, out_dir, compare) + _details(paths, out_dir)


def _details(paths: list[Path], out_dir: Path) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs: dict[tuple, list[dict]] = defaultdict(list)
    for record in report.load_records(paths):
        runs[(record["suite"], record["device"], record["env"]["timestamp"])].append(record)

    written, summary = [], ["# Benchmark summary", "",
                            f"Speedup = peer time / our time (> 1: ours faster); ours = impls named `{OURS_PREFIXES[0]}*`.", ""]
    for (suite, device, timestamp), records in runs.items():
        env = records[0]["env"]
        ok = [r for r in records if r["status"] == "ok"]
        summary += _run_header(suite, device, env)
        for pass_ in dict.fromkeys(r["pass"] for r in ok):
            rows = [r for r in ok if r["pass"] == pass_]
            stamp = re.sub(r"[^0-9T]", "", timestamp[:19]) + "Z"
            path = out_dir / f"{suite}_{device}_{stamp}_{re.sub(r'[^A-Za-z0-9]+', '_', pass_)}.png"
            _bar_chart(rows, f"{suite} · {pass_} · {env['device_name']} · {timestamp[:10]}", _env_line(env), path)
            written.append(path)
            summary += _pass_tables(pass_, rows)
        summary += _not_measured(r for r in records if r["status"] != "ok")

    path = out_dir / "summary.md"
    path.write_text("\n".join(summary))
    return written + [path]


def _env_line(env: dict) -> str:
    commit = env["git_commit"] or "no commit"
    if env["git_dirty"]:
        commit += " (dirty)"
    return (f"torch {env['torch']} · triton {env['triton'] or '-'} · python {env['python']}"
            f" · {commit} · {env['timestamp']}")


def _metric(records: list[dict]) -> tuple[str, str]:
    return next((key, label) for key, label in METRICS if all(r[key] is not None for r in records))


def _bar_chart(records: list[dict], title: str, subtitle: str, path: Path) -> None:
    """Grouped bars, one panel per (dtype, timer) so that each gets its own y scale."""
    key, label = _metric(records)
    impls = list(dict.fromkeys(r["impl"] for r in records))
    colors = dict(zip(impls, itertools.cycle(plt.get_cmap("tab10").colors)))
    panels: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        panels[(r["dtype"], r["timer"])].append(r)
    most_cases = max(len({report.shape_label(r["case"]) for r in rows}) for rows in panels.values())
    width_in = min(20.0, max(7.0, 1.5 + most_cases * (0.3 * len(impls) + 0.5)))

    fig, axes = plt.subplots(len(panels), 1, figsize=(width_in, 1.2 + 3.3 * len(panels)), squeeze=False,
                             layout="constrained")
    for ax, ((dtype, timer), rows) in zip(axes[:, 0], panels.items()):
        cases = list(dict.fromkeys(report.shape_label(r["case"]) for r in rows))
        values = {(report.shape_label(r["case"]), r["impl"]): r[key] for r in rows}
        width = 0.8 / len(impls)
        for i, impl in enumerate(impls):
            present = [(c, case) for c, case in enumerate(cases) if (case, impl) in values]
            if not present:
                continue
            xs = [c + (i - (len(impls) - 1) / 2) * width for c, _ in present]
            ys = [values[case, impl] for _, case in present]
            bars = ax.bar(xs, ys, width, color=colors[impl], edgecolor="white", linewidth=0.5,
                          hatch="//" if impl.startswith(OURS_PREFIXES) else None)
            ax.bar_label(bars, labels=[_short(y) for y in ys], fontsize=7, rotation=90, padding=2)
        rotate = max(map(len, cases), default=0) * len(cases) > 90
        ax.set_xticks(range(len(cases)), cases, fontsize=8, rotation=30 if rotate else 0,
                      ha="right" if rotate else "center")
        ax.set_title(" · ".join(filter(None, [dtype, timer])), fontsize=9, loc="left")
        ax.set_ylabel(label, fontsize=8)
        ax.margins(y=0.2)
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    handles = [plt.Rectangle((0, 0), 1, 1, facecolor=colors[i], hatch="//" if i.startswith(OURS_PREFIXES) else None,
                             edgecolor="white") for i in impls]
    # Outside the axes, in room the constrained layout reserves: never clipped, whatever the names.
    label_in = 0.6 + 0.065 * max(map(len, impls))  # a handle plus the longest name at 8 pt
    ncols = max(1, min(len(impls), int((fig.get_figwidth() - 0.3) // label_in)))
    fig.legend(handles, impls, loc="outside lower center", ncols=ncols, fontsize=8, frameon=False)
    fig.suptitle(f"{title}\n{subtitle}", fontsize=9)
    report.save_figure(fig, path)


def _short(value: float) -> str:
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def _run_header(suite: str, device: str, env: dict) -> list[str]:
    quick = ", quick" if env.get("quick") else ""
    return [f"## {suite} on {env['device_name']} ({device}{quick})", "", _env_line(env), ""]


# Derived figures shown as summary columns when any record of the pass has them.
DERIVED = (("gbps", "GB/s", ".1f"), ("tflops", "TFLOP/s", ".2f"), ("tokens_per_s", "tokens/s", ".1f"))


def _fmt(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def _pass_tables(pass_: str, records: list[dict]) -> list[str]:
    impls = list(dict.fromkeys(r["impl"] for r in records))
    ours = [i for i in impls if i.startswith(OURS_PREFIXES)]
    peers = [i for i in impls if not i.startswith(OURS_PREFIXES)]
    derived = [(k, name, spec) for k, name, spec in DERIVED if any(r.get(k) is not None for r in records)]
    times: dict[str, dict[str, float]] = defaultdict(dict)  # case label -> impl -> ms
    for r in records:
        times[report.case_label(r)][r["impl"]] = r["time_ms"]

    keys = report.extra_keys(records)
    header = ["case", "impl", "time ms"] + [name for _, name, _ in derived] + [k.replace("_", " ") for k in keys]
    header += [f"vs {p}" for p in peers] if ours else []
    lines = [f"### {pass_}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in records:
        label, impl = report.case_label(r), r["impl"]
        cells = [label, impl, _fmt(r["time_ms"], ".4g")] + [_fmt(r.get(k), spec) for k, _, spec in derived]
        cells += [report.extra_text(k, (r.get("extra") or {}).get(k)) for k in keys]
        if ours:
            peer_times = times[label]
            cells += [f"{peer_times[p] / r['time_ms']:.2f}×" if impl in ours and p in peer_times else ""
                      for p in peers]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")

    if ours and peers:
        lines += ["Geometric-mean speedup over the cases both measured:", "",
                  "| impl | " + " | ".join(f"vs {p}" for p in peers) + " |", "|" + "---|" * (len(peers) + 1)]
        for impl in ours:
            cells = []
            for peer in peers:
                ratios = [t[peer] / t[impl] for t in times.values() if impl in t and peer in t]
                cells.append(f"{math.exp(sum(map(math.log, ratios)) / len(ratios)):.2f}× (n={len(ratios)})"
                             if ratios else "")
            lines.append(f"| {impl} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _not_measured(records) -> list[str]:
    lines = []
    for r in records:
        where = " ".join(filter(None, [r["pass"], r["case"] and report.case_label(r)]))
        reason = next(iter((r["reason"] or "").strip().splitlines()), "")[:300]
        lines.append(f"- `{r['impl']}`{' ' + where if where else ''}: **{r['status']}**: {reason}")
    return ["### Not measured", "", *lines, ""] if lines else []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path, metavar="FILE.jsonl")
    parser.add_argument("--out", type=Path, help="output folder (default: folder of the first file)")
    parser.add_argument("--compare", nargs="+", type=Path, default=(), metavar="OLD.jsonl",
                        help="earlier records of the same cases: draw before/after, flag regressions")
    args = parser.parse_args(argv)
    for path in make_report(args.files, args.out or args.files[0].parent, args.compare):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
