"""4-bit weights for the model: quantize_, QuantLinear, native checkpoints, the CLI, and what
quantization costs a trained model in perplexity."""
import copy
import importlib.util
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import llama
from llama import checkpoint as ck
from llama.data import tokenize_file, train_val_split
from llama.model import Linear
from llama.quantize import (
    Int4Config, NF4Config, QuantLinear, config_from_dict, model_size_bytes, quantization_info, quantize_,
    quantized_layers,
)
from llama.tokenizer import train
from llama_kernels.cpu import int4_matmul as cpu_int4

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"int4-g64": Int4Config(64), "nf4-dq": NF4Config(64), "nf4-g32": NF4Config(32, double_quant=False)}


def tiny(**changes):
    base = dict(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, hidden_dim=384, max_seq_len=64)
    return llama.build(llama.ModelConfig(**{**base, **changes})).eval()


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def dequantized_copy(model):
    """The dense model whose weights are exactly what the 4-bit layers stand for."""
    dense = copy.deepcopy(model)
    for name, layer in quantized_layers(model).items():
        linear = Linear(layer.in_features, layer.out_features, bias=False)
        linear.weight = nn.Parameter(layer.dequantize())
        parent, _, child = name.rpartition(".")
        setattr(dense.get_submodule(parent) if parent else dense, child, linear)
    return dense


TOKENS = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))


# ----------------------------------------------------------------------------- configs and errors
def test_config_validation():
    assert Int4Config().group_size == 128 and NF4Config().group_size == 64 and NF4Config().double_quant
    with pytest.raises(ValueError, match="group_size: expected one of 32, 64, 128, got 48"):
        Int4Config(group_size=48)
    with pytest.raises(ValueError, match="block_size"):
        NF4Config(block_size=48)
    with pytest.raises(ValueError, match="double_quant"):
        NF4Config(double_quant="yes")
    with pytest.raises(ValueError, match="format: expected one of int4, nf4, got 'int3'"):
        config_from_dict({"format": "int3", "group_size": 64})
    with pytest.raises(ValueError, match="double_quant: applies only to format 'nf4'"):
        config_from_dict({"format": "int4", "double_quant": True})
    assert config_from_dict({"format": "nf4", "group_size": 32, "double_quant": False}) == NF4Config(32, False)
    with pytest.raises(ValueError, match="config: pass Int4Config"):
        quantize_(tiny(), "int4")
    with pytest.raises(TypeError, match="filter_fn"):
        quantize_(tiny(), Int4Config(), filter_fn=3)
    for wrong_arity in (lambda module: True, lambda module, fqn, extra: True):
        with pytest.raises(TypeError, match=r"filter_fn: expected a callable \(module, fqn\)"):
            quantize_(tiny(), Int4Config(), filter_fn=wrong_arity)
    with pytest.raises(TypeError, match=r"filter_fn: is called as filter_fn\(module, fqn\).*first parameter is 'name'"):
        quantize_(tiny(), Int4Config(), filter_fn=lambda name, module: "attention" in name)  # the old order


def test_already_quantized_is_refused():
    model = quantize_(tiny(), Int4Config(64))
    with pytest.raises(ValueError, match="model: already quantized"):
        quantize_(model, NF4Config())


