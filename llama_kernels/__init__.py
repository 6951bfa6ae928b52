"""Compiled kernels for LLaMA-family models: Triton, CUDA and C++ CPU, each with a PyTorch reference.

Public ops choose a backend per call (see llama_kernels.dispatch): CUDA, then Triton, then C++ CPU
or the reference. `LLAMA_KERNELS_BACKEND=torch|triton|cuda|cpu` or `use_backend(...)` forces one.
The ops live in llama_kernels/ops/, one module per op, with their backends beside them in
llama_kernels/cpu/, llama_kernels/cuda/ and llama_kernels/triton/; the 4-bit weight format is
llama_kernels/int4_format.py.
"""
from __future__ import annotations

import os
import platform

import torch

from .dispatch import BACKENDS, available_backends, capabilities, use_backend, warn_old_env_names
from .int4_format import QuantizedWeight, quantize_int4, quantize_nf4
from .ops.adamw import adamw_reference_, adamw_step_
from .ops.cross_entropy import linear_cross_entropy, linear_cross_entropy_reference
from .ops.int4_matmul import dequantize, int4_matmul, int4_matmul_reference
from .ops.linear import linear, linear_argmax, linear_reference
from .ops.masked_matmul import masked_matmul, masked_matmul_reference
from .ops.rms_norm import add_rms_norm, add_rms_norm_reference, rms_norm, rms_norm_reference
from .ops.rope_attention import (
    rope_attention,
    rope_attention_reference,
    rope_decode_attention,
    rope_decode_attention_reference,
)
from .ops.swiglu import swiglu, swiglu_reference

__version__ = "0.1.0"
DISTRIBUTION = "llama-kernels"  # the PyPI name; `llama` checks it, since its ops come from here
__all__ = [
    "BACKENDS",
    "QuantizedWeight",
    "adamw_reference_",
    "adamw_step_",
    "add_rms_norm",
    "add_rms_norm_reference",
    "available_backends",
    "build_info",
    "dequantize",
    "int4_matmul",
    "int4_matmul_reference",
    "linear",
    "linear_argmax",
    "linear_cross_entropy",
    "linear_cross_entropy_reference",
    "linear_reference",
    "masked_matmul",
    "masked_matmul_reference",
    "rms_norm",
    "quantize_int4",
    "quantize_nf4",
    "rms_norm_reference",
    "rope_attention",
    "rope_attention_reference",
    "rope_decode_attention",
    "rope_decode_attention_reference",
    "swiglu",
    "swiglu_reference",
    "use_backend",
]


warn_old_env_names()


def build_info() -> dict:
    """How the kernels were built and what this process can run."""
    caps = capabilities()
    info = {"version": __version__}
    if caps.ext is not None:
        ext = dict(caps.ext.build_info())
        info.update({k: v for k, v in ext.items() if k != "version"})
        info["extension_version"] = ext["version"]
        info["cpu_isa"] = caps.ext.cpu_isa()
    else:
        info["extension_error"] = caps.ext_error
    info.update(
        torch=torch.__version__,
        torch_cuda=torch.version.cuda,
        triton=caps.triton_version,
        triton_interpreter=caps.interpreter,
        python=platform.python_version(),
        cuda_device=torch.cuda.get_device_name() if caps.cuda_available else None,
        backends={
            "cpu": available_backends("cpu"),
            **({"cuda": available_backends("cuda")} if caps.cuda_available else {}),
        },
        forced_backend=os.environ.get("LLAMA_KERNELS_BACKEND") or None,
    )
    return info
