"""llama2.c's `.bin` exports for its C inference code run.c (formats llama2c-bin-v0, -v1, -v2).

Layout
------
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
wq/wk rows use interleaved RoPE pairs (permuted on the way in and out, see llama.formats.common).

Assumptions
-----------
* The files have no fields for rope_theta, RoPE scaling or norm_eps: they are read as 10000,
  none and 1e-5 (run.c's values), and writing a model that differs from those is refused, as is
  writing a LayerNorm or GELU variant. dropout and attn_dropout, training settings, are dropped.
* A file's size must be exactly what its header implies: a truncated file, or one with trailing
  bytes, is refused. The size is computed from the header alone and compared with the file's
  before anything is built or allocated for it, so a header that declares a huge model costs
  no more than a small one.
"""
from __future__ import annotations

import contextlib
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from ..atomic import atomic_file
from ..config import ModelConfig
from ..model import build, rope_tables
from .common import PathLike, Source, make_config, permute_half_to_interleaved, regular_file_size

LLAMA2C_MAGIC = 0x616B3432
LLAMA2C_HEADER_BYTES = 256
LLAMA2C_NORM_EPS = 1e-5  # run.c hard-codes it
LLAMA2C_ROPE_THETA = 10000.0
DEFAULT_GROUP_SIZE = 64  # export.py's default for version 2


def plausible_v0(values: tuple[int, ...]) -> bool:
    """Whether 7 int32 read from a file's start can be a v0 header (which has no magic number)."""
    dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, max_seq_len = values
    if not all(0 < v < 1 << 24 for v in (dim, hidden_dim, n_layers, n_heads, n_kv_heads, abs(vocab_size), max_seq_len)):
        return False
    return dim % n_heads == 0 and n_heads % n_kv_heads == 0 and (dim // n_heads) % 2 == 0


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
        return make_config(
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
    regular_file_size(path, "llama2.c .bin file")
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
    if len(head) < 28 or not plausible_v0(struct.unpack_from("<7i", head)):
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


def _tensor_bytes(header: Llama2cHeader, name: str, numel: int, quantized: bool, where: str) -> int:
    if not quantized:
        return 4 * numel
    if numel % header.group_size:
        raise ValueError(f"{where}: group_size {header.group_size} does not divide tensor {name} ({numel} values)")
    return numel + 4 * (numel // header.group_size)


def expected_bin_bytes(header: Llama2cHeader, cfg: ModelConfig, where: str) -> int:
    """The size in bytes a .bin file with this header has, in Python ints from the header alone:
    nothing is allocated for what the header declares before the file is known to hold it."""
    d, h, kv, v, n = cfg.dim, cfg.hidden_dim, cfg.n_kv_heads * cfg.head_dim, cfg.vocab_size, cfg.n_layers
    q = header.version == 2
    # (name, numel, count, quantized) for each kind of tensor; the names are for error messages
    kinds = [("attention_norm/ffn_norm", d, 2 * n, False), ("norm.weight", d, 1, False),
             ("tok_embeddings.weight", v * d, 1, q),
             ("attention.wq/wo", d * d, 2 * n, q), ("attention.wk/wv", kv * d, 2 * n, q),
             ("feed_forward.w1/w2/w3", h * d, 3 * n, q)]
    if not cfg.tie_embeddings:
        kinds.append(("output.weight", v * d, 1, q))
    if header.version == 0:
        kinds.append(("freq_cis_real/imag", cfg.max_seq_len * (cfg.head_dim // 2), 2, False))
    return header.header_bytes + sum(count * _tensor_bytes(header, name, numel, quantized, where)
                                     for name, numel, count, quantized in kinds)


def _bin_layout(header: Llama2cHeader, cfg: ModelConfig, where: str) -> list[_BinEntry]:
    shapes = {name: tuple(t.shape) for name, t in build(cfg, init=False).state_dict().items()}
    shapes["freqs_cos"] = shapes["freqs_sin"] = (cfg.max_seq_len, cfg.head_dim // 2)
    entries, offset = [], header.header_bytes
    for name, quantized in _bin_order(cfg, header.version):
        numel = math.prod(shapes[name])
        nbytes = _tensor_bytes(header, name, numel, quantized, where)
        entries.append(_BinEntry(name, shapes[name], numel, quantized, offset, nbytes))
        offset += nbytes
    return entries


@contextlib.contextmanager
def open_llama2c_bin(path: Path) -> Iterator[Source]:
    """The tensors and config of the .bin file `path`, read on demand (v2 dequantized to fp32)."""
    header = read_llama2c_header(path)
    cfg = header.config(str(path))
    # The header's sizes are checked against the file's bytes before anything is built for them.
    expected = expected_bin_bytes(header, cfg, str(path))
    actual = regular_file_size(path, "llama2.c .bin file")
    if actual != expected:
        problem = "truncated" if actual < expected else f"{actual - expected} unexpected trailing bytes"
        raise ValueError(f"{path}: corrupt llama2.c v{header.version} checkpoint ({problem}: its header "
                         f"(n_layers {cfg.n_layers}, dim {cfg.dim}, hidden_dim {cfg.hidden_dim}, vocab_size "
                         f"{cfg.vocab_size}, max_seq_len {cfg.max_seq_len}) needs {expected} bytes, the file "
                         f"has {actual})")
    layout = _bin_layout(header, cfg, str(path))
    if layout[-1].offset + layout[-1].nbytes != expected:
        raise AssertionError(f"{path}: layout and expected size disagree")
    by_name = {e.name: e for e in layout if not e.name.startswith("freqs_")}
    with open(path, "rb") as f:
        def fetch(name: str) -> torch.Tensor:
            e = by_name[name]
            if not e.quantized:
                return torch.from_numpy(_read_array(f, e.offset, e.numel, "<f4", path)).reshape(e.shape)
            q = torch.from_numpy(_read_array(f, e.offset, e.numel, "i1", path))
            scales = torch.from_numpy(_read_array(f, e.offset + e.numel, e.numel // header.group_size, "<f4", path))
            return (q.float().reshape(-1, header.group_size) * scales[:, None]).reshape(e.shape)

        yield Source(cfg, list(by_name), fetch, interleaved=True)


def _read_array(f, offset: int, count: int, dtype: str, path: Path) -> np.ndarray:
    array = np.empty(count, dtype=np.dtype(dtype))
    f.seek(offset)
    if f.readinto(memoryview(array).cast("B")) != array.nbytes:
        raise ValueError(f"{path}: truncated while reading at byte {offset}")
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    return array


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


def save_bin(state: dict[str, torch.Tensor], cfg: ModelConfig, path: Path, version: int,
             group_size: Optional[int]) -> None:
    """Write `state` as a llama2.c .bin file of `version` at `path`, atomically."""
    header = Llama2cHeader(
        version, cfg.dim, cfg.hidden_dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.vocab_size, cfg.max_seq_len,
        shared_classifier=cfg.tie_embeddings, group_size=_v2_group_size(cfg, group_size) if version == 2 else None,
    )
    tensors = dict(state)
    if version == 0:
        tensors["freqs_cos"], tensors["freqs_sin"] = rope_tables(cfg, cfg.max_seq_len)
    layout = _bin_layout(header, cfg, str(path))
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
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
