"""Checkpoints: read and write every weight layout this project meets, recognised by content.

    model = load_model("out/ckpt.pt")                            # llama2.c training checkpoint
    model = load_model("TinyLlama-1.1B/", dtype=torch.bfloat16)   # Hugging Face directory
    save(model, "stories15M.bin", format="llama2c-bin-v0")        # for llama2.c's run.c
    save(model, "runs/exp1/")                                     # our own format

`detect_format` looks at magic bytes, zip headers and JSON files, never at file names. Loading
builds the model on the meta device and hands the checkpoint's tensors to
`Transformer.load_weights`, so parameters are allocated once. `.pt` and safetensors files are
memory-mapped: what the model does not use (a training checkpoint's optimizer state) is never
read, and each parameter is copied out of the mapping once, so that rewriting the file later
cannot pull the weights from under the model.
Name maps are strict: a missing, unexpected or mis-shaped tensor is a ValueError that names it
as the checkpoint spells it. A truncated or corrupt file is a ValueError that names the file.
Every write is atomic: a failed save leaves the previous checkpoint at that path untouched.

RoPE: our model rotates half-split pairs (i, i + D/2), as Hugging Face does. Meta, llama2.c and
minllama rotate interleaved pairs (2i, 2i + 1); their wq/wk rows are permuted on the way in
(`permute_interleaved_to_half`) and back on the way out (`permute_half_to_interleaved`).

Formats (`FORMATS`)
-------------------
native          A directory: `config.json` = {"format": "llama-kernels", "version": 1,
                "weights": "dense", "dtype": "float32", "model": ModelConfig.to_dict(),
                "metadata": {...}} and `model.safetensors` holding our parameter names in the
                model's dtype; a tied `output.weight` is not stored. "weights" is the slot for
                quantized or pruned variants; a reader that does not know its value refuses.
                A model quantized by `llama.quantize.quantize_` has "weights": "int4" or "nf4"
                and "quantization": {"format", "group_size", "double_quant", "layers": [names
                of the 4-bit linear layers]}; each such layer stores `NAME.packed` (uint8),
                `NAME.scales` and `NAME.zeros` (fp16; no zeros for NF4, and no scales for NF4
                with double quantization, which stores `NAME.absmax_q` int8, `NAME.absmax_step`
                and `NAME.absmax_mean` fp32 instead) in place of `NAME.weight` (see QuantLinear).
                Loading swaps those layers before the strict load; `dtype` casts the other
                floating tensors only. No other format holds a quantized model.
hf              A Hugging Face LlamaForCausalLM directory: `config.json` plus `model.safetensors`,
                or `model-0000K-of-0000N.safetensors` shards listed in
                `model.safetensors.index.json`. q/k are half-split already (no permutation).
llama2c-pt      llama2.c's train.py checkpoint: a torch dict {"model": state_dict,
                "model_args": {...}} (other keys - optimizer, iter_num, config, best_val_loss -
                are ignored). `_orig_mod.` (torch.compile) and `module.` (DDP) prefixes are
                stripped. The output layer is tied when `output.weight` is absent or equal to
                the embedding.
minllama-pt     The same, with minllama's names `attention.compute_query/compute_key/
                compute_value/compute_output` for wq/wk/wv/wo. See "Assumptions" below.
llama2c-bin-v0  llama2.c's legacy export (run.c). 7 int32: dim, hidden_dim, n_layers, n_heads,
                n_kv_heads, vocab_size (negative: the classifier is not shared), max_seq_len;
                then fp32, each group over all layers in order:
                  tok_embeddings, attention_norm, wq, wk, wv, wo, ffn_norm, w1, w2, w3, norm,
                  freq_cis_real (max_seq_len x head_dim/2), freq_cis_imag (same),
                  output (only if not shared).
llama2c-bin-v1  A 256-byte header: uint32 magic 0x616b3432 ("ak42"), int32 version 1, the 7
                int32 above (vocab_size positive), uint8 shared_classifier, zeros to 256; then
                fp32 (export.py's version1_export):
                  attention_norm (all layers), ffn_norm (all layers), norm, tok_embeddings,
                  wq (all layers), wk, wv, wo, w1, w2, w3, output (only if not shared).
llama2c-bin-v2  The v1 header with version 2 and an int32 group_size right after the flag
                (byte offset 37); then fp32 norms as in v1 (attention_norm, ffn_norm, norm), then
                Q8_0 tensors (export.py's version2_export), each as all its int8 values followed
                by its fp32 scales (one per group_size consecutive values, scale = max|w| / 127):
                  tok_embeddings, wq (all layers), wk, wv, wo, w1, w2, w3, output (if not shared).
                Reading dequantizes to fp32.
All multi-byte numbers are little-endian; matrices are row-major (out_features, in_features).

Assumptions
-----------
* minllama (the CMU 11-711 assignment): its `load_pretrained` reads {"model", "model_args"}
  with llama2.c's keys, plus `layer_norm_eps` for the norm epsilon; its RoPE is interleaved and
  its embedding is always tied to the output. A `config` dict is used when `model_args` is
  absent. Writing minllama-pt therefore requires tied embeddings.
* Missing `model_args` entries take the defaults of the code that wrote the file (llama2.c:
  multiple_of 256, max_seq_len 2048; minllama: 32, 1024; both norm_eps 1e-5). An entry this
  module does not know is an error rather than a silent guess.
* llama2.c's formats have no fields for rope_theta, RoPE scaling or (in .bin) norm_eps: they are
  read as 10000, none and 1e-5, and writing a model that differs from those is refused, as is
  writing a LayerNorm or GELU variant to any format but native.
* dropout and attn_dropout are training settings: carried where a format has a field for them,
  otherwise dropped.
* load_model returns the model in eval mode, with the checkpoint's dtype unless `dtype` is given.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import re
import shutil
import struct
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file as _safetensors_save_file

from .config import ModelConfig, parse_overrides
from .model import Transformer, build, rope_tables

__all__ = [
    "FORMATS",
    "Llama2cHeader",
    "detect_format",
    "load_model",
    "permute_half_to_interleaved",
    "permute_interleaved_to_half",
    "read_config",
    "read_llama2c_header",
    "save",
]

PathLike = Union[str, os.PathLike]

FORMATS = (
    "native",
    "hf",
    "llama2c-pt",
    "minllama-pt",
    "llama2c-bin-v0",
    "llama2c-bin-v1",
    "llama2c-bin-v2",
)

NATIVE_FORMAT = "llama-kernels"
NATIVE_VERSION = 1
NATIVE_WEIGHTS = ("dense", "int4", "nf4")

LLAMA2C_MAGIC = 0x616B3432
LLAMA2C_HEADER_BYTES = 256
LLAMA2C_NORM_EPS = 1e-5  # run.c hard-codes it
LLAMA2C_ROPE_THETA = 10000.0
DEFAULT_GROUP_SIZE = 64  # export.py's default for version 2

CONFIG_JSON = "config.json"
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
_SHARD_RE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")

_ZIP_MAGIC = b"PK\x03\x04"
_GGUF_MAGIC = b"GGUF"
# torch's legacy (pre-zip) format opens with a pickled long: 0x1950a86a20f9469cfc6c.
_TORCH_LEGACY_MAGIC = b"\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")

# Read once: files made by mkstemp are 0600, ours get the permissions a plain open() would give.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


# ============================================================================ RoPE permutations
def _rope_geometry(w: torch.Tensor, n_heads: int) -> int:
    if not isinstance(n_heads, int) or n_heads <= 0:
        raise ValueError(f"n_heads: expected a positive integer, got {n_heads!r}")
    if w.dim() < 1 or w.shape[0] % n_heads:
        raise ValueError(f"weight: {w.shape[0] if w.dim() else 0} rows do not split into {n_heads} heads")
    head_dim = w.shape[0] // n_heads
    if head_dim % 2:
        raise ValueError(f"weight: head_dim {head_dim} must be even for rotary embeddings")
    return head_dim


def permute_interleaved_to_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a query/key projection (n_heads * head_dim, ...) from interleaved RoPE pairs
    (2i, 2i+1) (Meta, llama2.c) to half-split pairs (i, i + head_dim/2) (Hugging Face, ours).

    Within each head, row 2i + j moves to row j * head_dim/2 + i. For wk pass n_kv_heads.
    """
    head_dim = _rope_geometry(w, n_heads)
    rest = tuple(w.shape[1:])
    return w.reshape(n_heads, head_dim // 2, 2, *rest).transpose(1, 2).reshape(w.shape)


def permute_half_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of `permute_interleaved_to_half`."""
    head_dim = _rope_geometry(w, n_heads)
    rest = tuple(w.shape[1:])
    return w.reshape(n_heads, 2, head_dim // 2, *rest).transpose(1, 2).reshape(w.shape)


def _to_interleaved(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our half-split wq/wk as Meta/llama2.c store them; other tensors unchanged."""
    out = {}
    for name, t in state.items():
        if name.endswith("attention.wq.weight"):
            t = permute_half_to_interleaved(t, cfg.n_heads)
        elif name.endswith("attention.wk.weight"):
            t = permute_half_to_interleaved(t, cfg.n_kv_heads)
        out[name] = t
    return out


# ============================================================================ format detection
def detect_format(path: PathLike) -> str:
    """Which of `FORMATS` the file or directory at `path` holds, judged by its content.

    FileNotFoundError if nothing is there; ValueError (naming the path) for anything else that
    is not a checkpoint this module reads.
    """
    return _detect(Path(path))[0]


def _detect(path: Path) -> tuple[str, Any]:
    """The format, and whatever was loaded to decide it (a .pt's contents) for reuse."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if path.is_dir():
        return _detect_dir(path), None
    with open(path, "rb") as f:
        head = f.read(LLAMA2C_HEADER_BYTES)
    if len(head) >= 8 and struct.unpack_from("<I", head)[0] == LLAMA2C_MAGIC:
        version = struct.unpack_from("<i", head, 4)[0]
        if version not in (1, 2):
            raise ValueError(f"{path}: llama2.c checkpoint of unsupported version {version} (known: 0, 1, 2)")
        return f"llama2c-bin-v{version}", None
    if head.startswith(_ZIP_MAGIC) or _is_torch_legacy(head):
        ckpt = _torch_load(path)
        return _pt_flavour(ckpt, path), ckpt
    if head.startswith(_GGUF_MAGIC):
        raise ValueError(f"{path}: a GGUF file; GGUF is not supported (formats: {', '.join(FORMATS)})")
    if _is_safetensors(head):
        raise ValueError(f"{path}: a bare safetensors file; pass the directory holding it and its {CONFIG_JSON}")
    if len(head) >= 28 and _plausible_v0(struct.unpack_from("<7i", head)):
        return "llama2c-bin-v0", None
    raise ValueError(
        f"{path}: not a recognised checkpoint (no llama2.c magic, not a torch file, and the first "
        f"bytes are not a plausible llama2.c v0 header); formats: {', '.join(FORMATS)}"
    )


def _detect_dir(path: Path) -> str:
    config_path = path / CONFIG_JSON
    if not config_path.is_file():
        raise ValueError(f"{path}: a directory without {CONFIG_JSON}, so neither a native nor a Hugging Face "
                         "checkpoint")
    raw = _read_json(config_path)
    if raw.get("format") == NATIVE_FORMAT:
        return "native"
    model_type = raw.get("model_type")
    if model_type == "llama" or "LlamaForCausalLM" in (raw.get("architectures") or ()):
        return "hf"
    raise ValueError(
        f"{config_path}: neither our format (\"format\": \"{NATIVE_FORMAT}\") nor a Hugging Face LLaMA "
        f"(model_type {model_type!r}; only 'llama' is supported)"
    )


def _is_torch_legacy(head: bytes) -> bool:
    return len(head) >= 14 and head[0] == 0x80 and 2 <= head[1] <= 5 and head[2:14] == _TORCH_LEGACY_MAGIC


def _is_safetensors(head: bytes) -> bool:
    return len(head) >= 9 and head[8:9] == b"{" and 0 < struct.unpack_from("<Q", head)[0] < 1 << 30


def _plausible_v0(values: tuple[int, ...]) -> bool:
    dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, max_seq_len = values
    if not all(0 < v < 1 << 24 for v in (dim, hidden_dim, n_layers, n_heads, n_kv_heads, abs(vocab_size), max_seq_len)):
        return False
    return dim % n_heads == 0 and n_heads % n_kv_heads == 0 and (dim // n_heads) % 2 == 0


def _read_json(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return raw


def _make_config(where: str, **fields: Any) -> ModelConfig:
    try:
        return ModelConfig(**fields)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: invalid model configuration: {e}") from None


# ============================================================================ loading
@dataclass
class _Source:
    """One checkpoint's tensors, before they become our parameters.

    names: the tensors as stored; fetch(stored_name) reads one; stored_name(our_name) maps our
    parameter names to the checkpoint's; interleaved: wq/wk rows use interleaved RoPE pairs;
    ignored: stored tensors known not to be weights (e.g. RoPE tables), skipped by name;
    mapped: fetch returns views of a memory-mapped file (torch.load(mmap=True), safetensors).
    quantization: a native checkpoint's "quantization" entry (4-bit layers), else None.
    """

    config: ModelConfig
    names: list[str]
    fetch: Callable[[str], torch.Tensor]
    stored_name: Callable[[str], str] = lambda name: name
    interleaved: bool = False
    ignored: Callable[[str], bool] = lambda name: False
    mapped: bool = False
    quantization: Optional[dict[str, Any]] = None


def read_config(path: PathLike) -> ModelConfig:
    """The model configuration of the checkpoint at `path`, without building the model."""
    path = Path(path)
    fmt, preloaded = _detect(path)
    with _open_source(path, fmt, preloaded) as source:
        return source.config


def load_model(path: PathLike, device: Union[str, torch.device] = "cpu",
               dtype: Optional[torch.dtype] = None, overrides: Sequence[str] = ()) -> Transformer:
    """The model stored at `path`, in any of `FORMATS`, on `device`, in eval mode.

    dtype None keeps the checkpoint's (fp32 for llama2.c formats, also v2 which dequantizes).
    `overrides` are `key=value` config changes that keep the weights' shapes, such as
    `rope_scaling=dynamic rope_scaling_factor=4` or `max_seq_len=4096`.
    """
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype: expected a floating-point torch.dtype or None, got {dtype!r}")
    path = Path(path)
    fmt, preloaded = _detect(path)
    with _open_source(path, fmt, preloaded) as source:
        config = source.config.replace(**parse_overrides(overrides)) if overrides else source.config
        model = build(config, init=False)
        if source.quantization is not None:  # empty 4-bit layers on the meta device, filled below
            # (llama.quantize is imported on use: `python -m llama.quantize` runs it as __main__)
            from .quantize import config_from_dict, prepare_quantized

            q = source.quantization
            prepare_quantized(model, config_from_dict(q), q["layers"])
        state = _gather(source, model, str(path), torch.device(device), dtype)
    model.load_weights(state)
    return model.eval()


@contextlib.contextmanager
def _open_source(path: Path, fmt: str, preloaded: Any) -> Iterator[_Source]:
    if fmt == "native":
        with _open_native(path) as source:
            yield source
    elif fmt == "hf":
        with _open_hf(path) as source:
            yield source
    elif fmt in ("llama2c-pt", "minllama-pt"):
        yield _pt_source(preloaded if preloaded is not None else _torch_load(path), path, fmt)
    else:
        with _open_llama2c_bin(path) as source:
            yield source


def _gather(source: _Source, model: Transformer, where: str, device: torch.device,
            dtype: Optional[torch.dtype]) -> dict[str, torch.Tensor]:
    """Our state dict from `source`, checked strictly against `model` (on the meta device)."""
    from .quantize import quantized_layers

    cfg = source.config
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    # The stored tensors of 4-bit layers (codes, scales, ...) keep their exact dtype.
    quantized = tuple(f"{name}." for name in quantized_layers(model))
    frozen = {name: t.dtype for name, t in model.state_dict().items()
              if name.startswith(quantized) and not name.endswith(".bias")} if quantized else {}
    tied_output = None
    if cfg.tie_embeddings:
        expected.pop("output.weight", None)
        tied_output = source.stored_name("output.weight")
    wanted = {source.stored_name(ours): ours for ours in expected}
    given = {name for name in source.names if not source.ignored(name)}
    missing = sorted(set(wanted) - given)
    unexpected = sorted(given - set(wanted) - {tied_output})
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensor(s) {', '.join(missing)}")
        if unexpected:
            parts.append(f"unexpected tensor(s) {', '.join(unexpected)}")
        raise ValueError(f"{where}: {'; '.join(parts)}")

    state: dict[str, torch.Tensor] = {}
    for stored, ours in wanted.items():
        raw = t = source.fetch(stored)
        if tuple(t.shape) != expected[ours]:
            raise ValueError(f"{where}: tensor {stored}: expected shape {expected[ours]} for this config, "
                             f"got {tuple(t.shape)}")
        if ours in frozen:
            if t.dtype != frozen[ours]:
                raise ValueError(f"{where}: tensor {stored}: expected {frozen[ours]} for a 4-bit layer, got {t.dtype}")
            t = t.to(device=device)
        else:
            if not t.is_floating_point():
                raise ValueError(f"{where}: tensor {stored}: expected floating point, got {t.dtype}")
            if source.interleaved and ours.endswith("attention.wq.weight"):
                t = permute_interleaved_to_half(t, cfg.n_heads)
            elif source.interleaved and ours.endswith("attention.wk.weight"):
                t = permute_interleaved_to_half(t, cfg.n_kv_heads)
            t = t.to(device=device, dtype=dtype)
        if source.mapped and t.untyped_storage().data_ptr() == raw.untyped_storage().data_ptr():
            # Mapping is lazy (a .pt's optimizer state is never read), but the parameters get
            # memory of their own: a file rewritten in place under a mapping crashes (SIGBUS).
            t = t.clone()
        state[ours] = t
    if tied_output in given:
        embedding = state["tok_embeddings.weight"]
        if not torch.equal(source.fetch(tied_output).to(embedding), embedding):
            raise ValueError(f"{where}: tensor {tied_output}: differs from the embedding, but the config ties them")
    return state


# ---------------------------------------------------------------------------- native
@contextlib.contextmanager
def _open_native(path: Path) -> Iterator[_Source]:
    config_path = path / CONFIG_JSON
    raw = _read_json(config_path)
    version = raw.get("version")
    if not isinstance(version, int) or version < 1:
        raise ValueError(f"{config_path}: missing or invalid \"version\" {version!r}")
    if version > NATIVE_VERSION:
        raise ValueError(f"{config_path}: format version {version} is newer than this reader "
                         f"({NATIVE_VERSION}); upgrade")
    weights = raw.get("weights", "dense")
    if weights not in NATIVE_WEIGHTS:
        raise ValueError(f"{config_path}: weights {weights!r} are not supported by this reader "
                         f"(known: {', '.join(NATIVE_WEIGHTS)})")
    if not isinstance(raw.get("model"), dict):
        raise ValueError(f"{config_path}: missing the \"model\" configuration")
    try:
        cfg = ModelConfig.from_dict(raw["model"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{config_path}: invalid model configuration: {e}") from None
    quantization = _native_quantization(raw, weights, config_path)
    with contextlib.ExitStack() as stack:
        tensors = _open_safetensors(path / SAFETENSORS, stack)
        yield _Source(cfg, list(tensors), lambda name: _get_tensor(tensors[name], name, path), mapped=True,
                      quantization=quantization)


def _native_quantization(raw: dict[str, Any], weights: str, config_path: Path) -> Optional[dict[str, Any]]:
    """The checked "quantization" entry of a native config.json (None for dense weights)."""
    from .quantize import config_from_dict

    q = raw.get("quantization")
    if weights == "dense":
        if q is not None:
            raise ValueError(f"{config_path}: \"quantization\" given but weights are \"dense\"")
        return None
    if not isinstance(q, dict):
        raise ValueError(f"{config_path}: weights {weights!r} need a \"quantization\" object")
    if q.get("format") != weights:
        raise ValueError(f"{config_path}: quantization.format {q.get('format')!r} differs from weights {weights!r}")
    layers = q.get("layers")
    if not isinstance(layers, list) or not all(isinstance(n, str) for n in layers) or len(set(layers)) != len(layers):
        raise ValueError(f"{config_path}: quantization.layers must be a list of distinct layer names")
    try:
        config_from_dict(q)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{config_path}: quantization.{e}") from None
    return q


# ---------------------------------------------------------------------------- Hugging Face
_HF_TOP = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_HF_LAYER = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_LAYER_RE = re.compile(r"layers\.(\d+)\.(.+)")
_HF_IGNORED_RE = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")  # older transformers saved it


def _hf_name(ours: str) -> str:
    if ours in _HF_TOP:
        return _HF_TOP[ours]
    m = _LAYER_RE.fullmatch(ours)
    if m is None or m[2] not in _HF_LAYER:
        raise ValueError(f"{ours}: no Hugging Face LLaMA equivalent")
    return f"model.layers.{m[1]}.{_HF_LAYER[m[2]]}"


def _hf_rope(raw: dict[str, Any], where: str) -> tuple[float, str, float]:
    """(rope_theta, rope_scaling, factor) from transformers 4.x (`rope_theta`, `rope_scaling`)
    or 5.x (`rope_parameters`) spellings."""
    spec = dict(raw.get("rope_scaling") or {})
    spec.update(raw.get("rope_parameters") or {})
    theta = float(spec.pop("rope_theta", raw.get("rope_theta", 10000.0)))
    kind = spec.pop("rope_type", None) or spec.pop("type", None) or "default"
    spec.pop("type", None)
    original = spec.pop("original_max_position_embeddings", None)
    if original is not None and original != raw.get("max_position_embeddings"):
        raise ValueError(f"{where}: rope original_max_position_embeddings {original} differs from "
                         f"max_position_embeddings {raw.get('max_position_embeddings')}; not supported")
    if kind == "default":
        factor = float(spec.pop("factor", 1.0))
        if factor != 1.0:
            raise ValueError(f"{where}: rope factor {factor} without a scaling type")
        scaling = "none"
    elif kind in ("linear", "dynamic"):
        if "factor" not in spec:
            raise ValueError(f"{where}: rope scaling {kind!r} without a factor")
        factor, scaling = float(spec.pop("factor")), kind
    else:
        raise ValueError(f"{where}: rope scaling type {kind!r} is not supported (none, linear, dynamic)")
    if spec:
        raise ValueError(f"{where}: unsupported rope scaling field(s) {', '.join(sorted(spec))}")
    return theta, scaling, factor


def _config_from_hf(raw: dict[str, Any], where: str) -> ModelConfig:
    if raw.get("model_type", "llama") != "llama":
        raise ValueError(f"{where}: model_type {raw.get('model_type')!r} is not supported (only 'llama')")
    if raw.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{where}: hidden_act {raw.get('hidden_act')!r} is not supported (LLaMA uses 'silu')")
    for key in ("attention_bias", "mlp_bias"):
        if raw.get(key, False):
            raise ValueError(f"{where}: {key}=true is not supported (the model has no biases)")
    required = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    absent = [key for key in required if key not in raw]
    if absent:
        raise ValueError(f"{where}: missing field(s) {', '.join(absent)}")
    n_heads = raw["num_attention_heads"]
    n_kv_heads = raw.get("num_key_value_heads") or n_heads  # transformers' default when absent
    head_dim = raw.get("head_dim")
    if head_dim is not None and isinstance(n_heads, int) and n_heads > 0 and head_dim * n_heads != raw["hidden_size"]:
        raise ValueError(f"{where}: head_dim {head_dim} x {n_heads} heads != hidden_size {raw['hidden_size']}; "
                         "not supported")
    theta, scaling, factor = _hf_rope(raw, where)
    return _make_config(
        where,
        dim=raw["hidden_size"],
        n_layers=raw["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        vocab_size=raw["vocab_size"],
        hidden_dim=raw["intermediate_size"],
        norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        max_seq_len=raw.get("max_position_embeddings", 2048),
        rope_theta=theta,
        rope_scaling=scaling,
        rope_scaling_factor=factor,
        attn_dropout=float(raw.get("attention_dropout", 0.0)),
        tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
    )


@contextlib.contextmanager
def _open_hf(path: Path) -> Iterator[_Source]:
    config_path = path / CONFIG_JSON
    cfg = _config_from_hf(_read_json(config_path), str(config_path))
    with contextlib.ExitStack() as stack:
        index_path = path / SAFETENSORS_INDEX
        if index_path.is_file():
            index = _read_json(index_path)
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise ValueError(f"{index_path}: missing or invalid \"weight_map\"")
            tensors: dict[str, Any] = {}
            for shard in sorted(set(weight_map.values())):
                if Path(shard).name != shard:
                    raise ValueError(f"{index_path}: shard name {shard!r} must be a plain file name")
                for name, handle in _open_safetensors(path / shard, stack).items():
                    if weight_map.get(name) != shard:
                        raise ValueError(f"{path / shard}: tensor {name} is not listed for this shard in "
                                         f"{index_path.name}")
                    tensors[name] = handle
            unlisted = sorted(set(weight_map) - set(tensors))
            if unlisted:
                raise ValueError(f"{index_path}: lists tensor(s) its shards do not hold: {', '.join(unlisted)}")
        elif (path / SAFETENSORS).is_file():
            tensors = _open_safetensors(path / SAFETENSORS, stack)
        elif any(path.glob("pytorch_model*.bin")):
            raise ValueError(f"{path}: only safetensors weights are supported (pytorch_model*.bin needs pickle); "
                             "convert with save_pretrained(..., safe_serialization=True)")
        else:
            raise ValueError(f"{path}: no {SAFETENSORS} or {SAFETENSORS_INDEX}")
        yield _Source(
            cfg,
            list(tensors),
            lambda name: _get_tensor(tensors[name], name, path),
            stored_name=_hf_name,
            ignored=lambda name: _HF_IGNORED_RE.fullmatch(name) is not None,
            mapped=True,
        )


def _open_safetensors(path: Path, stack: contextlib.ExitStack) -> dict[str, Any]:
    """{tensor name: open handle} for one safetensors file (memory-mapped, read lazily)."""
    if not path.is_file():
        raise ValueError(f"{path}: missing weights file")
    try:
        handle = stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))
        return {name: handle for name in handle.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path}: corrupt or truncated safetensors file ({e})") from None


def _get_tensor(handle: Any, name: str, where: Path) -> torch.Tensor:
    try:
        return handle.get_tensor(name)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{where}: cannot read tensor {name} ({e})") from None


# ---------------------------------------------------------------------------- llama2.c / minllama .pt
_PT_WRAPPER_PREFIXES = ("_orig_mod.", "module.")  # torch.compile, DistributedDataParallel
_PT_IGNORED = ("freqs_cos", "freqs_sin", "freqs_cis", "rope.freqs")  # RoPE tables some versions saved
_MINLLAMA_NAMES = {
    "attention.wq.weight": "attention.compute_query.weight",
    "attention.wk.weight": "attention.compute_key.weight",
    "attention.wv.weight": "attention.compute_value.weight",
    "attention.wo.weight": "attention.compute_output.weight",
}
# model_args entry -> ModelConfig field. Anything else is an error, except _PT_ARGS_NO_EFFECT.
_PT_ARGS = {
    "dim": "dim", "n_layers": "n_layers", "n_heads": "n_heads", "n_kv_heads": "n_kv_heads",
    "vocab_size": "vocab_size", "hidden_dim": "hidden_dim", "multiple_of": "multiple_of",
    "ffn_dim_multiplier": "ffn_dim_multiplier", "norm_eps": "norm_eps", "layer_norm_eps": "norm_eps",
    "max_seq_len": "max_seq_len", "dropout": "dropout", "rope_theta": "rope_theta",
}
_PT_ARGS_NO_EFFECT = ("use_cache", "flash")
_PT_DEFAULTS = {  # the defaults of llama2.c's ModelArgs and minllama's LlamaConfig
    "llama2c-pt": dict(multiple_of=256, max_seq_len=2048, norm_eps=1e-5),
    "minllama-pt": dict(multiple_of=32, max_seq_len=1024, norm_eps=1e-5),
}


def _torch_load(path: Path) -> Any:
    """torch.load with weights_only=True, memory-mapped when the file is zip-format."""
    with open(path, "rb") as f:
        is_zip = f.read(4) == _ZIP_MAGIC
    if is_zip:
        try:
            with zipfile.ZipFile(path) as archive:
                if not any(n.endswith("data.pkl") for n in archive.namelist()):
                    raise ValueError(f"{path}: a zip archive but not a torch checkpoint (no data.pkl)")
        except zipfile.BadZipFile as e:
            raise ValueError(f"{path}: corrupt or truncated torch checkpoint ({e})") from None
    for mmap in ((True, False) if is_zip else (False,)):
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as e:
            detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(
                f"{path}: refusing to load: the checkpoint holds pickled Python objects that "
                "torch.load(weights_only=True) will not run, since unpickling arbitrary objects can "
                "execute code. Re-save it with plain tensors, dicts, lists and numbers only "
                f"(e.g. {{'model': state_dict, 'model_args': dict(...)}}). Detail: {detail}"
            ) from None
        except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as e:
            if mmap:
                continue  # a zip that cannot be memory-mapped: read it normally
            raise ValueError(f"{path}: corrupt or truncated torch checkpoint ({e})") from None
    raise AssertionError("unreachable")


def _pt_state_dict(ckpt: Any, path: Path) -> dict[str, torch.Tensor]:
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise ValueError(f"{path}: expected a llama2.c-style checkpoint, a dict with a 'model' state dict "
                         "and 'model_args'")
    state = {}
    for name, t in ckpt["model"].items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise ValueError(f"{path}: 'model' entry {name!r} is not a named tensor")
        for prefix in _PT_WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
        state[name] = t
    return state


def _pt_flavour(ckpt: Any, path: Path) -> str:
    names = _pt_state_dict(ckpt, path)
    if any(".attention.compute_query." in n for n in names):
        return "minllama-pt"
    if any(".attention.wq." in n for n in names):
        return "llama2c-pt"
    raise ValueError(f"{path}: a torch checkpoint without attention.wq or attention.compute_query weights; "
                     "not a llama2.c or minllama model")


def _pt_args(ckpt: dict[str, Any], path: Path) -> dict[str, Any]:
    args = ckpt.get("model_args")
    if args is None:  # minllama variants keep it under `config`; llama2.c's `config` is the training config
        config = ckpt.get("config")
        if isinstance(config, dict) and "dim" in config and "n_layers" in config:
            args = config
    if not isinstance(args, dict):
        raise ValueError(f"{path}: no 'model_args' dict with the model's shape (dim, n_layers, n_heads, ...)")
    return args


def _pt_source(ckpt: dict[str, Any], path: Path, fmt: str) -> _Source:
    state = _pt_state_dict(ckpt, path)
    args = dict(_pt_args(ckpt, path))
    position = args.pop("position_embedding_type", "rotary")
    if position != "rotary":
        raise ValueError(f"{path}: model_args position_embedding_type {position!r} is not supported (rotary only)")
    unknown = sorted(k for k in args if k not in _PT_ARGS and k not in _PT_ARGS_NO_EFFECT)
    if unknown:
        raise ValueError(f"{path}: unknown model_args entr{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)}")
    fields = dict(_PT_DEFAULTS[fmt])
    fields.update({_PT_ARGS[k]: v for k, v in args.items() if k in _PT_ARGS and v is not None})
    for required in ("dim", "n_layers", "n_heads", "vocab_size"):
        if required not in fields:
            raise ValueError(f"{path}: model_args lacks {required!r}")
    output, embedding = state.get("output.weight"), state.get("tok_embeddings.weight")
    fields["tie_embeddings"] = output is None or (embedding is not None and torch.equal(output, embedding))
    cfg = _make_config(str(path), **fields)
    if fmt == "minllama-pt":
        def stored_name(ours: str) -> str:
            m = _LAYER_RE.fullmatch(ours)
            return f"layers.{m[1]}.{_MINLLAMA_NAMES[m[2]]}" if m and m[2] in _MINLLAMA_NAMES else ours
    else:
        def stored_name(ours: str) -> str:
            return ours
    return _Source(cfg, list(state), state.__getitem__, stored_name=stored_name, interleaved=True,
                   ignored=lambda name: name in _PT_IGNORED, mapped=True)


# ---------------------------------------------------------------------------- llama2.c .bin
@dataclass(frozen=True)
class Llama2cHeader:
    """The header of a llama2.c `.bin` file. vocab_size is positive; shared_classifier says
    whether the output layer reuses the embedding. group_size: Q8_0 group (version 2 only)."""

    version: int
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    max_seq_len: int
    shared_classifier: bool
    group_size: Optional[int] = None

    @property
    def header_bytes(self) -> int:
        return 28 if self.version == 0 else LLAMA2C_HEADER_BYTES

    def config(self, where: str = "llama2.c header") -> ModelConfig:
        return _make_config(
            where, dim=self.dim, hidden_dim=self.hidden_dim, n_layers=self.n_layers, n_heads=self.n_heads,
            n_kv_heads=self.n_kv_heads, vocab_size=self.vocab_size, max_seq_len=self.max_seq_len,
            norm_eps=LLAMA2C_NORM_EPS, rope_theta=LLAMA2C_ROPE_THETA, tie_embeddings=self.shared_classifier,
        )

    def pack(self) -> bytes:
        params = (self.dim, self.hidden_dim, self.n_layers, self.n_heads, self.n_kv_heads)
        if self.version == 0:
            vocab = self.vocab_size if self.shared_classifier else -self.vocab_size
            return struct.pack("<7i", *params, vocab, self.max_seq_len)
        head = struct.pack("<Ii7iB", LLAMA2C_MAGIC, self.version, *params, self.vocab_size, self.max_seq_len,
                           int(self.shared_classifier))
        if self.version == 2:
            head += struct.pack("<i", self.group_size)
        return head + b"\0" * (LLAMA2C_HEADER_BYTES - len(head))


def read_llama2c_header(path: PathLike) -> Llama2cHeader:
    """Parse the header of a llama2.c `.bin` file of version 0, 1 or 2 (ValueError if it is not one)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, "rb") as f:
        head = f.read(LLAMA2C_HEADER_BYTES)
    if len(head) >= 4 and struct.unpack_from("<I", head)[0] == LLAMA2C_MAGIC:
        if len(head) < LLAMA2C_HEADER_BYTES:
            raise ValueError(f"{path}: truncated llama2.c header ({len(head)} of {LLAMA2C_HEADER_BYTES} bytes)")
        version, *params, shared = struct.unpack_from("<i7iB", head, 4)
        if version not in (1, 2):
            raise ValueError(f"{path}: llama2.c checkpoint of unsupported version {version} (known: 0, 1, 2)")
        if shared not in (0, 1):
            raise ValueError(f"{path}: corrupt llama2.c header (shared_classifier flag {shared})")
        group_size = struct.unpack_from("<i", head, 37)[0] if version == 2 else None
        if version == 2 and group_size <= 0:
            raise ValueError(f"{path}: corrupt llama2.c header (group_size {group_size})")
        if params[5] <= 0:
            raise ValueError(f"{path}: corrupt llama2.c header (vocab_size {params[5]})")
        return Llama2cHeader(version, *params, shared_classifier=bool(shared), group_size=group_size)
    if len(head) < 28 or not _plausible_v0(struct.unpack_from("<7i", head)):
        raise ValueError(f"{path}: not a llama2.c checkpoint (no 'ak42' magic and no plausible v0 header)")
    *params, vocab_size, max_seq_len = struct.unpack_from("<7i", head)
    return Llama2cHeader(0, *params, abs(vocab_size), max_seq_len, shared_classifier=vocab_size > 0)


