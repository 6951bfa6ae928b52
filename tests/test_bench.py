"""bench/run.py: records per item, with and without --rounds (CPU), on a tiny suite of its own."""
import json
import time

import pytest

from bench import run
from bench.common import SUITES, Bench, Unavailable


def _suite(ctx):
    def broken():
        raise RuntimeError("no inputs today")

    return [
        Bench("fast", {"n": 1}, "fp32", "fwd", lambda: [lambda: None], tokens=1),
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
    assert [p["phase"] for p in summary["phases"]] == ["prefill", "decode"]
    assert summary["meta"]["preset"] == "stories260K" and summary["meta"]["int4"] is True
    for phase in ("prefill", "decode"):
        assert "aten::" in (tmp_path / f"profile_{phase}.txt").read_text()
        assert json.loads((tmp_path / f"profile_{phase}.json").read_text())["traceEvents"]
