"""Every argument of rope_attention and rope_decode_attention, bad in one way at a time: a named
ValueError/TypeError that says what was expected, raised before any backend runs, on every backend
that runs here. Value checks (cu_seqlens offsets, positions, decode lengths) read tensors on the
host only where a sync is allowed; the decode fast path (check_bounds=False) never does."""
import pytest
import torch

import llama_kernels
from llama_kernels import dispatch
from llama_kernels.ops import rope_attention as mod
from tests.attention_cases import qkv, tables

F16 = torch.float16
HAS_TRITON = dispatch.unavailable("triton", torch.device("cpu")) is None
HAS_CPU = dispatch.unavailable("cpu", torch.device("cpu")) is None and mod._cpu_decode_unsupported() is None
TRAIN_BACKENDS = ["torch"] + (["triton"] if HAS_TRITON else [])
DECODE_BACKENDS = ["torch"] + (["cpu"] if HAS_CPU else []) + (["triton"] if HAS_TRITON else [])

I32 = torch.int32


def _cu(*offsets, dtype=I32):
    return torch.tensor(offsets, dtype=dtype)


@pytest.fixture
def no_backend_runs(monkeypatch):
    """Any path into a backend (reference, custom ops, decode dispatch) fails the test."""
    def ran(*args, **kwargs):
        raise AssertionError("a backend ran before the arguments were checked")

    for name in ("rope_attention_reference", "rope_attention_fwd", "_decode", "rope_decode_attention_op",
                 "rope_decode_attention_reference"):
        monkeypatch.setattr(mod, name, ran)


# ----------------------------------------------------------------------------- training
def _train_args(packed: bool, **change):
    """Packed: 10 tokens in sequences of 4 and 6; padded: (2, 6). H 4, Hkv 2, D 16; 8 table rows."""
    torch.manual_seed(0)
    q, k, v = qkv((10, 4, 16) if packed else (2, 6, 4, 16), 2, F16)
    cos, sin = tables(8, 16)
    args = dict(q=q, k=k, v=v, cos=cos, sin=sin)
    if packed:
        args["cu_seqlens"] = _cu(0, 4, 10)
    args.update(change)
    return args


TRAIN_CASES = [
    # cu_seqlens: values (the old code returned 5 of 10 tokens, or failed inside torch)
    (True, dict(cu_seqlens=_cu(0, 3, 5)), ValueError, "cu_seqlens: must end at the token count 10 (q.shape[0]), got 5"),
    (True, dict(cu_seqlens=_cu(0, 4, 12)), ValueError, "cu_seqlens: must end at the token count 10"),
    (True, dict(cu_seqlens=_cu(0, 12, 10)), ValueError, "cu_seqlens: offsets must be non-decreasing, got 12 then 10"),
    (True, dict(cu_seqlens=_cu(0, 6, 4, 10)), ValueError, "cu_seqlens: offsets must be non-decreasing, got 6 then 4"),
    (True, dict(cu_seqlens=_cu(-2, 4, 10)), ValueError, "cu_seqlens: must start at 0, got -2"),
    (True, dict(cu_seqlens=_cu(1, 4, 10)), ValueError, "cu_seqlens: must start at 0, got 1"),
    # cu_seqlens: structure
    (True, dict(cu_seqlens=_cu(0, 4, 10, dtype=torch.int64)), ValueError, "cu_seqlens: expected a 1-D int32 tensor"),
    (True, dict(cu_seqlens=_cu(0, 4, 10).view(1, 3)), ValueError, "cu_seqlens: expected a 1-D int32 tensor"),
    (True, dict(cu_seqlens=_cu(0)), ValueError, "cu_seqlens: expected a 1-D int32 tensor of batch + 1 offsets"),
    (True, dict(cu_seqlens=[0, 4, 10]), TypeError, "cu_seqlens: expected a torch.Tensor"),
    # max_seqlen
    (True, dict(max_seqlen=3), ValueError, "max_seqlen: 3 is smaller than the longest sequence in cu_seqlens, 6"),
    # too small a max_seqlen used to hide that 5 table rows do not cover a sequence of 6
    (True, dict(max_seqlen=5, cos=tables(5, 16)[0], sin=tables(5, 16)[1]), ValueError,
     "max_seqlen: 5 is smaller than the longest sequence"),
    (True, dict(cos=tables(5, 16)[0], sin=tables(5, 16)[1]), ValueError, "cos: has 5 positions but the sequences need 6"),
    (True, dict(max_seqlen=0), ValueError, "max_seqlen: expected a positive int"),
    (True, dict(max_seqlen=-1), ValueError, "max_seqlen: expected a positive int"),
    (True, dict(max_seqlen=6.0), ValueError, "max_seqlen: expected a positive int"),
    (True, dict(max_seqlen=True), ValueError, "max_seqlen: expected a positive int"),
    (False, dict(max_seqlen=6), ValueError, "max_seqlen: only meaningful with cu_seqlens"),
    # positions
    (True, dict(positions=torch.arange(10)), ValueError, r"positions: must index the 8 rows of cos/sin, got [0, 9]"),
    (True, dict(positions=torch.arange(10) - 1), ValueError, r"positions: must index the 8 rows of cos/sin, got [-1, 8]"),
    (False, dict(positions=torch.arange(6).expand(2, 6) + 3), ValueError, "positions: must index the 8 rows"),
    (True, dict(positions=torch.zeros(2, 5, dtype=torch.long)), ValueError,
     "positions: expected an int32 or int64 tensor of shape (10,)"),
    (False, dict(positions=torch.zeros(12, dtype=torch.long)), ValueError,
     "positions: expected an int32 or int64 tensor of shape (2, 6)"),
    (False, dict(positions=torch.zeros(2, 6)), ValueError, "positions: expected an int32 or int64 tensor"),
    (False, dict(positions=[[0] * 6] * 2), TypeError, "positions: expected a torch.Tensor"),
    # cos / sin
    (False, dict(sin=tables(8, 16)[1].double()), TypeError, "sin: dtype torch.float64 differs from cos's torch.float32"),
    (False, dict(sin=tables(7, 16)[1]), ValueError, "sin: shape (7, 8) differs from cos (8, 8)"),
    (False, dict(cos=torch.randn(8, 16)), ValueError, "cos: expected shape (positions, 8) for head dim 16"),
    (False, dict(cos=torch.zeros(8, 8, dtype=torch.long)), TypeError, "cos: expected a floating-point table"),
    (False, dict(sin=None), TypeError, "sin: expected a torch.Tensor"),
    # scalars
    (False, dict(dropout_p=1.0), ValueError, "dropout_p: expected a probability in [0, 1), got 1.0"),
    (False, dict(dropout_p=-0.1), ValueError, "dropout_p: expected a probability in [0, 1)"),
    (False, dict(dropout_p=float("nan")), ValueError, "dropout_p: expected a probability in [0, 1)"),
    (False, dict(dropout_p="0.1"), ValueError, "dropout_p: expected a probability in [0, 1)"),
    (False, dict(dropout_p=0.1, dropout_seed=1.5), TypeError, "dropout_seed: expected an int or None, got float"),
    (False, dict(dropout_p=0.1, dropout_seed=torch.tensor(3)), TypeError, "dropout_seed: expected an int or None"),
    (False, dict(softmax_scale=float("inf")), ValueError, "softmax_scale: expected a finite number or None"),
    (False, dict(softmax_scale=float("nan")), ValueError, "softmax_scale: expected a finite number or None"),
    (False, dict(softmax_scale="0.25"), ValueError, "softmax_scale: expected a finite number or None"),
    (False, dict(causal=1), TypeError, "causal: expected a bool, got int"),
]