# ----------------------------------------------------------------------------- quantize_
@pytest.mark.parametrize("name", list(CONFIGS))
def test_quantize_swaps_layers_and_logits_stay_close(name, monkeypatch):
    config = CONFIGS[name]
    dense = tiny()
    model = quantize_(copy.deepcopy(dense), config)
    layers = quantized_layers(model)
    assert len(layers) == 2 * 7 + 1 and "output" in layers  # untied head included
    assert not any(type(m) in (nn.Linear, Linear) for m in model.modules())
    assert isinstance(model.tok_embeddings, nn.Embedding)
    keys = set(model.state_dict())
    assert "layers.0.attention.wq.weight" not in keys and "layers.0.attention.wq.packed" in keys
    assert ("layers.0.attention.wq.zeros" in keys) == (config.format == "int4")
    assert ("layers.0.attention.wq.scales" in keys) == (not config.double_quant)
    assert ("layers.0.attention.wq.absmax_q" in keys) == config.double_quant
    wq = model.layers[0].attention.wq
    assert wq.packed.dtype == torch.uint8 and wq.packed.shape == (128, 64)
    assert wq.scales.dtype == torch.float16 and wq.scales.shape == (128, 128 // config.group_size)

    with torch.no_grad():
        ref, out = dense(TOKENS), model(TOKENS)  # int4 on the CPU: int8 activations by default
        monkeypatch.setattr(cpu_int4, "ACTIVATIONS", "fp32")
        exact = model(TOKENS)
        # With fp32 activations the 4-bit layers compute exactly with the weights they stand for...
        assert rel_err(exact, dequantized_copy(model)(TOKENS)) < 1e-5
        # ...which are close to the dense ones (random N(0, 0.02) weights: about 13% weight error);
        # int8 activations (int4's CPU default) add their rounding of x.
        assert rel_err(exact, ref) < 0.2
        assert rel_err(out, exact) < 3e-2
        # The one-row decode path (the C++ kernel where built) agrees with the batched one.
        assert rel_err(model(TOKENS[:1, :1]), exact[:1, :1]) < 1e-5
    assert model_size_bytes(model) < 0.45 * model_size_bytes(dense)


@pytest.mark.parametrize("batch, length", [(1, 3), (2, 20)], ids=["decode-sized", "prompt"])
def test_cpu_projections_that_share_an_input_run_as_one_call(monkeypatch, batch, length):
    """Q/K/V and gate/up of a 4-bit model are one int4_matmul call each on the CPU, for a
    decode step and for a prompt past llama.model.FUSED_PROJECTION_MAX_ROWS rows alike, and give
    the logits that one call per layer gives."""
    from llama.model import FUSED_PROJECTION_MAX_ROWS
    from llama_kernels.ops import int4_matmul as im
    assert (batch * length > FUSED_PROJECTION_MAX_ROWS) == (batch > 1)  # each case on its side
    model = quantize_(tiny(), Int4Config(64))
    calls, real = [], im._forward_parts
    monkeypatch.setattr(im, "_forward_parts", lambda x, parts, *a: calls.append(len(parts)) or real(x, parts, *a))
    tokens = TOKENS[:batch, :length]
    with torch.no_grad():
        fused = model(tokens)
        assert calls == [3, 1, 2, 1] * 2 + [1]
        monkeypatch.setattr(QuantLinear, "fused_forward", None)
        calls.clear()
        single = model(tokens)
        assert calls == [1] * 15
    torch.testing.assert_close(fused, single, atol=1e-5, rtol=1e-5)


def test_smaller_groups_are_more_accurate():
    dense = tiny()
    with torch.no_grad():
        ref = dense(TOKENS)
        errors = [rel_err(quantize_(copy.deepcopy(dense), Int4Config(g))(TOKENS), ref) for g in (32, 64, 128)]
    assert errors[0] < errors[1] < errors[2]


def test_filter_fn_is_respected():
    seen = []

    def attention_only(module, fqn):
        seen.append((fqn, type(module)))
        return ".attention." in fqn

    model = quantize_(tiny(), Int4Config(64), filter_fn=attention_only)
    assert ("output", Linear) in seen and ("layers.1.feed_forward.w3", Linear) in seen
    assert sorted(quantized_layers(model)) == sorted(f"layers.{i}.attention.{w}" for i in range(2)
                                                     for w in ("wq", "wk", "wv", "wo"))
    assert type(model.layers[0].feed_forward.w1) is Linear and type(model.output) is Linear


def test_non_divisible_layer_stays_dense_with_a_note(caplog):
    model = tiny(hidden_dim=352)  # w2 takes 352 inputs: not a multiple of 64
    with caplog.at_level(logging.WARNING, logger="llama"):
        quantize_(model, Int4Config(64))
    notes = [r for r in caplog.records if r.name == "llama" and r.levelno >= logging.WARNING]
    assert len(notes) == 1
    assert "layers.0.feed_forward.w2" in notes[0].getMessage() and "layers.1.feed_forward.w2" in notes[0].getMessage()
    assert "group_size 64" in notes[0].getMessage()
    assert type(model.layers[0].feed_forward.w2) is Linear
    assert isinstance(model.layers[0].feed_forward.w1, QuantLinear)
    model(TOKENS)


def test_tied_head_stays_tied_and_dense(tmp_path, caplog):
    model = tiny(tie_embeddings=True)
    with caplog.at_level(logging.WARNING, logger="llama"):
        quantize_(model, NF4Config())
    assert "output (its weight is tied" in caplog.text
    assert type(model.output) is Linear and model.output.weight is model.tok_embeddings.weight
    assert "output" not in quantized_layers(model)
    loaded = ck.load_model(ck.save(model, tmp_path / "tied"))
    assert loaded.output.weight is loaded.tok_embeddings.weight
    with torch.no_grad():
        torch.testing.assert_close(loaded(TOKENS), model(TOKENS), rtol=0, atol=0)


def test_plain_nn_linear_and_bias():
    net = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 32))
    x = torch.randn(5, 64)
    ref = net(x)
    quantize_(net, Int4Config(32))
    assert isinstance(net[0], QuantLinear) and isinstance(net[2], QuantLinear)
    assert net[0].bias is not None and "0.bias" in net.state_dict()
    assert rel_err(net(x), ref) < 0.1


