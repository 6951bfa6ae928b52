"""Compaction (llama/prune/compact.py): the compact dense model computes what the masked model does,
also after saving (native, Hugging Face); LoRA and 4-bit bases; named errors; the masks on disk
(llama/prune/masks.py: mask_files, save_masks, load_masks) against hostile files; and the CLI
`python -m llama.prune compact`."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import llama
from llama import checkpoint as ck
from llama.config import ModelConfig
from llama.lora import apply_lora, has_lora, lora_layers, lora_parameters
from llama.prune import (MASKS_CONFIG, MASKS_WEIGHTS, MODULE_KINDS, PruningMasks, compact, compact_checkpoint,
                         compact_config, load_masks, mask_files, masked_forward, save_masks)
from llama.prune.__main__ import main
from llama.quantize import Int4Config, quantize_
from llama_kernels.cpu import int4_matmul as cpu_int4

from .helpers import require_transformers

ROOT = Path(__file__).resolve().parents[1]
SOURCE = dict(dim=64, n_layers=4, n_heads=4, hidden_dim=96, vocab_size=97, max_seq_len=64)
TARGET = dict(dim=32, n_layers=2, n_heads=2, hidden_dim=48, vocab_size=97, max_seq_len=64)
DEFAULT = ("layer", "head", "intermediate", "hidden")
CASES = {  # name: (modules, target changes, source/target variant)
    "default": (DEFAULT, {}, {}),
    "all-kinds": (MODULE_KINDS, {}, {}),
    "heads-hidden": (("head", "hidden"), dict(n_layers=4, hidden_dim=96), {}),
    "intermediate": (("intermediate",), dict(dim=64, n_layers=4, n_heads=4), {}),
    "layers-branches": (("layer", "head_layer", "mlp"), dict(dim=64, n_heads=4, hidden_dim=96), {}),
    "tied": (DEFAULT, {}, dict(tie_embeddings=True)),
    "gelu-layernorm": (DEFAULT, {}, dict(mlp="gelu", norm="layer")),
    "gelu-layernorm-tied": (("hidden", "head", "intermediate"), dict(n_layers=4), dict(mlp="gelu", norm="layer",
                                                                                       tie_embeddings=True)),
}


def model_of(seed=0, **changes):
    torch.manual_seed(seed)
    model = llama.build(ModelConfig(**{**SOURCE, **changes}))
    with torch.no_grad():  # norms away from 1, so a wrong slice or fold shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand_like(p) + 0.5 if name.endswith("weight") else torch.randn_like(p) * 0.1)
    return model.eval()


def masks_of(source, modules, target_changes=(), seed=0, **kwargs):
    target = ModelConfig(**{**TARGET, **dict(target_changes),
                            **{k: getattr(source, k) for k in ("tie_embeddings", "mlp", "norm")}})
    masks = PruningMasks(source, target, modules=modules, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # kept gates land at soft values in (0, 1], so folding them shows
        for gate in masks.gates.values():
            gate.log_alpha.copy_((torch.randn(gate.shape, generator=gen) * 1.5 + 1.0).clamp(-2.0, 6.0))
    return masks.eval()


def tokens_of(seed=1, batch=2, seq=12):
    return torch.randint(0, SOURCE["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", list(CASES))
def test_compact_model_computes_what_the_masked_model_does(case):
    modules, target_changes, variant = CASES[case]
    model = model_of(**variant)
    masks = masks_of(model.config, modules, target_changes)
    z = masks.deterministic_masks()
    small = compact(model, z, target=masks.target)
    assert small.config == masks.target
    assert compact_config(model.config, z) == masks.target
    assert sum(p.numel() for p in small.parameters()) == masks.target.num_params()  # a tied head counted once
    tok = tokens_of()
    with torch.no_grad():
        expected = masked_forward(model, tok, z)
        torch.testing.assert_close(small(tok), expected, atol=1e-5, rtol=1e-5)
        # binary masks (every kept gate at 1) give the same shape and only slice
        torch.testing.assert_close(compact(model, masks.deterministic_masks(binary=True))(tok),
                                   masked_forward(model, tok, masks.deterministic_masks(binary=True)),
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.hf
def test_compact_survives_native_and_hf_checkpoints(tmp_path):
    transformers = require_transformers()
    model = model_of()
    masks = masks_of(model.config, MODULE_KINDS)
    z = masks.deterministic_masks()
    small = compact(model, z, target=masks.target)
    tok = tokens_of()
    with torch.no_grad():
        expected = masked_forward(model, tok, z)
        llama.save(small, tmp_path / "native")
        again = llama.load(tmp_path / "native", device="cpu").model
        assert again.config == small.config
        torch.testing.assert_close(again(tok), expected, atol=1e-5, rtol=1e-5)
        ck.save(small, tmp_path / "hf", format="hf")
        theirs = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
        torch.testing.assert_close(theirs(tok).logits, expected, atol=1e-4, rtol=1e-4)


def test_a_kept_gate_whose_value_is_zero_folds_to_zeros():
    """Top-k keeps the target's count even where a kept gate's test-time value is exactly 0; with
    the masks' `keep`, compaction keeps that head (its wo columns zero) and the shape stays whole."""
    model = model_of()
    masks = masks_of(model.config, DEFAULT)
    with torch.no_grad():
        masks.gates["head"].log_alpha[0] = torch.tensor([-5.0, -6.0, -7.0, -8.0])  # values 0, top-2 kept
    z, keep = masks.deterministic_masks(), masks.keep()
    assert keep["head"][0].sum() == 2 and not z["head"][0].any()
    with pytest.raises(ValueError, match="keeps no heads"):
        compact(model, z, target=masks.target)  # from the values alone, layer 0 has none
    small = compact(model, z, target=masks.target, keep=keep)
    tok = tokens_of()
    with torch.no_grad():
        torch.testing.assert_close(small(tok), masked_forward(model, tok, z), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="keep"):
        compact(model, z, keep={"head": keep["head"]})


