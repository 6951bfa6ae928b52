"""llama.checkpoint: every format round-trips, the llama2.c layouts match files built by hand,
RoPE permutations are right, Hugging Face directories agree with transformers, bad input is
refused clearly and failed saves leave the previous checkpoint intact."""
import json
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from llama import checkpoint as ck
from llama.config import ModelConfig
from llama.formats import hf, llama2c_bin, native
from llama.model import apply_rope, build, rope_tables
from tests.helpers import require_transformers

VOCAB = 300
CONFIGS = {
    "mha-untied": ModelConfig(dim=64, n_layers=2, n_heads=4, vocab_size=VOCAB, hidden_dim=96, max_seq_len=64),
    "gqa-tied": ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, hidden_dim=172,
                            max_seq_len=64, tie_embeddings=True),
    "gqa-untied": ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, hidden_dim=172,
                              max_seq_len=64),
}


def randomized(cfg: ModelConfig, seed: int = 0):
    """A model whose every tensor is random, norms included, with O(1) logits."""
    gen = torch.Generator().manual_seed(seed)
    model = build(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            elif p.dim() == 1:  # LayerNorm bias
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            elif name == "tok_embeddings.weight":
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def models():
    return {name: randomized(cfg, seed=i) for i, (name, cfg) in enumerate(CONFIGS.items())}


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def logits(model, tokens):
    return model(tokens)


def assert_same_logits(a, b, tokens, atol=1e-5):
    torch.testing.assert_close(logits(a, tokens), logits(b, tokens), atol=atol, rtol=1e-5)


def interleave_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Half-split RoPE rows -> interleaved, by index arithmetic (independent of the module):
    row h*D + 2i + j of the result is row h*D + j*D/2 + i of w."""
    d = w.shape[0] // n_heads
    return w[[h * d + j * (d // 2) + i for h in range(n_heads) for i in range(d // 2) for j in range(2)]]


def llama2c_state(model) -> dict:
    """Our state dict as llama2.c stores it: interleaved wq/wk, output.weight always present."""
    cfg = model.config
    state = {}
    for name, t in model.state_dict().items():
        if name.endswith("attention.wq.weight"):
            t = interleave_rows(t, cfg.n_heads)
        elif name.endswith("attention.wk.weight"):
            t = interleave_rows(t, cfg.n_kv_heads)
        state[name] = t.clone()
    return state


def snapshot(directory: Path) -> dict:
    return {p.relative_to(directory): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("fmt", [f for f in ck.FORMATS if f != "llama2c-bin-v2"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_round_trip_is_exact(fmt, name, models, tokens, tmp_path):
    model = models[name]
    if fmt == "minllama-pt" and not model.config.tie_embeddings:
        with pytest.raises(ValueError, match="untied"):
            ck.save(model, tmp_path / "ckpt", fmt)
        return
    path = ck.save(model, tmp_path / "ckpt", fmt)
    assert ck.detect_format(path) == fmt
    loaded = ck.load_model(path)
    assert loaded.config.tie_embeddings == model.config.tie_embeddings
    assert loaded.config.n_kv_heads == model.config.n_kv_heads
    assert not loaded.training
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert_same_logits(loaded, model, tokens, atol=1e-6)
    assert ck.read_config(path) == loaded.config


@pytest.mark.parametrize("name", ["mha-untied", "gqa-tied"])
def test_q8_round_trip_within_quantization_error(name, models, tokens, tmp_path):
    model = models[name]
    path = ck.save(model, tmp_path / "q8.bin", "llama2c-bin-v2")
    header = ck.read_llama2c_header(path)
    assert header.version == 2 and header.group_size == 64
    loaded = ck.load_model(path)
    assert loaded.tok_embeddings.weight.dtype == torch.float32
    # Every weight within half a quantization step of its group (groups of 64 = one embedding row).
    emb, emb_q = model.tok_embeddings.weight, loaded.tok_embeddings.weight
    step = emb.abs().amax(dim=1, keepdim=True) / 127
    assert ((emb_q - emb).abs() <= step / 2 + 1e-7).all()
    for key, value in model.state_dict().items():
        got = loaded.state_dict()[key]
        if key.endswith("norm.weight"):
            assert torch.equal(got, value), key  # norms stay fp32
        else:
            assert (got - value).abs().max() <= value.abs().max() / 127 / 2 + 1e-7, key
    reference = logits(model, tokens)
    quantized_error = (logits(loaded, tokens) - reference).abs().max()
    unrelated_error = (logits(randomized(model.config, seed=99), tokens) - reference).abs().max()
    assert quantized_error < 0.1 * unrelated_error


def test_q8_group_size(models, tmp_path):
    model = models["mha-untied"]
    path = ck.save(model, tmp_path / "q8.bin", "llama2c-bin-v2", group_size=32)
    assert ck.read_llama2c_header(path).group_size == 32
    ck.load_model(path)
    with pytest.raises(ValueError, match="group_size"):
        ck.save(model, tmp_path / "bad.bin", "llama2c-bin-v2", group_size=48)
    with pytest.raises(ValueError, match="group_size"):
        ck.save(model, tmp_path / "bad.bin", "llama2c-bin-v1", group_size=32)
    odd = randomized(CONFIGS["mha-untied"].replace(dim=48, n_heads=4, hidden_dim=96))
    assert ck.read_llama2c_header(ck.save(odd, tmp_path / "odd.bin", "llama2c-bin-v2")).group_size == 16


def test_load_with_dtype(models, tmp_path):
    path = ck.save(models["gqa-tied"], tmp_path / "native")
    loaded = ck.load_model(path, dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert loaded.output.weight is loaded.tok_embeddings.weight
    assert ck.load_model(ck.save(loaded, tmp_path / "bf16")).tok_embeddings.weight.dtype == torch.bfloat16


# ----------------------------------------------------------------------------- llama2.c layouts by hand
def handmade_bin(model, version: int, group_size: int = 64) -> bytes:
    """A llama2.c .bin built straight from export.py's description, for comparison."""
    cfg = model.config
    sd = llama2c_state(model)
    layer = lambda suffix: [sd[f"layers.{i}.{suffix}"] for i in range(cfg.n_layers)]  # noqa: E731
    att_norm, ffn_norm = layer("attention_norm.weight"), layer("ffn_norm.weight")
    wq, wk, wv, wo = (layer(f"attention.{w}.weight") for w in ("wq", "wk", "wv", "wo"))
    w1, w2, w3 = (layer(f"feed_forward.{w}.weight") for w in ("w1", "w2", "w3"))
    shared = cfg.tie_embeddings
    output = [] if shared else [sd["output.weight"]]
    params = [cfg.dim, cfg.hidden_dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.vocab_size, cfg.max_seq_len]
    f32 = lambda ts: b"".join(t.float().numpy().astype("<f4").tobytes() for t in ts)  # noqa: E731
    if version == 0:
        params[5] = cfg.vocab_size if shared else -cfg.vocab_size
        cos, sin = rope_tables(cfg, cfg.max_seq_len)
        return struct.pack("<7i", *params) + f32(
            [sd["tok_embeddings.weight"], *att_norm, *wq, *wk, *wv, *wo, *ffn_norm, *w1, *w2, *w3, sd["norm.weight"],
             cos, sin, *output])
    header = struct.pack("<Ii7iB", 0x616B3432, version, *params, int(shared))
    if version == 2:
        header += struct.pack("<i", group_size)
    header += bytes(256 - len(header))
    norms = [*att_norm, *ffn_norm, sd["norm.weight"]]
    matrices = [sd["tok_embeddings.weight"], *wq, *wk, *wv, *wo, *w1, *w2, *w3, *output]
    if version == 1:
        return header + f32(norms + matrices)
    body = f32(norms)
    for w in matrices:
        groups = w.float().reshape(-1, group_size)
        scale = groups.abs().amax(dim=1) / 127
        q = torch.round(groups / scale[:, None]).to(torch.int8)
        body += q.numpy().tobytes() + f32([scale])
    return header + body


@pytest.mark.parametrize("version", [0, 1, 2])
@pytest.mark.parametrize("name", ["mha-untied", "gqa-tied"])
def test_bin_layout_matches_llama2c(version, name, models, tokens, tmp_path):
    model = models[name]
    handmade = tmp_path / "handmade.bin"
    handmade.write_bytes(handmade_bin(model, version))
    assert ck.detect_format(handmade) == f"llama2c-bin-v{version}"
    loaded = ck.load_model(handmade)
    assert loaded.config.tie_embeddings == model.config.tie_embeddings
    if version < 2:
        assert_same_logits(loaded, model, tokens, atol=1e-6)
    # Our writer produces the same bytes.
    ours = ck.save(model, tmp_path / "ours.bin", f"llama2c-bin-v{version}")
    assert ours.read_bytes() == handmade.read_bytes()


# ----------------------------------------------------------------------------- RoPE permutations
def rope_interleaved(x, cos, sin):
    """Meta/llama2.c RoPE: rotate pairs (2i, 2i+1). x (S, H, D), cos/sin (S, D/2)."""
    real, imag = x[..., 0::2], x[..., 1::2]
    cos, sin = cos[:, None], sin[:, None]
    return torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1).flatten(-2)


