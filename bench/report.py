"""The benchmark's front page: report.md and report.html from JSONL records, with their charts.

    python bench/plot.py FILE.jsonl [...] [--out DIR] [--compare OLD.jsonl ...]

(`bench/plot.py` is the command: it writes this report and also the per-pass detail charts.)

Per suite and pass the report compares our best impl with each peer measured in the same run
(impls named ``llama_kernels*`` are ours; a suite's references, such as a plain copy of the same
bytes, are rooflines, not peers):

* a headline table at the top: per suite and pass, the geometric mean over the cases of our best
  against the best peer of each case (peer time / our time), its range, and how many cases are
  wins, losses or within noise; with the device, date and commit of the run;
* a speedup chart (log scale, a line at 1x), bars per peer with the p20-p80 spread as error bars;
* peak memory per impl, where the records have it;
* the fraction of the roofline, where records carry bytes or FLOPs: a suite's own reference in
  the same case (the copy of the same bytes), else the copy bandwidth and matmul throughput that
  `bench/run.py` measured on the device at the start of the run (``env.roofline``);
* with ``--compare``, the same cases before and after, regressions flagged beyond the spread;
* a suite's own headline ratio (``@suite(..., ratio=HeadlineRatio(...))``: one impl's field over
  another's per case, such as QLoRA's peak memory over full fine-tuning's) in the headline table,
  against its target; and per pass, a table of every record with the fields its set-up measured
  (``extra``, such as trainable parameters) where records have them.

A ratio is "within noise" when the spreads overlap 1x: peer p20 / our p80 <= 1 <= peer p80 /
our p20. Such ratios are greyed, not counted as wins or losses.
"""

from __future__ import annotations

import html
import itertools
import json
import math
import re
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
if __package__ in (None, ""):  # run as a script: import bench.* from the repo root
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
    sys.path.insert(0, str(HERE.parent))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402

from bench.common import is_ours, suite_info  # noqa: E402

DPI = 100
# A change between two runs counts when the spreads do not overlap and the medians differ this much.
COMPARE_MIN_CHANGE = 0.05
PALETTE = plt.get_cmap("tab10").colors
NOISE_COLOR = "#c8c8c8"


# ----------------------------------------------------------------------------- records
def load_records(paths) -> list[dict]:
    records = []
    for path in paths:
        with open(path) as f:
            records.extend(json.loads(line) for line in f if line.strip())
    return records


def shape_label(case: dict | None) -> str:
    case = case or {}
    if all(isinstance(v, int) for v in case.values()):
        if case and all(k[:1].isupper() and len(k) <= 3 for k in case):  # dims named B, H, S, D: "B4 H16"
            return " ".join(f"{k}{v}" for k, v in case.items())
        return "×".join(map(str, case.values()))
    return ", ".join(f"{k}={v}" for k, v in case.items())


def case_label(record: dict) -> str:
    return " ".join(filter(None, [shape_label(record["case"]), record["dtype"]]))


def record_key(record: dict) -> tuple:
    return (record["suite"], record["device"], record["impl"], json.dumps(record["case"], sort_keys=True),
            record["dtype"], record["pass"])


def load_suites() -> None:
    """Register the suites so that their references are known; records of unknown suites still plot."""
    try:
        from bench.run import load_suites as load
        load()
    except Exception:  # noqa: BLE001 - the report works from records alone
        pass


@dataclass
class Ratio:
    """peer time / our time, with the bounds the two spreads allow."""

    value: float
    lo: float
    hi: float

    @classmethod
    def of(cls, peer: dict, ours: dict) -> Ratio:
        return cls(peer["time_ms"] / ours["time_ms"], _p(peer, "p20_ms") / _p(ours, "p80_ms"),
                   _p(peer, "p80_ms") / _p(ours, "p20_ms"))

    @property
    def verdict(self) -> str:
        return "win" if self.lo > 1 else "loss" if self.hi < 1 else "noise"


def _p(record: dict, key: str) -> float:
    return record.get(key) or record["time_ms"]


def geomean(values) -> float | None:
    values = [v for v in values if v and v > 0]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


@dataclass
class CaseRow:
    label: str
    ours: dict | None  # our fastest record
    peers: dict[str, dict]  # peer -> record
    refs: dict[str, dict]
    all_ours: dict[str, dict]

    @property
    def best_peer(self) -> str | None:
        return min(self.peers, key=lambda p: self.peers[p]["time_ms"]) if self.peers else None

    def ratio(self, peer: str | None = None) -> Ratio | None:
        peer = peer or self.best_peer
        if self.ours is None or peer is None or peer not in self.peers:
            return None
        return Ratio.of(self.peers[peer], self.ours)


