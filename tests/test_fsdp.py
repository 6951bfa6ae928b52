"""Distributed training (FSDP2 on gloo, two CPU ranks under torchrun): the losses of a two-rank
run equal a single-process run's on the same global batches, and its sharded checkpoint resumes in
a single process (2 -> 1) to the losses of a run that was never stopped."""
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import llama
from llama.train import TrainConfig, build_run, latest_checkpoint
from tests.helpers import logged_losses, tiny_train_config

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available in this PyTorch build")


def _config(train_shards, out, **changes):
    """A tiny deterministic run (no dropout) of 4 steps on the CPU."""
    return tiny_train_config(train_shards, out, **{**dict(max_steps=4, eval_every=100, dropout=0.0, device="cpu"),
                                             **changes})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(cfg: TrainConfig, cwd: Path, nproc: int = 2) -> subprocess.CompletedProcess:
    args = [f"{k}={json.dumps(v)}" for k, v in cfg.to_dict().items() if v is not None]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "llama.train", *args]
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


def test_two_ranks_match_one_process_and_resume_in_one(train_shards, tmp_path):
    # label smoothing and z-loss go through the fused loss on the gathered head weight
    extra = dict(max_steps=6, label_smoothing=0.1, z_loss=1e-3)
    two = tmp_path / "two"
    _torchrun(_config(train_shards, two, **extra), tmp_path)
    one = tmp_path / "one"
    single = build_run(_config(train_shards, one, **extra))
    single.fit()

    losses2, losses1 = logged_losses(two), logged_losses(one)
    assert sorted(losses2) == sorted(losses1) == [1, 2, 3, 4, 5, 6]
    for step, loss in losses2.items():  # the same global batches; only the reduction order differs
        assert loss == pytest.approx(losses1[step], rel=1e-4, abs=1e-5), step
    final = llama.load(two / "final").model  # the train_shards gathered into one native checkpoint
    for name, t in final.state_dict().items():
        torch.testing.assert_close(t, single.model.state_dict()[name], rtol=1e-4, atol=1e-5, msg=name)

    ckpt = two / "checkpoints" / "step_00000004"
    assert (ckpt / ".metadata").is_file() and len(list(ckpt.glob("*.distcp"))) == 2  # one file per rank
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["sharded"] and state["world_size"] == 2
    assert not [p.name for p in (two / "checkpoints").iterdir() if p.name.startswith(".")]  # no staging left

    # 2 -> 1: the sharded checkpoint of step 4 resumes in a single process (no process group)
    shutil.rmtree(two / "checkpoints" / "step_00000006")
    assert latest_checkpoint(two) == ckpt
    resumed = build_run(_config(train_shards, two, resume=True, **extra))
    resumed.fit()
    after = logged_losses(two)
    assert sorted(after) == [1, 2, 3, 4, 5, 6]
    for step in (5, 6):
        assert after[step] == pytest.approx(losses1[step], rel=1e-4, abs=1e-5), step
    for name, t in resumed.model.state_dict().items():
        torch.testing.assert_close(t, single.model.state_dict()[name], rtol=1e-4, atol=1e-5, msg=name)


def test_a_single_process_checkpoint_resumes_on_two_ranks(train_shards, tmp_path):
    extra = dict(max_steps=6)
    one = tmp_path / "one"
    build_run(_config(train_shards, one, **extra)).fit()
    part = tmp_path / "part"
    shutil.copytree(one, part)
    shutil.rmtree(part / "checkpoints" / "step_00000006")
    shutil.rmtree(part / "final")
    _torchrun(_config(train_shards, part, resume=True, **extra), tmp_path)  # 1 -> 2: each rank takes its train_shards
    for step, loss in logged_losses(one).items():
        assert logged_losses(part)[step] == pytest.approx(loss, rel=1e-4, abs=1e-5), step


def test_the_global_batch_must_split_evenly(train_shards, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ValueError, match=r"batch_size: 4 is not divisible by the number of ranks \(WORLD_SIZE=3\)"):
        build_run(_config(train_shards, tmp_path / "odd"))
