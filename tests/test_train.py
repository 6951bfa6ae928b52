"""The trainer: config checks, a short run that learns and leaves its files, exact resume (in
process and after SIGKILL), SIGTERM, a diverged loss, fused against eager ops, LoRA."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import llama
from llama.train import TrainConfig, TrainingDiverged, build_run, latest_checkpoint
from llama.train.__main__ import main as train_main
from tests.helpers import logged_losses, tiny_train_config

ROOT = Path(__file__).resolve().parents[1]


_config = tiny_train_config


# ----------------------------------------------------------------------------- config
def test_config_reports_unknown_keys_and_bad_types(tmp_path):
    with pytest.raises(ValueError, match=r"unknown key 'learning_rate'"):
        TrainConfig.from_spec(None, ["learning_rate=1e-3"])
    with pytest.raises(ValueError, match=r"lr: expected a number, got 'fast'"):
        TrainConfig.from_spec(None, ["lr=fast"])
    with pytest.raises(ValueError, match=r"max_steps: expected an integer"):
        TrainConfig.from_spec(None, ["max_steps=1.5"])
    with pytest.raises(ValueError, match=r"fused: expected true or false"):
        TrainConfig.from_spec(None, ["fused=yes please"])
    with pytest.raises(ValueError, match=r"warmup_steps"):
        TrainConfig.from_spec(None, ["warmup_steps=50", "max_steps=10"])
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("lr: 1e-3\nmax_steps: 5\nbogus: 1\n")
    with pytest.raises(ValueError, match=r"run.yaml: unknown key\(s\) bogus"):
        TrainConfig.from_spec(yaml_file)
    yaml_file.write_text("lr: 1e-3\nmax_steps: 5\nwarmup_steps: 1\n")
    cfg = TrainConfig.from_spec(yaml_file, ["weight_decay=1e-2"])
    assert cfg.lr == 1e-3 and cfg.weight_decay == 0.01 and cfg.max_steps == 5


def test_cli_refuses_a_bad_config_before_any_work(tmp_path, capsys):
    assert train_main(["lr=-1", f"out_dir={tmp_path / 'never'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error:") and "lr" in err[-1]
    assert not (tmp_path / "never").exists()
    assert train_main(["--config", str(tmp_path / "missing.yaml")]) == 2


def test_demo_config_is_valid():
    cfg = TrainConfig.from_spec(ROOT / "configs/train/botchan-tiny.yaml")
    assert cfg.data is None and cfg.max_steps > 0


# ----------------------------------------------------------------------------- a run
def test_a_short_run_learns_and_leaves_its_files(train_shards, tmp_path):
    out = tmp_path / "run"
    trainer = build_run(_config(train_shards, out, max_steps=24, eval_every=12, save_every=12, keep_last=1))
    result = trainer.fit()
    losses = logged_losses(out)
    assert len(losses) == 24
    assert sum(list(losses.values())[-4:]) < sum(list(losses.values())[:4]) - 0.4  # it learns
    assert result["val_ppl"] > 1 and not result["stopped_early"]
    steps = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert steps == ["step_00000024"]  # keep_last=1 removed step 12
    assert (out / "loss.png").stat().st_size > 1000
    final = llama.load(out / "final")  # a native checkpoint any tool reads
    for (name, a), b in zip(trainer.model.state_dict().items(), final.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_resume_continues_exactly(train_shards, tmp_path):
    whole = tmp_path / "whole"
    build_run(_config(train_shards, whole)).fit()

    part = tmp_path / "part"

    def stop_at_3(step, _metrics):
        if step == 3:
            trainer.stop_requested = True

    trainer = build_run(_config(train_shards, part), on_step=stop_at_3)
    assert trainer.fit()["stopped_early"]
    assert latest_checkpoint(part).name == "step_00000003"
    build_run(_config(train_shards, part, resume=True)).fit()
    assert logged_losses(part) == logged_losses(whole)  # bit for bit on the CPU, dropout included
    a, b = llama.load(whole / "final").model, llama.load(part / "final").model
    for x, y in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(x, y)


def test_resume_after_sigkill_and_sigterm(train_shards, tmp_path):
    """A run killed with SIGKILL (it saves every step, so the kill can land inside a save) and
    one stopped by SIGTERM both resume to the losses of an uninterrupted run."""
    whole = tmp_path / "whole"
    build_run(_config(train_shards, whole, max_steps=10, save_every=1)).fit()
    for sig in (signal.SIGKILL, signal.SIGTERM):
        out = tmp_path / f"killed-{sig}"
        args = [f"{k}={json.dumps(v)}" for k, v in _config(train_shards, out, max_steps=10, save_every=1).to_dict().items()
                if v is not None]
        child = subprocess.Popen([sys.executable, "-m", "llama.train", *args], cwd=tmp_path,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ})
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and child.poll() is None:
            if len(logged_losses(out) if (out / "metrics.jsonl").exists() else {}) >= 4:
                break
            time.sleep(0.02)
        child.send_signal(sig)
        child.wait(timeout=60)
        if sig == signal.SIGTERM:
            assert child.returncode == 0, child.stderr.read().decode()[-2000:]
        assert latest_checkpoint(out) is not None
        build_run(_config(train_shards, out, max_steps=10, save_every=1, resume=True)).fit()
        assert logged_losses(out) == logged_losses(whole), sig
        leftovers = [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
        assert not leftovers


def test_a_diverged_loss_stops_without_saving(train_shards, tmp_path):
    out = tmp_path / "nan"
    trainer = build_run(_config(train_shards, out, save_every=1))
    real = trainer.loss

    def poisoned(x, y):
        loss = real(x, y)
        return loss * float("nan") if trainer.step == 3 else loss

    trainer.loss = poisoned
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 4.*step_00000003"):
        trainer.fit()
    assert latest_checkpoint(out).name == "step_00000003"


def test_fused_and_eager_ops_train_alike(train_shards, tmp_path):
    results = {}
    for fused in (True, False):
        out = tmp_path / f"fused-{fused}"
        trainer = build_run(_config(train_shards, out, fused=fused, max_steps=3, dropout=0.0, label_smoothing=0.1,
                                    z_loss=1e-3))
        trainer.fit()
        results[fused] = (logged_losses(out), trainer.model.state_dict())
    for step, loss in results[True][0].items():
        assert loss == pytest.approx(results[False][0][step], rel=1e-5, abs=1e-5)
    for name, t in results[True][1].items():
        torch.testing.assert_close(t, results[False][1][name], atol=2e-5, rtol=1e-4, msg=name)


def test_lora_trains_only_the_adapters_and_resumes(train_shards, tmp_path):
    base_dir = tmp_path / "base"
    build_run(_config(train_shards, base_dir, max_steps=2)).fit()
    base = llama.load(base_dir / "final").model
    cfg = dict(init_from=str(base_dir / "final"), lora=True, lora_rank=4, trainable=["norm"], max_steps=6,
               save_every=3, lr=1e-2)
    out = tmp_path / "lora"
    trainer = build_run(_config(train_shards, out, **cfg))
    trainer.fit()
    base_state = base.state_dict()
    tuned = trainer.model.state_dict()
    assert torch.equal(tuned["tok_embeddings.weight"], base_state["tok_embeddings.weight"])
    assert torch.equal(tuned["layers.0.attention.wq.base.weight"], base_state["layers.0.attention.wq.weight"])
    assert not torch.equal(tuned["norm.weight"], base_state["norm.weight"])  # named trainable
    assert all(tuned[n].abs().sum() > 0 for n in tuned if n.endswith("lora_B"))  # B starts at zero
    assert (out / "final" / "adapter_config.json").is_file()
    resumed_out = tmp_path / "lora-resumed"

    def stop_at_3(step, _metrics):
        if step == 3:
            t.stop_requested = True

    t = build_run(_config(train_shards, resumed_out, **cfg), on_step=stop_at_3)
    t.fit()
    build_run(_config(train_shards, resumed_out, resume=True, **cfg)).fit()
    assert logged_losses(resumed_out) == logged_losses(out)


def test_tensorboard_is_optional(train_shards, tmp_path):
    """tensorboard=true writes event files where the package is installed, and is refused by
    name, before training, where it is not."""
    import importlib.util

    cfg = _config(train_shards, tmp_path / "tb", max_steps=2, tensorboard=True)
    if importlib.util.find_spec("tensorboard") is None:
        with pytest.raises(ValueError, match=r"tensorboard: needs the tensorboard package"):
            build_run(cfg)
        assert not (tmp_path / "tb" / "metrics.jsonl").exists()
    else:
        build_run(cfg).fit()
        assert any((tmp_path / "tb" / "tensorboard").iterdir())


def test_cli_reports_a_diverged_run_in_one_line(train_shards, tmp_path, capsys, monkeypatch):
    from llama.train import trainer as trainer_mod

    def diverge(self, x, y):
        return torch.tensor(float("inf"), requires_grad=True)

    monkeypatch.setattr(trainer_mod.Trainer, "loss", diverge)
    args = [f"{k}={json.dumps(v)}" for k, v in _config(train_shards, tmp_path / "inf").to_dict().items()
            if v is not None]
    assert train_main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: loss is inf at step 1")