def test_dtype_and_device_moves_keep_the_codes():
    model = quantize_(tiny(), NF4Config())
    wq = model.layers[0].attention.wq
    scales = wq.scales.clone()
    model.to(torch.bfloat16)
    assert model.norm.weight.dtype == torch.bfloat16
    assert wq.packed.dtype == torch.uint8 and wq.absmax_q.dtype == torch.int8
    assert wq.scales.dtype == torch.float16 and torch.equal(wq.scales, scales)
    assert wq.absmax_step.dtype == torch.float32
    assert model(TOKENS).dtype == torch.bfloat16


def test_qlora_gradients_reach_the_adapter_not_the_codes():
    base = nn.Linear(128, 96, bias=False)
    layer = QuantLinear.from_linear(base, NF4Config())
    adapter_a = nn.Linear(128, 8, bias=False)
    adapter_b = nn.Linear(8, 96, bias=False)
    x = torch.randn(3, 20, 128, requires_grad=True)
    y = layer(x) + adapter_b(adapter_a(x))
    y.square().mean().backward()
    assert adapter_a.weight.grad is not None and adapter_a.weight.grad.abs().sum() > 0
    assert adapter_b.weight.grad is not None and adapter_b.weight.grad.abs().sum() > 0
    assert list(layer.parameters()) == []
    for buf in layer.buffers():
        assert not buf.requires_grad and buf.grad is None
    # grad_x is that of the dequantized weight.
    x2 = x.detach().clone().requires_grad_(True)
    (x2 @ layer.dequantize().t() + adapter_b(adapter_a(x2))).square().mean().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-6)


def test_model_size_bytes():
    model = tiny(tie_embeddings=True)
    assert model_size_bytes(model) == model.config.num_params() * 4  # the tied head counted once
    quantize_(model, Int4Config(128))
    # 4 bits a weight plus two fp16 values per 128 of them, for every linear weight
    linear = sum(layer.in_features * layer.out_features for layer in quantized_layers(model).values())
    dense_rest = model.config.num_params() - linear
    assert model_size_bytes(model) == dense_rest * 4 + linear // 2 + linear // 128 * 4


# ----------------------------------------------------------------------------- native checkpoints
@pytest.mark.parametrize("name", list(CONFIGS))
def test_native_round_trip(name, tmp_path):
    from safetensors import safe_open

    config = CONFIGS[name]
    model = quantize_(tiny(), config)
    path = ck.save(model, tmp_path / "q", metadata={"note": "x"})
    meta = json.loads((path / "config.json").read_text())
    assert meta["weights"] == config.format and meta["metadata"] == {"note": "x"}
    assert meta["quantization"] == {"format": config.format, "group_size": config.group_size,
                                    "double_quant": config.double_quant, "layers": list(quantized_layers(model))}
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        assert set(f.keys()) == set(model.state_dict())
        assert f.get_tensor("output.packed").dtype == torch.uint8
    loaded = ck.load_model(path)
    assert quantization_info(loaded) == quantization_info(model)
    with torch.no_grad():
        torch.testing.assert_close(loaded(TOKENS), model(TOKENS), rtol=0, atol=0)
        torch.testing.assert_close(loaded(TOKENS[:1, :3]), model(TOKENS[:1, :3]), rtol=0, atol=0)
        for a, b in zip(quantized_layers(loaded).values(), quantized_layers(model).values()):
            assert torch.equal(a.scales, b.scales)
    # dtype casts the dense tensors only.
    half = ck.load_model(path, dtype=torch.bfloat16)
    wq = half.layers[0].attention.wq
    assert half.tok_embeddings.weight.dtype == torch.bfloat16 and half.norm.weight.dtype == torch.bfloat16
    assert wq.packed.dtype == torch.uint8 and wq.scales.dtype == torch.float16
    assert json.loads((ck.save(half, tmp_path / "half") / "config.json").read_text())["dtype"] == "bfloat16"


def test_other_formats_refuse_a_quantized_model(tmp_path):
    model = quantize_(tiny(), Int4Config(64))
    for fmt, target in (("hf", "hf"), ("llama2c-pt", "m.pt"), ("llama2c-bin-v2", "m.bin")):
        with pytest.raises(ValueError, match=f"format: '{fmt}' cannot hold a model with 4-bit layers"):
            ck.save(model, tmp_path / target, format=fmt)
        assert not (tmp_path / target).exists()


