"""The CUDA entry points' host side, checked without a GPU. Every entry point of llama_kernels._C
(rms_norm fwd/bwd, int4_matmul, int4_dequantize, rope_decode_attention) takes its tensors as
TensorArg descriptors and checks them before it touches a device: valid descriptors then reach
the CUDA runtime (a "CUDA error" here, where there is none), bad ones give a ValueError naming the
argument. Descriptors claiming device 0 are built directly with fake addresses, which nothing
dereferences. Also: llama_kernels.dispatch.tensor_arg, and the decode wrapper's split heuristic,
workspace size, argument list and `unsupported` reasons."""
import math

import pytest
import torch

import llama_kernels
from llama_kernels import dispatch
from llama_kernels.cuda import rope_decode as rdc

NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")


def _cuda_ext():
    ext = dispatch.ext()
    if not llama_kernels.build_info()["cuda"]:
        pytest.skip("llama_kernels._C was built without CUDA")
    return ext


def _code(dtype):
    return dtype if isinstance(dtype, int) else dispatch.DTYPE_CODES[dtype]


def _contiguous(shape):
    strides, step = [], 1
    for size in reversed(shape):
        strides.insert(0, step)
        step *= max(size, 1)
    return strides


def desc(shape, dtype, address=1 << 20, device=0, strides=None):
    """A descriptor of a tensor that does not exist: `address` is never dereferenced."""
    return dispatch.ext().TensorArg(address, _code(dtype), device, list(shape),
                                    _contiguous(shape) if strides is None else list(strides))


NONE = object()  # in a change: the argument is absent (None)


def _call(entry, base, change):
    args = dict(base)
    assert set(change) <= set(args), set(change) - set(args)
    for name, value in change.items():
        args[name] = dispatch.ext().TensorArg() if value is NONE else value
    return getattr(dispatch.ext(), entry), args


# ----------------------------------------------------------------------------- valid arguments
BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32
MiB = 1 << 20


def rms_fwd_args():
    return dict(x=desc((4, 64), BF16, 1 * MiB), h=dispatch.ext().TensorArg(), w=desc((64,), F32, 2 * MiB),
                y=desc((4, 64), BF16, 3 * MiB), s=dispatch.ext().TensorArg(), rstd=desc((4,), F32, 4 * MiB),
                eps=1e-6, stream=0)


def rms_bwd_args():
    return dict(dy=desc((4, 64), BF16, 1 * MiB), ds=dispatch.ext().TensorArg(), x=desc((4, 64), BF16, 2 * MiB),
                w=desc((64,), F32, 3 * MiB), rstd=desc((4,), F32, 4 * MiB), dx=desc((4, 64), BF16, 5 * MiB),
                dw=desc((64,), F32, 6 * MiB), dw_partial=desc((8, 64), F32, 7 * MiB), stream=0)


