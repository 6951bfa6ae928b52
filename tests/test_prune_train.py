"""Pruning training (llama/prune/train.py): dynamic batch loading's update, the config's checks,
a short run on two domains that moves the masks toward the target and writes what compaction
reads, and an exact resume, masks and lambdas included."""
from __future__ import annotations

import json
import math
import random

import pytest
import torch

import llama
from llama.prune import PruningMasks
from llama.prune.masks import load_masks
from llama.prune.train import PruneConfig, build_prune, update_domain_weights
from llama.train import latest_checkpoint

from tests.helpers import logged_losses

SOURCE = ["vocab_size=300", "dim=32", "n_heads=4", "n_kv_heads=4", "n_layers=2", "hidden_dim=64", "max_seq_len=64"]
TARGET = ["dim=16", "n_heads=2", "n_kv_heads=2", "hidden_dim=32"]


@pytest.fixture(scope="module")
def domains(train_shards, tmp_path_factory):
    """Two token folders with one tokenizer: the shared fixture's text and a second text drawn
    from other words."""
    from llama.data import prepare

    root = tmp_path_factory.mktemp("prune-domains")
    rng = random.Random(1)
    words = ["".join(rng.choice("fghij") for _ in range(rng.randint(3, 8))) for _ in range(40)]
    text = "\n\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(5, 30))) for _ in range(300))
    (root / "other.txt").write_text(text + "\n", encoding="utf-8")
    tok = train_shards.parent / "tok" / "tokenizer.model"
    prepare(tok, [root / "other.txt"], root / "other", val_fraction=0.1, progress=False)
    return {"first": str(train_shards), "second": str(root / "other")}


def _config(data, out, **changes) -> PruneConfig:
    base = dict(model="stories260K", model_overrides=SOURCE, data=data, seq_len=32, batch_size=4, lr=3e-3,
                warmup_steps=2, max_steps=8, log_every=1, eval_every=4, eval_batches=2, save_every=4,
                out_dir=str(out), sample_tokens=0, target_overrides=TARGET, lagrangian_warmup_steps=4,
                mask_lr=0.5, lag_lr=0.5, seed=3)
    base.update(changes)
    return PruneConfig(**base)


# ----------------------------------------------------------------------------- dynamic batch loading
def test_domain_weights_follow_the_excess_loss():
    w = update_domain_weights({"a": 0.5, "b": 0.5}, {"a": 3.0, "b": 2.0}, {"a": 2.0, "b": 2.0}, eta=1.0, smoothing=0.0)
    assert w["a"] == pytest.approx(math.e / (math.e + 1)) and w["b"] == pytest.approx(1 / (math.e + 1))
    # below the reference counts as zero excess; smoothing keeps a floor of c / k
    w = update_domain_weights({"a": 1.0, "b": 0.0}, {"a": 1.0, "b": 1.0}, {"a": 2.0, "b": 2.0}, smoothing=0.1)
    assert w["b"] == pytest.approx(0.05) and sum(w.values()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="losses, references"):
        update_domain_weights({"a": 1.0}, {"b": 1.0}, {"a": 1.0})


# ----------------------------------------------------------------------------- config
@pytest.mark.parametrize("changes, match", [
    (dict(prune_modules=["heads"]), "prune_modules"),
    (dict(target_overrides=[]), "target"),
    (dict(compile=True), "compile"),
    (dict(mask_lr=0.0), "mask_lr"),
    (dict(lagrangian_warmup_steps=100), "lagrangian_warmup_steps"),
    (dict(reference_losses={"first": 1.0}), "reference_losses"),
    (dict(target_overrides=["n_heads=8"]), "n_heads"),
    (dict(target_overrides=["depth=3"]), "target_overrides"),
])
def test_bad_config_is_named(domains, tmp_path, changes, match):
    with pytest.raises(ValueError, match=match):
        build_prune(_config(domains, tmp_path / "bad", **changes))


