"""4-bit weight-only quantization: int4 and NF4 group-quantized weights and their matmul.

Formats (both store 16 codes per 4-bit value; a group is `group_size` consecutive input
elements of one output row):

* **int4** (asymmetric): w ~ (q - 8) * scale + zero, one scale and one zero per group of
  32, 64 or 128. `zero` is the weight value of the middle code, so it is a float, as in tinygemm.
* **NF4** (QLoRA): w ~ NF4[q] * absmax, one absmax per block of 64 (any of 32/64/128 allowed).
  With double quantization the absmax values are stored as int8 around their mean, with one
  fp32 scale per 256 of them; they are decoded once to the kernels' fp16 scales.

Both reduce to one kernel contract: w = lut[q] * scale (+ zero), where lut is the 16-entry
table of the format (q - 8 for int4, the NF4 code book for NF4).

Packed layout (`packed`, uint8, shape (N, K/2)): each row is cut into chunks of 32 codes, and
byte j of a chunk holds code j in its low nibble and code j + 16 in its high nibble. One
16-byte load thus yields two contiguous runs of 16 codes, which SIMD and GPU kernels widen
without shuffles. K must be a multiple of the group size (and so of 32).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional, Sequence

import torch

from . import _dispatch

FORMATS = ("int4", "nf4")
GROUP_SIZES = (32, 64, 128)
SCALE_DTYPE = torch.float16
ACT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DOUBLE_QUANT_BLOCK = 256
# Rows up to which the C++ CPU kernel multiplies the 4-bit codes directly. Past it, the weight is
# dequantized (C++, into a scratch buffer) for a BLAS GEMM, whose efficiency grows with M while
# the kernel's cost per row stays flat; the two meet near 64 rows on the shapes measured.
MAX_CPU_ROWS = 64
# On CUDA: the tensor-core kernel up to 16 rows, the Triton GEMM below 128, dequantize + cuBLAS
# from 128 (crossovers measured on an H200, bench/results/int4_cuda_*.jsonl).
CUDA_MMA_MAX_ROWS = 16
CUDA_DEQUANT_MIN_ROWS = 128


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


def _lut(fmt: str, device: torch.device) -> torch.Tensor:
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
        return _lut(self.format, self.packed.device)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        return dequantize(self, dtype or self.dtype)

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
        stored = _double_quantize(absmax.reshape(-1))
        absmax = _double_dequantize(stored, absmax.shape)
    scale = absmax.to(SCALE_DTYPE)
    code = NF4_CODE.to(w.device)
    normalized = g / scale.float()[..., None]
    # The nearest code: the code book is sorted, so it is the bucket between midpoints (a tie
    # goes to the lower code, as argmin over the 16 distances would; no 16x temporary).
    q = torch.bucketize(normalized, (code[1:] + code[:-1]) / 2).reshape(n, k)
    return QuantizedWeight("nf4", pack_codes(q), scale, None, block_size, (n, k), w.dtype, stored)


def _double_quantize(absmax: torch.Tensor) -> dict[str, torch.Tensor]:
    mean = absmax.mean()
    centered = absmax - mean
    pad = (-centered.numel()) % DOUBLE_QUANT_BLOCK
    blocks = torch.nn.functional.pad(centered, (0, pad)).reshape(-1, DOUBLE_QUANT_BLOCK)
    step = (blocks.abs().amax(dim=-1) / 127).clamp_min(1e-12)
    q8 = torch.round(blocks / step[:, None]).clamp_(-127, 127).to(torch.int8)
    return {"absmax_q": q8.reshape(-1)[: absmax.numel()], "absmax_step": step, "absmax_mean": mean.reshape(1)}


def _double_dequantize(stored: dict[str, torch.Tensor], shape) -> torch.Tensor:
    q8 = stored["absmax_q"].float()
    step = stored["absmax_step"].repeat_interleave(DOUBLE_QUANT_BLOCK)[: q8.numel()]
    return (q8 * step + stored["absmax_mean"]).reshape(shape)


def dequantize(qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (N, K) weight the codes stand for, computed in fp32 (by the compiled kernels where
    they can take it, else by the PyTorch reference below)."""
    return _dequantize_fast(qw.packed, qw.scales, qw.zeros, qw.lut, qw.group_size, dtype)