def test_permutation_turns_interleaved_rope_into_half_split():
    cfg = CONFIGS["gqa-tied"]
    gen = torch.Generator().manual_seed(3)
    w_interleaved = torch.randn(cfg.n_heads * cfg.head_dim, cfg.dim, generator=gen)
    x = torch.randn(10, cfg.dim, generator=gen)
    cos, sin = rope_tables(cfg, 10)
    q_meta = rope_interleaved((x @ w_interleaved.T).view(10, cfg.n_heads, cfg.head_dim), cos, sin)
    w_half = ck.permute_interleaved_to_half(w_interleaved, cfg.n_heads)
    q_ours = apply_rope((x @ w_half.T).view(1, 10, cfg.n_heads, cfg.head_dim), cos, sin)[0]
    # Same rotated features, in half-split order within each head.
    torch.testing.assert_close(q_ours, q_meta.view(10, cfg.n_heads, -1, 2).transpose(-1, -2).flatten(-2))
    # So attention scores agree.
    torch.testing.assert_close(q_ours @ q_ours.transpose(-1, -2), q_meta @ q_meta.transpose(-1, -2))
    torch.testing.assert_close(ck.permute_half_to_interleaved(w_half, cfg.n_heads), w_interleaved)
    torch.testing.assert_close(w_interleaved, interleave_rows(w_half, cfg.n_heads))
    with pytest.raises(ValueError, match="heads"):
        ck.permute_interleaved_to_half(torch.zeros(10, 4), 4)