@pytest.mark.parametrize("four_bit", [False, True], ids=["dense-base", "4bit-base"])
def test_compact_merges_lora_without_changing_the_model(four_bit, monkeypatch):
    # the 4-bit kernel with fp32 activations: compared with the dequantized weights at 1e-4
    monkeypatch.setattr(cpu_int4, "ACTIVATIONS", "fp32")
    model = model_of()
    if four_bit:
        quantize_(model, Int4Config(32), filter_fn=lambda module, fqn: fqn != "output")
    apply_lora(model, rank=4, targets=("wq", "wk", "wv", "wo", "w1", "w2", "w3", "output"))
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn_like(p) * 0.05)
    masks = masks_of(model.config, DEFAULT)
    z = masks.deterministic_masks()
    small = compact(model, z, target=masks.target)
    assert has_lora(model) and not any(layer.merged for layer in lora_layers(model).values())
    assert not has_lora(small) and all(p.dtype == torch.float32 for p in small.parameters())
    tok = tokens_of()
    with torch.no_grad():
        # 4-bit: int4_matmul against the fp32 dequantized weights, a few ulps apart
        torch.testing.assert_close(small(tok), masked_forward(model, tok, z), atol=1e-4, rtol=1e-4)


def _layer_z(cfg, **kinds):
    return {kind: torch.tensor(values, dtype=torch.float32) for kind, values in kinds.items()}


@pytest.mark.parametrize("make_z,target,match", [
    (lambda cfg: {"hidden": torch.ones(63)}, None, r"z\['hidden'\]: expected shape \(64,\)"),
    (lambda cfg: {"intermediate": torch.ones(4, 95)}, None, r"z\['intermediate'\]: expected shape \(4, 96\)"),
    (lambda cfg: _layer_z(cfg, head_layer=[1.0, 0.0, 1.0, 1.0], mlp=[1.0] * 4), None,
     r"z: layer 1 keeps its FFN branch but not its attention branch"),
    (lambda cfg: {"layer": torch.zeros(4)}, None, r"z: every layer is pruned"),
    (lambda cfg: {"head": torch.tensor([[1.0, 1, 0, 0], [1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 0, 0]])}, None,
     r"z\['head'\]: layer 0 keeps 2 heads but layer 1 keeps 3"),
    (lambda cfg: {"head": torch.ones(4, 4), "hidden": torch.cat([torch.ones(40), torch.zeros(24)])}, None,
     r"kept dim must be n_heads \* head_dim = 64"),
    (lambda cfg: {"intermediate": torch.cat([torch.ones(4, 48), torch.zeros(4, 48)], 1)},
     ModelConfig(**{**SOURCE, "dim": 128, "n_heads": 8}), r"target.dim: expected at most the source's 64"),
    (lambda cfg: {"intermediate": torch.cat([torch.ones(4, 48), torch.zeros(4, 48)], 1)},
     ModelConfig(**{**SOURCE, "hidden_dim": 40}), r"target.hidden_dim: the masks give 48, but the target has 40"),
    (lambda cfg: {}, ModelConfig(**{**SOURCE, "tie_embeddings": True}), r"target.tie_embeddings"),
    (lambda cfg: {}, SOURCE, r"target: expected a ModelConfig"),
])
def test_bad_compaction_inputs_are_named(make_z, target, match):
    model = model_of()
    with pytest.raises(ValueError, match=match):
        compact(model, make_z(model.config), target=target)