@dataclass
class PassView:
    name: str
    rows: list[CaseRow]
    records: list[dict]

    @property
    def peers(self) -> list[str]:
        return list(dict.fromkeys(p for row in self.rows for p in row.peers))

    def summary(self) -> dict | None:
        ratios = [r for r in (row.ratio() for row in self.rows) if r is not None]
        if not ratios:
            return None
        verdicts = Counter(r.verdict for r in ratios)
        return {"geomean": Ratio(geomean(r.value for r in ratios), geomean(r.lo for r in ratios),
                                 geomean(r.hi for r in ratios)),
                "min": min(r.value for r in ratios), "max": max(r.value for r in ratios), "n": len(ratios),
                "verdicts": verdicts,
                "best_peers": Counter(row.best_peer for row in self.rows if row.ratio() is not None)}


@dataclass
class RunView:
    suite: str
    device: str
    env: dict
    records: list[dict]
    passes: list[PassView] = field(default_factory=list)
    unavailable: list[dict] = field(default_factory=list)

    @property
    def stamp(self) -> str:
        return re.sub(r"[^0-9T]", "", self.env["timestamp"][:19]) + "Z"

    @property
    def date(self) -> str:
        return self.env["timestamp"][:10]

    @property
    def commit(self) -> str:
        commit = self.env.get("git_commit") or "no commit"
        return commit + (" (dirty)" if self.env.get("git_dirty") else "")

    @property
    def mode(self) -> str:
        return self.env.get("mode") or ("quick" if self.env.get("quick") else "full")

    @property
    def device_name(self) -> str:
        return self.env.get("device_name") or self.device

    def missing_peers(self) -> list[dict]:
        return [r for r in self.unavailable if not is_ours(r["impl"])]

    def loads(self) -> list[float]:
        values = [r.get("load_1min") for r in self.records if r.get("load_1min") is not None]
        return values or ([self.env["load_avg_1min"]] if self.env.get("load_avg_1min") is not None else [])


def build_runs(records: list[dict]) -> list[RunView]:
    grouped: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        grouped[(r["suite"], r["device"], r["env"]["timestamp"])].append(r)
    runs = []
    for (suite, device, _), recs in grouped.items():
        refs = set(suite_info(suite).references)
        run = RunView(suite, device, recs[0]["env"], recs)
        run.unavailable = [r for r in recs if r["status"] != "ok"]
        ok = [r for r in recs if r["status"] == "ok"]
        for pass_ in dict.fromkeys(r["pass"] for r in ok):
            in_pass = [r for r in ok if r["pass"] == pass_]
            by_case: dict[str, list[dict]] = defaultdict(list)
            for r in in_pass:
                by_case[case_label(r)].append(r)
            rows = []
            for label, rs in by_case.items():
                ours = {r["impl"]: r for r in rs if is_ours(r["impl"])}
                peers = {r["impl"]: r for r in rs if not is_ours(r["impl"]) and r["impl"] not in refs}
                ref = {r["impl"]: r for r in rs if r["impl"] in refs}
                best = min(ours.values(), key=lambda r: r["time_ms"]) if ours else None
                rows.append(CaseRow(label, best, peers, ref, ours))
            run.passes.append(PassView(pass_, rows, in_pass))
        runs.append(run)
    return runs


# ----------------------------------------------------------------------------- roofline
def roofline_fraction(record: dict, refs: dict[str, dict]) -> tuple[float, str] | None:
    """(fraction of the roofline reached, which roofline) for one record, None without one."""
    if record.get("gbps") and refs:
        ref = next((r for r in refs.values() if r.get("gbps")), None)
        if ref is not None:
            return record["gbps"] / ref["gbps"], f"`{ref['impl']}` of the same bytes, same case"
    roof = (record.get("env") or {}).get("roofline") or {}
    parts = []
    if record.get("gbps") and roof.get("copy_gbps"):
        parts.append((record["gbps"] / roof["copy_gbps"], "copy bandwidth"))
    peak = (roof.get("matmul_tflops") or {}).get(record.get("dtype"))
    if record.get("tflops") and peak:
        parts.append((record["tflops"] / peak, f"{record['dtype']} matmul throughput"))
    return max(parts) if parts else None


# ----------------------------------------------------------------------------- charts
def _colors(names) -> dict[str, tuple]:
    return dict(zip(names, itertools.cycle(PALETTE)))


def _title(fig, run: RunView, what: str) -> None:
    fig.suptitle(f"{run.suite} · {what}\n{run.device_name} · {run.date} · {run.commit}"
                 + (f" · {run.mode} run" if run.mode != "full" else ""), fontsize=10)


