"""bench/run.py: records per item, with and without --rounds (CPU), on a tiny suite of its own."""
import json
import time

import pytest

from bench import run
from bench.common import SUITES, Bench, Calls, Unavailable


def _suite(ctx):
    def broken():
        raise RuntimeError("no inputs today")

    return [
        Bench("fast", {"n": 1}, "fp32", "fwd", lambda: Calls([lambda: None], params=3, note="built"), tokens=1),
        Bench("slow", {"n": 1}, "fp32", "fwd", lambda: [lambda: time.sleep(0.001)], tokens=1),
        Bench("broken", {"n": 1}, "fp32", "fwd", broken),
        Unavailable("absent", "not installed here"),
    ]


@pytest.mark.parametrize("rounds", [1, 3])
def test_records_with_rounds(monkeypatch, tmp_path, rounds):
    run.load_suites()
    monkeypatch.setitem(SUITES, "tiny", _suite)
    monkeypatch.setitem(run.CPU_TIMER[1], "budget_s", 0.03)
    assert run.main(["--suite", "tiny", "--device", "cpu", "--quick", "--rounds", str(rounds), "--no-plot",
                     "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("tiny_cpu_*.jsonl")
    records = {r["impl"]: r for r in map(json.loads, path.read_text().splitlines())}
    assert [records[k]["status"] for k in ("fast", "slow", "broken", "absent")] == ["ok", "ok", "error", "missing"]
    assert "RuntimeError: no inputs today" in records["broken"]["reason"]
    assert records["absent"]["reason"] == "not installed here"
    fast, slow = records["fast"], records["slow"]
    # Fields the set-up measured (Calls) land in the record's extra; a plain list of calls has none.
    assert fast["extra"] == {"params": 3, "note": "built"} and slow["extra"] is None
    assert slow["time_ms"] >= 1.0 > fast["time_ms"] and slow["min_ms"] <= slow["time_ms"] <= slow["p80_ms"]
    assert slow["tokens_per_s"] == pytest.approx(1e3 / slow["time_ms"])
    # Each pass takes at least ceil(5 / rounds) samples of every item: the pooled count shows them all.
    assert slow["reps"] >= rounds * -(-5 // rounds)


def test_rounds_must_be_positive(capsys):
    with pytest.raises(SystemExit):
        run.parse_args(["--rounds", "0"])
    assert "--rounds: expected a positive count" in capsys.readouterr().err


def test_rounds_pool_every_pass(monkeypatch, tmp_path):
    """Three passes, each returning one sample per item (0, 1 and 2 ms): the record holds all three."""
    run.load_suites()
    monkeypatch.setitem(SUITES, "tiny", _suite)
    passes = {}

    def fake_samples(calls, **settings):
        key = id(calls)
        passes[key] = passes.get(key, -1) + 1
        return [float(passes[key])]

    monkeypatch.setattr(run, "cpu_samples", fake_samples)
    assert run.main(["--suite", "tiny", "--device", "cpu", "--rounds", "3", "--no-plot", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("tiny_cpu_*.jsonl")
    slow = next(r for r in map(json.loads, path.read_text().splitlines()) if r["impl"] == "slow")
    assert (slow["reps"], slow["min_ms"], slow["time_ms"]) == (3, 0.0, 1.0)
    assert slow["env"]["rounds"] == 3


def test_profile_model_writes_tables_traces_and_a_summary(tmp_path):
    """bench/profile_model.py on a tiny preset: a table and a trace per phase, and the summary."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "profile_model.py"
    spec = importlib.util.spec_from_file_location("profile_model", path)
    profile_model = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(profile_model)
    assert profile_model.main(["--out", str(tmp_path), "--device", "cpu", "--preset", "stories260K",
                               "--prompt", "12", "--int4"]) == 0
    summary = json.loads((tmp_path / "profile_summary.json").read_text())
    assert [p["phase"] for p in summary["phases"]] == ["prefill", "decode", "decode-plan"]
    assert summary["meta"]["preset"] == "stories260K" and summary["meta"]["int4"] is True
    plan = summary["phases"][2]  # the CPU decode plan's step, timed op by op
    assert plan["op_us_per_step"]["qkv"] > 0 and plan["op_us_per_step"]["head"] > 0
    assert sum(plan["op_us_per_step"].values()) <= plan["wall_ms_per_iter"] * 1e3
    assert plan["copy_gbps"] > 0 and plan["read_gbps"] > 0
    assert set(plan["weights_gbps"]) == {"qkv", "wo", "gate_up", "down", "head"}
    for phase in ("prefill", "decode"):
        assert "aten::" in (tmp_path / f"profile_{phase}.txt").read_text()
        assert json.loads((tmp_path / f"profile_{phase}.json").read_text())["traceEvents"]


# ----------------------------------------------------------------------------- the report
RESULTS = __import__("pathlib").Path(__file__).resolve().parents[1] / "bench" / "results"


def _peers_suite(ctx):
    """Ours, one peer twice as slow, a peer that is missing here, and a roofline reference."""
    return [
        Bench("llama_kernels-cpu", {"n": 1}, "fp32", "fwd", lambda: [lambda: time.sleep(0.001)], bytes=1000),
        Bench("peer-slow", {"n": 1}, "fp32", "fwd", lambda: [lambda: time.sleep(0.002)], bytes=1000),
        Unavailable("peer-absent", "not installed here"),
    ]


def _charts_checked(monkeypatch):
    """Hook every chart save: the legend must lie inside the figure (nothing clipped)."""
    from bench import report

    saved, save = [], report.save_figure

    def check(fig, path):
        assert report.legend_inside(fig), f"{path.name}: legend outside the figure"
        saved.append(path.name)
        return save(fig, path)

    monkeypatch.setattr(report, "save_figure", check)
    return saved


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_quick_cpu_run_writes_wellformed_jsonl_and_report(tmp_path):
    """A real suite in quick mode: every record has every field, spreads are ordered, the env keeps
    the host load, the mode and the roofline, and report.md opens with the headline table."""
    assert run.main(["--suite", "linear", "--device", "cpu", "--quick", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("linear_cpu_*.jsonl")
    records = _records(path)
    # copy: the suite's roofline reference (the same bytes copied), beside ours and the peer
    assert records and {r["impl"] for r in records} == {"llama_kernels-cpu", "torch-F.linear", "copy"}
    for r in records:
        assert set(run.RECORD_FIELDS) <= r.keys()
        assert r["status"] == "ok" and r["suite"] == "linear" and r["device"] == "cpu"
        assert 0 < r["min_ms"] <= r["p20_ms"] <= r["time_ms"] <= r["p80_ms"]
        assert r["gbps"] > 0 and r["wall_s"] > 0 and r["load_1min"] is not None
        assert isinstance(r["peak_mem_bytes"], int) and r["peak_mem_bytes"] >= 0
        env = r["env"]
        assert env["mode"] == "quick" and env["quick"] is True and env["load_avg_1min"] is not None
        assert env["roofline"]["copy_gbps"] > 0 and env["roofline"]["matmul_tflops"]["fp32"] > 0
    report_md = (tmp_path / "report.md").read_text()
    assert report_md.splitlines()[0] == "# Benchmark report"
    assert report_md.index("## Headline") < report_md.index("## linear")
    assert "`linear` · fwd" in report_md and (tmp_path / "report.html").read_text().startswith("<!doctype html>")


def test_default_run_keeps_headline_cases_and_full_keeps_all(monkeypatch):
    import torch

    from bench.common import SUITE_INFO, SuiteContext, SuiteInfo, headline_items

    def items(ctx):
        return [Bench("llama_kernels-cpu", {"n": n}, "fp32", "fwd", lambda: [lambda: None]) for n in (1, 2, 3)] + \
            [Unavailable("peer-absent", "not here")]

    run.load_suites()
    monkeypatch.setitem(SUITES, "picky", items)
    monkeypatch.setitem(SUITE_INFO, "picky", SuiteInfo("picky", headline=lambda ctx, b: b.case["n"] == 2))
    ctx = SuiteContext(torch.device("cpu"), False)
    kept = headline_items("picky", ctx, items(ctx))
    assert [getattr(i, "case", None) for i in kept] == [{"n": 2}, None]
    assert len(run.plan(ctx, ["picky"], "full")["picky"]) == 4
    assert len(run.plan(ctx, ["picky"], "default")["picky"]) == 2
    # A rule that keeps nothing (a quick list without the headline cases) runs the suite whole.
    monkeypatch.setitem(SUITE_INFO, "picky", SuiteInfo("picky", headline=lambda ctx, b: False))
    assert len(headline_items("picky", ctx, items(ctx))) == 4
    # Every registered suite declares its headline cases.
    assert all(SUITE_INFO[name].headline is not None
               for name in ("attention", "decode", "finetune", "int4", "linear", "pruned", "rms_norm"))


def test_finetune_suite_on_a_tiny_model(monkeypatch, tmp_path):
    """The finetune suite on stories260K: a step per method, trainable parameters in the records
    (LoRA's: rank x (in + out) per adapted layer, and the head), the QLoRA / full peak-memory ratio
    in the report's headline and the trainable parameters in its table."""
    from bench.suites import finetune
    from llama.config import ModelConfig
    from llama.model import build

    run.load_suites()
    monkeypatch.setattr(finetune, "_shape", lambda ctx: ("stories260K", 3, 16, None))
    monkeypatch.setitem(run.CPU_TIMER[1], "budget_s", 0.02)
    assert run.main(["--suite", "finetune", "--device", "cpu", "--quick", "--no-roofline",
                     "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("finetune_cpu_*.jsonl")
    records = {r["impl"]: r for r in _records(path)}
    assert set(records) == {"full", "lora", "qlora"}
    assert all(r["status"] == "ok" and r["pass"] == "step" and r["tokens"] == 48 for r in records.values())
    assert all(r["peak_mem_bytes"] > 0 and r["extra"]["resident_bytes"] > 0 for r in records.values())
    cfg = ModelConfig.preset("stories260K")
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    adapters = finetune.LORA_RANK * ((cfg.dim + q) * 2 + (cfg.dim + kv) * 2) * cfg.n_layers
    head = cfg.dim * finetune.NUM_LABELS + finetune.NUM_LABELS
    trainable = {impl: r["extra"]["trainable_params"] for impl, r in records.items()}
    assert trainable["lora"] == trainable["qlora"] == adapters + head
    assert trainable["full"] == sum(p.numel() for p in build(cfg).parameters()) + head  # tied: no LM head to freeze
    # The 4-bit base keeps less between steps than the dense one.
    assert records["qlora"]["extra"]["resident_bytes"] < records["lora"]["extra"]["resident_bytes"]
    md = (tmp_path / "report.md").read_text()
    headline = next(line for line in md.splitlines() if line.startswith("| `finetune` · step"))
    total = {impl: r["peak_mem_bytes"] + r["extra"]["resident_bytes"] for impl, r in records.items()}
    ratio = total["qlora"] / total["full"]
    assert f"`qlora` / `full` peak memory (resident + step): {ratio:.2f}×" in headline
    assert "target" not in headline  # the target is the GPU's
    assert "trainable params" in md and f"{trainable['full']:,}" in md


def test_plot_recorded_gpu_jsonl_draws_every_chart_and_the_report(monkeypatch, tmp_path):
    """The recorded H200 attention run: speedup, memory, roofline and per-pass charts, legends inside."""
    from bench import plot

    saved = _charts_checked(monkeypatch)
    src = RESULTS / "attention_cuda_20261128T062616Z.jsonl"
    assert plot.main([str(src), "--out", str(tmp_path)]) == 0
    stem = "attention_cuda_20261128T062616Z"
    expected = {f"{stem}_{kind}.png" for kind in ("speedup", "memory", "roofline", "fwd", "fwd_bwd", "decode")}
    assert expected <= set(saved) and all((tmp_path / name).stat().st_size > 0 for name in expected)
    md = (tmp_path / "report.md").read_text()
    assert "NVIDIA H200" in md and "2026-11-28" in md and "`attention` · decode" in md
    assert "`copy` of the same bytes" in md  # the decode roofline is the suite's copy reference
    for name in expected - {f"{stem}_{p}.png" for p in ("fwd", "fwd_bwd", "decode")}:
        assert f"]({name})" in md  # the front-page charts are embedded


def test_missing_peer_shows_as_missing(monkeypatch, tmp_path):
    from bench import plot

    run.load_suites()
    monkeypatch.setitem(SUITES, "peers", _peers_suite)
    monkeypatch.setitem(run.CPU_TIMER[1], "budget_s", 0.02)
    assert run.main(["--suite", "peers", "--device", "cpu", "--quick", "--no-roofline", "--no-plot",
                     "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("peers_cpu_*.jsonl")
    saved = _charts_checked(monkeypatch)
    assert plot.main([str(path), "--out", str(tmp_path / "plots")]) == 0
    md = (tmp_path / "plots" / "report.md").read_text()
    assert "`peer-absent`: **missing**: not installed here" in md
    assert "`peers` · fwd" in md and "`peer-slow`" in md
    assert any(name.endswith("_speedup.png") for name in saved)


def test_compare_flags_a_doctored_regression(monkeypatch, tmp_path):
    """Old records against the same records with one made 3x slower: that one, and only it, is flagged."""
    from bench import plot

    src = RESULTS / "rms_norm_cpu_20261128T110412Z.jsonl"
    old = _records(src)
    new = [dict(r) for r in old]
    victim = next(i for i, r in enumerate(new) if r["status"] == "ok" and r["impl"].startswith("kernels"))
    for key in ("time_ms", "min_ms", "p20_ms", "p80_ms"):
        new[victim][key] = old[victim][key] * 3
    new_path = tmp_path / "rms_norm_cpu_new.jsonl"
    new_path.write_text("".join(json.dumps(r) + "\n" for r in new))
    saved = _charts_checked(monkeypatch)
    assert plot.main([str(new_path), "--out", str(tmp_path / "out"), "--compare", str(src)]) == 0
    rows = json.loads((tmp_path / "out" / "compare.json").read_text())
    flagged = [r for r in rows if r["verdict"] != "noise"]
    assert len(rows) == sum(r["status"] == "ok" for r in old)
    assert [(r["verdict"], r["impl"], r["pass"]) for r in flagged] == \
        [("regression", new[victim]["impl"], new[victim]["pass"])]
    assert "REGRESSION" in (tmp_path / "out" / "report.md").read_text()
    assert "rms_norm_compare.png" in saved


def test_run_compare_option_reaches_the_report(monkeypatch, tmp_path):
    run.load_suites()
    monkeypatch.setitem(SUITES, "peers", _peers_suite)
    monkeypatch.setitem(run.CPU_TIMER[1], "budget_s", 0.02)
    args = ["--suite", "peers", "--device", "cpu", "--quick", "--no-roofline"]
    assert run.main(args + ["--no-plot", "--out", str(tmp_path / "a")]) == 0
    (old,) = (tmp_path / "a").glob("peers_cpu_*.jsonl")
    records = _records(old)
    for r in records:  # the old run, doctored to have been 3x faster: the new run regresses
        if r["impl"] == "llama_kernels-cpu":
            for key in ("time_ms", "min_ms", "p20_ms", "p80_ms"):
                r[key] /= 3
    old.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert run.main(args + ["--out", str(tmp_path / "b"), "--compare", str(old)]) == 0
    rows = json.loads((tmp_path / "b" / "compare.json").read_text())
    assert {r["impl"]: r["verdict"] for r in rows}["llama_kernels-cpu"] == "regression"


def test_estimate_prints_before_running(capsys, monkeypatch, tmp_path):
    run.load_suites()
    monkeypatch.setitem(SUITES, "peers", _peers_suite)
    assert run.main(["--suite", "peers", "--device", "cpu", "--estimate", "--out", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "default run" in err and "2 measurements" in err and "estimated" in err
    assert not list(tmp_path.glob("*.jsonl"))