def _dequantize_fast(packed, scales, zeros, lut, group_size, dtype) -> torch.Tensor:
    if torch.compiler.is_compiling():  # traced: the opaque op (its fake gives the shape)
        return dequantize_op(packed, scales, zeros, lut, group_size, dtype)
    return _dequantize_any(packed, scales, zeros, lut, group_size, dtype)


@torch.library.custom_op("llama_kernels::int4_dequantize", mutates_args=())
def dequantize_op(packed: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor], lut: torch.Tensor,
                  group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """The dequantized (N, K) weight in `dtype`, as one op for torch.compile and AOT autograd."""
    return _dequantize_any(packed, scales, zeros, lut, group_size, dtype)


@dequantize_op.register_fake
def _(packed, scales, zeros, lut, group_size, dtype):
    return packed.new_empty((packed.shape[0], packed.shape[1] * 2), dtype=dtype)


def _dequantize_any(packed, scales, zeros, lut, group_size, dtype) -> torch.Tensor:
    """The dequantized (N, K) weight in `dtype`: the C++ kernel on the CPU, the CUDA one for
    16-bit CUDA outputs, else the reference (also under a forced `torch` backend)."""
    forced = _dispatch.forced_backend()
    if forced != "torch" and _dispatch.capabilities().ext is not None and packed.dim() == 2:
        if packed.is_cpu and _dispatch.unavailable("cpu", packed.device) is None:
            return _cpu_dequantize(packed, scales, zeros, lut, group_size, dtype)
        if (packed.is_cuda and dtype in (torch.float16, torch.bfloat16)
                and _dispatch.unavailable("cuda", packed.device) is None):
            return _cuda_dequantize(packed, scales, zeros, lut, group_size, dtype)
    return _dequantize(packed, scales, zeros, lut, group_size).to(dtype)


def _cpu_dequantize(packed, scales, zeros, lut, group_size, dtype) -> torch.Tensor:
    w = torch.empty((packed.shape[0], packed.shape[1] * 2), dtype=dtype)
    _cpu_dequantize_into(packed, scales, zeros, lut, group_size, w)
    return w


def _cpu_dequantize_into(packed, scales, zeros, lut, group_size, w) -> None:
    """Writes the dequantized rows into w (contiguous, fp32/fp16/bf16)."""
    n, k = packed.shape[0], packed.shape[1] * 2
    packed, scales = packed.contiguous(), scales.contiguous()
    zeros = None if zeros is None else zeros.contiguous()
    _dispatch.ext().int4_dequantize_cpu(
        packed.data_ptr(), scales.data_ptr(), 0 if zeros is None else zeros.data_ptr(), lut.contiguous().data_ptr(),
        w.data_ptr(), n, k, group_size, _dispatch.DTYPE_CODES[w.dtype], torch.get_num_threads(),
    )