def _figure(n_panels: int, n_cases: int, n_bars: int, extra_height: float = 0.0):
    width = min(18.0, max(7.5, 3.0 + n_cases * (0.28 * max(n_bars, 1) + 0.6)))
    fig, axes = plt.subplots(n_panels, 1, figsize=(width, 1.4 + 2.9 * n_panels + extra_height),
                             squeeze=False, layout="constrained")
    return fig, axes[:, 0]


def _legend(fig, handles, labels) -> None:
    """Below the axes, in room the constrained layout reserves, in as many columns as fit the width."""
    if not handles:
        return
    label_in = 0.6 + 0.065 * max(map(len, labels))  # a handle plus the longest label at 8 pt
    ncols = max(1, min(len(labels), int((fig.get_figwidth() - 0.3) // label_in)))
    fig.legend(handles, labels, loc="outside lower center", ncols=ncols, fontsize=8, frameon=False)


def _ratio_axis(ax) -> None:
    """Log y axis labelled 0.5×, 1×, 2×, ..."""
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}×"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _xticks(ax, labels) -> None:
    rotate = max(map(len, labels), default=0) * len(labels) > 90
    ax.set_xticks(range(len(labels)), labels, fontsize=8, rotation=30 if rotate else 0,
                  ha="right" if rotate else "center")


def _missing_handles(run: RunView) -> tuple[list, list]:
    names = list(dict.fromkeys(r["impl"] for r in run.missing_peers()))
    return ([Line2D([], [], linestyle="none") for _ in names],
            [f"{n}: {next(r['status'] for r in run.missing_peers() if r['impl'] == n)}" for n in names])


def speedup_chart(run: RunView, path: Path) -> Path | None:
    """Per pass: bars per peer of (peer time / our best time), log scale, a line at 1x."""
    passes = [p for p in run.passes if any(row.ours and row.peers for row in p.rows)]
    if not passes:
        return None
    peers = list(dict.fromkeys(p for view in passes for p in view.peers))
    colors = _colors(peers)
    cases_max = max(len(v.rows) for v in passes)
    fig, axes = _figure(len(passes), cases_max, len(peers))
    for ax, view in zip(axes, passes):
        rows = [row for row in view.rows if row.ours and row.peers]
        width = 0.8 / len(peers)
        values = []
        for i, peer in enumerate(peers):
            for c, row in enumerate(rows):
                ratio = row.ratio(peer)
                if ratio is None:
                    continue
                x = c + (i - (len(peers) - 1) / 2) * width
                noise = ratio.verdict == "noise"
                ax.bar(x, ratio.value, width, color=NOISE_COLOR if noise else colors[peer],
                       edgecolor=colors[peer], linewidth=1.0)
                ax.errorbar(x, ratio.value, yerr=[[max(ratio.value - ratio.lo, 0)], [max(ratio.hi - ratio.value, 0)]],
                            fmt="none", ecolor="black", elinewidth=0.7, capsize=1.5)
                ax.annotate(f"{ratio.value:.2f}", (x, max(ratio.hi, ratio.value)), xytext=(0, 2), textcoords="offset points",
                            ha="center", fontsize=6, rotation=90 if len(peers) > 2 else 0,
                            color="gray" if noise else "black")
                values += [ratio.lo, ratio.hi, ratio.value]
        ax.axhline(1.0, color="black", linewidth=0.9)
        _ratio_axis(ax)
        lo, hi = min(values + [1.0]), max(values + [1.0])
        ax.set_ylim(lo / 1.6, hi * 2.2)
        _xticks(ax, [f"{row.label}\n(ours: {row.ours['impl']})" if len(row.all_ours) > 1 else row.label
                     for row in rows])
        ax.set_title(view.name, fontsize=9, loc="left")
        ax.set_ylabel("speedup, × (peer time / our time)", fontsize=8)
        ax.grid(axis="y", which="both", alpha=0.25)
        ax.set_axisbelow(True)
    handles = [Patch(facecolor=colors[p], edgecolor=colors[p]) for p in peers]
    labels = [f"vs {p}" for p in peers]
    handles.append(Patch(facecolor=NOISE_COLOR, edgecolor="gray"))
    labels.append("within noise (p20-p80 spreads overlap 1×)")
    mh, ml = _missing_handles(run)
    _legend(fig, handles + mh, labels + ml)
    _title(fig, run, "speedup of our best impl over each peer (> 1: ours faster)")
    return _save(fig, path)


def memory_chart(run: RunView, path: Path) -> Path | None:
    """Per pass: peak bytes allocated during one call beyond the inputs, MiB, per impl."""
    passes = [p for p in run.passes if any(r.get("peak_mem_bytes") is not None for r in p.records)]
    if not passes:
        return None
    impls = list(dict.fromkeys(r["impl"] for v in passes for r in v.records))
    colors = _colors(impls)
    fig, axes = _figure(len(passes), max(len(v.rows) for v in passes), len(impls))
    for ax, view in zip(axes, passes):
        cases = list(dict.fromkeys(case_label(r) for r in view.records))
        values = {(case_label(r), r["impl"]): r["peak_mem_bytes"] for r in view.records
                  if r.get("peak_mem_bytes") is not None}
        width = 0.8 / len(impls)
        for i, impl in enumerate(impls):
            present = [(c, case) for c, case in enumerate(cases) if (case, impl) in values]
            if not present:
                continue
            xs = [c + (i - (len(impls) - 1) / 2) * width for c, _ in present]
            ys = [values[case, impl] / 2**20 for _, case in present]
            bars = ax.bar(xs, ys, width, color=colors[impl], hatch="//" if is_ours(impl) else None,
                          edgecolor="white", linewidth=0.5)
            ax.bar_label(bars, labels=[_short(y) for y in ys], fontsize=6, rotation=90, padding=2)
        _xticks(ax, cases)
        ax.margins(y=0.25)
        ax.set_title(view.name, fontsize=9, loc="left")
        ax.set_ylabel("peak memory, MiB (lower is better)", fontsize=8)
        ax.grid(axis="y", alpha=0.25)
        ax.set_axisbelow(True)
    handles = [Patch(facecolor=colors[i], hatch="//" if is_ours(i) else None, edgecolor="white") for i in impls]
    _legend(fig, handles, impls)
    _title(fig, run, "peak memory allocated during one call, beyond its inputs")
    return _save(fig, path)


def roofline_chart(run: RunView, path: Path) -> tuple[Path | None, set[str]]:
    """Per pass: the fraction of the roofline each impl reaches; (path, rooflines used)."""
    panels, used = [], set()
    for view in run.passes:
        data = {}
        for row in view.rows:
            for r in [*row.all_ours.values(), *row.peers.values()]:
                frac = roofline_fraction(r, row.refs)
                if frac is not None:
                    data[(row.label, r["impl"])] = frac[0]
                    used.add(frac[1])
        if data:
            panels.append((view, data))
    if not panels:
        return None, used
    impls = list(dict.fromkeys(impl for _, data in panels for _, impl in data))
    colors = _colors(impls)
    fig, axes = _figure(len(panels), max(len(v.rows) for v, _ in panels), len(impls))
    for ax, (view, data) in zip(axes, panels):
        cases = list(dict.fromkeys(case for case, _ in data))
        width = 0.8 / len(impls)
        for i, impl in enumerate(impls):
            present = [(c, case) for c, case in enumerate(cases) if (case, impl) in data]
            if not present:
                continue
            xs = [c + (i - (len(impls) - 1) / 2) * width for c, _ in present]
            ys = [data[case, impl] for _, case in present]
            bars = ax.bar(xs, ys, width, color=colors[impl], hatch="//" if is_ours(impl) else None,
                          edgecolor="white", linewidth=0.5)
            ax.bar_label(bars, labels=[f"{y:.2f}" for y in ys], fontsize=6, rotation=90, padding=2)
        ax.axhline(1.0, color="black", linewidth=0.9, linestyle="--")
        _xticks(ax, cases)
        ax.set_ylim(0, max(1.15, max(data.values()) * 1.3))
        ax.set_title(view.name, fontsize=9, loc="left")
        ax.set_ylabel("fraction of the roofline (1 = at the bound)", fontsize=8)
        ax.grid(axis="y", alpha=0.25)
        ax.set_axisbelow(True)
    handles = [Patch(facecolor=colors[i], hatch="//" if is_ours(i) else None, edgecolor="white") for i in impls]
    _legend(fig, handles, impls)
    _title(fig, run, "fraction of the measured roofline (" + "; ".join(sorted(used)).replace("`", "") + ")")
    return _save(fig, path), used


def compare_chart(rows: list[dict], title: str, path: Path) -> Path | None:
    """Horizontal bars of old time / new time per matched record, log scale; red = regression."""
    if not rows:
        return None
    height = 1.6 + 0.22 * len(rows)
    fig, ax = plt.subplots(figsize=(10, height), layout="constrained")
    color = {"regression": "#d62728", "improvement": "#2ca02c", "noise": NOISE_COLOR}
    ys = range(len(rows))
    speed = [r["speed"] for r in rows]
    ax.barh(ys, speed, color=[color[r["verdict"]] for r in rows], edgecolor="gray", linewidth=0.5)
    ax.errorbar(speed, ys, xerr=[[max(r["speed"] - r["lo"], 0) for r in rows],
                                 [max(r["hi"] - r["speed"], 0) for r in rows]],
                fmt="none", ecolor="black", elinewidth=0.6, capsize=1.5)
    ax.axvline(1.0, color="black", linewidth=0.9)
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}×"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_yticks(list(ys), [r["label"] for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("old time / new time, × (> 1: faster now; log scale)", fontsize=8)
    ax.grid(axis="x", which="both", alpha=0.25)
    handles = [Patch(facecolor=c) for c in color.values()]
    fig.legend(handles, ["regression beyond the spread", "improvement beyond the spread", "within noise"],
               loc="outside upper center", ncols=3, fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def save_figure(fig, path: Path) -> Path:
    """Every chart is written here (tests hook it to check the layout)."""
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def _save(fig, path: Path) -> Path:
    return save_figure(fig, path)


def legend_inside(fig) -> bool:
    """Whether every legend of ``fig`` lies within the figure's own extent (nothing clipped)."""
    renderer = fig.canvas.get_renderer()
    fig.draw(renderer)
    box = fig.bbox
    legends = list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    for legend in legends:
        extent = legend.get_window_extent(renderer)
        if extent.x0 < box.x0 - 0.5 or extent.y0 < box.y0 - 0.5 or extent.x1 > box.x1 + 0.5 or extent.y1 > box.y1 + 0.5:
            return False
    return bool(legends)


def _short(value: float) -> str:
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


# ----------------------------------------------------------------------------- compare
def compare(new: list[dict], old: list[dict]) -> list[dict]:
    """Matched ok records (same suite, device, impl, case, dtype, pass), with a verdict each."""
    old_by_key = {record_key(r): r for r in old if r["status"] == "ok"}
    rows = []
    for r in new:
        o = old_by_key.get(record_key(r)) if r["status"] == "ok" else None
        if o is None:
            continue
        speed = o["time_ms"] / r["time_ms"]
        lo, hi = _p(o, "p20_ms") / _p(r, "p80_ms"), _p(o, "p80_ms") / _p(r, "p20_ms")
        if hi < 1 and speed < 1 / (1 + COMPARE_MIN_CHANGE):
            verdict = "regression"
        elif lo > 1 and speed > 1 + COMPARE_MIN_CHANGE:
            verdict = "improvement"
        else:
            verdict = "noise"
        rows.append({"suite": r["suite"], "pass": r["pass"], "impl": r["impl"], "case": case_label(r),
                     "old_ms": o["time_ms"], "new_ms": r["time_ms"], "speed": speed, "lo": lo, "hi": hi,
                     "verdict": verdict, "label": f"{r['pass']} · {case_label(r)} · {r['impl']}",
                     "old_commit": o["env"].get("git_commit"), "old_date": o["env"]["timestamp"][:10]})
    return rows


# ----------------------------------------------------------------------------- the page
class Page:
    """Blocks rendered both as Markdown and as HTML."""

    def __init__(self):
        self.blocks: list[tuple] = []

    def h(self, level: int, text: str):
        self.blocks.append(("h", level, text))

    def p(self, text: str, muted: bool = False):
        self.blocks.append(("p", text, muted))

    def ul(self, items: list[str]):
        if items:
            self.blocks.append(("ul", items))

    def table(self, header: list[str], rows: list[list[str]], muted: list[bool] | None = None):
        self.blocks.append(("table", header, rows, muted or [False] * len(rows)))

    def img(self, path: Path, alt: str):
        self.blocks.append(("img", path.name, alt))

    def markdown(self) -> str:
        out = []
        for b in self.blocks:
            if b[0] == "h":
                out += ["#" * b[1] + " " + b[2], ""]
            elif b[0] == "p":
                out += [f"_{b[1]}_" if b[2] else b[1], ""]
            elif b[0] == "ul":
                out += [f"- {item}" for item in b[1]] + [""]
            elif b[0] == "table":
                _, header, rows, muted = b
                out += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                out += ["| " + " | ".join(_md_muted(c) if m else c for c in row) + " |" for row, m in zip(rows, muted)]
                out.append("")
            elif b[0] == "img":
                out += [f"![{b[2]}]({b[1]})", ""]
        return "\n".join(out)

    def html(self, title: str) -> str:
        out = ["<!doctype html>", '<html><head><meta charset="utf-8">', f"<title>{html.escape(title)}</title>",
               "<style>body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;"
               "color:#222}table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;"
               "padding:3px 8px;text-align:left;font-size:14px}th{background:#f3f3f3}.muted{color:#999}"
               "img{max-width:100%;border:1px solid #eee}code{background:#f5f5f5;padding:0 3px}</style>",
               "</head><body>"]
        for b in self.blocks:
            if b[0] == "h":
                out.append(f"<h{b[1]}>{_inline(b[2])}</h{b[1]}>")
            elif b[0] == "p":
                out.append(f'<p{" class=muted" if b[2] else ""}>{_inline(b[1])}</p>')
            elif b[0] == "ul":
                out.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in b[1]) + "</ul>")
            elif b[0] == "table":
                _, header, rows, muted = b
                out.append("<table><tr>" + "".join(f"<th>{_inline(h)}</th>" for h in header) + "</tr>")
                for row, m in zip(rows, muted):
                    out.append(f'<tr{" class=muted" if m else ""}>' + "".join(f"<td>{_inline(c)}</td>" for c in row)
                               + "</tr>")
                out.append("</table>")
            elif b[0] == "img":
                out.append(f'<p><img src="{html.escape(b[1])}" alt="{html.escape(b[2])}"></p>')
        out.append("</body></html>")
        return "\n".join(out)


