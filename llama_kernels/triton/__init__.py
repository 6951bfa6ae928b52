"""Triton kernels, one module per op: rms_norm.py, int4_matmul.py, rope_attention.py (training
forward and backward) and rope_decode.py (the decode step), with rope_common.py holding the RoPE
pieces the two attention modules share.

Nothing imports these modules with llama_kernels itself: the op modules (llama_kernels/ops/) load
one through `kernels(name)` when a call runs on Triton. The `triton` package is optional, and
TRITON_INTERPRET must be set before any kernel is decorated (the tests set it at start-up), so a
Triton module is imported only once it is used.
"""
from __future__ import annotations

import importlib
from types import ModuleType


def kernels(name: str) -> ModuleType:
    """llama_kernels.triton.<name>, imported on first use (later calls find it in sys.modules)."""
    return importlib.import_module(f"{__name__}.{name}")
