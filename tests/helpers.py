"""Shared by the tests: tolerances by dtype, poisoning, which backends can run here, transformers."""
import contextlib
import importlib.util

import pytest
import torch

from llama_kernels import dispatch

# (atol, rtol) for a kernel's output against the fp32 reference cast to the same dtype.
TOLERANCE = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def poisoned(shape, dtype, device="cpu"):
    """An output buffer full of NaN, so a kernel that skips an element fails the comparison."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def assert_close(actual, expected, dtype, scale=1.0):
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol * scale, rtol=rtol * scale)


def cpu_backends():
    """Backends testable on CPU tensors: the reference, the C++ kernels, Triton's interpreter."""
    backends = ["torch"]
    if dispatch.unavailable("cpu", torch.device("cpu")) is None:
        backends.append("cpu")
    if dispatch.unavailable("triton", torch.device("cpu")) is None:
        backends.append("triton")
    return backends


def cpu_variants():
    """cpu_backends(), plus "cpu@ISA" for every instruction set the C++ kernels were built for."""
    backends = cpu_backends()
    if "cpu" not in backends:
        return backends
    import llama_kernels

    return backends + [f"cpu@{isa}" for isa in llama_kernels.capabilities().ext.cpu_isas()]


@contextlib.contextmanager
def backend_variant(name):
    """Yields the backend of `name`; "cpu@avx2" runs the C++ backend's AVX2 build meanwhile."""
    backend, _, isa = name.partition("@")
    if isa:
        import llama_kernels

        ext = llama_kernels.capabilities().ext
        ext.set_cpu_isa(isa)
    try:
        yield backend
    finally:
        if isa:
            ext.set_cpu_isa("")


def transformers_installed() -> bool:
    return importlib.util.find_spec("transformers") is not None


def require_transformers():
    """The transformers module; skips only where it is not installed. Installed but failing to
    import (a name clash, say) fails the test instead of hiding behind a skip."""
    if not transformers_installed():
        pytest.skip("transformers is not installed")
    import transformers

    return transformers


def tiny_train_config(shards, out, **changes):
    """A TrainConfig for a tiny run on `shards` (2 layers of width 32, batch 4 of 32 tokens,
    8 steps, a loss logged every step), with `changes` applied."""
    from llama.train import TrainConfig

    base = dict(model="stories260K", model_overrides=["vocab_size=300", "dim=32", "n_heads=4", "n_kv_heads=2",
                                                      "n_layers=2", "max_seq_len=64"],
                data=str(shards), seq_len=32, batch_size=4, lr=3e-3, warmup_steps=2, max_steps=8, log_every=1,
                eval_every=4, eval_batches=2, save_every=4, out_dir=str(out), dropout=0.1, sample_tokens=0)
    base.update(changes)
    return TrainConfig(**base)


def logged_losses(out):
    """{step: training loss} from a run's metrics.jsonl."""
    import json
    from pathlib import Path

    records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}