def _md_muted(cell: str) -> str:
    return f"_{cell}_" if cell and not cell.startswith("_") else cell


def _inline(text: str) -> str:
    """The little Markdown the report writes (`code`, **bold**, _italic_) as HTML."""
    text = html.escape(text)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    text = re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", text)
    return re.sub(r"(?<![\w])_([^_]+)_(?![\w])", r"<i>\1</i>", text)


def _ratio_text(r: Ratio) -> str:
    text = f"{r.value:.2f}×"
    return text + " (within noise)" if r.verdict == "noise" else text


def _load_text(run: RunView) -> str:
    loads = run.loads()
    if not loads:
        return "not recorded"
    return f"{min(loads):.2f}" if min(loads) == max(loads) else f"{min(loads):.2f}-{max(loads):.2f}"


def _roofline_text(env: dict) -> str | None:
    roof = env.get("roofline")
    if not roof:
        return None
    parts = []
    if roof.get("copy_gbps"):
        parts.append(f"copy {roof['copy_gbps']:.1f} GB/s")
    parts += [f"{dt} matmul {v:.2f} TFLOP/s" for dt, v in (roof.get("matmul_tflops") or {}).items()]
    return ", ".join(parts) + (f" ({roof['how']})" if roof.get("how") else "")


def write_report(paths, out_dir: Path, compare_paths=(), title: str = "Benchmark report") -> list[Path]:
    """report.md, report.html and their charts in ``out_dir``; the written paths."""
    load_suites()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = load_records(paths)
    runs = build_runs(records)
    written: list[Path] = []
    page = Page()
    page.h(1, title)
    devices = sorted({r.device_name for r in runs})
    dates = sorted({r.date for r in runs})
    commits = sorted({r.commit for r in runs})
    page.p(f"{', '.join(devices)} · {', '.join(dates)} · commit {', '.join(commits)} · "
           f"{len(runs)} suite run(s), {sum(len(r.records) for r in runs)} records")
    header = ["suite · pass", "ours vs best peer (geomean)", "range", "wins / noise / losses", "cases",
              "best peer (most cases)", "device", "date", "commit", "host load"]
    rows, muted = [], []
    for run in runs:
        for view in run.passes:
            s = view.summary()
            if s is None:
                continue
            v = s["verdicts"]
            rows.append([f"`{run.suite}` · {view.name}", _ratio_text(s["geomean"]),
                         f"{s['min']:.2f}-{s['max']:.2f}×", f"{v['win']} / {v['noise']} / {v['loss']}", str(s["n"]),
                         f"`{s['best_peers'].most_common(1)[0][0]}`", run.device_name, run.date, run.commit,
                         _load_text(run)])
            muted.append(v["noise"] == s["n"])  # grey only when every case is within noise
        ratios = headline_ratios(run)
        for view, values in ratios:
            spec, target = suite_info(run.suite).ratio, _target(run)
            numbers = [v for _, v in values]
            met = f"{sum(v <= target for v in numbers)} of {len(numbers)} at or under the target" \
                if target is not None else ""
            rows.append([f"`{run.suite}` · {view.name}", _headline_ratio_text(spec, geomean(numbers) or 0.0, target),
                         f"{min(numbers):.2f}-{max(numbers):.2f}×", met, str(len(numbers)), "", run.device_name,
                         run.date, run.commit, _load_text(run)])
            muted.append(False)
        if not ratios and not any(v.summary() for v in run.passes):
            rows.append([f"`{run.suite}`", "no peer and ours in the same case", "", "", "", "", run.device_name,
                         run.date, run.commit, _load_text(run)])
            muted.append(True)
    page.h(2, "Headline")
    page.table(header, rows, muted)
    page.p("Records: " + ", ".join(f"`{Path(p).name}`" for p in paths)
           + ". Redraw with `python bench/plot.py FILE.jsonl... --out DIR`.", muted=True)
    page.p("Speedup = peer time / our time, the peer measured in the same run (> 1: ours faster). "
           "Ours = impls named `llama_kernels*`; per case our fastest impl against the fastest peer. "
           "A ratio whose p20-p80 spreads overlap 1× is marked _within noise_ and counted neither as a win "
           "nor as a loss.")
    roofs = {t for t in (_roofline_text(r.env) for r in runs) if t}
    cpu_runs = [r for r in runs if r.device == "cpu"]
    page.ul([f"Roofline measured in the run: {t}." for t in sorted(roofs)]
            + ([f"Host load (1-minute load average, sampled after each record) on "
                f"{cpu_runs[0].env.get('cpu_count') or '?'} cores: "
                + ", ".join(f"`{r.suite}` {_load_text(r)}" for r in cpu_runs)
                + ". A load above the core count means the timings shared the cores."] if cpu_runs else []))

    compare_rows = compare(records, load_records(compare_paths)) if compare_paths else []

    for run in runs:
        prefix = f"{run.suite}_{run.device}_{run.stamp}"
        page.h(2, f"{run.suite} on {run.device_name}")
        page.p(f"{run.date} · commit {run.commit} · {run.mode} run · torch {run.env.get('torch')} · "
               f"host load {_load_text(run)}", muted=True)
        chart = speedup_chart(run, out_dir / f"{prefix}_speedup.png")
        if chart:
            written.append(chart)
            page.img(chart, f"{run.suite}: speedup over each peer")
        for view in run.passes:
            table_rows, table_muted = [], []
            for row in view.rows:
                ratio = row.ratio()
                if row.ours is None:
                    continue
                frac = roofline_fraction(row.ours, row.refs)
                table_rows.append([row.label, f"`{row.ours['impl']}`", _ms(row.ours),
                                   f"`{row.best_peer}`" if row.best_peer else "no peer",
                                   _ms(row.peers[row.best_peer]) if row.best_peer else "",
                                   _ratio_text(ratio) if ratio else "",
                                   f"{ratio.lo:.2f}-{ratio.hi:.2f}×" if ratio else "",
                                   f"{frac[0]:.2f}" if frac else ""])
                table_muted.append(ratio is not None and ratio.verdict == "noise")
            if table_rows:
                page.h(3, f"{run.suite} · {view.name}")
                page.table(["case", "ours (fastest)", "ours ms (p20-p80)", "best peer", "peer ms (p20-p80)",
                            "speedup", "spread bounds", "ours, fraction of roofline"], table_rows, table_muted)
            keys = extra_keys(view.records)
            if keys:
                page.h(3, f"{run.suite} · {view.name}: every impl")
                page.table(["case", "impl", "ms (p20-p80)", "peak memory"] + [k.replace("_", " ") for k in keys],
                           [[case_label(r), f"`{r['impl']}`", _ms(r), _bytes_text(r.get("peak_mem_bytes"))]
                            + [extra_text(k, (r.get("extra") or {}).get(k)) for k in keys] for r in view.records])
        for view, values in headline_ratios(run):
            spec, target = suite_info(run.suite).ratio, _target(run)
            page.p(f"Headline, {view.name}: `{spec.num}` / `{spec.den}` {spec.label or spec.field} per case: "
                   + ", ".join(f"{label} {v:.3f}×" for label, v in values)
                   + (f"; target ≤ {target:.2f}×." if target is not None else "."))
        chart, used = roofline_chart(run, out_dir / f"{prefix}_roofline.png")
        if chart:
            written.append(chart)
            page.p("Roofline: " + "; ".join(sorted(used)) + ". Fraction = achieved GB/s (or TFLOP/s) / the bound, "
                   "the larger of the two where both are known. The bounds are measured, not datasheet peaks: "
                   "above 1 means faster than a plain copy of the same bytes (or than the measured matmul).")
            page.img(chart, f"{run.suite}: fraction of the roofline")
        chart = memory_chart(run, out_dir / f"{prefix}_memory.png")
        if chart:
            written.append(chart)
            page.p("Peak memory: bytes allocated during one call beyond what was allocated before it "
                   + ("(`torch.cuda.max_memory_allocated`)." if run.device == "cuda" else
                      "(torch's CPU allocator, from the profiler's memory events; memory a kernel allocates "
                      "outside torch is not seen)."), muted=True)
            page.img(chart, f"{run.suite}: peak memory")
        else:
            page.p("Peak memory: not recorded in these records.", muted=True)
        page.ul([f"`{r['impl']}`" + (f" ({r['pass']} {case_label(r)})" if r.get("case") else "")
                 + f": **{r['status']}**: {_first_line(r.get('reason'))}" for r in run.unavailable])

    if compare_paths:
        page.h(2, "Compared with an earlier run")
        olds = load_records(compare_paths)
        old_desc = sorted({f"{r['env']['timestamp'][:10]} ({r['env'].get('git_commit')})" for r in olds})
        counts = Counter(r["verdict"] for r in compare_rows)
        page.p(f"Against {', '.join(old_desc)}: {len(compare_rows)} matched records; "
               f"{counts['regression']} regression(s), {counts['improvement']} improvement(s), "
               f"{counts['noise']} within noise. A change counts when the p20-p80 spreads do not overlap and "
               f"the medians differ by more than {COMPARE_MIN_CHANGE:.0%}. Absolute times: compare runs on the "
               f"same device under similar host load.")
        regressions = [r for r in compare_rows if r["verdict"] == "regression"]
        if regressions:
            page.table(["REGRESSION", "old ms", "new ms", "old / new"],
                       [[f"`{r['suite']}` {r['label']}", f"{r['old_ms']:.4g}", f"{r['new_ms']:.4g}",
                         f"{r['speed']:.2f}×"] for r in regressions])
        for suite in dict.fromkeys(r["suite"] for r in compare_rows):
            rows_s = [r for r in compare_rows if r["suite"] == suite]
            chart = compare_chart(rows_s, f"{suite}: before and after (old time / new time)",
                                  out_dir / f"{suite}_compare.png")
            written.append(chart)
            page.img(chart, f"{suite}: before and after")
        (out_dir / "compare.json").write_text(json.dumps(compare_rows, indent=1))
        written.append(out_dir / "compare.json")

    md, htm = out_dir / "report.md", out_dir / "report.html"
    md.write_text(page.markdown())
    htm.write_text(page.html(title))
    return written + [md, htm]


