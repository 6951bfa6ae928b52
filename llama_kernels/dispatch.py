"""Capability detection, backend choice, and the helpers every compiled backend calls.

Each op runs on one of four backends, tried in this order for the tensor's device:

* ``cuda``   - hand-written CUDA kernels in ``llama_kernels._C`` (CUDA tensors, module built with nvcc)
* ``triton`` - Triton kernels (CUDA tensors; CPU tensors only under ``TRITON_INTERPRET=1``,
  and then only when forced, since the interpreter is for testing, not speed)
* ``cpu``    - C++ kernels in ``llama_kernels._C`` (CPU tensors)
* ``torch``  - the PyTorch reference, always available

``LLAMA_KERNELS_BACKEND=torch|triton|cuda|cpu`` or ``with llama_kernels.use_backend(...)`` forces one; a
forced backend that cannot run the call raises. An automatic fallback is logged once per op and
reason on the ``llama_kernels`` logger.

The glue of the compiled backends (llama_kernels/cpu/, llama_kernels/cuda/) reaches
``llama_kernels._C`` through ``ext()``, passes dtypes as ``DTYPE_CODES`` (read from the module
itself), passes tensors to the CUDA entry points as descriptors built by ``tensor_arg()``, and
raises the errors of CUDA entry points through ``cuda_call()``.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import logging
import os
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Optional

import torch

log = logging.getLogger("llama_kernels")

BACKENDS = ("cuda", "triton", "cpu", "torch")

_forced: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("llama_kernels_backend", default=None)
# (op, message) pairs already logged by log_once(); tests replace it with an empty set.
logged: set[tuple[str, str]] = set()

# Environment variables this project read before its ops package was renamed. Hugging Face's
# `kernels` package reads KERNELS_*-prefixed variables too, so these names are no longer read.
OLD_ENV_NAMES = ("KERNELS_BACKEND", "KERNELS_CPU_ISA", "KERNELS_CUDA_ARCHS", "KERNELS_NO_CUDA",
                 "KERNELS_NATIVE", "KERNELS_DEBUG")


def warn_old_env_names(environ: Mapping[str, str] = os.environ) -> list[str]:
    """Log one line for each old variable name still set, naming its replacement; the names."""
    stale = [name for name in OLD_ENV_NAMES if name in environ]
    for name in stale:
        log.warning("%s is set but no longer read; set LLAMA_%s instead", name, name)
    return stale


@dataclass(frozen=True)
class Capabilities:
    ext: object  # the llama_kernels._C module, or None
    ext_error: Optional[str]  # why llama_kernels._C could not be imported
    ext_cuda: bool  # llama_kernels._C was built with CUDA
    triton_version: Optional[str]
    triton_error: Optional[str]
    interpreter: bool  # TRITON_INTERPRET=1
    cuda_available: bool  # torch sees a CUDA device


@functools.lru_cache(maxsize=None)
def capabilities() -> Capabilities:
    try:
        ext = importlib.import_module("llama_kernels._C")
        ext_error = None
    except ImportError as e:  # not built (source checkout) or built for another Python
        ext, ext_error = None, f"llama_kernels._C is not importable ({e}); build it with `pip install -e .`"
    try:
        import triton

        triton_version, triton_error = triton.__version__, None
    except ImportError as e:
        triton_version, triton_error = None, f"triton is not importable ({e})"
    return Capabilities(
        ext=ext,
        ext_error=ext_error,
        ext_cuda=bool(ext is not None and ext.build_info()["cuda"]),
        triton_version=triton_version,
        triton_error=triton_error,
        interpreter=os.environ.get("TRITON_INTERPRET", "0") == "1",
        cuda_available=torch.cuda.is_available(),
    )


def ext():
    """The compiled module; raises with the reason when it is missing."""
    caps = capabilities()
    if caps.ext is None:
        raise RuntimeError(caps.ext_error)
    return caps.ext


def dtype_codes() -> dict[torch.dtype, int]:
    """The codes of the dtypes the compiled kernels take, as llama_kernels._C defines them (DType
    in csrc/common.h): the float dtypes the kernels compute in, and the integer dtypes of the
    other tensors the CUDA entry points take (packed 4-bit codes, sequence lengths). Without llama_kernels._C no compiled backend runs and nothing needs them:
    this raises why the module is missing."""
    module = ext()
    if not hasattr(module, "dtype_codes"):
        raise RuntimeError("llama_kernels._C has no dtype_codes (built from older sources); rebuild it with "
                           "`pip install -e .`")
    return {getattr(torch, name): code for name, code in module.dtype_codes().items()}


def __getattr__(name: str):
    # DTYPE_CODES ({torch.float32: 0, ...}) is read from llama_kernels._C on first use, not at
    # import (which must work without the module), and then kept as a plain module attribute.
    if name == "DTYPE_CODES":
        codes = globals()["DTYPE_CODES"] = dtype_codes()
        return codes
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what every op computes on


def check_float_tensor(name: str, t: object, x: torch.Tensor) -> None:
    """That argument `name` is a tensor of one of FLOAT_DTYPES on the device of `x` (the op's
    input), else TypeError or ValueError naming it."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: dtype must be float32, float16 or bfloat16, got {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"{name}: is on {t.device} but x is on {x.device}")