def test_native_quantized_loading_is_strict(tmp_path):
    from safetensors.torch import load_file, save_file

    model = quantize_(tiny(), Int4Config(64))
    path = ck.save(model, tmp_path / "q")
    tensors = load_file(str(path / "model.safetensors"))
    meta = json.loads((path / "config.json").read_text())

    def broken(tensors=tensors, meta=meta):
        bad = tmp_path / f"bad{len(list(tmp_path.iterdir()))}"
        bad.mkdir()
        save_file(tensors, str(bad / "model.safetensors"))
        (bad / "config.json").write_text(json.dumps(meta))
        return bad

    missing = {k: v for k, v in tensors.items() if k != "layers.1.attention.wv.zeros"}
    with pytest.raises(ValueError, match=r"missing tensor\(s\) layers.1.attention.wv.zeros"):
        ck.load_model(broken(missing))
    extra = {**tensors, "layers.0.attention.wq.weight": torch.zeros(128, 128)}
    with pytest.raises(ValueError, match=r"unexpected tensor\(s\) layers.0.attention.wq.weight"):
        ck.load_model(broken(extra))
    shape = {**tensors, "output.scales": torch.zeros(256, 4, dtype=torch.float16)}
    with pytest.raises(ValueError, match="output.scales: expected shape"):
        ck.load_model(broken(shape))
    dtype = {**tensors, "output.scales": tensors["output.scales"].float()}
    with pytest.raises(ValueError, match="output.scales: expected torch.float16 for a 4-bit layer"):
        ck.load_model(broken(dtype))
    for edit, message in (
        (dict(quantization={**meta["quantization"], "layers": ["layers.0.nope"]}), "'layers.0.nope' is not a linear"),
        (dict(quantization={**meta["quantization"], "group_size": 48}), "quantization.group_size"),
        (dict(quantization={**meta["quantization"], "format": "nf4"}), "differs from weights"),
        (dict(weights="int3"), "int3"),
        ({"quantization": None}, "need a \"quantization\" object"),
        (dict(model={**meta["model"], "tie_embeddings": True}), "'output' is tied"),
    ):
        with pytest.raises(ValueError, match=message):
            ck.load_model(broken(meta={**meta, **edit}))


# ----------------------------------------------------------------------------- API and CLI
@pytest.fixture(scope="module")
def dense_lm(tokenizer):
    torch.manual_seed(0)
    return llama.LLaMA(tiny(vocab_size=tokenizer.vocab_size, max_seq_len=128), tokenizer)


def test_load_and_generate_quantized_checkpoint(dense_lm, tmp_path):
    lm = llama.LLaMA(quantize_(copy.deepcopy(dense_lm.model), Int4Config(64)), dense_lm.tokenizer)
    llama.save(lm, tmp_path / "q")
    loaded = llama.load(tmp_path / "q", device="cpu")
    assert loaded.tokenizer is not None and quantized_layers(loaded.model)
    expected = lm.generate("Once upon a time", max_new_tokens=20, temperature=0)
    assert isinstance(expected, str) and expected
    assert loaded.generate("Once upon a time", max_new_tokens=20, temperature=0) == expected
    assert len(loaded.generate(["a", "The cat sat"], max_new_tokens=8, temperature=0.8, seed=1)) == 2


def _cli(*args):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=ROOT)


@pytest.mark.slow
def test_quantize_cli(dense_lm, tmp_path):
    llama.save(dense_lm, tmp_path / "dense", format="hf")
    out = tmp_path / "nf4"
    result = _cli("llama.quantize", "--checkpoint", str(tmp_path / "dense"), "--out", str(out),
                  "--format", "nf4", "--group-size", "64")
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stdout and "15 layers in nf4" in result.stdout
    assert "15/15" in result.stderr  # the progress bar
    assert "Warning" not in result.stderr and "Traceback" not in result.stderr
    meta = json.loads((out / "config.json").read_text())
    assert meta["weights"] == "nf4" and meta["quantization"]["double_quant"] is True
    assert (out / "tokenizer.model").is_file()

    expected = llama.LLaMA(quantize_(copy.deepcopy(dense_lm.model), NF4Config(64)), dense_lm.tokenizer) \
        .generate("Once upon", max_new_tokens=12, temperature=0)
    gen = _cli("llama.generate", "--checkpoint", str(out), "--prompt", "Once upon", "--max-new-tokens", "12",
               "--temperature", "0", "--device", "cpu")
    assert gen.returncode == 0, gen.stderr
    assert gen.stdout.rstrip("\n") == "Once upon" + expected

    base = ["llama.quantize", "--checkpoint", str(tmp_path / "dense"), "--out", str(tmp_path / "bad")]
    for extra, message in ((["--group-size", "48"], "error: group_size"),
                           (["--format", "int3"], "error: format"),
                           (["--format", "int4", "--no-double-quant"], "error: double_quant")):
        bad = _cli(*base, *extra)
        assert bad.returncode == 2 and message in bad.stderr, bad.stderr
        assert "Traceback" not in bad.stderr
    again = _cli("llama.quantize", "--checkpoint", str(out), "--out", str(tmp_path / "twice"))
    assert again.returncode == 2 and "error: model: already quantized" in again.stderr
    assert not (tmp_path / "bad").exists() and not (tmp_path / "twice").exists()


