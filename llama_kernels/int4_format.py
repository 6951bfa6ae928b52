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
without shuffles. K must be a multiple of the group size (and so of 32). The CPU kernel's
int8-activation path (llama_kernels/cpu/int4_matmul.py) takes this layout as it is: masking and
shifting 16C bytes gives the low and high codes of C chunks, and x is stored in that order, so
the unsigned codes meet int8 x in byte dot products (vpdpbusd) with no repacking.
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

    def __post_init__(self) -> None:
        self.validate()
        self._explain_lut("qw")  # derived from format and device, not a field: checked here, once
        if not isinstance(self.dtype, torch.dtype) or not self.dtype.is_floating_point:
            raise TypeError(f"qw.dtype: expected a floating-point torch.dtype, got {self.dtype!r}")
        if self.double_quant is not None and not isinstance(self.double_quant, dict):
            raise TypeError(f"qw.double_quant: expected None or a dict of tensors, got {type(self.double_quant).__name__}")

    def validate(self, name: str = "qw") -> None:
        """Raise ValueError/TypeError naming the field if this object is not one the kernels can
        take: packed uint8 (N, K/2) contiguous; scales (and zeros, which int4 needs and NF4 has
        none of) SCALE_DTYPE (N, K/group_size) contiguous; one device; shape == (N, K), K > 0.
        Run at construction and again by the ops (fields can be reassigned): it reads only
        attributes (dtype, shape, strides, device), never data, so it costs about a microsecond."""
        packed, scales, zeros, group_size = self.packed, self.scales, self.zeros, self.group_size
        try:  # the fast path, for a valid object: one expression, no messages built
            rows, half = packed.shape
            k = half * 2
            if (packed.dtype is torch.uint8 and scales.dtype is SCALE_DTYPE and packed.is_contiguous()
                    and scales.is_contiguous() and type(group_size) is int and group_size in GROUP_SIZES
                    and k and not k % group_size and self.shape == (rows, k) and type(self.shape) in (tuple, torch.Size)
                    and scales.shape == (rows, k // group_size) and scales.device == packed.device
                    and (zeros is None if self.format == "nf4" else
                         (self.format == "int4" and zeros is not None and zeros.dtype is SCALE_DTYPE
                          and zeros.shape == scales.shape and zeros.is_contiguous() and zeros.device == packed.device))):
                return
        except Exception:
            pass
        self._explain(name)

    def _explain(self, name: str) -> None:
        """validate()'s slow path: raise the error that names the first bad field."""
        fmt, group_size, packed, scales, zeros = self.format, self.group_size, self.packed, self.scales, self.zeros
        if fmt not in FORMATS:
            raise ValueError(f"{name}.format: expected one of {FORMATS}, got {fmt!r}")
        if type(group_size) is not int or group_size not in GROUP_SIZES:
            raise ValueError(f"{name}.group_size: expected one of {GROUP_SIZES}, got {group_size!r}")
        if not isinstance(packed, torch.Tensor):
            raise TypeError(f"{name}.packed: expected a torch.Tensor, got {type(packed).__name__}")
        if packed.dtype != torch.uint8:
            raise TypeError(f"{name}.packed: expected uint8, got {str(packed.dtype).replace('torch.', '')}")
        if packed.dim() != 2:
            raise ValueError(f"{name}.packed: expected 2-D (N, K/2), got shape {tuple(packed.shape)}")
        if not packed.is_contiguous():
            raise ValueError(f"{name}.packed: expected a contiguous tensor, got strides {packed.stride()}")
        n, k = packed.shape[0], packed.shape[1] * 2
        shape = self.shape
        if (type(shape) not in (tuple, torch.Size) or len(shape) != 2 or shape[0] != n or shape[1] != k):
            raise ValueError(f"{name}.shape: expected (N, K) = {(n, k)} to match packed {tuple(packed.shape)}, "
                             f"got {shape!r}")
        if k == 0 or k % group_size:
            raise ValueError(f"{name}.shape: in_features {k} must be a positive multiple of group_size {group_size}")
        groups = (n, k // group_size)
        _check_scale_like(f"{name}.scales", scales, groups, packed.device)
        if fmt == "int4":
            if zeros is None:
                raise ValueError(f"{name}.zeros: int4 needs zeros, got None")
            _check_scale_like(f"{name}.zeros", zeros, groups, packed.device)
        elif zeros is not None:
            raise ValueError(f"{name}.zeros: nf4 has no zeros, got a tensor of shape {tuple(getattr(zeros, 'shape', ()))}")
        self._explain_lut(name)
        raise ValueError(f"{name}: not a QuantizedWeight the kernels can take")  # not reached

    def _explain_lut(self, name: str) -> None:
        lut = device_lut(self.format, self.packed.device)
        if lut.dtype != torch.float32 or lut.shape != (16,) or lut.device != self.packed.device:
            raise ValueError(f"{name}.lut: expected float32 (16,) on {self.packed.device}, "
                             f"got {lut.dtype} {tuple(lut.shape)} on {lut.device}")

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
        self.validate()
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


def _check_scale_like(name: str, t, groups: tuple[int, int], device: torch.device) -> None:
    """scales/zeros: SCALE_DTYPE, contiguous, shape (N, K/group_size), on packed's device."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype != SCALE_DTYPE:
        raise TypeError(f"{name}: expected {str(SCALE_DTYPE).replace('torch.', '')}, got {str(t.dtype).replace('torch.', '')}")
    if t.shape != groups:
        raise ValueError(f"{name}: expected shape {groups} (N, K/group_size), got {tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor, got strides {t.stride()}")
    if t.device != device:
        raise ValueError(f"{name}: is on {t.device} but packed is on {device}")


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
    if k == 0:
        raise ValueError(f"{name}: in_features is 0; a 4-bit weight needs at least one group of {group_size}")
    if k % group_size:
        raise ValueError(f"{name}: in_features {k} is not a multiple of group_size {group_size}")
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"{name}: contains non-finite values (nan or inf), which no 4-bit format holds")
    return n, k


def _check_fits(w: torch.Tensor, fmt: str, *stored: torch.Tensor, name: str = "w") -> None:
    """Refuse weights whose fp16 scales (or zeros) overflowed: they would dequantize to inf/NaN."""
    if all(bool(torch.isfinite(t).all()) for t in stored):
        return
    largest = w.detach().abs().max().item()
    raise ValueError(f"{name}: magnitudes up to {largest:g} overflow the float16 scales of {fmt}; the format "
                     f"holds weights up to {torch.finfo(SCALE_DTYPE).max:g} in magnitude")


def quantize_int4(w: torch.Tensor, group_size: int = 128) -> QuantizedWeight:
    """Asymmetric int4 with a scale and a zero per group of `group_size` input elements."""
    n, k = _check_weight(w, group_size)
    g = w.detach().float().reshape(n, k // group_size, group_size)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    scale = ((hi - lo) / 15).clamp_min(1e-8).to(SCALE_DTYPE)
    zero = (lo + 8 * scale.float()).to(SCALE_DTYPE)
    _check_fits(w, "int4", scale, zero)
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
    _check_fits(w, "nf4", scale)
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