def tensor_arg(t: Optional[torch.Tensor], name: str):
    """The descriptor (llama_kernels._C.TensorArg) by which a CUDA entry point takes tensor `t`:
    address, dtype code, device (-1 for the CPU), sizes and strides in elements. None gives an
    absent tensor (address 0), for the optional ones. A dtype without a code raises TypeError
    naming `name`."""
    module = ext()
    if t is None:
        return module.TensorArg()
    codes = globals().get("DTYPE_CODES") or __getattr__("DTYPE_CODES")
    code = codes.get(t.dtype)
    if code is None:
        names = ", ".join(str(d).removeprefix("torch.") for d in codes)
        raise TypeError(f"{name}: dtype {t.dtype} has no code for the compiled kernels (they take {names})")
    return module.TensorArg(t.data_ptr(), code, t.get_device(), t.shape, t.stride())


def forced_backend() -> Optional[str]:
    """The backend forced by use_backend() or LLAMA_KERNELS_BACKEND, or None for automatic choice."""
    name = _forced.get() or os.environ.get("LLAMA_KERNELS_BACKEND")
    if not name:
        return None
    name = name.strip().lower() or None
    if name is not None and name not in BACKENDS:
        raise ValueError(f"LLAMA_KERNELS_BACKEND: unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
    return name


@contextlib.contextmanager
def use_backend(name: Optional[str]) -> Iterator[None]:
    """Force a backend for the ops called inside the block (None restores automatic choice)."""
    if name is not None and name not in BACKENDS:
        raise ValueError(f"name: unknown backend {name!r}; expected one of {', '.join(BACKENDS)} or None")
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)


def cuda_stream(t: torch.Tensor) -> int:
    """The handle of the current CUDA stream on t's device, for the CUDA entry points."""
    return torch.cuda.current_stream(t.device).cuda_stream


@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    """Multiprocessors of a CUDA device (kernels size their grids and splits by it)."""
    return torch.cuda.get_device_properties(device).multi_processor_count


def host_sync_allowed(t: torch.Tensor) -> bool:
    """Whether a host-side check may read t's device values: not while tracing for
    torch.compile, nor while capturing a CUDA graph."""
    return not torch.compiler.is_compiling() and not (t.is_cuda and torch.cuda.is_current_stream_capturing())


def cuda_call(fn: Callable[..., str], *args, **kwargs) -> None:
    """Call a CUDA entry point of llama_kernels._C, which returns "" or "ValueError: ..." /
    "RuntimeError: ..." instead of throwing (see csrc/cuda/kernels_cuda.h), and raise its error."""
    err = fn(*args, **kwargs)
    if err:
        kind, _, message = err.partition(": ")
        raise (ValueError if kind == "ValueError" else RuntimeError)(message)


