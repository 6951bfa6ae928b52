"""GGUF export: one file that llama.cpp (and whatever reads GGUF) runs as a LLaMA. Written only:
`llama.load` does not read GGUF back (run it with llama.cpp, or keep a native copy).

    llama.save(model, "model-q4_0.gguf", format="gguf", quant="q4_0")

The container (header, key/value metadata, tensor table, aligned data) is written by the `gguf`
package, the writer that llama.cpp's own conversion scripts use: the file layout is theirs to
keep right. What goes *into* the blocks is computed here, so the weights are quantized by our
arithmetic, not by a converter we do not test.

Tensor types (`quant`):

    f32    every tensor float32 (exact)
    f16    matrices float16; norms float32 (llama.cpp expects 1-D tensors in f32)
    q8_0   matrices in blocks of 32: an fp16 scale d and 32 int8 codes, w = q * d
    q4_0   matrices in blocks of 32: an fp16 scale d and 32 4-bit codes, w = (q - 8) * d
    None   f32 for a float32 model, f16 otherwise

"Matrices" are the embedding and every projection, the output head included. A matrix whose
rows are not a multiple of 32 long cannot be cut into blocks; it is written as float32 and the
fallback is logged, per tensor (llama.cpp's converter does the same, with f16). Norm weights
are always float32.

Block layout (llama.cpp's): each row is cut into blocks of 32 consecutive inputs. A Q8_0 block
is d (fp16) then q[0..31] (int8): 34 bytes. A Q4_0 block is d (fp16) then 16 bytes, byte j
holding code j in its low nibble and code j + 16 in its high nibble: 18 bytes. Q4_0 takes d from
the element of largest magnitude, m, as d = m / -8, so m itself is exact (code 0) and values of
the other sign reach at most +7 * |d|: the error is at most |d| / 2 inside that range and at
most |d| at the far end. Q8_0's error is at most d / 2. Codes are computed with the fp16-rounded
d that the file stores, so the stored scale is the one the codes were fitted to.

A model already quantized by `llama.quantize.quantize_`:

* int4 layers (w = (q - 8) * scale + zero, per group of 32, 64 or 128) are written as **Q4_1**
  blocks (d, m, 16 bytes of codes; w = q * d + m) whatever `quant` says, because Q4_0 has no
  offset and cannot hold an asymmetric group: requantizing to Q4_0 would add a second rounding.
  The mapping is d = scale and m = zero - 8 * scale; a group of 64 or 128 becomes 2 or 4 blocks
  with the same d and m. Our packed layout already puts code j and code j + 16 of every 32 in one
  byte, so the codes are copied as they are. The codes and d are exact; m is rounded to fp16
  (an error of at most 2^-11 of |m| per weight). `quant` then applies to the dense tensors
  left (the embedding, a tied head, layers kept dense). The rows of wq and wk are permuted as
  whole rows (below), which moves blocks without touching them.
* NF4 layers have a code book no GGUF block type holds. With `quant` f32 or f16 they are
  dequantized (NF4 value * absmax, exact in f32). q8_0 and q4_0 are refused for them: that
  would round weights that were already rounded; quantize the dense model with
  `Int4Config(group_size=32)` (exported losslessly as Q4_1) or export it as q4_0/q8_0.

llama.cpp's LLaMA graph rotates interleaved pairs (2i, 2i + 1) (its "normal" RoPE); ours rotates
half-split pairs (i, i + D/2). The rows of wq and wk are therefore permuted within each head, as
for llama2.c (`permute_half_to_interleaved`); this is what llama.cpp's converter does to a
Hugging Face checkpoint. The argmax test in tests/test_gguf.py runs both and checks it.

Names and metadata follow llama.cpp's "llama" architecture: token_embd, blk.N.{attn_norm,
attn_q, attn_k, attn_v, attn_output, ffn_norm, ffn_gate, ffn_down, ffn_up}, output_norm, output;
llama.{context_length, embedding_length, block_count, feed_forward_length, attention.head_count,
attention.head_count_kv, attention.layer_norm_rms_epsilon, rope.freq_base, rope.dimension_count,
vocab_size}, general.file_type, and rope.scaling.{type, factor} for linear RoPE scaling. Dynamic
(NTK) scaling has no GGUF equivalent and is refused. A tied head is not written: llama.cpp uses
token_embd when output.weight is absent.

Vocabulary: given a SentencePiece tokenizer (`llama.tokenizer.Tokenizer`, either file format),
tokenizer.ggml.* holds its pieces, scores and piece types (SentencePiece's type numbers are
llama.cpp's) with the bos/eos/unk/pad ids, as model "llama". Without one the file says
tokenizer.ggml.model = "no_vocab" and llama.vocab_size = the model's vocabulary: llama.cpp then
loads it with that many nameless tokens; it runs on token ids but cannot tokenize text. A
tokenizer whose size differs from the model's vocab_size is refused.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ..atomic import atomic_file
from ..config import ModelConfig
from ..model import Transformer
from ..quantize import QuantLinear, quantized_layers
from ..tokenizer import Tokenizer
from ..tokenizer.llama2c import ModelProto, llama2c_model_proto, parse_llama2c
from .common import LAYER_RE, permute_half_to_interleaved

log = logging.getLogger("llama")

QUANTS = ("f32", "f16", "q8_0", "q4_0")
BLOCK = 32  # inputs per Q8_0, Q4_0 and Q4_1 block
Q8_0_BYTES = 2 + BLOCK  # fp16 d, 32 int8
Q4_0_BYTES = 2 + BLOCK // 2  # fp16 d, 16 bytes of nibbles
Q4_1_BYTES = 4 + BLOCK // 2  # fp16 d, fp16 m, 16 bytes of nibbles

_TOP_NAMES = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
              "output.weight": "output.weight"}
_LAYER_NAMES = {
    "attention_norm.weight": "attn_norm.weight",
    "attention.wq.weight": "attn_q.weight",
    "attention.wk.weight": "attn_k.weight",
    "attention.wv.weight": "attn_v.weight",
    "attention.wo.weight": "attn_output.weight",
    "ffn_norm.weight": "ffn_norm.weight",
    "feed_forward.w1.weight": "ffn_gate.weight",
    "feed_forward.w2.weight": "ffn_down.weight",
    "feed_forward.w3.weight": "ffn_up.weight",
}


def gguf_name(ours: str) -> str:
    """The GGUF tensor name of one of our parameter names ("layers.3.attention.wq.weight" ->
    "blk.3.attn_q.weight")."""
    if ours in _TOP_NAMES:
        return _TOP_NAMES[ours]
    m = LAYER_RE.fullmatch(ours)
    if m is None or m[2] not in _LAYER_NAMES:
        raise ValueError(f"{ours}: no GGUF LLaMA tensor for it")
    return f"blk.{m[1]}.{_LAYER_NAMES[m[2]]}"


# ============================================================================ block quantization
def _blocks(w: torch.Tensor, name: str) -> torch.Tensor:
    if w.dim() != 2 or w.shape[1] % BLOCK:
        raise ValueError(f"{name}: expected a matrix whose rows are a multiple of {BLOCK} long, got shape "
                         f"{tuple(w.shape)}")
    return w.detach().to("cpu", torch.float32).reshape(w.shape[0], w.shape[1] // BLOCK, BLOCK)


def _inverse(d: torch.Tensor) -> torch.Tensor:
    """1 / d, and 0 where d is 0 (an all-zero block: every code then means 0)."""
    return torch.where(d == 0, torch.zeros_like(d), 1.0 / torch.where(d == 0, torch.ones_like(d), d))


def _fp16_bytes(t: torch.Tensor) -> np.ndarray:
    """(..., 1) fp16 -> (..., 2) uint8, little-endian as GGUF stores it."""
    return t.contiguous().numpy().astype("<f2").view(np.uint8)


def quantize_q8_0(w: torch.Tensor, name: str = "w") -> np.ndarray:
    """(N, K) -> (N, K / 32 * 34) uint8 Q8_0 blocks (see the module docstring)."""
    x = _blocks(w, name)
    d = (x.abs().amax(-1, keepdim=True) / 127).to(torch.float16)  # what the file stores
    q = torch.round(x * _inverse(d.float())).clamp(-127, 127).to(torch.int8)
    out = np.concatenate([_fp16_bytes(d), q.numpy().view(np.uint8)], axis=-1)
    return out.reshape(x.shape[0], -1)


def quantize_q4_0(w: torch.Tensor, name: str = "w") -> np.ndarray:
    """(N, K) -> (N, K / 32 * 18) uint8 Q4_0 blocks (see the module docstring)."""
    x = _blocks(w, name)
    extreme = x.gather(-1, x.abs().argmax(-1, keepdim=True))  # signed, of largest magnitude
    d = (extreme / -8).to(torch.float16)
    q = torch.floor(x * _inverse(d.float()) + 8.5).clamp(0, 15).to(torch.uint8)
    nibbles = q[..., :BLOCK // 2] | (q[..., BLOCK // 2:] << 4)
    out = np.concatenate([_fp16_bytes(d), nibbles.numpy()], axis=-1)
    return out.reshape(x.shape[0], -1)


def int4_as_q4_1(layer: QuantLinear) -> np.ndarray:
    """An int4 QuantLinear's weight as (N, K / 32 * 20) uint8 Q4_1 blocks, codes copied as they are."""
    qw = layer.qweight
    if qw.format != "int4":
        raise ValueError(f"layer: expected an int4 layer, got format {qw.format!r}")
    n, k = qw.shape
    per_group = qw.group_size // BLOCK
    scale = qw.scales.detach().to("cpu", torch.float32).repeat_interleave(per_group, dim=1)
    zero = qw.zeros.detach().to("cpu", torch.float32).repeat_interleave(per_group, dim=1)
    d = scale.to(torch.float16).unsqueeze(-1)  # already fp16: exact
    m = (zero - 8 * scale).to(torch.float16).unsqueeze(-1)
    codes = qw.packed.detach().cpu().reshape(n, k // BLOCK, BLOCK // 2).numpy()
    return np.concatenate([_fp16_bytes(d), _fp16_bytes(m), codes], axis=-1).reshape(n, -1)


# ============================================================================ writing
def default_quant(model: Transformer) -> str:
    """f32 for a float32 model, f16 otherwise (what `quant=None` means)."""
    dtype = model.tok_embeddings.weight.dtype
    return "f32" if dtype == torch.float32 else "f16"


def check_gguf_model(cfg: ModelConfig) -> None:
    """ValueError naming what llama.cpp's LLaMA cannot run the same way."""
    problems = []
    if cfg.norm != "rms":
        problems.append(f"norm {cfg.norm!r} (only 'rms')")
    if cfg.mlp != "swiglu":
        problems.append(f"mlp {cfg.mlp!r} (only 'swiglu')")
    if cfg.rope_scaling not in ("none", "linear"):
        problems.append(f"rope_scaling {cfg.rope_scaling!r} (GGUF has 'none' and 'linear'; dynamic NTK "
                        "scaling has no equivalent there)")
    if problems:
        raise ValueError(f"format 'gguf' cannot represent this model: {'; '.join(problems)}")


def _dense_tensor(name: str, w: torch.Tensor, quant: str) -> tuple[np.ndarray, Optional[str]]:
    """(array, block type "q8_0"/"q4_0", or None for a float array) for one dense tensor of ours."""
    w = w.detach().cpu()
    if w.dim() == 1 or quant == "f32":
        return w.to(torch.float32).contiguous().numpy(), None
    if quant == "f16":
        too_big = w.abs().amax().item() > torch.finfo(torch.float16).max
        if too_big:
            raise ValueError(f"{name}: values beyond float16's range ({torch.finfo(torch.float16).max}); "
                             "use quant='f32'")
        return w.to(torch.float16).contiguous().numpy(), None
    if w.shape[1] % BLOCK:
        log.warning("gguf: %s has rows of %d, not a multiple of %d: written as f32, not %s",
                    name, w.shape[1], BLOCK, quant)
        return w.to(torch.float32).contiguous().numpy(), None
    if quant == "q8_0":
        return quantize_q8_0(w, name), "q8_0"
    return quantize_q4_0(w, name), "q4_0"


def _tokenizer_proto(tokenizer: Tokenizer) -> ModelProto:
    """The SentencePiece model of `tokenizer` (rebuilt from a llama2.c tokenizer.bin)."""
    data = Path(tokenizer.path).read_bytes()
    if tokenizer.format == "llama2c":
        return llama2c_model_proto(*parse_llama2c(data))
    proto = ModelProto()
    proto.ParseFromString(data)
    return proto


def _write_vocab(writer, cfg: ModelConfig, tokenizer: Optional[Tokenizer]) -> None:
    if tokenizer is None:
        writer.add_tokenizer_model("no_vocab")
        return
    if tokenizer.vocab_size != cfg.vocab_size:
        raise ValueError(f"tokenizer: has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                         f"{cfg.vocab_size}")
    pieces = _tokenizer_proto(tokenizer).pieces
    writer.add_tokenizer_model("llama")
    writer.add_token_list([p.piece.encode("utf-8") for p in pieces])
    writer.add_token_scores([float(p.score) for p in pieces])
    writer.add_token_types([int(p.type) for p in pieces])  # NORMAL 1 ... BYTE 6 in both
    for add, token_id in ((writer.add_bos_token_id, tokenizer.bos_id), (writer.add_eos_token_id, tokenizer.eos_id),
                          (writer.add_unk_token_id, tokenizer.unk_id), (writer.add_pad_token_id, tokenizer.pad_id)):
        if token_id is not None:
            add(token_id)


def save_gguf(model: Transformer, path: Path, quant: Optional[str] = None,
              tokenizer: Optional[Tokenizer] = None) -> None:
    """Write `model` (dense, or with int4 or NF4 layers) to `path` as a GGUF file, atomically."""
    # A dependency, imported here all the same: it takes 0.3 s (it loads yaml and its tables), which
    # `import llama` and the other formats need not pay.
    import gguf

    if quant is None:
        quant = default_quant(model)
    if not isinstance(quant, str) or quant not in QUANTS:
        raise ValueError(f"quant: expected one of {', '.join(QUANTS)} or None, got {quant!r}")
    if tokenizer is not None and not isinstance(tokenizer, Tokenizer):
        raise ValueError(f"tokenizer: expected a llama.tokenizer.Tokenizer or None, got {type(tokenizer).__name__}")
    cfg = model.config
    check_gguf_model(cfg)
    layers = quantized_layers(model)
    nf4 = [name for name, layer in layers.items() if layer.config.format == "nf4"]
    if nf4 and quant in ("q8_0", "q4_0"):
        raise ValueError(f"quant: {quant!r} would requantize NF4 layers ({len(nf4)}, e.g. {nf4[0]}); use 'f16' "
                         "or 'f32' (NF4 is dequantized), or quantize the dense model with Int4Config(group_size=32), "
                         "which is exported to Q4_1 without loss")

    tensors: list[tuple[str, Any, Any]] = []  # (gguf name, array, raw type), in our parameter order
    qtypes = set()  # of the matrices, for general.file_type
    for name, t in model.state_dict().items():
        owner = name.rsplit(".", 1)[0]
        layer = layers.get(owner)
        if layer is not None:
            if not name.endswith(".packed"):
                if name.endswith(".bias"):
                    raise ValueError(f"{owner}: has a bias, which llama.cpp's LLaMA does not take")
                continue  # scales, zeros, NF4's absmax: carried by the blocks or the dequantized weight
            name = f"{owner}.weight"
            if layer.config.format == "nf4":
                t = layer.dequantize(torch.float32)
        if name == "output.weight" and cfg.tie_embeddings:
            continue  # llama.cpp uses token_embd.weight when output.weight is absent
        if layer is not None and layer.config.format == "int4":
            array, blocks = int4_as_q4_1(layer), "q4_1"
        else:
            array, blocks = _dense_tensor(name, t, quant)
        if t.dim() == 2:
            qtypes.add(blocks or ("f32" if array.dtype == np.float32 else "f16"))
        raw = None if blocks is None else getattr(gguf.GGMLQuantizationType, blocks.upper())
        # llama.cpp rotates interleaved pairs: permute whole rows, which blocks never cross
        if name.endswith("attention.wq.weight"):
            array = permute_half_to_interleaved(torch.from_numpy(array), cfg.n_heads).numpy()
        elif name.endswith("attention.wk.weight"):
            array = permute_half_to_interleaved(torch.from_numpy(array), cfg.n_kv_heads).numpy()
        tensors.append((gguf_name(name), np.ascontiguousarray(array), raw))

    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
                 "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1}
    main = "q4_1" if "q4_1" in qtypes else quant
    with atomic_file(path) as tmp:
        writer = gguf.GGUFWriter(tmp, "llama")
        try:
            writer.add_name(path.stem)
            writer.add_context_length(cfg.max_seq_len)
            writer.add_embedding_length(cfg.dim)
            writer.add_block_count(cfg.n_layers)
            writer.add_feed_forward_length(cfg.hidden_dim)
            writer.add_head_count(cfg.n_heads)
            writer.add_head_count_kv(cfg.n_kv_heads)
            writer.add_layer_norm_rms_eps(cfg.norm_eps)
            writer.add_rope_freq_base(cfg.rope_theta)
            writer.add_rope_dimension_count(cfg.dim // cfg.n_heads)
            if cfg.rope_scaling == "linear":
                writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
                writer.add_rope_scaling_factor(cfg.rope_scaling_factor)
            writer.add_vocab_size(cfg.vocab_size)
            writer.add_file_type(int(file_type[main]))
            if main not in ("f32", "f16"):
                writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
            _write_vocab(writer, cfg, tokenizer)
            for name, array, raw in tensors:
                writer.add_tensor(name, array, raw_dtype=raw)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