# ----------------------------------------------------------------------------- a run
def test_pruning_run_on_two_domains(domains, tmp_path):
    out = tmp_path / "run"
    trainer = build_prune(_config(domains, out, max_steps=12, eval_every=4, lag_lr=1.0))
    start = {k: float(v.detach()) for k, v in trainer.masks.expected_sizes().items()}
    result = trainer.fit()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "lm_loss" in r]
    evals = [r for r in records if "val_loss_first" in r]
    assert len(steps) == 12 and len(evals) == 3
    for r in steps:
        assert {"expected_head", "target_head", "expected_hidden", "lagrangian"} <= set(r)
    assert all(abs(r["weight_first"] + r["weight_second"] - 1) < 1e-9 for r in evals)
    assert trainer.reference_losses is not None and set(trainer.reference_losses) == {"first", "second"}
    # the Lagrangian pulls every expected size toward its (smaller) target
    end = trainer.masks.expected_sizes()
    for kind, size in end.items():
        assert float(size) < start[kind], kind
    assert "val_loss" in result and math.isfinite(result["val_loss"])
    # final/: a model llama.load reads and its masks
    final = out / "final"
    model = llama.load(final).model
    assert model.config == trainer.model.config
    masks = load_masks(final)
    for name, t in trainer.masks.state_dict().items():
        assert torch.equal(masks.state_dict()[name], t.cpu()), name
    assert (out / "prune.png").stat().st_size > 1000


def test_resume_continues_exactly_with_masks(domains, tmp_path):
    whole = tmp_path / "whole"
    build_prune(_config(domains, whole)).fit()

    part = tmp_path / "part"

    def stop_at_5(step, _metrics):
        if step == 5:
            trainer.stop_requested = True

    trainer = build_prune(_config(domains, part), on_step=stop_at_5)
    assert trainer.fit()["stopped_early"]
    assert latest_checkpoint(part).name == "step_00000005"
    assert (latest_checkpoint(part) / "masks.safetensors").is_file()
    resumed = build_prune(_config(domains, part, resume=True))
    resumed.fit()
    assert logged_losses(part) == logged_losses(whole)
    a, b = load_masks(whole / "final"), load_masks(part / "final")
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
    assert isinstance(a, PruningMasks)


def test_lora_pruning_trains_adapters_and_masks_only(domains, tmp_path):
    out = tmp_path / "lora"
    trainer = build_prune(_config(domains, out, lora=True, lora_targets=["wq", "wk", "wv", "wo", "w1", "w2", "w3"],
                                  max_steps=4))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if not p.requires_grad}
    alpha = {n: p.detach().clone() for n, p in trainer.masks.named_parameters()}
    trainer.fit()
    for n, p in trainer.model.named_parameters():
        if n in before:
            assert torch.equal(p, before[n]), n
    assert any(not torch.equal(p, alpha[n]) for n, p in trainer.masks.named_parameters())
    merged = llama.load(out / "final").model  # adapters merged into a dense model beside the masks
    assert not any("lora" in n for n in merged.state_dict())


def test_cli_trains_then_compacts(domains, tmp_path):
    """`python -m llama.prune train` then `compact`, as a user runs them (outside the repo)."""
    import subprocess
    import sys

    cfg = _config(domains, tmp_path / "cli", max_steps=3, eval_every=3, save_every=3, lagrangian_warmup_steps=2)
    args = [f"{k}={json.dumps(v)}" for k, v in cfg.to_dict().items() if v is not None]
    run = subprocess.run([sys.executable, "-m", "llama.prune", "train", *args], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "next: python -m llama.prune compact" in run.stdout
    run = subprocess.run([sys.executable, "-m", "llama.prune", "compact", str(tmp_path / "cli" / "final"),
                          "--out", str(tmp_path / "small")], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    small = llama.load(tmp_path / "small").model.config
    assert (small.dim, small.n_heads, small.hidden_dim) == (16, 2, 32)
    bad = subprocess.run([sys.executable, "-m", "llama.prune", "train", *args, "mask_lr=-1"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "mask_lr" in bad.stderr