@pytest.mark.parametrize("name", ["mha-untied", "gqa-tied"])
def test_llama2c_pt_built_by_hand(name, models, tokens, tmp_path):
    model = models[name]
    cfg = model.config
    state = {f"_orig_mod.{k}": v for k, v in llama2c_state(model).items()}  # torch.compile'd
    args = dict(dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads,
                vocab_size=cfg.vocab_size, hidden_dim=cfg.hidden_dim, multiple_of=32, max_seq_len=cfg.max_seq_len,
                dropout=0.0)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": state, "model_args": args, "optimizer": {"state": {}, "param_groups": []},
                "iter_num": 5000, "best_val_loss": torch.tensor(1.25), "config": {"batch_size": 32}}, path)
    assert ck.detect_format(path) == "llama2c-pt"
    loaded = ck.load_model(path)
    assert loaded.config.tie_embeddings == cfg.tie_embeddings
    assert_same_logits(loaded, model, tokens, atol=1e-6)
    # Without the permutation the model would be a different one: the test can fail.
    unpermuted = build(loaded.config, init=False).load_weights(
        {k.removeprefix("_orig_mod."): v for k, v in state.items()}).eval()
    assert (logits(unpermuted, tokens) - logits(model, tokens)).abs().max() > 1e-2


def test_llama2c_pt_rebuilds_hidden_dim_from_multiple_of(tokens, tmp_path):
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, vocab_size=VOCAB, multiple_of=32, max_seq_len=64,
                      tie_embeddings=True)
    assert cfg.hidden_dim == 192
    model = randomized(cfg)
    args = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=None, vocab_size=VOCAB, multiple_of=32, max_seq_len=64,
                dropout=0.0)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": llama2c_state(model), "model_args": args}, path)
    loaded = ck.load_model(path)
    assert loaded.config.hidden_dim == 192 and loaded.config.n_kv_heads == 4
    assert_same_logits(loaded, model, tokens, atol=1e-6)