@dataclass(frozen=True)
class _BinEntry:
    name: str           # our parameter name, or "freqs_cos"/"freqs_sin" (v0's RoPE tables)
    shape: tuple[int, ...]
    numel: int
    quantized: bool     # Q8_0 (int8 values, then fp32 scales) rather than fp32
    offset: int
    nbytes: int


def _bin_order(cfg: ModelConfig, version: int) -> list[tuple[str, bool]]:
    """(name, quantized) for every tensor of a llama2.c .bin file, in file order."""
    layers = range(cfg.n_layers)

    def each(suffix: str) -> list[str]:
        return [f"layers.{i}.{suffix}" for i in layers]

    norms = [*each("attention_norm.weight"), *each("ffn_norm.weight"), "norm.weight"]
    matrices = [*each("attention.wq.weight"), *each("attention.wk.weight"), *each("attention.wv.weight"),
                *each("attention.wo.weight"), *each("feed_forward.w1.weight"), *each("feed_forward.w2.weight"),
                *each("feed_forward.w3.weight")]
    output = [] if cfg.tie_embeddings else ["output.weight"]
    if version == 0:
        names = ["tok_embeddings.weight", *each("attention_norm.weight"), *matrices[: 4 * cfg.n_layers],
                 *each("ffn_norm.weight"), *matrices[4 * cfg.n_layers:], "norm.weight", "freqs_cos", "freqs_sin",
                 *output]
        return [(n, False) for n in names]
    if version == 1:
        return [(n, False) for n in (*norms, "tok_embeddings.weight", *matrices, *output)]
    return [(n, False) for n in norms] + [(n, True) for n in ("tok_embeddings.weight", *matrices, *output)]


