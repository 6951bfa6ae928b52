"""The 4-bit weight formats, int4 and NF4: constants, code books, QuantizedWeight, packing,
quantization and NF4 double quantization. torch only: nothing else of llama_kernels is imported
here, so the op (llama_kernels/ops/int4_matmul.py), its backends and the Triton kernels all build
on this module.

Formats (both store 16 codes per 4-bit value; a group is `group_size` consecutive input
elements of one output row):

* **int4** (asymmetric): w ~ (q - 8) * scale + zero, one scale and one zero per group of
  32, 64 or 128. `zero` is the weight value of the middle code, so it is a float, as in tinygemm.
* **NF4** (QLoRA): w ~ NF4[q] * absmax, one absmax per block of 64 (any of 32/64/128 allowed).
  With double quantization the absmax values are stored as int8 around their mean, with one
  fp32 scale per 256 of them; they are decoded once to the kernels' fp16 scales.

Both reduce to one kernel contract: w = lut[q] * scale (+ zero), where lut is the 16-entry
table of the format (q - 8 for int4, the NF4 code book for NF4); `dequantize_reference` is that
contract in PyTorch.

Packed layout (`packed`, uint8, shape (N, K/2)): each row is cut into chunks of 32 codes, and
byte j of a chunk holds code j in its low nibble and code j + 16 in its high nibble. One
16-byte load thus yields two contiguous runs of 16 codes, which SIMD and GPU kernels widen
without shuffles. K must be a multiple of the group size (and so of 32).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

import torch

FORMATS = ("int4", "nf4")
GROUP_SIZES = (32, 64, 128)
SCALE_DTYPE = torch.float16
DOUBLE_QUANT_BLOCK = 256


def _nf4_code() -> torch.Tensor:
    """The NF4 code book: quantiles of N(0, 1) with an exact zero, scaled to [-1, 1] (QLoRA)."""
    offset = 0.9677083  # the outermost quantile, chosen so that the tails are not wasted
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    values = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg])
    return (values / values.abs().max()).sort().values.float()


NF4_CODE = _nf4_code()
INT4_LUT = torch.arange(16, dtype=torch.float32) - 8


_LUTS: dict[tuple[str, torch.device], torch.Tensor] = {}


def device_lut(fmt: str, device: torch.device) -> torch.Tensor:
    """The 16-entry value table of a format, kept once per device (a dict, which torch.compile
    reads without complaint, unlike an lru_cache)."""
    key = (fmt, device)
    if key not in _LUTS:
        _LUTS[key] = (INT4_LUT if fmt == "int4" else NF4_CODE).to(device)
    return _LUTS[key]


@dataclass
class QuantizedWeight:
    """A frozen (N, K) weight in 4 bits. `scales`/`zeros` are (N, K / group_size) in fp16."""

    format: str
    packed: torch.Tensor
    scales: torch.Tensor
    zeros: Optional[torch.Tensor]
    group_size: int
    shape: tuple[int, int]
    dtype: torch.dtype = torch.float32  # of the weight it came from; dequantize()'s default
    # NF4 double quantization, as stored: int8 absmax offsets, fp32 scale per 256, fp32 mean.
    double_quant: Optional[dict[str, torch.Tensor]] = field(default=None, repr=False)

    @property
    def lut(self) -> torch.Tensor:
        return device_lut(self.format, self.packed.device)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """llama_kernels.dequantize(self, dtype), by default in the dtype the weight came from. It
        runs as the op llama_kernels::int4_dequantize, which llama_kernels registers on import:
        this module imports nothing of the package, so it names the op rather than the function."""
        return torch.ops.llama_kernels.int4_dequantize(self.packed, self.scales, self.zeros, self.lut,
                                                       self.group_size, dtype or self.dtype)

    def to(self, device) -> "QuantizedWeight":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        dq = None if self.double_quant is None else {k: v.to(device) for k, v in self.double_quant.items()}
        return replace(self, packed=move(self.packed), scales=move(self.scales), zeros=move(self.zeros), double_quant=dq)

    def nbytes(self) -> int:
        """Bytes held for the kernels (packed codes, scales, zeros)."""
        tensors = [self.packed, self.scales] + ([self.zeros] if self.zeros is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)


# ----------------------------------------------------------------------------- packing
def pack_codes(q: torch.Tensor) -> torch.Tensor:
    """(N, K) codes in [0, 16) -> (N, K/2) uint8 in the chunk-of-32 layout above."""
    n, k = q.shape
    chunks = q.to(torch.uint8).reshape(n, k // 32, 2, 16)
    return (chunks[:, :, 0] | (chunks[:, :, 1] << 4)).reshape(n, k // 2)


def unpack_codes(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_codes: (N, K/2) uint8 -> (N, K) int64 codes."""
    n, half = packed.shape
    b = packed.reshape(n, half // 16, 16).to(torch.int64)
    return torch.stack([b & 0xF, b >> 4], dim=2).reshape(n, half * 2)


# ----------------------------------------------------------------------------- quantization
def _check_weight(w: torch.Tensor, group_size: int, name: str = "w") -> tuple[int, int]:
    if not isinstance(w, torch.Tensor) or not w.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {getattr(w, 'dtype', type(w).__name__)}")
    if w.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D (out_features, in_features) weight, got shape {tuple(w.shape)}")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size: expected one of {GROUP_SIZES}, got {group_size}")
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"{name}: in_features {k} is not a multiple of group_size {group_size}")
    return n, k