def test_minllama_names_and_config(models, tokens, tmp_path):
    model = models["gqa-tied"]
    cfg = model.config
    renames = {"wq": "compute_query", "wk": "compute_key", "wv": "compute_value", "wo": "compute_output"}
    state = {}
    for k, v in llama2c_state(model).items():
        parts = k.split(".")
        if len(parts) == 5 and parts[2] == "attention":
            parts[3] = renames[parts[3]]
        state[".".join(parts)] = v
    args = dict(dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads,
                vocab_size=cfg.vocab_size, hidden_dim=cfg.hidden_dim, max_seq_len=cfg.max_seq_len,
                layer_norm_eps=1e-5, position_embedding_type="rotary", use_cache=True)
    for key in ("model_args", "config"):
        path = tmp_path / f"{key}.pt"
        torch.save({"model": state, key: args}, path)
        assert ck.detect_format(path) == "minllama-pt"
        assert_same_logits(ck.load_model(path), model, tokens, atol=1e-6)


def test_legacy_torch_serialization(models, tokens, tmp_path):
    model = models["gqa-tied"]
    cfg = model.config
    args = dict(dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads,
                vocab_size=cfg.vocab_size, hidden_dim=cfg.hidden_dim, max_seq_len=cfg.max_seq_len)
    path = tmp_path / "old.pt"
    torch.save({"model": llama2c_state(model), "model_args": args}, path, _use_new_zipfile_serialization=False)
    assert path.read_bytes()[:2] != b"PK"
    assert ck.detect_format(path) == "llama2c-pt"
    assert_same_logits(ck.load_model(path), model, tokens, atol=1e-6)