# ----------------------------------------------------------------------------- perplexity
@pytest.mark.slow
def test_quantized_perplexity_stays_close_to_fp32(tmp_path, sample):
    """A short run of examples/quantize_botchan.py: int4-g64 and NF4 within 5% of fp32."""
    spec = importlib.util.spec_from_file_location("quantize_botchan", ROOT / "examples" / "quantize_botchan.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    text = sample.text
    demo.seed_everything(0)
    tok = train([text], 512, tmp_path, quiet=True, num_threads=1)
    train_tokens, val = train_val_split(tokenize_file(tok, text, progress=False), 0.1)
    cfg = demo.model_config(tok.vocab_size, dim=128, n_layers=2, max_seq_len=64)
    variants = {k: demo.VARIANTS[k] for k in ("fp32", "int4-g64", "nf4-b64-dq", "nf4-b64")}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # matrices this small gain nothing from a second thread, and lose a lot on a busy CPU
    try:
        model = demo.train_model(cfg, train_tokens, steps=200, batch_size=8)
        rows = {r["variant"]: r for r in demo.evaluate_variants(model, val, cfg.max_seq_len, variants)}
    finally:
        torch.set_num_threads(threads)
    random_ppl = demo.perplexity(llama.build(cfg).eval(), val, cfg.max_seq_len)
    fp32 = rows["fp32"]["ppl"]
    assert fp32 < 0.5 * random_ppl, (fp32, random_ppl)
    for name in ("int4-g64", "nf4-b64-dq", "nf4-b64"):
        assert abs(rows[name]["delta"]) < 0.05, (name, rows[name]["ppl"], fp32)
        assert rows[name]["bytes"] < 0.4 * rows["fp32"]["bytes"]


# ----------------------------------------------------------------------------- joined projections
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_joined_4bit_projections_run_as_one_call_and_round_trip(name, tmp_path, monkeypatch):
    """join_projections stores Q/K/V (and gate/up) codes side by side: one int4_matmul call per
    group for any number of rows, the same logits, and checkpoints that load back unchanged."""
    from llama_kernels.ops import int4_matmul as im
    model = quantize_(tiny(), CONFIGS[name])
    with torch.no_grad():
        before, before_step = model(TOKENS), model(TOKENS[:1, :1])
    model.join_projections()
    wq, wk = model.layers[0].attention.wq, model.layers[0].attention.wk
    assert wq.packed.untyped_storage().data_ptr() == wk.packed.untyped_storage().data_ptr()
    calls, real = [], im._forward_parts
    monkeypatch.setattr(im, "_forward_parts", lambda x, parts, *a: calls.append(len(parts)) or real(x, parts, *a))
    with torch.no_grad():
        after = model(TOKENS)  # 40 rows per sequence: beyond the unjoined path's fused-call limit
        assert calls == [1] * (2 * 4 + 1)  # QKV, wo, gate/up, w2 per block, then the head
        torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(TOKENS[:1, :1]), before_step, atol=1e-5, rtol=1e-5)
    loaded = ck.load_model(ck.save(model, tmp_path / "q"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(TOKENS), after, atol=1e-5, rtol=1e-5)
    assert set(loaded.state_dict()) == set(model.state_dict())


def test_quantizing_a_joined_model_unjoins_it():
    """quantize_ replaces the joined dense layers; the 4-bit ones can then be joined again."""
    dense = tiny().join_projections()
    model = quantize_(dense, Int4Config(64))
    assert not any("_joined" in m.__dict__ for m in model.modules())
    model.join_projections()
    assert all("_joined" in layer.__dict__ for layer in (model.layers[1].feed_forward.w1, model.layers[1].attention.wv))