def quantize_int4(w: torch.Tensor, group_size: int = 128) -> QuantizedWeight:
    """Asymmetric int4 with a scale and a zero per group of `group_size` input elements."""
    n, k = _check_weight(w, group_size)
    g = w.detach().float().reshape(n, k // group_size, group_size)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    scale = ((hi - lo) / 15).clamp_min(1e-8).to(SCALE_DTYPE)
    zero = (lo + 8 * scale.float()).to(SCALE_DTYPE)
    s, z = scale.float()[..., None], zero.float()[..., None]
    q = torch.round((g - z) / s + 8).clamp_(0, 15).reshape(n, k)
    return QuantizedWeight("int4", pack_codes(q), scale, zero, group_size, (n, k), w.dtype)


def quantize_nf4(w: torch.Tensor, block_size: int = 64, double_quant: bool = False) -> QuantizedWeight:
    """NF4 with an absmax per block of `block_size`; `double_quant` stores the absmax values in 8 bits."""
    n, k = _check_weight(w, block_size)
    g = w.detach().float().reshape(n, k // block_size, block_size)
    absmax = g.abs().amax(dim=-1).clamp_min(1e-8)
    stored = None
    if double_quant:
        stored = double_quantize(absmax.reshape(-1))
        absmax = double_dequantize(stored, absmax.shape)
    scale = absmax.to(SCALE_DTYPE)
    code = NF4_CODE.to(w.device)
    normalized = g / scale.float()[..., None]
    # The nearest code: the code book is sorted, so it is the bucket between midpoints (a tie
    # goes to the lower code, as argmin over the 16 distances would; no 16x temporary).
    q = torch.bucketize(normalized, (code[1:] + code[:-1]) / 2).reshape(n, k)
    return QuantizedWeight("nf4", pack_codes(q), scale, None, block_size, (n, k), w.dtype, stored)


def double_quantize(absmax: torch.Tensor) -> dict[str, torch.Tensor]:
    """NF4 double quantization of the absmax values: int8 offsets from their mean, one fp32 step
    per DOUBLE_QUANT_BLOCK of them, as QuantizedWeight.double_quant stores them."""
    mean = absmax.mean()
    centered = absmax - mean
    pad = (-centered.numel()) % DOUBLE_QUANT_BLOCK
    blocks = torch.nn.functional.pad(centered, (0, pad)).reshape(-1, DOUBLE_QUANT_BLOCK)
    step = (blocks.abs().amax(dim=-1) / 127).clamp_min(1e-12)
    q8 = torch.round(blocks / step[:, None]).clamp_(-127, 127).to(torch.int8)
    return {"absmax_q": q8.reshape(-1)[: absmax.numel()], "absmax_step": step, "absmax_mean": mean.reshape(1)}


def double_dequantize(stored: dict[str, torch.Tensor], shape) -> torch.Tensor:
    """The absmax values (fp32, `shape`) that double_quantize() stored."""
    q8 = stored["absmax_q"].float()
    step = stored["absmax_step"].repeat_interleave(DOUBLE_QUANT_BLOCK)[: q8.numel()]
    return (q8 * step + stored["absmax_mean"]).reshape(shape)


# ----------------------------------------------------------------------------- reference
def dequantize_reference(packed, scales, zeros, lut, group_size) -> torch.Tensor:
    """The reference dequantization, w = lut[q] * scale (+ zero) in fp32 (the tests' oracle)."""
    n, k = packed.shape[0], packed.shape[1] * 2
    w = lut[unpack_codes(packed)].reshape(n, k // group_size, group_size) * scales.float()[..., None]
    if zeros is not None:
        w = w + zeros.float()[..., None]
    return w.reshape(n, k)
