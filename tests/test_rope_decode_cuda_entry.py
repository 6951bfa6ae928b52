"""The CUDA decode kernel's host side, checked without a GPU: the entry point rejects bad
arguments by name before it touches a device (on a CUDA build), and the Python wrapper's split
heuristic, workspace size, argument list and `unsupported` reasons."""
import math
import re

import pytest
import torch

import llama_kernels
from llama_kernels import dispatch
from llama_kernels.cuda import rope_decode as rdc


def _cuda_ext():
    ext = dispatch.ext()
    if not llama_kernels.build_info()["cuda"]:
        pytest.skip("llama_kernels._C was built without CUDA")
    return ext


def _tensors(batch=2, heads=8, kv_heads=2, head_dim=64, capacity=32, dtype=torch.bfloat16):
    q = torch.zeros(batch, 1, heads, head_dim, dtype=dtype)
    k_new = torch.zeros(batch, 1, kv_heads, head_dim, dtype=dtype)
    v_new = torch.zeros_like(k_new)
    k_cache = torch.zeros(batch, capacity, kv_heads, head_dim, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    seqlens = torch.zeros(batch, dtype=torch.int32)
    cos = torch.zeros(capacity, head_dim // 2)
    return q, k_new, v_new, k_cache, v_cache, seqlens, cos, cos.clone(), torch.zeros_like(q)


def _args(monkeypatch, ws_splits=1, **change):
    """Arguments for rope_decode_attention_cuda built by the wrapper from CPU tensors (their
    addresses are never dereferenced: every call here fails its checks, or finds no device), with
    a workspace sized for `ws_splits`, then `change` applied."""
    monkeypatch.setattr(dispatch, "cuda_stream", lambda t: 0)
    q, k_new, v_new, k_cache, v_cache, seqlens, cos, sin, out = _tensors()
    ws = torch.zeros(rdc.workspace_elems(q.shape[0], q.shape[2], q.shape[3], ws_splits))
    args = rdc.entry_args(q, k_new, v_new, k_cache, v_cache, seqlens, cos, sin, out, ws, 0.125, ws_splits)
    args["device"] = 0
    for name in ("k_cache", "v_cache"):  # CPU tensors need not be 16-byte aligned; make them look so
        args[name] = (args[name] + 15) // 16 * 16
    assert set(change) <= set(args), set(change) - set(args)
    args.update(change)
    return args


def test_entry_args_match_the_binding(monkeypatch):
    ext = _cuda_ext()
    args = _args(monkeypatch)
    doc = ext.rope_decode_attention_cuda.__doc__.splitlines()[0]
    assert len(re.findall(r"\barg\d+:", doc)) == len(args) == 35, doc


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(head_dim=65), "head_dim: the CUDA decode attention takes 32, 64, 128 or 256, got 65"),
        (dict(head_dim=96), "head_dim: .* got 96"),
        (dict(kv_heads=3), "kv_heads: 3 must be positive and divide heads = 8"),
        (dict(kv_heads=0), "kv_heads: 0 must be positive"),
        (dict(heads=0), "heads: expected 1..65535 query heads, got 0"),
        (dict(dtype=7), "q: unknown dtype code 7"),
        (dict(dtype=0), "q: the CUDA decode attention takes float16 or bfloat16, got float32"),
        (dict(batch=70000), "batch: expected 0..65535"),
        (dict(capacity=0), "capacity: expected 1..2"),
        (dict(table_len=0), "cos: the tables need at least one position"),
        (dict(table_stride=31), "cos: row stride 31 is shorter than head_dim / 2 = 32"),
        (dict(k_cache=4098), "k_cache: must be 16-byte aligned"),
        (dict(v_cache=4104), "v_cache: must be 16-byte aligned"),
        (dict(cache_stride_h=68), "k_cache: strides must be non-negative multiples of 8 elements"),
        (dict(cache_stride_s=-128), "k_cache: strides must be non-negative multiples of 8 elements"),
        (dict(q_stride_h=-64), "q: strides must be non-negative"),
        (dict(out_stride_b=-1), "out: strides must be non-negative"),
        (dict(softmax_scale=math.nan), "softmax_scale: must be finite"),
        (dict(splits=0), "splits: expected 1..65535, got 0"),
        (dict(splits=2), "workspace: needs 2112 float32 elements"),  # 2 * 8 * 2 * (64 + 2)
        (dict(q=0), "q: null pointer"),
        (dict(out=0), "out: null pointer"),
        (dict(device=-1), "device: expected a CUDA device ordinal"),
    ],
    ids=lambda v: next(iter(v)) if isinstance(v, dict) else None,
)
def test_entry_point_rejects_bad_arguments_by_name(monkeypatch, change, message):
    ext = _cuda_ext()
    args = _args(monkeypatch, **change)
    err = ext.rope_decode_attention_cuda(*args.values())  # returned, never thrown
    assert err.startswith("ValueError: "), err
    with pytest.raises(ValueError, match=message):
        dispatch.cuda_call(ext.rope_decode_attention_cuda, *args.values())


def test_a_workspace_that_fits_passes_the_checks(monkeypatch):
    ext = _cuda_ext()
    need = ext.rope_decode_workspace_elems_cuda(2, 8, 64, 3)
    assert need == rdc.workspace_elems(2, 8, 64, 3) == 2 * 8 * 3 * 66
    assert ext.rope_decode_workspace_elems_cuda(2, 8, 64, 1) == rdc.workspace_elems(2, 8, 64, 1) == 0
    short = _args(monkeypatch, splits=3, workspace=4096, workspace_elems=need - 1)
    assert ext.rope_decode_attention_cuda(*short.values()).startswith("ValueError: workspace: needs")
    unaligned = _args(monkeypatch, splits=3, workspace=4100, workspace_elems=need)
    assert ext.rope_decode_attention_cuda(*unaligned.values()).startswith("ValueError: workspace: needs")
    ok = _args(monkeypatch, splits=3, workspace=4096, workspace_elems=need, batch=0)
    assert ext.rope_decode_attention_cuda(*ok.values()) == ""  # an empty batch launches nothing


@pytest.mark.parametrize("batch,heads,head_dim", [(1, 1, 32), (2, 8, 64), (3, 24, 128), (64, 40, 256)])
@pytest.mark.parametrize("splits", [1, 2, 7, 256])
def test_workspace_size_is_the_entry_points(batch, heads, head_dim, splits):
    """The wrapper's workspace formula is rope_decode_workspace_elems (kernels_cuda.h), which the
    module exposes only when built with CUDA."""
    ext = _cuda_ext()
    expected = ext.rope_decode_workspace_elems_cuda(batch, heads, head_dim, splits)
    assert rdc.workspace_elems(batch, heads, head_dim, splits) == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
def test_valid_arguments_without_a_device_give_a_cuda_error(monkeypatch):
    ext = _cuda_ext()
    with pytest.raises(RuntimeError, match="rope_decode_attention: CUDA error"):
        dispatch.cuda_call(ext.rope_decode_attention_cuda, *_args(monkeypatch).values())


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