def _dequantize(packed, scales, zeros, lut, group_size) -> torch.Tensor:
    """The reference dequantization, in fp32 (the tests' oracle)."""
    n, k = packed.shape[0], packed.shape[1] * 2
    w = lut[unpack_codes(packed)].reshape(n, k // group_size, group_size) * scales.float()[..., None]
    if zeros is not None:
        w = w + zeros.float()[..., None]
    return w.reshape(n, k)


# ----------------------------------------------------------------------------- matmul
def int4_matmul_reference(x: torch.Tensor, qw: QuantizedWeight, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The oracle: x @ dequantize(W)^T (+ bias) in fp32, result in x's dtype."""
    y = x.float() @ _dequantize(qw.packed, qw.scales, qw.zeros, qw.lut, qw.group_size).t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def check_inputs(x: torch.Tensor, qw: QuantizedWeight, bias: Optional[torch.Tensor]) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if not isinstance(qw, QuantizedWeight):
        raise TypeError(f"qw: expected a QuantizedWeight (from quantize_int4/quantize_nf4), got {type(qw).__name__}")
    if x.dtype not in ACT_DTYPES:
        raise TypeError(f"x: dtype must be float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != qw.shape[1]:
        raise ValueError(f"x: last dim must equal the weight's in_features {qw.shape[1]}, got shape {tuple(x.shape)}")
    if x.device != qw.device:
        raise ValueError(f"qw: is on {qw.device} but x is on {x.device}")
    if bias is not None:
        _check_bias(x, bias, qw.shape[0])


def _check_bias(x: torch.Tensor, bias: torch.Tensor, out_features: int) -> None:
    if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (out_features,):
        raise ValueError(f"bias: expected shape ({out_features},), got {tuple(getattr(bias, 'shape', ()))}")
    if bias.device != x.device:
        raise ValueError(f"bias: is on {bias.device} but x is on {x.device}")


def _cpu_parts(x2, parts, lut, group_size, ys):
    """One kernel call for several weights against the same x2: parts[p] = (packed, scales,
    zeros) writes ys[p] (all with one row stride)."""
    _cpu_call(x2, x2.shape[0], x2.stride(0), parts, lut, group_size, [y.data_ptr() for y in ys], ys[0].stride(0))


def _cpu_call(x, rows, x_stride, parts, lut, group_size, outs, y_stride):
    """The C++ kernel over `rows` rows of x (row stride x_stride, last dim contiguous): outs[p] is
    the address of part p's first output, y_stride the output row stride."""
    packed, scales, zeros, n = [], [], [], []
    for p, s, z in parts:
        packed.append(p.data_ptr())
        scales.append(s.data_ptr())
        zeros.append(0 if z is None else z.data_ptr())
        n.append(p.shape[0])
    _dispatch.ext().int4_matmul_cpu(
        x.data_ptr(), packed, scales, zeros, lut.data_ptr(), outs, n, rows, x.shape[-1], group_size, x_stride,
        y_stride, _dispatch.DTYPE_CODES[x.dtype], torch.get_num_threads(),
    )


def _cpu(x2, packed, scales, zeros, lut, group_size, y):
    _cpu_parts(x2, ((packed, scales, zeros),), lut, group_size, (y,))


CPU_PANEL_BYTES = 1 << 21  # fp32 weight rows dequantized at a time past MAX_CPU_ROWS: cache-sized


def _cpu_gemm(x2, parts, lut, group_size, y):
    """Past MAX_CPU_ROWS: panels of weight rows dequantized by the C++ kernel into one reused,
    cache-sized fp32 buffer, each followed by a BLAS GEMM into its columns of y (rows, sum N).
    The dense weight never exists whole, so there is no weight-sized allocation to fault in."""
    xf = x2.float()
    k = x2.shape[1]
    step = max(16, CPU_PANEL_BYTES // (4 * k) // 16 * 16)
    buffer = torch.empty((step, k), dtype=torch.float32)
    offset = 0
    for packed, scales, zeros in parts:
        n = packed.shape[0]
        for r0 in range(0, n, step):
            r1 = min(n, r0 + step)
            panel = buffer[: r1 - r0]
            _cpu_dequantize_into(packed[r0:r1], scales[r0:r1], None if zeros is None else zeros[r0:r1], lut,
                                 group_size, panel)
            y[:, offset + r0:offset + r1] = xf @ panel.t()
        offset += n


def _triton(x2, packed, scales, zeros, lut, group_size, y):
    from .triton import int4_matmul as tri

    tri.int4_matmul(x2, packed, scales, zeros, lut, group_size, y)


def _torch(x2, packed, scales, zeros, lut, group_size, y):
    y.copy_(x2.float() @ _dequantize(packed, scales, zeros, lut, group_size).t())


def cuda_iterations(k: int) -> int:
    """Iterations of the CUDA small-M kernel over K, 128 codes (4 chunks of 32) each."""
    return -(-(k // 32) // 4)


def cuda_splits(n: int, k: int, sm_count: int) -> int:
    """How many parts the CUDA kernel splits K into: enough warps (one per 16 rows and split)
    for about 32 per multiprocessor, each split keeping at least two iterations of 128 codes."""
    tiles = -(-n // 16)
    iters = cuda_iterations(k)
    want = max(1, min(iters // 2, (32 * sm_count) // tiles))
    per = -(-iters // want)
    return -(-iters // per)


def _int4_codes(lut: torch.Tensor) -> bool:
    """Whether `lut` is the int4 table (q - 8), which the CUDA kernels decode with bit tricks."""
    return lut.data_ptr() == _lut("int4", lut.device).data_ptr()


def _cuda_dequantize(packed, scales, zeros, lut, group_size, dtype) -> torch.Tensor:
    n, k = packed.shape[0], packed.shape[1] * 2
    w = torch.empty((n, k), dtype=dtype, device=packed.device)
    _dispatch.cuda_call(
        _dispatch.ext().int4_dequantize_cuda,
        packed.data_ptr(), scales.data_ptr(), 0 if zeros is None else zeros.data_ptr(), lut.data_ptr(),
        w.data_ptr(), n, k, group_size, _dispatch.DTYPE_CODES[dtype], _int4_codes(lut), packed.device.index,
        _dispatch.cuda_stream(packed),
    )
    return w


def _cuda(x2, packed, scales, zeros, lut, group_size, y):
    """The tensor-core kernel up to CUDA_MMA_MAX_ROWS rows, else dequantize + cuBLAS."""
    m, n, k = x2.shape[0], packed.shape[0], packed.shape[1] * 2
    if m > CUDA_MMA_MAX_ROWS:
        torch.matmul(x2, _cuda_dequantize(packed, scales, zeros, lut, group_size, x2.dtype).t(), out=y)
        return
    device = x2.device
    splits = cuda_splits(n, k, _dispatch.sm_count(device))
    workspace = torch.empty(splits * m * n if splits > 1 else 0, dtype=torch.float32, device=device)
    _dispatch.cuda_call(
        _dispatch.ext().int4_matmul_cuda,
        x2.data_ptr(), packed.data_ptr(), scales.data_ptr(), 0 if zeros is None else zeros.data_ptr(),
        lut.data_ptr(), y.data_ptr(), workspace.data_ptr(), workspace.numel(), m, n, k, group_size,
        x2.stride(0), y.stride(0), _dispatch.DTYPE_CODES[x2.dtype], _int4_codes(lut), splits, device.index,
        _dispatch.cuda_stream(x2),
    )


# Each backend writes y (M, N) from x2 (M, K); tests call them directly with poisoned outputs.
BACKENDS = {"torch": _torch, "cpu": _cpu, "triton": _triton, "cuda": _cuda}


def _cuda_unsupported(x2: torch.Tensor, packed: torch.Tensor) -> Optional[str]:
    if x2.dtype not in (torch.float16, torch.bfloat16):
        return f"{x2.dtype} activations (the CUDA kernels take float16 and bfloat16)"
    if x2.data_ptr() % 16 or x2.stride(0) % 8 or packed.data_ptr() % 16:
        return "x or the packed weight is not 16-byte aligned"
    if CUDA_MMA_MAX_ROWS < x2.shape[0] < CUDA_DEQUANT_MIN_ROWS:
        return (f"{x2.shape[0]} rows (the Triton GEMM is faster from {CUDA_MMA_MAX_ROWS + 1} "
                f"to {CUDA_DEQUANT_MIN_ROWS - 1})")
    return None


_IMPLEMENTED = ("cuda", "triton", "cpu", "torch")


def _forward_parts(x, parts, lut, group_size, n=None):
    """x @ [W_0 | W_1 | ...]^T for parts[p] = (packed, scales, zeros), in one (..., sum N_p)
    output: the CPU kernel takes every part in one call; other backends run one part at a time."""
    k = x.shape[-1]
    rows = x.numel() // k if k else 0
    if n is None:
        n = sum(p[0].shape[0] for p in parts)
    packed = parts[0][0]
    x2 = None if x.is_cpu else _rows(x)
    checks = None if x2 is None else {"cuda": lambda: _cuda_unsupported(x2, packed)}
    backend = _dispatch.choose("int4_matmul", x.device, checks, implemented=_IMPLEMENTED)
    if len(parts) > 1 and backend != "cpu":
        return torch.cat([_forward_parts(x, [p], lut, group_size) for p in parts], dim=-1)
    y = x.new_empty((*x.shape[:-1], n))
    if not rows:
        return y
    if backend != "cpu":
        BACKENDS[backend](x2 if x2 is not None else _rows(x), *parts[0], lut, group_size, y.view(rows, n))
        return y
    if rows > MAX_CPU_ROWS:
        _cpu_gemm(_rows(x), parts, lut, group_size, y.view(rows, n))
        return y
    # A contiguous x needs no 2-D view: the kernel takes its address, row count and row stride K.
    if x.is_contiguous():
        x2, x_stride = x, k
    else:
        x2 = _rows(x)
        x_stride = x2.stride(0)
    # The parts' outputs sit side by side in each row of y, each after the columns of those before.
    outs, address, size = [], y.data_ptr(), y.element_size()
    for p in parts:
        outs.append(address)
        address += p[0].shape[0] * size
    _cpu_call(x2, rows, x_stride, parts, lut, group_size, outs, n)
    return y


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as (rows, K) with a contiguous last dim."""
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _forward(x, packed, scales, zeros, lut, group_size):
    return _forward_parts(x, ((packed, scales, zeros),), lut, group_size)


@torch.library.custom_op("llama_kernels::int4_matmul", mutates_args=())
def _int4_matmul_op(
    x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
    lut: torch.Tensor, group_size: int,
) -> torch.Tensor:
    return _forward(x, packed, scales, zeros, lut, group_size)


@_int4_matmul_op.register_fake
def _(x, packed, scales, zeros, lut, group_size):
    return x.new_empty(*x.shape[:-1], packed.shape[0])


def _setup_context(ctx, inputs, output):
    _x, packed, scales, zeros, lut, group_size = inputs
    ctx.save_for_backward(packed, scales, zeros, lut)
    ctx.group_size = group_size
    ctx.forced_backend = _dispatch.forced_backend()  # the backward may run on another thread


def _backward(ctx, grad_y):
    """grad_x = grad_y @ dequant(W); the 4-bit weight is frozen (QLoRA)."""
    packed, scales, zeros, lut = ctx.saved_tensors
    with _dispatch.use_backend(ctx.forced_backend):
        w = dequantize_op(packed, scales, zeros, lut, ctx.group_size, grad_y.dtype)
    return grad_y @ w, None, None, None, None, None


_int4_matmul_op.register_autograd(_backward, setup_context=_setup_context)


def int4_matmul(
    x: torch.Tensor, qw: QuantizedWeight | Sequence[QuantizedWeight], bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """y = x @ dequant(qw)^T (+ bias) over any leading dims of x, differentiable in x (and bias).

    x may be fp32, fp16 or bf16; y has x's dtype. The weight is frozen. `qw` may also be a
    sequence of weights that share x (the Q, K and V projections, say, in one format and group
    size): y is then x @ [W_0 | W_1 | ...]^T, the outputs side by side in one (..., sum N)
    tensor, computed in one pass (one CPU kernel call converts x once for all of them); `bias`
    then has sum N entries.
    """
    qws = _weights(qw)
    n = 0
    for q in qws:
        check_inputs(x, q, None)
        n += q.shape[0]
    if bias is not None:
        _check_bias(x, bias, n)
    first = qws[0]
    lut = first.lut
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and x.requires_grad):
        ys = [_int4_matmul_op(x, q.packed, q.scales, q.zeros, q.lut, q.group_size) for q in qws]
        y = ys[0] if len(ys) == 1 else torch.cat(ys, dim=-1)
    else:
        y = _forward_parts(x, [(q.packed, q.scales, q.zeros) for q in qws], lut, first.group_size, n)
    return y if bias is None else y + bias.to(y.dtype)


def _weights(qw) -> list[QuantizedWeight]:
    """qw as a non-empty list of weights that one kernel call can take together."""
    if isinstance(qw, QuantizedWeight):
        return [qw]
    if not isinstance(qw, (list, tuple)) or not qw:
        raise TypeError(f"qw: expected a QuantizedWeight or a non-empty sequence of them, got {type(qw).__name__}")
    qws = list(qw)
    for i, q in enumerate(qws):
        if not isinstance(q, QuantizedWeight):
            raise TypeError(f"qw[{i}]: expected a QuantizedWeight (from quantize_int4/quantize_nf4), "
                            f"got {type(q).__name__}")
        if (q.format, q.group_size, q.shape[1]) != (qws[0].format, qws[0].group_size, qws[0].shape[1]):
            raise ValueError(f"qw[{i}]: format {q.format}, group_size {q.group_size}, in_features {q.shape[1]} "
                             f"differ from qw[0]'s {qws[0].format}, {qws[0].group_size}, {qws[0].shape[1]}")
    return qws
