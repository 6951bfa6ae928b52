"""GGUF export (llama/formats/gguf.py): read back with the `gguf` package's own reader and
dequantizer, which is the independent check of our block arithmetic; and, where llama-cpp-python is
installed, llama.cpp's logits against ours at every prompt position."""
import importlib.util
import logging
import random

import gguf
import numpy as np
import pytest
import torch

import llama
from llama import checkpoint as ck
from llama.config import ModelConfig
from llama.formats.common import permute_interleaved_to_half
from llama.formats.gguf import gguf_name, quantize_q4_0, quantize_q8_0
from llama.model import build
from llama.quantize import Int4Config, NF4Config, quantize_, quantized_layers

GQA = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, max_seq_len=64, hidden_dim=160,
                  rope_theta=50000.0, norm_eps=1e-6)
TIED = GQA.replace(tie_embeddings=True, n_kv_heads=4)
QT = gguf.GGMLQuantizationType


def _model(cfg, seed=0):
    torch.manual_seed(seed)
    model = build(cfg)
    with torch.no_grad():  # norms away from 1 so that a misplaced one shows
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.3 * torch.randn_like(p))
    return model.eval()


def _field(reader, key):
    return reader.get_field(key).contents()


def _tensors(reader):
    return {t.name: t for t in reader.tensors}


def _ours_as_stored(model):
    """{gguf name: our tensor as llama.cpp's LLaMA expects it (wq/wk rows interleaved)}, fp32."""
    cfg = model.config
    out = {}
    for name, t in model.state_dict().items():
        if name == "output.weight" and cfg.tie_embeddings:
            continue
        out[gguf_name(name)] = t.detach().float()
    return out


def _unpermuted(name, w, cfg):
    """A dequantized GGUF matrix in our layout again."""
    if name.endswith("attn_q.weight"):
        return permute_interleaved_to_half(w, cfg.n_heads)
    if name.endswith("attn_k.weight"):
        return permute_interleaved_to_half(w, cfg.n_kv_heads)
    return w


def _dequantized(t):
    return torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))