def _weight(n=64, k=256, group=128):
    return dict(packed=desc((n, k // 2), torch.uint8, 11 * MiB), scales=desc((n, k // group), F16, 12 * MiB),
                zeros=desc((n, k // group), F16, 13 * MiB), lut=desc((16,), F32, 14 * MiB), group_size=group,
                int4_codes=True)


def int4_matmul_args():
    return dict(x=desc((1, 256), BF16, 1 * MiB), **_weight(), y=desc((1, 64), BF16, 2 * MiB),
                workspace=dispatch.ext().TensorArg(), splits=1, stream=0)


def int4_dequantize_args():
    return dict(**_weight(), w=desc((64, 256), BF16, 3 * MiB), stream=0)


def rope_args(batch=2, heads=8, kv_heads=2, head_dim=64, capacity=32, dtype=BF16, splits=1):
    ws = rdc.workspace_elems(batch, heads, head_dim, splits)
    return dict(q=desc((batch, 1, heads, head_dim), dtype, 1 * MiB),
                k_new=desc((batch, 1, kv_heads, head_dim), dtype, 2 * MiB),
                v_new=desc((batch, 1, kv_heads, head_dim), dtype, 3 * MiB),
                k_cache=desc((batch, capacity, kv_heads, head_dim), dtype, 4 * MiB),
                v_cache=desc((batch, capacity, kv_heads, head_dim), dtype, 5 * MiB),
                seqlens=desc((batch,), torch.int32, 6 * MiB),
                cos=desc((capacity, head_dim // 2), F32, 7 * MiB), sin=desc((capacity, head_dim // 2), F32, 8 * MiB),
                out=desc((batch, 1, heads, head_dim), dtype, 9 * MiB),
                workspace=desc((ws,), F32, 10 * MiB) if ws else dispatch.ext().TensorArg(),
                softmax_scale=0.125, splits=splits, stream=0)


ENTRIES = {
    "rms_norm_fwd_cuda": ("rms_norm_fwd", rms_fwd_args),
    "rms_norm_bwd_cuda": ("rms_norm_bwd", rms_bwd_args),
    "int4_matmul_cuda": ("int4_matmul", int4_matmul_args),
    "int4_dequantize_cuda": ("int4_dequantize", int4_dequantize_args),
    "rope_decode_attention_cuda": ("rope_decode_attention", rope_args),
}

VALID_VARIANTS = [
    ("rms_norm_fwd_cuda", {}),
    ("rms_norm_fwd_cuda", dict(h=desc((4, 64), BF16, 21 * MiB), s=desc((4, 64), BF16, 22 * MiB), rstd=NONE)),
    ("rms_norm_fwd_cuda", dict(w=desc((64,), BF16, 2 * MiB), x=desc((4, 64), BF16, 1 * MiB, strides=(128, 1)))),
    ("rms_norm_bwd_cuda", {}),
    ("rms_norm_bwd_cuda", dict(ds=desc((4, 64), BF16, 21 * MiB))),
    ("int4_matmul_cuda", {}),
    ("int4_matmul_cuda", dict(zeros=NONE, int4_codes=False)),
    ("int4_matmul_cuda", dict(splits=2, workspace=desc((128,), F32, 21 * MiB))),
    ("int4_dequantize_cuda", {}),
    ("rope_decode_attention_cuda", {}),
    ("rope_decode_attention_cuda", dict(seqlens=desc((2,), torch.int64, 6 * MiB))),
]


@NO_GPU
@pytest.mark.parametrize("entry,change", VALID_VARIANTS, ids=lambda v: v if isinstance(v, str) else ",".join(v))
def test_valid_descriptors_without_a_device_give_a_cuda_error(entry, change):
    _cuda_ext()
    op, make = ENTRIES[entry]
    fn, args = _call(entry, make(), change)
    with pytest.raises(RuntimeError, match=f"{op}: CUDA error"):
        dispatch.cuda_call(fn, **args)


# ----------------------------------------------------------------------------- bad arguments
def _rope_change(**shape):
    """The decode arguments for other shapes (batch, heads, kv_heads, head_dim, capacity, ...)."""
    return rope_args(**shape)


BAD = [
    # RMSNorm forward
    ("rms_norm_fwd_cuda", dict(x=desc((2, 4, 64), BF16)), "x: expected 2 dims, got 3"),
    ("rms_norm_fwd_cuda", dict(x=desc((4, 0), BF16)), "x: expected a non-empty last dimension, got 0"),
    ("rms_norm_fwd_cuda", dict(x=desc((2**31, 64), BF16)), "x: at most 2.31-1 rows"),
    ("rms_norm_fwd_cuda", dict(x=desc((4, 64), 7)), "x: unknown dtype code 7"),
    ("rms_norm_fwd_cuda", dict(x=desc((4, 64), BF16, device=-1)), "x: a CPU tensor"),
    ("rms_norm_fwd_cuda", dict(x=NONE), "x: required, got none"),
    ("rms_norm_fwd_cuda", dict(x=desc((4, 64), BF16, strides=(128, 2))), "x: the last dim must be contiguous"),
    ("rms_norm_fwd_cuda", dict(x=desc((4, 64), BF16, strides=(64, 1, 1))), "x: 2 sizes but 3 strides"),
    ("rms_norm_fwd_cuda", dict(w=desc((64,), F16)), "weight: dtype float16 must be float32 or match x .bfloat16."),
    ("rms_norm_fwd_cuda", dict(w=desc((63,), F32)), "weight: has 63 elements but the last dim of x is 64"),
    ("rms_norm_fwd_cuda", dict(w=desc((64,), F32, strides=(2,))), "weight: must be contiguous"),
    ("rms_norm_fwd_cuda", dict(w=NONE), "weight: required"),
    ("rms_norm_fwd_cuda", dict(w=desc((64,), F32, device=1)), "weight: on cuda:1 but the first tensor is on cuda:0"),
    ("rms_norm_fwd_cuda", dict(y=desc((4, 32), BF16)), r"y: expected shape \(4, 64\), got \(4, 32\)"),
    ("rms_norm_fwd_cuda", dict(y=desc((4, 64), F32)), r"y: dtype float32 must match x \(bfloat16\)"),
    ("rms_norm_fwd_cuda", dict(y=desc((4, 64), BF16, device=-1)), "y: a CPU tensor"),
    ("rms_norm_fwd_cuda", dict(h=desc((4, 64), BF16)), "s: the sum x . h needs an output"),
    ("rms_norm_fwd_cuda", dict(h=desc((3, 64), BF16), s=desc((4, 64), BF16)), r"h: expected shape \(4, 64\)"),
    ("rms_norm_fwd_cuda", dict(h=desc((4, 64), BF16), s=desc((4, 64), F16)), "s: dtype float16 must match x"),
    ("rms_norm_fwd_cuda", dict(rstd=desc((4,), BF16)), "rstd: expected float32, got bfloat16"),
    ("rms_norm_fwd_cuda", dict(rstd=desc((3,), F32)), r"rstd: expected shape \(4,\), got \(3,\)"),
    ("rms_norm_fwd_cuda", dict(rstd=desc((4, 1), F32)), "rstd: expected 1 dims, got 2"),
    # RMSNorm backward
    ("rms_norm_bwd_cuda", dict(x=desc((4,), BF16)), "x: expected 2 dims, got 1"),
    ("rms_norm_bwd_cuda", dict(dy=desc((4, 64), F16)), "dy: dtype float16 must match x"),
    ("rms_norm_bwd_cuda", dict(dy=desc((4, 63), BF16)), r"dy: expected shape \(4, 64\)"),
    ("rms_norm_bwd_cuda", dict(ds=desc((4, 64), BF16, device=-1)), "ds: a CPU tensor"),
    ("rms_norm_bwd_cuda", dict(rstd=NONE), "rstd: required"),
    ("rms_norm_bwd_cuda", dict(dx=desc((4, 64), BF16, device=1)), "dx: on cuda:1"),
    ("rms_norm_bwd_cuda", dict(dw=desc((64,), BF16)), r"dw: dtype bfloat16 must match weight \(float32\)"),
    ("rms_norm_bwd_cuda", dict(dw=desc((64,), F32, strides=(2,))), "dw: .*must be contiguous"),
    ("rms_norm_bwd_cuda", dict(dw_partial=desc((0, 64), F32)), "dw_partial: expected 1..65535 rows"),
    ("rms_norm_bwd_cuda", dict(dw_partial=desc((8, 32), F32)), r"dw_partial: expected shape \(8, 64\)"),
    ("rms_norm_bwd_cuda", dict(dw_partial=desc((8, 64), BF16)), "dw_partial: expected float32"),
    ("rms_norm_bwd_cuda", dict(w=desc((64,), F16)), "weight: dtype float16 must be float32 or match x"),
    # int4 matmul
    ("int4_matmul_cuda", dict(x=desc((17, 256), BF16), y=desc((17, 64), BF16)),
     "x: the CUDA int4 kernel takes at most 16 rows, got 17"),
    ("int4_matmul_cuda", dict(packed=desc((64, 50), torch.uint8)), "in_features must be a positive multiple of 32"),
    ("int4_matmul_cuda", dict(group_size=48), "group_size: expected 32, 64 or 128"),
    ("int4_matmul_cuda", dict(x=desc((1, 256), BF16, 4098)), "x: rows must start 16-byte aligned"),
    ("int4_matmul_cuda", dict(x=desc((2, 256), BF16, strides=(260, 1)), y=desc((2, 64), BF16)),
     "x: rows must start 16-byte aligned"),
    ("int4_matmul_cuda", dict(packed=desc((64, 128), torch.uint8, 4100)), "qw.packed: must be 16-byte aligned"),
    ("int4_matmul_cuda", dict(splits=3), "splits: expected 1..2"),
    ("int4_matmul_cuda", dict(splits=2), "workspace: needs 128 float32 elements"),
    ("int4_matmul_cuda", dict(splits=2, workspace=desc((127,), F32)), "workspace: needs 128 float32 elements"),
    ("int4_matmul_cuda", dict(splits=2, workspace=desc((128,), BF16)), "workspace: expected float32"),
    ("int4_matmul_cuda", dict(x=desc((1, 256), F32)), "x: the CUDA int4 kernels take float16 or bfloat16, got float32"),
    ("int4_matmul_cuda", dict(x=desc((256,), BF16)), "x: expected 2 dims, got 1"),
    ("int4_matmul_cuda", dict(x=desc((1, 128), BF16)), "x: has 128 columns but qw has 256 in_features"),
    ("int4_matmul_cuda", dict(x=desc((1, 256), BF16, device=-1)), "x: a CPU tensor"),
    ("int4_matmul_cuda", dict(packed=desc((64, 128), torch.int32)), "qw.packed: expected uint8, got int32"),
    ("int4_matmul_cuda", dict(packed=desc((64, 128), torch.uint8, device=-1)), "qw.packed: a CPU tensor"),
    ("int4_matmul_cuda", dict(packed=NONE), "qw.packed: required"),
    ("int4_matmul_cuda", dict(scales=desc((64, 4), F16)), r"qw.scales: expected shape \(64, 2\), got \(64, 4\)"),
    ("int4_matmul_cuda", dict(scales=NONE), "qw.scales: required"),
    ("int4_matmul_cuda", dict(zeros=desc((64, 2), F32)), "qw.zeros: expected float16, got float32"),
    ("int4_matmul_cuda", dict(zeros=desc((64, 2), F16, strides=(4, 1))), "qw.zeros: must be contiguous"),
    ("int4_matmul_cuda", dict(lut=desc((15,), F32)), r"qw.lut: expected shape \(16,\)"),
    ("int4_matmul_cuda", dict(lut=desc((16,), F32, device=1)), "qw.lut: on cuda:1"),
    ("int4_matmul_cuda", dict(y=desc((1, 32), BF16)), r"y: expected shape \(1, 64\)"),
    ("int4_matmul_cuda", dict(y=desc((1, 64), F16)), r"y: dtype float16 must match x \(bfloat16\)"),
    ("int4_matmul_cuda", dict(y=NONE), "y: required"),
    # int4 dequantize
    ("int4_dequantize_cuda", dict(w=desc((64, 128), BF16)), r"w: expected shape \(64, 256\)"),
    ("int4_dequantize_cuda", dict(w=desc((64, 256), F32)), "w: the CUDA int4 kernels take float16 or bfloat16"),
    ("int4_dequantize_cuda", dict(w=desc((64, 256), BF16, 4104)), "w: must be 16-byte aligned"),
    ("int4_dequantize_cuda", dict(w=desc((64, 256), BF16, strides=(512, 1))), "w: must be contiguous"),
    ("int4_dequantize_cuda", dict(w=desc((64, 256), BF16, device=-1)), "w: a CPU tensor"),
    ("int4_dequantize_cuda", dict(w=NONE), "w: required"),
    ("int4_dequantize_cuda", dict(packed=desc((64 * 128,), torch.uint8)), "qw.packed: expected 2 dims, got 1"),
    ("int4_dequantize_cuda", dict(packed=desc((64, 128), torch.uint8, device=-1)), "qw.packed: a CPU tensor"),
    ("int4_dequantize_cuda", dict(scales=desc((64, 2), F16, device=1)), "qw.scales: on cuda:1"),
    ("int4_dequantize_cuda", dict(group_size=64), r"qw.scales: expected shape \(64, 4\), got \(64, 2\)"),
    ("int4_dequantize_cuda", dict(lut=NONE), "qw.lut: required"),
    # RoPE + decode attention: shapes, dtypes, devices, strides, scalars
    ("rope_decode_attention_cuda", _rope_change(head_dim=65),
     "head_dim: the CUDA decode attention takes 32, 64, 128 or 256, got 65"),
    ("rope_decode_attention_cuda", _rope_change(head_dim=96), "head_dim: .* got 96"),
    ("rope_decode_attention_cuda", _rope_change(kv_heads=3), "kv_heads: 3 must be positive and divide heads = 8"),
    ("rope_decode_attention_cuda", _rope_change(kv_heads=0), "kv_heads: 0 must be positive"),
    ("rope_decode_attention_cuda", _rope_change(heads=0), "heads: expected 1..65535 query heads, got 0"),
    ("rope_decode_attention_cuda", _rope_change(batch=70000), "batch: expected 0..65535"),
    ("rope_decode_attention_cuda", _rope_change(capacity=0), "capacity: expected 1..2"),
    ("rope_decode_attention_cuda", _rope_change(dtype=torch.float32),
     "q: the CUDA decode attention takes float16 or bfloat16, got float32"),
    ("rope_decode_attention_cuda", dict(q=desc((2, 1, 8, 64), 7)), "q: unknown dtype code 7"),
    ("rope_decode_attention_cuda", dict(q=desc((2, 8, 64), BF16)), "q: expected 4 dims, got 3"),
    ("rope_decode_attention_cuda", dict(q=desc((2, 2, 8, 64), BF16)), "q: expected one new token per sequence"),
    ("rope_decode_attention_cuda", dict(q=desc((2, 1, 8, 64), BF16, device=-1)), "q: a CPU tensor"),
    ("rope_decode_attention_cuda", dict(q=desc((2, 1, 8, 64), BF16, 0)), "q: required, got none"),
    ("rope_decode_attention_cuda", dict(q=desc((2, 1, 8, 64), BF16, strides=(512, 512, -64, 1))),
     "q: strides must be non-negative"),
    ("rope_decode_attention_cuda", dict(q=desc((2, 1, 8, 64), BF16, strides=(1024, 1024, 128, 2))),
     "q: the last dim must be contiguous"),
    ("rope_decode_attention_cuda", dict(k_new=desc((2, 1, 4, 64), BF16)), r"k_new: expected shape \(2, 1, 2, 64\)"),
    ("rope_decode_attention_cuda", dict(k_new=desc((2, 1, 2, 64), BF16, device=1)),
     "k_new: on cuda:1 but the first tensor is on cuda:0"),
    ("rope_decode_attention_cuda", dict(v_new=desc((2, 1, 2, 64), F16)), r"v_new: dtype float16 must match q"),
    ("rope_decode_attention_cuda", dict(v_new=NONE), "v_new: required"),
    ("rope_decode_attention_cuda", dict(k_cache=desc((3, 32, 2, 64), BF16)), r"k_cache: expected shape \(2, 32, 2, 64\)"),
    ("rope_decode_attention_cuda", dict(k_cache=desc((2, 32, 2, 64), BF16, device=-1)), "k_cache: a CPU tensor"),
    ("rope_decode_attention_cuda", dict(k_cache=desc((2, 32, 2, 64), BF16, 4098), v_cache=desc((2, 32, 2, 64), BF16, 4098)),
     "k_cache: must be 16-byte aligned"),
    ("rope_decode_attention_cuda", dict(v_cache=desc((2, 32, 2, 64), BF16, 4104)), "v_cache: must be 16-byte aligned"),
    ("rope_decode_attention_cuda", dict(k_cache=desc((2, 32, 2, 64), BF16, strides=(4352, 136, 68, 1)),
                                        v_cache=desc((2, 32, 2, 64), BF16, strides=(4352, 136, 68, 1))),
     "k_cache: strides must be multiples of 8 elements"),
    ("rope_decode_attention_cuda", dict(k_cache=desc((2, 32, 2, 64), BF16, strides=(4096, -128, 64, 1))),
     "k_cache: strides must be non-negative"),
    ("rope_decode_attention_cuda", dict(v_cache=desc((2, 32, 2, 64), BF16, strides=(4096, 64, 2048, 1))),
     "v_cache: strides .* must be k_cache's"),
    ("rope_decode_attention_cuda", dict(v_cache=desc((2, 16, 2, 64), BF16)), r"v_cache: expected shape \(2, 32, 2, 64\)"),
    ("rope_decode_attention_cuda", dict(out=desc((2, 1, 8, 64), BF16, strides=(-1, 512, 64, 1))),
     "out: strides must be non-negative"),
    ("rope_decode_attention_cuda", dict(out=desc((2, 1, 8, 64), F16)), r"out: dtype float16 must match q \(bfloat16\)"),
    ("rope_decode_attention_cuda", dict(out=NONE), "out: required"),
    ("rope_decode_attention_cuda", dict(seqlens=desc((2,), F32)), "seqlens: expected int32 or int64, got float32"),
    ("rope_decode_attention_cuda", dict(seqlens=desc((3,), torch.int32)), r"seqlens: expected shape \(2,\)"),
    ("rope_decode_attention_cuda", dict(seqlens=desc((2,), torch.int32, strides=(2,))), "seqlens: must be contiguous"),
    ("rope_decode_attention_cuda", dict(seqlens=desc((2,), torch.int32, 0)), "seqlens: required"),
    ("rope_decode_attention_cuda", dict(cos=desc((0, 32), F32), sin=desc((0, 32), F32)),
     "cos: the tables need at least one position"),
    ("rope_decode_attention_cuda", dict(cos=desc((32, 32), F32, strides=(31, 1))),
     "cos: row stride 31 is shorter than head_dim / 2 = 32"),
    ("rope_decode_attention_cuda", dict(cos=desc((32, 64), F32)), r"cos: expected shape \(32, 32\)"),
    ("rope_decode_attention_cuda", dict(cos=desc((32, 32), BF16)), "cos: expected float32, got bfloat16"),
    ("rope_decode_attention_cuda", dict(sin=desc((16, 32), F32)), r"sin: expected shape \(32, 32\)"),
    ("rope_decode_attention_cuda", dict(sin=desc((32, 32), F32, strides=(64, 1))), "sin: strides .* must be cos's"),
    ("rope_decode_attention_cuda", dict(sin=desc((32, 32), F32, device=1)), "sin: on cuda:1"),
    ("rope_decode_attention_cuda", dict(softmax_scale=math.nan), "softmax_scale: must be finite"),
    ("rope_decode_attention_cuda", dict(splits=0), "splits: expected 1..65535, got 0"),
    ("rope_decode_attention_cuda", dict(splits=2), "workspace: needs 2112 float32 elements"),  # 2 * 8 * 2 * (64 + 2)
    ("rope_decode_attention_cuda", dict(splits=2, workspace=desc((2112,), BF16)), "workspace: expected float32"),
    ("rope_decode_attention_cuda", dict(splits=2, workspace=desc((2112,), F32, device=-1)), "workspace: a CPU tensor"),
]


def _bad_id(case):
    entry, change, _ = case
    return entry.removesuffix("_cuda") + ":" + ",".join(change)


@pytest.mark.parametrize("entry,change,message", BAD, ids=[_bad_id(c) for c in BAD])
def test_entry_points_reject_bad_descriptors_by_name(entry, change, message):
    _cuda_ext()
    fn, args = _call(entry, ENTRIES[entry][1](), change)
    err = fn(**args)  # returned, never thrown
    assert err.startswith("ValueError: "), err
    with pytest.raises(ValueError, match=message):
        dispatch.cuda_call(fn, **args)


def test_every_entry_point_has_a_bad_input_of_each_kind():
    kinds = {"dims, got": "rank", "expected float": "dtype", "a CPU tensor": "cpu", "on cuda:1": "device",
             "expected shape": "shape", "required": "missing", "must match": "dtype", "must be float32": "dtype",
             "expected uint8": "dtype", "unknown dtype": "dtype", "take float16": "dtype", "int32 or int64": "dtype",
             "has 63 elements": "shape", "columns but": "shape"}
    seen = {}
    for entry, _, message in BAD:
        for key, kind in kinds.items():
            if key in message:
                seen.setdefault(entry, set()).add(kind)
    for entry in ENTRIES:
        assert {"rank", "dtype", "cpu", "device", "shape", "missing"} <= seen[entry], (entry, seen[entry])


def test_entry_points_take_the_arguments_the_tests_give():
    ext = _cuda_ext()
    for entry, (_, make) in ENTRIES.items():
        doc = getattr(ext, entry).__doc__.splitlines()[0]
        names = [part.split(":")[0].strip() for part in doc[doc.index("(") + 1: doc.rindex(")")].split(", ")]
        assert set(names) == set(make()), (entry, names)  # the tests pass them by name


def test_an_empty_batch_launches_nothing():
    ext = _cuda_ext()
    need = ext.rope_decode_workspace_elems_cuda(2, 8, 64, 3)
    assert need == rdc.workspace_elems(2, 8, 64, 3) == 2 * 8 * 3 * 66
    assert ext.rope_decode_workspace_elems_cuda(2, 8, 64, 1) == rdc.workspace_elems(2, 8, 64, 1) == 0
    args = rope_args(splits=3)
    assert ext.rope_decode_attention_cuda(**{**args, "workspace": desc((need - 1,), F32)}) \
        .startswith("ValueError: workspace: needs")
    assert ext.rope_decode_attention_cuda(**{**args, "workspace": desc((need,), F32, 4100)}) \
        .startswith("ValueError: workspace: needs")
    empty = rope_args(batch=0, splits=3)
    for name in ("q", "k_new", "v_new", "k_cache", "v_cache", "seqlens", "out"):  # empty tensors may have address 0
        empty[name] = desc(empty[name].sizes, empty[name].dtype, 0)
    assert ext.rope_decode_attention_cuda(**empty) == ""
    rows0 = rms_fwd_args()
    rows0.update(x=desc((0, 64), BF16, 0), y=desc((0, 64), BF16, 0), rstd=desc((0,), F32, 0))
    assert ext.rms_norm_fwd_cuda(**rows0) == ""


@pytest.mark.parametrize("batch,heads,head_dim", [(1, 1, 32), (2, 8, 64), (3, 24, 128), (64, 40, 256)])
@pytest.mark.parametrize("splits", [1, 2, 7, 256])
def test_workspace_size_is_the_entry_points(batch, heads, head_dim, splits):
    """The wrapper's workspace formula is rope_decode_workspace_elems (kernels_cuda.h), which the
    module exposes only when built with CUDA."""
    ext = _cuda_ext()
    expected = ext.rope_decode_workspace_elems_cuda(batch, heads, head_dim, splits)
    assert rdc.workspace_elems(batch, heads, head_dim, splits) == expected


# ----------------------------------------------------------------------------- the Python side
def _tensors(batch=2, heads=8, kv_heads=2, head_dim=64, capacity=32, dtype=torch.bfloat16):
    q = torch.zeros(batch, 1, heads, head_dim, dtype=dtype)
    k_new = torch.zeros(batch, 1, kv_heads, head_dim, dtype=dtype)
    v_new = torch.zeros_like(k_new)
    k_cache = torch.zeros(batch, capacity, kv_heads, head_dim, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    seqlens = torch.zeros(batch, dtype=torch.int32)
    cos = torch.zeros(capacity, head_dim // 2)
    return q, k_new, v_new, k_cache, v_cache, seqlens, cos, cos.clone(), torch.zeros_like(q)


def test_tensor_arg_describes_the_tensor():
    t = torch.zeros(4, 6, dtype=torch.float16)[:, ::2]
    a = dispatch.tensor_arg(t, "x")
    assert (a.address, a.dtype, a.device) == (t.data_ptr(), dispatch.DTYPE_CODES[torch.float16], -1)
    assert a.sizes == [4, 3] and a.strides == [6, 2] and a.dim() == 2 and a.size(1) == 3 and a.stride(0) == 6
    assert a.defined()
    none = dispatch.tensor_arg(None, "h")
    assert not none.defined() and none.dim() == 0 and none.address == 0
    with pytest.raises(IndexError):
        a.size(2)
    for dtype in (torch.uint8, torch.int32, torch.int64, torch.float32, torch.bfloat16):
        assert dispatch.tensor_arg(torch.zeros(2, dtype=dtype), "t").dtype == dispatch.DTYPE_CODES[dtype]


@pytest.mark.parametrize("dtype", [torch.complex64, torch.int8, torch.float64, torch.bool], ids=str)
def test_tensor_arg_rejects_a_dtype_without_a_code_by_name(dtype):
    with pytest.raises(TypeError, match=f"seqlens: dtype {dtype} has no code"):
        dispatch.tensor_arg(torch.zeros(2, dtype=dtype), "seqlens")


def test_entry_args_are_the_bindings_and_describe_the_tensors(monkeypatch):
    ext = _cuda_ext()
    monkeypatch.setattr(dispatch, "cuda_stream", lambda t: 0)
    tensors = _tensors()
    ws = torch.zeros(rdc.workspace_elems(2, 8, 64, 2))
    args = rdc.entry_args(*tensors, ws, 0.125, 2)
    doc = ext.rope_decode_attention_cuda.__doc__.splitlines()[0]
    names = [part.split(":")[0].strip() for part in doc[doc.index("(") + 1: doc.rindex(")")].split(", ")]
    assert list(args) == names and len(args) == 13
    q, k_cache = args["q"], args["k_cache"]
    assert q.sizes == [2, 1, 8, 64] and q.address == tensors[0].data_ptr() and q.device == -1
    assert k_cache.strides == list(tensors[3].stride()) and args["seqlens"].dtype == dispatch.DTYPE_CODES[torch.int32]
    assert args["workspace"].sizes == [ws.numel()] and (args["softmax_scale"], args["splits"]) == (0.125, 2)
    # CPU tensors are refused by name before anything is read
    with pytest.raises(ValueError, match="q: a CPU tensor"):
        dispatch.cuda_call(ext.rope_decode_attention_cuda, **args)
    args = rdc.entry_args(*tensors, None, 0.125, 1)
    assert not args["workspace"].defined()


@pytest.mark.parametrize("batch,kv_heads", [(1, 1), (1, 4), (1, 8), (8, 8), (8, 32), (64, 8)])
@pytest.mark.parametrize("capacity", [1, 100, 2048, 8192, 131072])
@pytest.mark.parametrize("sms", [1, 132])
@pytest.mark.parametrize("head_dim", [32, 64, 128, 256])
def test_splits_heuristic(head_dim, sms, capacity, batch, kv_heads):
    splits = rdc.splits_for(batch, kv_heads, capacity, sms, head_dim)
    assert 1 <= splits <= rdc.MAX_SPLITS
    chunk = max(rdc.MIN_CHUNK, rdc.WARPS * rdc.tile_keys(head_dim))
    assert splits == 1 or capacity // splits >= chunk  # every split has work at full capacity
    if capacity >= rdc.MAX_SPLITS * chunk:  # long caches: about two blocks per multiprocessor
        assert batch * kv_heads * splits >= min(2 * sms, batch * kv_heads * rdc.MAX_SPLITS)
        assert batch * kv_heads * (splits - 1) < 2 * sms or splits == 1


def test_unsupported_names_the_reason():
    q, k_new, v_new, k_cache, v_cache, *_ = _tensors()
    base = k_cache.data_ptr()
    if base % 16 == 0 and all(s % 8 == 0 for s in k_cache.stride()[:3]):
        assert rdc.unsupported(q, k_new, v_new, k_cache, v_cache) is None
    assert "float32" in rdc.unsupported(q.float(), k_new, v_new, k_cache, v_cache)
    q96 = torch.zeros(2, 1, 8, 96, dtype=torch.bfloat16)
    cache96 = torch.zeros(2, 32, 2, 96, dtype=torch.bfloat16)
    assert "head dim 96" in rdc.unsupported(q96, k_new, v_new, cache96, cache96)
    flat = torch.zeros(k_cache.numel() + 8, dtype=k_cache.dtype)
    off = (-flat.data_ptr() // 2) % 8  # elements to the next 16-byte boundary
    shifted = flat[off + 1: off + 1 + k_cache.numel()].view(k_cache.shape)
    assert "k_cache is not 16-byte aligned" in rdc.unsupported(q, k_new, v_new, shifted, v_cache)


def test_the_glue_calls_every_entry_point_by_its_argument_names(monkeypatch):
    """Each CUDA glue function builds its descriptors and reaches its entry point (names and
    arity as bound): given CPU tensors, the entry's first check refuses them by name."""
    _cuda_ext()
    from llama_kernels.cuda import int4_matmul as cuda_int4
    from llama_kernels.cuda import rms_norm as cuda_rms_norm
    from llama_kernels.int4_format import quantize_int4

    monkeypatch.setattr(dispatch, "cuda_stream", lambda t: 0)
    monkeypatch.setattr(dispatch, "sm_count", lambda device: 4)
    x, w = torch.randn(4, 64, dtype=BF16), torch.ones(64)
    y, rstd = torch.empty_like(x), torch.empty(4)
    with pytest.raises(ValueError, match="x: a CPU tensor"):
        cuda_rms_norm.forward(x, w, 1e-6, y, rstd)
    with pytest.raises(ValueError, match="x: a CPU tensor"):
        cuda_rms_norm.forward(x, w, 1e-6, y, None, h=x.clone(), s=torch.empty_like(x))
    with pytest.raises(ValueError, match="x: a CPU tensor"):
        cuda_rms_norm.backward(x, x, w, rstd, torch.empty_like(x), torch.empty_like(w), ds=x.clone())
    qw = quantize_int4(torch.randn(64, 256), 128)
    with pytest.raises(ValueError, match="x: a CPU tensor"):
        cuda_int4.forward(torch.randn(2, 256, dtype=BF16), qw.packed, qw.scales, qw.zeros, qw.lut, 128,
                          torch.empty(2, 64, dtype=BF16))
    with pytest.raises(ValueError, match="qw.packed: a CPU tensor"):
        cuda_int4.dequantize(qw.packed, qw.scales, None, qw.lut, 128, BF16)
    q, k_new, v_new, k_cache, v_cache, seqlens, cos, sin, out = _tensors()
    with pytest.raises(ValueError, match="q: a CPU tensor"):
        rdc.decode(q, k_new, v_new, k_cache, v_cache, seqlens, cos, sin, out, 0.125)