@pytest.mark.parametrize("backend", TRAIN_BACKENDS)
@pytest.mark.parametrize("packed,change,error,message", TRAIN_CASES)
def test_rope_attention_bad_argument(no_backend_runs, backend, packed, change, error, message):
    with llama_kernels.use_backend(backend), pytest.raises(error) as info:
        llama_kernels.rope_attention(**_train_args(packed, **change))
    assert message in str(info.value)


@pytest.mark.parametrize("backend", TRAIN_BACKENDS)
@pytest.mark.parametrize("change", [dict(), dict(max_seqlen=6), dict(max_seqlen=8), dict(positions=torch.arange(10) % 8)])
def test_rope_attention_good_packed_arguments_still_run(backend, change):
    args = _train_args(True, **change)
    with llama_kernels.use_backend(backend):
        out = llama_kernels.rope_attention(**args)
    assert out.shape == args["q"].shape and torch.isfinite(out).all()


def test_empty_pack_takes_max_seqlen_zero():
    q, k, v = qkv((0, 4, 16), 2, F16)
    cos, sin = tables(8, 16)
    out = llama_kernels.rope_attention(q, k, v, cos, sin, cu_seqlens=_cu(0, 0), max_seqlen=0)
    assert out.shape == (0, 4, 16)


def test_offsets_are_not_read_where_no_host_sync_is_allowed(monkeypatch):
    """Compiling or capturing a CUDA graph: cu_seqlens' values stay on the device; only
    max_seqlen's own range is checked."""
    monkeypatch.setattr(dispatch, "host_sync_allowed", lambda t: False)
    q = torch.empty(10, 4, 16)
    bad = _cu(0, 3, 5)
    assert mod._packed_max_seqlen(bad, q, 7) == 7
    with pytest.raises(ValueError, match="max_seqlen: expected a positive int"):
        mod._packed_max_seqlen(bad, q, 0)
    with pytest.raises(ValueError, match="max_seqlen: required with cu_seqlens while capturing a CUDA graph"):
        mod._packed_max_seqlen(bad, q, None)