# ---------------------------------------------------------------------------------- metadata
@pytest.mark.parametrize("cfg", [GQA, TIED], ids=["gqa-untied", "mha-tied"])
def test_metadata_names_and_shapes(cfg, tmp_path):
    model = _model(cfg)
    path = ck.save(model, tmp_path / "m.gguf", "gguf", quant="f32")
    r = gguf.GGUFReader(path)
    expected = {
        "general.architecture": "llama", "llama.context_length": cfg.max_seq_len,
        "llama.embedding_length": cfg.dim, "llama.block_count": cfg.n_layers,
        "llama.feed_forward_length": cfg.hidden_dim, "llama.attention.head_count": cfg.n_heads,
        "llama.attention.head_count_kv": cfg.n_kv_heads, "llama.rope.dimension_count": cfg.dim // cfg.n_heads,
        "llama.vocab_size": cfg.vocab_size, "general.file_type": int(gguf.LlamaFileType.ALL_F32),
        "tokenizer.ggml.model": "no_vocab",
    }
    for key, value in expected.items():
        assert _field(r, key) == value, key
    assert _field(r, "llama.rope.freq_base") == pytest.approx(cfg.rope_theta)
    assert _field(r, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(cfg.norm_eps)
    assert r.get_field("llama.rope.scaling.type") is None
    tensors = _tensors(r)
    ours = _ours_as_stored(model)
    assert list(tensors) == list(ours)  # names, order, and no output.weight when tied
    assert ("output.weight" in tensors) == (not cfg.tie_embeddings)
    for name, t in tensors.items():
        assert tuple(int(x) for x in t.shape) == tuple(reversed(ours[name].shape)), name  # ggml: columns first
        assert t.tensor_type == QT.F32


def test_f32_is_exact_and_qk_rows_are_permuted(tmp_path):
    model = _model(GQA)
    r = gguf.GGUFReader(ck.save(model, tmp_path / "m.gguf", "gguf", quant="f32"))
    ours = _ours_as_stored(model)
    for name, t in _tensors(r).items():
        stored = _dequantized(t).reshape(ours[name].shape)
        assert torch.equal(_unpermuted(name, stored, GQA), ours[name]), name
        if name.endswith(("attn_q.weight", "attn_k.weight")):
            assert not torch.equal(stored, ours[name])  # interleaved for llama.cpp's RoPE


def test_linear_rope_scaling_is_written_and_dynamic_refused(tmp_path):
    model = _model(GQA.replace(rope_scaling="linear", rope_scaling_factor=4.0))
    r = gguf.GGUFReader(ck.save(model, tmp_path / "m.gguf", "gguf"))
    assert _field(r, "llama.rope.scaling.type") == "linear"
    assert _field(r, "llama.rope.scaling.factor") == pytest.approx(4.0)
    dynamic = _model(GQA.replace(rope_scaling="dynamic", rope_scaling_factor=2.0))
    with pytest.raises(ValueError, match="rope_scaling 'dynamic'"):
        ck.save(dynamic, tmp_path / "d.gguf", "gguf")
    assert not (tmp_path / "d.gguf").exists()


# ---------------------------------------------------------------------------------- block math
def _blocks(w):
    return w.reshape(w.shape[0], -1, 32)


@pytest.mark.parametrize("shape", [(3, 32), (5, 96), (64, 160)])
@pytest.mark.parametrize("quant", ["q8_0", "q4_0"])
def test_blocks_against_gguf_dequantize(quant, shape):
    torch.manual_seed(1)
    w = torch.randn(shape) * torch.logspace(-3, 1, shape[0])[:, None]  # rows of very different scales
    w[0, :32] = 0  # an all-zero block
    w[-1, -32:] = -w[-1, -32:].abs()  # one of a single sign
    fn, qtype, per_block = (quantize_q8_0, QT.Q8_0, 34) if quant == "q8_0" else (quantize_q4_0, QT.Q4_0, 18)
    raw = fn(w)
    assert raw.dtype == np.uint8 and raw.shape == (shape[0], shape[1] // 32 * per_block)
    theirs = torch.from_numpy(gguf.quants.dequantize(raw, qtype)).float()
    assert theirs.shape == w.shape
    err = _blocks((theirs - w).abs())
    amax = _blocks(w).abs().amax(-1, keepdim=True)
    # Q8_0: d = amax / 127, error <= d / 2. Q4_0: |d| = amax / 8, error <= |d| at the far end.
    # Both with d rounded to fp16 (a relative 2^-11).
    bound = amax / 127 / 2 if quant == "q8_0" else amax / 8
    assert (err <= bound * (1 + 2 ** -9) + 1e-12).all()
    assert torch.equal(theirs[0, :32], torch.zeros(32))
    # And no worse than gguf's own quantizer of the same weights.
    reference = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), qtype), qtype)).float()
    assert (theirs - w).abs().mean() <= (reference - w).abs().mean() * 1.01 + 1e-12


def test_q4_0_extreme_is_exact_and_nibbles_are_llama_cpp_order():
    w = torch.arange(32, dtype=torch.float32)[None] - 8  # the extreme, 23, is at position 31
    raw = quantize_q4_0(w)
    d = np.frombuffer(raw[0, :2].tobytes(), "<f2")[0]
    assert d == np.float16(23 / -8)
    codes = np.concatenate([raw[0, 2:] & 15, raw[0, 2:] >> 4])  # byte j: code j low, code j + 16 high
    assert codes[31] == 0  # w = (0 - 8) * d = 23 exactly
    dequant = gguf.quants.dequantize(raw, QT.Q4_0)[0]
    assert np.allclose(dequant, (codes.astype(np.float32) - 8) * np.float32(d))
    assert dequant[31] == pytest.approx(23, rel=2 ** -10)


def test_quantizers_name_a_bad_shape():
    with pytest.raises(ValueError, match=r"wq: .*multiple of 32.*\(4, 48\)"):
        quantize_q4_0(torch.zeros(4, 48), "wq")
    with pytest.raises(ValueError, match=r"w: "):
        quantize_q8_0(torch.zeros(32))