def unavailable(backend: str, device: torch.device) -> Optional[str]:
    """Why `backend` cannot run on `device` at all, or None if it can."""
    return _unavailable(backend, torch.device(device).type)


@functools.lru_cache(maxsize=None)
def _unavailable(backend: str, device_type: str) -> Optional[str]:
    caps = capabilities()
    if backend == "torch":
        return None
    if backend == "cuda":
        if device_type != "cuda":
            return f"the cuda backend needs CUDA tensors, got {device_type}"
        if caps.ext is None:
            return caps.ext_error
        return None if caps.ext_cuda else "llama_kernels._C was built without CUDA"
    if backend == "cpu":
        if device_type != "cpu":
            return f"the cpu backend needs CPU tensors, got {device_type}"
        return caps.ext_error
    if backend == "triton":
        if caps.triton_error:
            return caps.triton_error
        if device_type == "cuda" or (device_type == "cpu" and caps.interpreter):
            return None
        return f"triton needs CUDA tensors, or TRITON_INTERPRET=1 for {device_type} tensors"
    raise ValueError(f"backend: unknown backend {backend!r}")


def available_backends(device: torch.device | str) -> list[str]:
    """Backends that could run on `device`, in the order they are preferred."""
    device = torch.device(device)
    order = _preference(device)
    return [b for b in order if unavailable(b, device) is None]


def _preference(device: torch.device) -> tuple[str, ...]:
    return ("cuda", "triton", "torch") if device.type == "cuda" else ("cpu", "torch")


def clear_caches() -> None:
    """Forget the cached capability answers (tests that fake a missing backend call this)."""
    _unavailable.cache_clear()
    _candidates.cache_clear()


@functools.lru_cache(maxsize=None)
def _candidates(device_type: str, implemented: tuple[str, ...]) -> tuple[tuple[str, Optional[str]], ...]:
    """The implemented backends for a device type, preferred first, each with why it cannot run
    there at all (None if it can); computed once, since choose() runs on every call of every op."""
    return tuple((b, _unavailable(b, device_type)) for b in _preference(torch.device(device_type))
                 if b in implemented)


def log_once(op: str, message: str, level: int = logging.WARNING) -> None:
    key = (op, message)
    if key not in logged:
        logged.add(key)
        log.log(level, "%s: %s", op, message)


def choose(
    op: str,
    device: torch.device,
    unsupported: Optional[Mapping[str, Callable[[], Optional[str]]]] = None,
    implemented: tuple[str, ...] = BACKENDS,
) -> str:
    """Pick the backend for one call of `op`.

    `implemented` lists the backends the op has at all (others are skipped silently).
    `unsupported` maps a backend to a check returning why it cannot take this particular call
    (an odd size, say), or None. A forced backend that cannot run raises RuntimeError.
    """
    forced = forced_backend()
    if forced is not None:
        if forced not in implemented:
            raise RuntimeError(f"{op}: backend {forced!r} was forced but {op} has no {forced} implementation")
        reason = _unavailable(forced, device.type) or (
            unsupported[forced]() if unsupported and forced in unsupported else None)
        if reason:
            raise RuntimeError(f"{op}: backend {forced!r} was forced but cannot run this call: {reason}")
        return forced
    skipped, missing = [], False
    for backend, reason in _candidates(device.type, implemented):
        missing = missing or reason is not None
        if reason is None and unsupported and backend in unsupported:
            reason = unsupported[backend]()
        if reason is None:
            if skipped:
                # A backend missing from this build is worth a warning; a case one backend
                # leaves to another by design (too many rows, say) is only information.
                level = logging.WARNING if missing else logging.INFO
                log_once(op, f"using {backend} instead of " + "; ".join(skipped), level)
            return backend
        skipped.append(f"{backend} ({reason})")
    raise AssertionError("the torch backend is always available")