def headline_ratios(run: RunView) -> list[tuple[PassView, list[tuple[str, float]]]]:
    """Per pass, the suite's HeadlineRatio per case, [(case label, value)]; passes without one are left out."""
    spec = suite_info(run.suite).ratio
    if spec is None:
        return []
    found = []
    for view in run.passes:
        by_case: dict[str, dict[str, dict]] = defaultdict(dict)
        for r in view.records:
            by_case[case_label(r)][r["impl"]] = r
        values = []
        for label, impls in by_case.items():
            num, den = spec.value(impls.get(spec.num) or {}), spec.value(impls.get(spec.den) or {})
            if num is not None and den:
                values.append((label, num / den))
        if values:
            found.append((view, values))
    return found


def _target(run: RunView) -> float | None:
    """The target of the suite's HeadlineRatio on this run's device, None if it has none here."""
    spec = suite_info(run.suite).ratio
    if spec is None or spec.target_device not in (None, run.device):
        return None
    return spec.target


def _headline_ratio_text(spec, value: float, target: float | None) -> str:
    text = f"`{spec.num}` / `{spec.den}` {spec.label or spec.field}: {value:.2f}×"
    if target is None:
        return text
    return f"{text} (target ≤ {target:.2f}×: {'met' if value <= target else '**missed**'})"


def extra_keys(records: list[dict]) -> list[str]:
    """The ``extra`` fields of the records, in the order they first appear."""
    return list(dict.fromkeys(k for r in records for k in (r.get("extra") or {})))


def _bytes_text(value: float | None) -> str:
    return "" if value is None else f"{value / 2**20:.1f} MiB"


def extra_text(key: str, value) -> str:
    """An ``extra`` field for a table: bytes (``*_bytes``) in MiB, counts with thousands separators."""
    if value is None:
        return ""
    if key.endswith("_bytes") and isinstance(value, (int, float)):
        return _bytes_text(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return f"{value:,}" if isinstance(value, int) else f"{value:.4g}"


def _ms(record: dict) -> str:
    return f"{record['time_ms']:.4g} ({_p(record, 'p20_ms'):.4g}-{_p(record, 'p80_ms'):.4g})"


def _first_line(text: str | None) -> str:
    return next(iter((text or "").strip().splitlines()), "")[:300]