@pytest.mark.parametrize("quant", ["f16", "q8_0", "q4_0"])
def test_each_quant_reads_back_within_its_error(quant, tmp_path):
    model = _model(GQA)
    r = gguf.GGUFReader(ck.save(model, tmp_path / "m.gguf", "gguf", quant=quant))
    matrix_type = {"f16": QT.F16, "q8_0": QT.Q8_0, "q4_0": QT.Q4_0}[quant]
    file_type = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                 "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[quant]
    assert _field(r, "general.file_type") == int(file_type)
    ours = _ours_as_stored(model)
    for name, t in _tensors(r).items():
        w = ours[name]
        stored = _unpermuted(name, _dequantized(t).reshape(w.shape), GQA)
        if w.dim() == 1:
            assert t.tensor_type == QT.F32 and torch.equal(stored, w), name
            continue
        assert t.tensor_type == matrix_type, name
        if quant == "f16":
            assert torch.equal(stored, w.half().float()), name
            continue
        amax = _blocks(w).abs().amax(-1, keepdim=True)
        bound = amax / 254 if quant == "q8_0" else amax / 8
        assert (_blocks((stored - w).abs()) <= bound * (1 + 2 ** -9) + 1e-12).all(), name


def test_rows_that_do_not_split_into_blocks_fall_back_to_f32(tmp_path, caplog):
    cfg = ModelConfig(dim=48, n_layers=1, n_heads=3, vocab_size=40, max_seq_len=16, hidden_dim=64)
    model = _model(cfg)
    with caplog.at_level(logging.WARNING, logger="llama"):
        r = gguf.GGUFReader(ck.save(model, tmp_path / "m.gguf", "gguf", quant="q4_0"))
    types = {t.name: t.tensor_type for t in r.tensors}
    assert types["blk.0.ffn_down.weight"] == QT.Q4_0  # rows of 64
    for name in ("token_embd.weight", "blk.0.attn_q.weight", "blk.0.ffn_gate.weight", "output.weight"):
        assert types[name] == QT.F32, name  # rows of 48
    assert "not a multiple of 32: written as f32" in caplog.text
    ours = _ours_as_stored(model)
    stored = _dequantized(_tensors(r)["blk.0.ffn_gate.weight"]).reshape(64, 48)
    assert torch.equal(stored, ours["blk.0.ffn_gate.weight"])


# ---------------------------------------------------------------------------------- 4-bit models
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_layers_become_q4_1_without_requantizing(group_size, tmp_path):
    cfg = GQA.replace(dim=128, hidden_dim=256)
    model = quantize_(_model(cfg), Int4Config(group_size=group_size))
    layers = quantized_layers(model)
    r = gguf.GGUFReader(ck.save(model, tmp_path / "m.gguf", "gguf", quant="q8_0"))
    assert _field(r, "general.file_type") == int(gguf.LlamaFileType.MOSTLY_Q4_1)
    tensors = _tensors(r)
    assert tensors["token_embd.weight"].tensor_type == QT.Q8_0  # dense: as quant says
    for module_name, layer in layers.items():
        name = gguf_name(f"{module_name}.weight")
        t = tensors[name]
        assert t.tensor_type == QT.Q4_1, name
        ours = layer.dequantize(torch.float32)
        stored = _unpermuted(name, _dequantized(t).reshape(ours.shape), cfg)
        # d = scale exactly; m = zero - 8 * scale rounded to fp16: at most 2^-11 of |m| off.
        scale = layer.scales.float().repeat_interleave(group_size, 1)
        m = (layer.zeros.float() - 8 * layer.scales.float()).repeat_interleave(group_size, 1)
        assert ((stored - ours).abs() <= m.abs() * 2 ** -11 + scale * 1e-6 + 1e-7).all(), name


def test_nf4_is_dequantized_for_f16_and_refused_for_block_types(tmp_path):
    model = quantize_(_model(GQA), NF4Config(block_size=32))
    layer = model.layers[0].feed_forward.w2
    r = gguf.GGUFReader(ck.save(model, tmp_path / "m.gguf", "gguf", quant="f16"))
    stored = _dequantized(_tensors(r)["blk.0.ffn_down.weight"]).reshape(layer.out_features, layer.in_features)
    assert torch.equal(stored, layer.dequantize(torch.float32).half().float())
    for quant in ("q8_0", "q4_0"):
        with pytest.raises(ValueError, match=f"quant: '{quant}' would requantize NF4 layers"):
            ck.save(model, tmp_path / "n.gguf", "gguf", quant=quant)
    assert not (tmp_path / "n.gguf").exists()