# ----------------------------------------------------------------------------- decode
def _decode_args(**change):
    """Batch 2, H 4, Hkv 2, D 16, capacity 12, lengths [0, 3]; 12 table rows."""
    torch.manual_seed(0)
    args = dict(q=torch.randn(2, 1, 4, 16).to(F16), k_new=torch.randn(2, 1, 2, 16).to(F16),
                v_new=torch.randn(2, 1, 2, 16).to(F16), k_cache=torch.zeros(2, 12, 2, 16, dtype=F16),
                v_cache=torch.zeros(2, 12, 2, 16, dtype=F16), cache_seqlens=torch.tensor([0, 3], dtype=I32))
    args["cos"], args["sin"] = tables(12, 16)
    args.update(change)
    return args


DECODE_CASES = [
    # cache_seqlens
    (dict(cache_seqlens=torch.tensor([0.0, 3.0])), ValueError, "cache_seqlens: expected an int32 or int64 tensor of shape (2,)"),
    (dict(cache_seqlens=torch.tensor([[0, 3]])), ValueError, "cache_seqlens: expected an int32 or int64 tensor of shape (2,)"),
    (dict(cache_seqlens=torch.tensor([0, 3, 4])), ValueError, "cache_seqlens: expected an int32 or int64 tensor of shape (2,)"),
    (dict(cache_seqlens=[0, 3]), TypeError, "cache_seqlens: expected a torch.Tensor"),
    (dict(cache_seqlens=torch.tensor([0, 12])), ValueError, r"cache_seqlens: lengths must be in [0, 11] (capacity 12"),
    (dict(cache_seqlens=torch.tensor([-1, 3])), ValueError, r"cache_seqlens: lengths must be in [0, 11]"),
    (dict(cache_seqlens=torch.tensor([0, 7]), cos=tables(6, 16)[0], sin=tables(6, 16)[1]), ValueError,
     r"cache_seqlens: lengths must be in [0, 5] (capacity 12, 6 table positions), got [0, 7]"),
    # cos / sin
    (dict(sin=tables(12, 16)[1].double()), TypeError, "sin: dtype torch.float64 differs from cos's torch.float32"),
    (dict(sin=tables(11, 16)[1]), ValueError, "sin: shape (11, 8) differs from cos (12, 8)"),
    (dict(cos=torch.randn(12, 5)), ValueError, "cos: expected shape (positions, 8)"),
    # tensors
    (dict(q=torch.randn(2, 2, 4, 16).to(F16)), ValueError, "q: expected one new token per sequence"),
    (dict(q=torch.randn(2, 1, 4, 0).to(F16), k_new=torch.randn(2, 1, 2, 0).to(F16),
          v_new=torch.randn(2, 1, 2, 0).to(F16), k_cache=torch.zeros(2, 12, 2, 0, dtype=F16),
          v_cache=torch.zeros(2, 12, 2, 0, dtype=F16), cos=torch.zeros(12, 0), sin=torch.zeros(12, 0)),
     ValueError, "q: head dim must be even for RoPE, got 0"),
    (dict(k_new=torch.randn(2, 1, 3, 16).to(F16)), ValueError, "k_new: expected shape (2, 1, 2, 16)"),
    (dict(v_new=torch.randn(2, 1, 2, 16)), TypeError, "v_new: dtype torch.float32 differs from q's torch.float16"),
    (dict(v_cache=torch.zeros(2, 11, 2, 16, dtype=F16)), ValueError, "v_cache: shape (2, 11, 2, 16) differs"),
    (dict(k_cache=torch.zeros(3, 12, 2, 16, dtype=F16)), ValueError, "k_cache: expected shape (2, capacity, kv_heads, 16)"),
    # scalars
    (dict(softmax_scale=float("nan")), ValueError, "softmax_scale: expected a finite number or None"),
    (dict(softmax_scale=True), ValueError, "softmax_scale: expected a finite number or None"),
    (dict(check_bounds="yes"), TypeError, "check_bounds: expected a bool, got str"),
]


@pytest.mark.parametrize("backend", DECODE_BACKENDS)
@pytest.mark.parametrize("change,error,message", DECODE_CASES)
def test_rope_decode_attention_bad_argument(no_backend_runs, backend, change, error, message):
    args = _decode_args(**change)
    k_before = args["k_cache"].clone() if isinstance(args["k_cache"], torch.Tensor) else None
    with llama_kernels.use_backend(backend), pytest.raises(error) as info:
        llama_kernels.rope_decode_attention(**args)
    assert message in str(info.value)
    assert torch.equal(args["k_cache"], k_before)  # nothing written


def test_decode_fast_path_reads_no_tensor_values(monkeypatch):
    """check_bounds=False (the model's decode step, CUDA-graph captured): the checks look only at
    metadata, so a length out of range is not caught here and no host sync happens."""
    calls = []
    monkeypatch.setattr(dispatch, "host_sync_allowed", lambda t: calls.append(t) or True)
    for name in ("tolist", "item", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, lambda *a, _n=name: calls.append(_n))
    monkeypatch.setattr(mod, "_decode", lambda q, *rest: q)  # the checks only
    args = _decode_args(cache_seqlens=torch.tensor([0, 40], dtype=I32))
    assert llama_kernels.rope_decode_attention(**args, check_bounds=False) is args["q"]
    assert calls == []