def _bin_layout(header: Llama2cHeader, cfg: ModelConfig, where: str) -> list[_BinEntry]:
    shapes = {name: tuple(t.shape) for name, t in build(cfg, init=False).state_dict().items()}
    shapes["freqs_cos"] = shapes["freqs_sin"] = (cfg.max_seq_len, cfg.head_dim // 2)
    entries, offset = [], header.header_bytes
    for name, quantized in _bin_order(cfg, header.version):
        numel = math.prod(shapes[name])
        if quantized:
            if numel % header.group_size:
                raise ValueError(f"{where}: group_size {header.group_size} does not divide tensor {name} "
                                 f"({numel} values)")
            nbytes = numel + 4 * (numel // header.group_size)
        else:
            nbytes = 4 * numel
        entries.append(_BinEntry(name, shapes[name], numel, quantized, offset, nbytes))
        offset += nbytes
    return entries


@contextlib.contextmanager
def _open_llama2c_bin(path: Path) -> Iterator[_Source]:
    header = read_llama2c_header(path)
    cfg = header.config(str(path))
    layout = _bin_layout(header, cfg, str(path))
    expected = layout[-1].offset + layout[-1].nbytes
    actual = path.stat().st_size
    if actual != expected:
        problem = "truncated" if actual < expected else f"{actual - expected} unexpected trailing bytes"
        raise ValueError(f"{path}: corrupt llama2.c v{header.version} checkpoint ({problem}: its header "
                         f"({cfg.n_layers} layers, dim {cfg.dim}, vocab {cfg.vocab_size}) needs {expected} bytes, "
                         f"the file has {actual})")
    by_name = {e.name: e for e in layout if not e.name.startswith("freqs_")}
    with open(path, "rb") as f:
        def fetch(name: str) -> torch.Tensor:
            e = by_name[name]
            if not e.quantized:
                return torch.from_numpy(_read_array(f, e.offset, e.numel, "<f4", path)).reshape(e.shape)
            q = torch.from_numpy(_read_array(f, e.offset, e.numel, "i1", path))
            scales = torch.from_numpy(_read_array(f, e.offset + e.numel, e.numel // header.group_size, "<f4", path))
            return (q.float().reshape(-1, header.group_size) * scales[:, None]).reshape(e.shape)

        yield _Source(cfg, list(by_name), fetch, interleaved=True)


def _read_array(f, offset: int, count: int, dtype: str, path: Path) -> np.ndarray:
    array = np.empty(count, dtype=np.dtype(dtype))
    f.seek(offset)
    if f.readinto(memoryview(array).cast("B")) != array.nbytes:
        raise ValueError(f"{path}: truncated while reading at byte {offset}")
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    return array


# ============================================================================ saving
def save(
    model: Transformer,
    path: PathLike,
    format: str = "native",
    *,
    max_shard_bytes: Optional[int] = None,
    group_size: Optional[int] = None,
    metadata: Optional[dict[str, Any]] = None,
) -> Path:
    """Write `model` to `path` in `format` (one of FORMATS) atomically; returns the path.

    Directory formats (native, hf) write into `path`, keeping unrelated files already there.
    max_shard_bytes (hf): split the weights into shards of at most this many bytes (a tensor
    larger than that gets a shard of its own). group_size (llama2c-bin-v2): the Q8_0 group; by
    default 64, halved until it divides dim, as llama2.c does. metadata (native): JSON-able
    information stored in config.json. A model with 4-bit layers (llama.quantize) is written
    only as native.
    """
    if format not in FORMATS:
        raise ValueError(f"format: expected one of {', '.join(FORMATS)}, got {format!r}")
    for option, value, applies in (("max_shard_bytes", max_shard_bytes, "hf"),
                                   ("group_size", group_size, "llama2c-bin-v2"),
                                   ("metadata", metadata, "native")):
        if value is not None and format != applies:
            raise ValueError(f"{option}: applies only to format {applies!r}, not {format!r}")
    if max_shard_bytes is not None and (not isinstance(max_shard_bytes, int) or max_shard_bytes <= 0):
        raise ValueError(f"max_shard_bytes: expected a positive integer, got {max_shard_bytes!r}")
    cfg = model.config
    _check_representable(cfg, format)
    from .quantize import quantization_info

    quantization = quantization_info(model)
    if quantization is not None and format != "native":
        raise ValueError(f"format: {format!r} cannot hold a model with 4-bit layers "
                         f"({len(quantization['layers'])} of them); save it as 'native'")
    path = Path(path)
    state = {name: t.detach() for name, t in model.state_dict().items()}
    if format == "native":
        _save_native(state, cfg, path, metadata, quantization)
    elif format == "hf":
        _save_hf(state, cfg, path, max_shard_bytes)
    elif format in ("llama2c-pt", "minllama-pt"):
        _save_pt(state, cfg, path, format)
    else:
        _save_bin(state, cfg, path, int(format[-1]), group_size)
    return path


def _check_representable(cfg: ModelConfig, fmt: str) -> None:
    problems = []
    if fmt != "native":
        if cfg.norm != "rms":
            problems.append(f"norm {cfg.norm!r} (only 'rms')")
        if cfg.mlp != "swiglu":
            problems.append(f"mlp {cfg.mlp!r} (only 'swiglu')")
    if fmt not in ("native", "hf"):
        if cfg.rope_theta != LLAMA2C_ROPE_THETA:
            problems.append(f"rope_theta {cfg.rope_theta} (fixed at {LLAMA2C_ROPE_THETA})")
        if cfg.rope_scaling != "none":
            problems.append(f"rope_scaling {cfg.rope_scaling!r} (none only)")
    if fmt.startswith("llama2c-bin") and cfg.norm_eps != LLAMA2C_NORM_EPS:
        problems.append(f"norm_eps {cfg.norm_eps} (run.c uses {LLAMA2C_NORM_EPS})")
    if fmt == "minllama-pt" and not cfg.tie_embeddings:
        problems.append("untied output layer (minllama always ties it to the embedding)")
    if problems:
        raise ValueError(f"format {fmt!r} cannot represent this model: {'; '.join(problems)}; "
                         "save as 'native' (or 'hf') instead")


def _dense(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors that own their memory, the tied output left out (safetensors refuses
    shared storage; weights joined for decoding are views of one tensor, see join_projections)."""
    out = {}
    for name, t in state.items():
        if cfg.tie_embeddings and name == "output.weight":
            continue
        t = t.to("cpu").contiguous()
        out[name] = t if t.untyped_storage().nbytes() == t.nbytes else t.clone()
    return out


def _dtype_name(state: dict[str, torch.Tensor]) -> str:
    return str(state["tok_embeddings.weight"].dtype).removeprefix("torch.")


def _save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    _safetensors_save_file(tensors, str(path), metadata={"format": "pt"})


def _json_writer(obj: dict[str, Any]) -> Callable[[Path], None]:
    text = json.dumps(obj, indent=2, sort_keys=False) + "\n"
    return lambda p: p.write_text(text, encoding="utf-8")


def _is_weights_file(name: str) -> bool:
    return name in (SAFETENSORS, SAFETENSORS_INDEX) or _SHARD_RE.fullmatch(name) is not None


def _save_native(state: dict[str, torch.Tensor], cfg: ModelConfig, path: Path,
                 metadata: Optional[dict[str, Any]], quantization: Optional[dict[str, Any]] = None) -> None:
    tensors = _dense(state, cfg)
    config = {
        "format": NATIVE_FORMAT,
        "version": NATIVE_VERSION,
        "weights": "dense" if quantization is None else quantization["format"],
        "dtype": _dtype_name(state),
        "model": cfg.to_dict(),
        **({} if quantization is None else {"quantization": quantization}),
        "metadata": metadata or {},
    }
    try:
        config_writer = _json_writer(config)
    except TypeError as e:
        raise ValueError(f"metadata: not JSON-serializable ({e})") from None
    _write_dir(path, {SAFETENSORS: lambda p: _save_safetensors(tensors, p), CONFIG_JSON: config_writer})


def _hf_config(cfg: ModelConfig, dtype: str) -> dict[str, Any]:
    rope_parameters: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    rope_scaling = None
    if cfg.rope_scaling != "none":
        rope_parameters.update(rope_type=cfg.rope_scaling, factor=cfg.rope_scaling_factor)
        rope_scaling = {"type": cfg.rope_scaling, "rope_type": cfg.rope_scaling, "factor": cfg.rope_scaling_factor}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "max_position_embeddings": cfg.max_seq_len,
        "rope_theta": cfg.rope_theta,       # transformers 4.x
        "rope_scaling": rope_scaling,       # transformers 4.x
        "rope_parameters": rope_parameters,  # transformers 5.x
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": cfg.attn_dropout,
        "torch_dtype": dtype,
    }


def _save_hf(state: dict[str, torch.Tensor], cfg: ModelConfig, path: Path, max_shard_bytes: Optional[int]) -> None:
    tensors = {_hf_name(name): t for name, t in _dense(state, cfg).items()}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if max_shard_bytes is not None and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    files: dict[str, Callable[[Path], None]] = {}
    if len(shards) == 1:
        files[SAFETENSORS] = lambda p: _save_safetensors(tensors, p)
    else:
        weight_map = {}
        for k, shard in enumerate(shards, start=1):
            filename = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
            files[filename] = lambda p, shard=shard: _save_safetensors(shard, p)
            weight_map.update(dict.fromkeys(shard, filename))
        files[SAFETENSORS_INDEX] = _json_writer({"metadata": {"total_size": total}, "weight_map": weight_map})
    files[CONFIG_JSON] = _json_writer(_hf_config(cfg, _dtype_name(state)))
    _write_dir(path, files)


def _save_pt(state: dict[str, torch.Tensor], cfg: ModelConfig, path: Path, fmt: str) -> None:
    state = _to_interleaved({name: t.to("cpu") for name, t in state.items()}, cfg)
    if cfg.tie_embeddings:  # both names, one storage: what llama2.c's state_dict() holds
        state["output.weight"] = state["tok_embeddings.weight"]
    args: dict[str, Any] = {
        "dim": cfg.dim, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads,
        "vocab_size": cfg.vocab_size, "hidden_dim": cfg.hidden_dim, "multiple_of": cfg.multiple_of,
        "norm_eps": cfg.norm_eps, "max_seq_len": cfg.max_seq_len, "dropout": cfg.dropout,
    }
    if fmt == "minllama-pt":
        args["layer_norm_eps"] = args.pop("norm_eps")
        renamed = {}
        for name, t in state.items():
            m = _LAYER_RE.fullmatch(name)
            renamed[f"layers.{m[1]}.{_MINLLAMA_NAMES[m[2]]}" if m and m[2] in _MINLLAMA_NAMES else name] = t
        state = renamed
    checkpoint = {"model": state, "model_args": args}
    with _atomic_file(path) as tmp:
        torch.save(checkpoint, tmp)


def _v2_group_size(cfg: ModelConfig, requested: Optional[int]) -> int:
    if requested is None:
        group_size = DEFAULT_GROUP_SIZE
        while cfg.dim % group_size:
            group_size //= 2
        return group_size
    if not isinstance(requested, int) or requested <= 0:
        raise ValueError(f"group_size: expected a positive integer, got {requested!r}")
    if cfg.dim % requested:  # every quantized tensor has dim as a factor of its size
        raise ValueError(f"group_size: {requested} does not divide dim {cfg.dim}, so not every tensor "
                         "splits into groups")
    return requested


def _save_bin(state: dict[str, torch.Tensor], cfg: ModelConfig, path: Path, version: int,
              group_size: Optional[int]) -> None:
    header = Llama2cHeader(
        version, cfg.dim, cfg.hidden_dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.vocab_size, cfg.max_seq_len,
        shared_classifier=cfg.tie_embeddings, group_size=_v2_group_size(cfg, group_size) if version == 2 else None,
    )
    tensors = dict(state)
    if version == 0:
        tensors["freqs_cos"], tensors["freqs_sin"] = rope_tables(cfg, cfg.max_seq_len)
    layout = _bin_layout(header, cfg, str(path))
    with _atomic_file(path) as tmp, open(tmp, "wb") as f:
        f.write(header.pack())
        for entry in layout:
            t = tensors[entry.name]
            if entry.name.endswith("attention.wq.weight"):
                t = permute_half_to_interleaved(t, cfg.n_heads)
            elif entry.name.endswith("attention.wk.weight"):
                t = permute_half_to_interleaved(t, cfg.n_kv_heads)
            if entry.quantized:
                q, scales = _quantize_q80(t, header.group_size)
                f.write(memoryview(q.numpy()))
                _write_f32(f, scales)
            else:
                _write_f32(f, t)


def _quantize_q80(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per group: scale = max|w| / 127, q = round(w / scale); an all-zero group
    gets scale 0 and q 0."""
    groups = w.detach().to("cpu", torch.float32).reshape(-1, group_size)
    scales = groups.abs().amax(dim=1) / 127.0
    divisor = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round(groups / divisor[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.reshape(-1), scales


def _write_f32(f, t: torch.Tensor) -> None:
    array = np.ascontiguousarray(t.detach().to("cpu", torch.float32).numpy(), dtype="<f4")
    f.write(memoryview(array).cast("B"))


# ---------------------------------------------------------------------------- atomic writes
def _fsync(path: Path) -> None:
    """Flush a written file to disk."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    """Flush a directory's entries (renames) to disk, where the platform allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _make_tmp(directory: Path, name: str) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    os.close(fd)
    return Path(tmp)


@contextlib.contextmanager
def _atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; once the body has written it, fsync it and rename it
    over `path`. If the body fails, the temporary file is removed and `path` is untouched."""
    if path.is_dir():
        raise ValueError(f"{path}: is a directory; this format is a single file")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _make_tmp(path.parent, path.name)
    try:
        yield tmp
        _fsync(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _write_dir(path: Path, files: dict[str, Callable[[Path], None]]) -> None:
    """Write `files` (name -> writer) into directory `path` so that a failure leaves what was
    there before.

    A new directory is assembled under a temporary name and renamed into place. In an existing
    directory every file is first written in full beside its final name, then the files are
    renamed into place in order (weights first, config.json last), and weight files of an
    earlier save that the new one does not use are removed; other files there are kept.
    """
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path}: exists and is not a directory; this format is a directory")
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        try:
            for name, write in files.items():
                write(staging / name)
                _fsync(staging / name)
                os.chmod(staging / name, 0o666 & ~_UMASK)
            os.chmod(staging, 0o777 & ~_UMASK)
            _fsync_dir(staging)
            os.rename(staging, path)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        _fsync_dir(path.parent)
        return

    staged: list[tuple[Path, Path]] = []
    try:
        for name, write in files.items():
            tmp = _make_tmp(path, name)
            staged.append((tmp, path / name))
            write(tmp)
            _fsync(tmp)
            os.chmod(tmp, 0o666 & ~_UMASK)
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise
    for tmp, final in staged:
        os.replace(tmp, final)
    for old in path.iterdir():
        if _is_weights_file(old.name) and old.name not in files:
            old.unlink()
    _fsync_dir(path)