# ---------------------------------------------------------------------------------- vocabulary
@pytest.fixture(scope="module")
def small_tokenizer(tmp_path_factory):
    from llama.tokenizer import train

    root = tmp_path_factory.mktemp("gguf-tok")
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 6))) for _ in range(80)]
    text = "\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(5, 20))) for _ in range(300))
    (root / "text.txt").write_text(text + "\n", encoding="utf-8")
    return train([root / "text.txt"], 300, root / "tok", quiet=True)


def test_sentencepiece_vocabulary_goes_inside_the_file(small_tokenizer, tmp_path):
    tok = small_tokenizer
    model = _model(GQA.replace(vocab_size=tok.vocab_size))
    llama.save(llama.LLaMA(model, tok), tmp_path / "m.gguf", format="gguf", quant="q8_0")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]  # nothing beside it
    r = gguf.GGUFReader(tmp_path / "m.gguf")
    assert _field(r, "tokenizer.ggml.model") == "llama"
    tokens = _field(r, "tokenizer.ggml.tokens")
    assert tokens == [tok.id_to_piece(i) for i in range(tok.vocab_size)]
    types = _field(r, "tokenizer.ggml.token_type")
    assert types[tok.unk_id] == 2 and types[tok.bos_id] == 3 and types[tok.eos_id] == 3
    assert types[tok.piece_to_id("<0x41>")] == 6  # byte pieces
    assert len(_field(r, "tokenizer.ggml.scores")) == tok.vocab_size
    ids = (_field(r, "tokenizer.ggml.bos_token_id"), _field(r, "tokenizer.ggml.eos_token_id"))
    assert ids == (tok.bos_id, tok.eos_id)


def test_bad_arguments_are_named(small_tokenizer, tmp_path):
    model = _model(GQA)
    with pytest.raises(ValueError, match="quant: expected one of f32, f16, q8_0, q4_0"):
        ck.save(model, tmp_path / "m.gguf", "gguf", quant="q4_k")
    with pytest.raises(ValueError, match="quant: applies only to format 'gguf'"):
        ck.save(model, tmp_path / "m", "native", quant="q4_0")
    with pytest.raises(ValueError, match="tokenizer: has 300 tokens but the model's vocab_size is 96"):
        ck.save(model, tmp_path / "m.gguf", "gguf", tokenizer=small_tokenizer)
    with pytest.raises(ValueError, match="tokenizer: expected a llama.tokenizer.Tokenizer"):
        ck.save(model, tmp_path / "m.gguf", "gguf", tokenizer="tokenizer.model")
    (tmp_path / "dir.gguf").mkdir()
    with pytest.raises(ValueError, match="is a directory"):
        ck.save(model, tmp_path / "dir.gguf", "gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_loading_gguf_says_it_is_written_only(tmp_path):
    path = ck.save(_model(GQA), tmp_path / "m.gguf", "gguf")
    with pytest.raises(ValueError, match="GGUF is written for llama.cpp .* but not read"):
        ck.load_model(path)


def test_a_failed_write_leaves_the_old_file(tmp_path, monkeypatch):
    path = ck.save(_model(GQA), tmp_path / "m.gguf", "gguf")
    before = path.read_bytes()

    def fail(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", fail)
    with pytest.raises(OSError, match="disk full"):
        ck.save(_model(GQA, seed=1), path, "gguf")
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


# ---------------------------------------------------------------------------------- llama.cpp
needs_llama_cpp = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                     reason="llama-cpp-python is not installed (pip install '.[peers]'; "
                                            "README: Export to GGUF / llama.cpp)")


def _llama_cpp_logits(path, tokens):
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=len(tokens), n_batch=len(tokens), logits_all=True,
                n_threads=torch.get_num_threads(), type_k=0, type_v=0, verbose=False)  # 0: an f32 KV cache
    try:
        llm.eval(tokens)
        return torch.from_numpy(np.array(llm.scores[:len(tokens)], dtype=np.float32))
    finally:
        llm.close()