def test_compact_refuses_what_is_not_a_model():
    with pytest.raises(ValueError, match="model: expected a llama.model.Transformer"):
        compact(torch.nn.Linear(2, 2), {})
    with pytest.raises(ValueError, match="model: its weights are on the meta device"):
        compact(llama.build(ModelConfig(**SOURCE), init=False), {})


# ----------------------------------------------------------------------------- masks on disk
def test_masks_round_trip_and_keep_other_files(tmp_path):
    source = ModelConfig(**SOURCE)
    masks = masks_of(source, MODULE_KINDS, seed=3, lagrangian_warmup_steps=7, normalize=False,
                     constrain_params=True)
    with torch.no_grad():
        for p in masks.lagrangian_parameters():
            p.copy_(torch.randn(()))
    assert set(mask_files(masks)) == {MASKS_WEIGHTS, MASKS_CONFIG}
    (tmp_path / "other.txt").write_text("kept")
    save_masks(masks, tmp_path)
    assert (tmp_path / "other.txt").read_text() == "kept"
    rng = torch.get_rng_state()
    back = load_masks(tmp_path)
    assert torch.equal(torch.get_rng_state(), rng)  # loading draws no random numbers of the caller's
    assert (back.source, back.target, back.modules_) == (masks.source, masks.target, masks.modules_)
    assert (back.lagrangian_warmup_steps, back.normalize, back.constrain_params) == (7, False, True)
    for (name, a), (name_b, b) in zip(masks.state_dict().items(), back.state_dict().items()):
        assert name == name_b and torch.equal(a, b), name
    back.eval()
    for kind, t in masks.deterministic_masks().items():
        assert torch.equal(back.deterministic_masks()[kind], t)


def _saved(tmp_path):
    save_masks(masks_of(ModelConfig(**SOURCE), DEFAULT), tmp_path)
    return json.loads((tmp_path / MASKS_CONFIG).read_text())


@pytest.mark.parametrize("change,match", [
    (lambda raw: [1, 2], r"masks.json: expected a JSON object|masks.json"),
    (lambda raw: {**raw, "format": "other"}, r"masks.json: field format: expected 'llama-kernels-prune-masks'"),
    (lambda raw: {**raw, "version": 2}, r"masks.json: field version"),
    (lambda raw: {k: v for k, v in raw.items() if k != "modules"}, r"masks.json: missing field modules"),
    (lambda raw: {**raw, "modules": "head"}, r"masks.json: field modules: expected a non-empty list"),
    (lambda raw: {**raw, "modules": ["head", "tail"]}, r"masks.json: field modules"),
    (lambda raw: {**raw, "lagrangian_warmup_steps": True}, r"masks.json: field lagrangian_warmup_steps"),
    (lambda raw: {**raw, "normalize": "yes"}, r"masks.json: field normalize: expected true or false"),
    (lambda raw: {**raw, "source": [64]}, r"masks.json: field source: expected an object"),
    (lambda raw: {**raw, "source": {**raw["source"], "dim": "64"}}, r"masks.json: field source: invalid model"),
    (lambda raw: {**raw, "source": {**raw["source"], "evil": 1}}, r"masks.json: field source: invalid model"),
    (lambda raw: {**raw, "target": {**raw["target"], "dim": 128, "n_heads": 4}},
     r"masks.json: target.dim: expected at most"),
    (lambda raw: {**raw, "source": {**raw["source"], "n_layers": 10**9}},
     r"masks.safetensors: tensor gates.layer.log_alpha: expected shape \(1000000000,\), got \(4,\)"),
    (lambda raw: {**raw, "constrain_params": True}, r"masks.safetensors: expected the tensors .*missing "
                                                    r"\['lambda_1.params', 'lambda_2.params'\]"),
])
def test_hostile_masks_json_is_named(tmp_path, change, match):
    raw = _saved(tmp_path)
    (tmp_path / MASKS_CONFIG).write_text(json.dumps(change(raw)))
    with pytest.raises(ValueError, match=match):
        load_masks(tmp_path)