def test_loaded_weights_survive_the_file_being_rewritten_in_place(tmp_path):
    """Loading maps files lazily; the model must not stay backed by them (else: SIGBUS)."""
    script = f"""
import torch
from llama import checkpoint as ck
from llama.config import ModelConfig
from llama.model import build
cfg = ModelConfig(dim=64, n_layers=1, n_heads=4, vocab_size=300, max_seq_len=64)
model = build(cfg).eval()
for fmt in ("native", "llama2c-pt"):
    path = ck.save(model, {str(tmp_path)!r} + "/" + fmt, fmt)
    loaded = ck.load_model(path)
    weights = path / "model.safetensors" if fmt == "native" else path
    weights.write_bytes(b"")  # truncated in place, as a non-atomic writer would
    assert torch.equal(loaded(torch.tensor([[1, 2, 3]])), model(torch.tensor([[1, 2, 3]])))
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


def test_detection_ignores_file_names(models, tmp_path):
    model = models["gqa-tied"]
    for fmt, misleading in (("llama2c-bin-v1", "model.pt"), ("llama2c-pt", "model.bin"),
                            ("llama2c-bin-v0", "weights.safetensors")):
        path = ck.save(model, tmp_path / misleading, fmt)
        assert ck.detect_format(path) == fmt
        path.unlink()


# ----------------------------------------------------------------------------- Hugging Face
def hf_model(kv_heads: int, tie: bool, rope_scaling=None, seed: int = 0):
    transformers = require_transformers()
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=kv_heads, vocab_size=VOCAB, max_position_embeddings=64, rms_norm_eps=1e-5,
        tie_word_embeddings=tie, rope_scaling=rope_scaling,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.rand(p.shape, generator=gen) + 0.5 if "norm" in name
                    else torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
    return model


@torch.no_grad()
def hf_logits(model, tokens):
    return model(tokens).logits


@pytest.mark.hf
@pytest.mark.parametrize("kv_heads,tie,rope_scaling", [
    (4, False, None),
    (2, True, {"rope_type": "linear", "factor": 2.0}),
])
def test_hf_directory_from_transformers(kv_heads, tie, rope_scaling, tokens, tmp_path):
    reference = hf_model(kv_heads, tie, rope_scaling)
    reference.save_pretrained(tmp_path / "hf")
    assert ck.detect_format(tmp_path / "hf") == "hf"
    ours = ck.load_model(tmp_path / "hf")
    assert ours.config.n_kv_heads == kv_heads and ours.config.tie_embeddings == tie
    assert ours.config.rope_scaling == ("linear" if rope_scaling else "none")
    torch.testing.assert_close(logits(ours, tokens), hf_logits(reference, tokens), atol=1e-4, rtol=1e-4)


@pytest.mark.hf
@pytest.mark.parametrize("name,shard", [("mha-untied", None), ("gqa-tied", 40_000)])
def test_hf_directory_for_transformers(name, shard, models, tokens, tmp_path):
    transformers = require_transformers()
    model = models[name]
    path = ck.save(model, tmp_path / "hf", "hf", max_shard_bytes=shard)
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert config["torch_dtype"] == "float32"
    if shard:
        index = json.loads((path / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1
        assert not (path / "model.safetensors").exists()
        assert "lm_head.weight" not in index["weight_map"]  # tied: stored once
    theirs = transformers.LlamaForCausalLM.from_pretrained(path).eval()
    torch.testing.assert_close(hf_logits(theirs, tokens), logits(model, tokens), atol=1e-4, rtol=1e-4)


def test_hf_resave_keeps_other_files_and_drops_stale_shards(models, tokens, tmp_path):
    model = models["mha-untied"]
    path = ck.save(model, tmp_path / "hf", "hf", max_shard_bytes=40_000)
    (path / "tokenizer.model").write_bytes(b"tokenizer")
    ck.save(model, path, "hf")
    names = sorted(p.name for p in path.iterdir())
    assert names == ["config.json", "model.safetensors", "tokenizer.model"]
    assert_same_logits(ck.load_model(path), model, tokens, atol=1e-6)


def write_hf(model, path: Path, edit_config=None, edit_tensors=None) -> Path:
    """Save `model` as an HF directory, then edit its config.json and/or tensors."""
    from safetensors.torch import load_file, save_file

    ck.save(model, path, "hf")
    if edit_config:
        config = json.loads((path / "config.json").read_text())
        edit_config(config)
        (path / "config.json").write_text(json.dumps(config))
    if edit_tensors:
        tensors = load_file(path / "model.safetensors")
        edit_tensors(tensors)
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return path


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"), "missing tensor.*model.layers.1.mlp.up_proj.weight"),
    (lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}),
     "unexpected tensor.*model.layers.0.self_attn.q_proj.bias"),
    (lambda t: t.update({"model.norm.weight": torch.ones(65)}), "model.norm.weight.*shape"),
])
def test_hf_strict_tensor_names_and_shapes(edit, message, models, tmp_path):
    path = write_hf(models["mha-untied"], tmp_path / "hf", edit_tensors=edit)
    with pytest.raises(ValueError, match=message):
        ck.load_model(path)


def test_hf_kv_heads_must_match_k_proj(models, tmp_path):
    gqa = models["gqa-untied"]
    path = write_hf(gqa, tmp_path / "contradicting", edit_config=lambda c: c.update(num_key_value_heads=4))
    with pytest.raises(ValueError, match="model.layers.0.self_attn.k_proj.weight.*shape"):
        ck.load_model(path)
    # Absent, it defaults to num_attention_heads (transformers' rule), which k_proj contradicts here.
    path = write_hf(gqa, tmp_path / "absent", edit_config=lambda c: c.pop("num_key_value_heads"))
    assert ck.read_config(path).n_kv_heads == 4
    with pytest.raises(ValueError, match="k_proj"):
        ck.load_model(path)


@pytest.mark.parametrize("edit,message", [
    (lambda c: c.update(hidden_act="gelu"), "hidden_act"),
    (lambda c: c.update(attention_bias=True), "attention_bias"),
    (lambda c: c.update(mlp_bias=True), "mlp_bias"),
    (lambda c: c.update(rope_parameters={"rope_type": "llama3", "factor": 8.0, "rope_theta": 5e5}), "llama3"),
    (lambda c: c.update(head_dim=32), "head_dim"),
    (lambda c: c.update(num_key_value_heads=3), "n_kv_heads"),
])
def test_hf_unsupported_config(edit, message, models, tmp_path):
    path = write_hf(models["mha-untied"], tmp_path / "hf", edit_config=edit)
    with pytest.raises(ValueError, match=message):
        ck.load_model(path)


# ----------------------------------------------------------------------------- native
def test_native_layout(models, tmp_path):
    from safetensors import safe_open

    model = models["gqa-tied"]
    path = ck.save(model, tmp_path / "run", metadata={"step": 1000})
    config = json.loads((path / "config.json").read_text())
    assert config["format"] == "llama-kernels" and config["version"] == 1 and config["weights"] == "dense"
    assert config["model"] == model.config.to_dict() and config["metadata"] == {"step": 1000}
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        assert "output.weight" not in f.keys() and "tok_embeddings.weight" in f.keys()
    for edit, message in ((dict(version=2), "newer"), (dict(weights="q4"), "q4")):
        (path / "config.json").write_text(json.dumps({**config, **edit}))
        with pytest.raises(ValueError, match=message):
            ck.load_model(path)


def test_native_keeps_every_variant(tokens, tmp_path):
    cfg = ModelConfig(dim=64, n_layers=1, n_heads=4, vocab_size=VOCAB, max_seq_len=64, norm="layer", mlp="gelu",
                      rope_theta=5e5, rope_scaling="dynamic", rope_scaling_factor=4.0)
    model = randomized(cfg)
    assert_same_logits(ck.load_model(ck.save(model, tmp_path / "native")), model, tokens, atol=1e-6)
    for fmt in ("hf", "llama2c-pt", "llama2c-bin-v0"):
        with pytest.raises(ValueError, match="cannot represent"):
            ck.save(model, tmp_path / fmt, fmt)


# ----------------------------------------------------------------------------- bad input
def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        ck.load_model(tmp_path / "nope.bin")


@pytest.mark.parametrize("fmt", ["llama2c-bin-v0", "llama2c-bin-v1", "llama2c-bin-v2", "llama2c-pt"])
def test_truncated_file(fmt, models, tmp_path):
    path = ck.save(models["gqa-untied"], tmp_path / "model", fmt)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"{re.escape(str(path))}.*(truncated|corrupt)"):
        ck.load_model(path)


def test_truncated_safetensors(models, tmp_path):
    path = ck.save(models["gqa-untied"], tmp_path / "native")
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match="model.safetensors"):
        ck.load_model(path)


def test_wrong_magic_and_garbage(models, tmp_path):
    path = ck.save(models["gqa-tied"], tmp_path / "model.bin", "llama2c-bin-v1")
    data = bytearray(path.read_bytes())
    data[:4] = b"\xde\xad\xbe\xef"
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{re.escape(str(path))}.*not a recognised checkpoint"):
        ck.load_model(path)
    data[:8] = struct.pack("<Ii", 0x616B3432, 7)
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="unsupported version 7"):
        ck.detect_format(path)
    for content in (b"", b"hello", np.random.default_rng(0).bytes(4096)):
        path.write_bytes(content)
        with pytest.raises(ValueError, match=re.escape(str(path))):
            ck.load_model(path)
    with pytest.raises(ValueError, match="config.json"):
        ck.load_model(tmp_path)


class Opaque:
    """Something torch.load(weights_only=True) must not unpickle."""


def test_pickled_objects_are_refused(models, tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": llama2c_state(models["gqa-tied"]), "model_args": Opaque()}, path)
    with pytest.raises(ValueError, match="weights_only"):
        ck.load_model(path)


def test_pt_problems(models, tmp_path):
    state = llama2c_state(models["gqa-tied"])
    cases = (
        ({"model": state}, "model_args"),
        ({"model": state, "model_args": dict(dim=64, n_layers=2, n_heads=4, vocab_size=VOCAB, rope_kind="x")},
         "rope_kind"),
        ({"model": state, "model_args": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB)},
         "layers.0.feed_forward.w1.weight.*shape"),  # hidden_dim from llama2.c's default multiple_of 256
        ({"weights": state}, "'model'"),
    )
    for ckpt, message in cases:
        torch.save(ckpt, tmp_path / "bad.pt")
        with pytest.raises(ValueError, match=message):
            ck.load_model(tmp_path / "bad.pt")


def test_save_refuses_what_a_format_cannot_hold(models, tmp_path):
    model = models["mha-untied"]
    with pytest.raises(ValueError, match="format"):
        ck.save(model, tmp_path / "x", "safetensors")
    with pytest.raises(ValueError, match="max_shard_bytes"):
        ck.save(model, tmp_path / "x", "native", max_shard_bytes=1000)
    eps = randomized(CONFIGS["mha-untied"].replace(norm_eps=1e-6))
    with pytest.raises(ValueError, match="norm_eps"):
        ck.save(eps, tmp_path / "x.bin", "llama2c-bin-v1")
    ck.load_model(ck.save(eps, tmp_path / "x.pt", "llama2c-pt"))  # .pt has a field for it
    with pytest.raises(ValueError, match="is a directory"):
        ck.save(model, tmp_path, "llama2c-bin-v0")
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a directory"):
        ck.save(model, tmp_path / "file", "hf")


# ----------------------------------------------------------------------------- atomic writes
def test_failed_file_save_leaves_previous_checkpoint(models, monkeypatch, tmp_path):
    path = ck.save(models["gqa-tied"], tmp_path / "model.bin", "llama2c-bin-v1")
    before = snapshot(tmp_path)
    real, calls = llama2c_bin._write_f32, []

    def failing(f, t):
        calls.append(1)
        real(f, t)
        if len(calls) == 5:
            raise OSError("disk full")

    monkeypatch.setattr(llama2c_bin, "_write_f32", failing)
    with pytest.raises(OSError, match="disk full"):
        ck.save(models["mha-untied"], path, "llama2c-bin-v1")
    assert snapshot(tmp_path) == before
    calls.clear()
    with pytest.raises(OSError, match="disk full"):
        ck.save(models["mha-untied"], tmp_path / "new.bin", "llama2c-bin-v0")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("fmt,shard", [("hf", None), ("hf", 40_000), ("native", None)])
def test_failed_directory_save_leaves_previous_checkpoint(fmt, shard, models, monkeypatch, tmp_path):
    path = ck.save(models["gqa-tied"], tmp_path / "ckpt", fmt, max_shard_bytes=shard)
    (path / "tokenizer.model").write_bytes(b"tokenizer")
    before = snapshot(tmp_path)
    writer = {"hf": hf, "native": native}[fmt]  # the format module that writes the safetensors files
    real, calls = writer.save_safetensors, []
    fail_at = 2 if shard else 1  # sharded: after one shard was written in full

    def failing(tensors, p):
        calls.append(1)
        if len(calls) == fail_at:
            Path(p).write_bytes(b"partial")
            raise OSError("disk full")
        real(tensors, p)

    monkeypatch.setattr(writer, "save_safetensors", failing)
    for target in (path, tmp_path / "fresh"):  # over the old checkpoint, and into a new directory
        calls.clear()
        with pytest.raises(OSError, match="disk full"):
            ck.save(models["mha-untied"], target, fmt, max_shard_bytes=shard)
        assert snapshot(tmp_path) == before
        assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    monkeypatch.undo()
    assert_same_logits(ck.load_model(path), models["gqa-tied"], torch.tensor([[1, 2, 3]]), atol=1e-6)