def _our_logits(model, tokens):
    with torch.inference_mode():
        return model(torch.tensor([tokens]))[0].float()


def _as_stored(model, path):
    """A copy of `model` holding the weights exactly as the GGUF file at `path` stores them."""
    cfg = model.config
    dense = build(cfg)
    tensors = _tensors(gguf.GGUFReader(path))
    state = {}
    for name, t in dense.state_dict().items():
        gname = gguf_name(name)
        if gname not in tensors:  # a tied head
            gname = "token_embd.weight"
        state[name] = _unpermuted(gname, _dequantized(tensors[gname]).reshape(t.shape), cfg)
    dense.load_state_dict(state)
    return dense.eval()


@needs_llama_cpp
@pytest.mark.parametrize("cfg", [GQA, TIED], ids=["gqa-untied", "mha-tied"])
def test_llama_cpp_argmax_equals_ours_at_every_position_f32(cfg, tmp_path):
    model = _model(cfg)
    path = ck.save(model, tmp_path / "m.gguf", "gguf", quant="f32")
    tokens = torch.randint(0, cfg.vocab_size, (48,), generator=torch.Generator().manual_seed(3)).tolist()
    ours, theirs = _our_logits(model, tokens), _llama_cpp_logits(path, tokens)
    assert torch.equal(theirs.argmax(-1), ours.argmax(-1))
    assert torch.allclose(theirs, ours, atol=1e-3 * ours.abs().max().item(), rtol=0)


@needs_llama_cpp
@pytest.mark.parametrize("quant", ["f16", "q8_0", "q4_0", "int4-g32"])
def test_llama_cpp_runs_our_quantized_blocks(quant, tmp_path):
    """llama.cpp against our model holding the weights the file stores (so the blocks' decoding is
    what is compared, not the quantization error). llama.cpp rounds the activations too (to 8 bits
    for these matmuls, to f16 for f16 ones), which on this random model moves logits by under 1% of
    their largest: the logits must agree to 2%, and the argmax wherever our top two logits are
    further apart than twice the largest difference seen, and at 90% of positions at least.
    (On this seed all 48 agree for f16, q8_0 and q4_0, and 47 for int4 as Q4_1: one position's top
    two lie 0.001 apart.)"""
    model = _model(GQA)
    if quant == "int4-g32":  # every projection but the head (tied: no; kept dense by the filter)
        model = quantize_(model, Int4Config(group_size=32), lambda m, fqn: fqn != "output")
        quant = "f32"
    path = ck.save(model, tmp_path / "m.gguf", "gguf", quant=quant)
    tokens = torch.randint(0, GQA.vocab_size, (48,), generator=torch.Generator().manual_seed(4)).tolist()
    ours, theirs = _our_logits(_as_stored(model, path), tokens), _llama_cpp_logits(path, tokens)
    err = (theirs - ours).abs().max().item()
    assert err < 0.02 * ours.abs().max().item()
    top2 = ours.topk(2, -1).values
    decided = (top2[:, 0] - top2[:, 1]) > 2 * err
    assert torch.equal(theirs.argmax(-1)[decided], ours.argmax(-1)[decided])
    assert (theirs.argmax(-1) == ours.argmax(-1)).float().mean() >= 0.9


@needs_llama_cpp
def test_llama_cpp_reads_our_vocabulary(small_tokenizer, tmp_path):
    from llama_cpp import Llama

    tok = small_tokenizer
    model = _model(GQA.replace(vocab_size=tok.vocab_size))
    llama.save(llama.LLaMA(model, tok), tmp_path / "m.gguf", format="gguf")
    llm = Llama(model_path=str(tmp_path / "m.gguf"), n_ctx=64, verbose=False)
    try:
        text = "abc dea fghij"
        assert llm.tokenize(text.encode(), add_bos=True) == tok.encode(text, bos=True)
        assert (llm.token_bos(), llm.token_eos()) == (tok.bos_id, tok.eos_id)
    finally:
        llm.close()