@pytest.mark.parametrize("tamper,match", [
    (lambda t: {**t, "gates.head.log_alpha": torch.zeros(2, 2)},
     r"masks.safetensors: tensor gates.head.log_alpha: expected shape \(4, 4\), got \(2, 2\)"),
    (lambda t: {k: v for k, v in t.items() if k != "lambda_2.hidden"}, r"missing \['lambda_2.hidden'\]"),
    (lambda t: {**t, "extra": torch.zeros(1)}, r"unexpected \['extra'\]"),
    (lambda t: {**t, "gates.layer.log_alpha": torch.zeros(4, dtype=torch.int32)},
     r"tensor gates.layer.log_alpha: expected a float tensor, got dtype I32"),
    (lambda t: {**t, "gates.layer.log_alpha": torch.tensor([0.0, float("nan"), 0.0, 0.0])},
     r"tensor gates.layer.log_alpha: expected finite values"),
])
def test_hostile_masks_safetensors_is_named(tmp_path, tamper, match):
    _saved(tmp_path)
    tensors = load_file(tmp_path / MASKS_WEIGHTS)
    save_file(tamper(tensors), tmp_path / MASKS_WEIGHTS)
    with pytest.raises(ValueError, match=match):
        load_masks(tmp_path)


def test_masks_are_never_unpickled(tmp_path):
    _saved(tmp_path)
    torch.save({"gates.layer.log_alpha": torch.zeros(4)}, tmp_path / MASKS_WEIGHTS)  # a pickle, not safetensors
    with pytest.raises(ValueError, match=r"masks.safetensors: corrupt or truncated safetensors file"):
        load_masks(tmp_path)
    (tmp_path / MASKS_CONFIG).unlink()
    with pytest.raises(ValueError, match=r"masks.json: missing masks file"):
        load_masks(tmp_path)


# ----------------------------------------------------------------------------- the CLI
def _checkpoint_with_masks(folder: Path):
    model = model_of()
    masks = masks_of(model.config, DEFAULT)
    llama.save(model, folder)
    save_masks(masks, folder)
    (folder / "tokenizer.model").write_bytes(b"not really a tokenizer")  # copied as it is
    return model, masks


def test_cli_compacts_a_checkpoint_as_a_subprocess(tmp_path):
    model, masks = _checkpoint_with_masks(tmp_path / "ckpt")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "llama.prune", "compact", str(tmp_path / "ckpt"), "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "2/4 layers" in done.stdout
    assert (out / "tokenizer.model").read_bytes() == b"not really a tokenizer"
    small = ck.load_model(out)
    assert small.config == masks.target
    tok = tokens_of()
    with torch.no_grad():
        torch.testing.assert_close(small(tok), masked_forward(model, tok, masks.deterministic_masks()),
                                   atol=1e-5, rtol=1e-5)
    # a bad argument: one `error:` line naming it, exit status 2
    done = subprocess.run([sys.executable, "-m", "llama.prune", "compact", str(tmp_path / "ckpt"), "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"error: --out: {str(out)!r} already holds a checkpoint; "
                                                "pass --force to write into it anyway"]


def test_cli_writes_hf_and_forces(tmp_path, capsys):
    model, masks = _checkpoint_with_masks(tmp_path / "ckpt")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("x")
    assert main(["compact", str(tmp_path / "ckpt"), "--out", str(out), "--format", "hf"]) == 2
    assert "--out" in capsys.readouterr().err
    assert main(["compact", str(tmp_path / "ckpt"), "--out", str(out), "--format", "hf", "--force"]) == 0
    assert ck.detect_format(out) == "hf"
    assert ck.read_config(out).dim == masks.target.dim


@pytest.mark.parametrize("argv,match", [
    (lambda d: ["compact", str(d / "missing"), "--out", str(d / "o")], "error: CKPT: "),
    (lambda d: ["compact", str(d / "bare"), "--out", str(d / "o")], "has no masks.json"),
    (lambda d: ["compact", str(d / "ckpt"), "--out", str(d / "ckpt")], "error: --out: .* is CKPT itself"),
])
def test_cli_usage_errors(tmp_path, capsys, argv, match):
    _checkpoint_with_masks(tmp_path / "ckpt")
    llama.save(model_of(), tmp_path / "bare")
    assert main(argv(tmp_path)) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert re.search(match, err), err


def test_compact_checkpoint_library_call(tmp_path):
    model, masks = _checkpoint_with_masks(tmp_path / "ckpt")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="out: .* is not empty; pass force=True"):
        compact_checkpoint(tmp_path / "ckpt", out)
    with pytest.raises(ValueError, match="out: .* is the source checkpoint"):
        compact_checkpoint(tmp_path / "ckpt", tmp_path / "ckpt", force=True)
    with pytest.raises(ValueError, match="format: expected one of native, hf"):
        compact_checkpoint(tmp_path / "ckpt", out, format="gguf", force=True)
    small = compact_checkpoint(tmp_path / "ckpt", out, force=True)
    assert small.config == masks.target == ck.read_config(out)
    assert (out / "notes.txt").exists() and (out / "tokenizer.model").exists()


def test_cli_needs_a_subcommand(capsys):
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2
