"""The native format: this project's own checkpoint directory.

Layout
------
A directory holding

* `config.json` = {"format": "llama-kernels", "version": 1, "weights": "dense",
  "dtype": "float32", "model": ModelConfig.to_dict(), "metadata": {...}}, and
* `model.safetensors`, our parameter names in the model's dtype; a tied `output.weight` is not
  stored.

"weights" is the slot for quantized or pruned variants; a reader that does not know its value
refuses. A model quantized by `llama.quantize.quantize_` has "weights": "int4" or "nf4" and
"quantization": {"format", "group_size", "double_quant", "layers": [names of the 4-bit linear
layers]}; each such layer stores `NAME.packed` (uint8), `NAME.scales` and `NAME.zeros` (fp16;
no zeros for NF4, and no scales for NF4 with double quantization, which stores `NAME.absmax_q`
int8, `NAME.absmax_step` and `NAME.absmax_mean` fp32 instead) in place of `NAME.weight` (see
QuantLinear). Loading swaps those layers before the strict load; `dtype` casts the other
floating tensors only. No other format holds a quantized model.

Reading checks every field of "model" (ModelConfig), bounds what it declares by the tensors and
bytes model.safetensors holds before the model is built (llama.formats.common.check_config_fits),
and requires dense tensors to be float32, float16 or bfloat16 unless load_model is given a
`dtype` to cast them to (a float64 tensor, say, is a ValueError naming the file and tensor).

Writing keeps unrelated files already in the directory (a tokenizer, say) and removes weight
files of an earlier save that this one does not use.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from ..atomic import write_dir
from ..config import ModelConfig
from ..quantize import config_from_dict
from .common import (
    CONFIG_JSON, SAFETENSORS, Source, dense, dtype_name, get_tensor, is_weights_file, json_writer, open_safetensors,
    read_json, regular_file_size, save_safetensors,
)

NATIVE_FORMAT = "llama-kernels"
NATIVE_VERSION = 1
NATIVE_WEIGHTS = ("dense", "int4", "nf4")


@contextlib.contextmanager
def open_native(path: Path) -> Iterator[Source]:
    """The tensors and config of the native checkpoint directory `path`."""
    config_path = path / CONFIG_JSON
    raw = read_json(config_path)
    version = raw.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ValueError(f"{config_path}: missing or invalid \"version\" {version!r}")
    if version > NATIVE_VERSION:
        raise ValueError(f"{config_path}: format version {version} is newer than this reader "
                         f"({NATIVE_VERSION}); upgrade")
    weights = raw.get("weights", "dense")
    if not isinstance(weights, str) or weights not in NATIVE_WEIGHTS:
        raise ValueError(f"{config_path}: weights {weights!r} are not supported by this reader "
                         f"(known: {', '.join(NATIVE_WEIGHTS)})")
    if not isinstance(raw.get("model"), dict):
        raise ValueError(f"{config_path}: missing the \"model\" configuration")
    try:
        cfg = ModelConfig.from_dict(raw["model"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{config_path}: invalid model configuration: {e}") from None
    quantization = _native_quantization(raw, weights, config_path)
    with contextlib.ExitStack() as stack:
        tensors = open_safetensors(path / SAFETENSORS, stack)
        yield Source(cfg, list(tensors), lambda name: get_tensor(tensors[name], name, path), mapped=True,
                     quantization=quantization, stored_bytes=regular_file_size(path / SAFETENSORS))


def _native_quantization(raw: dict[str, Any], weights: str, config_path: Path) -> Optional[dict[str, Any]]:
    """The checked "quantization" entry of a native config.json (None for dense weights)."""
    q = raw.get("quantization")
    if weights == "dense":
        if q is not None:
            raise ValueError(f"{config_path}: \"quantization\" given but weights are \"dense\"")
        return None
    if not isinstance(q, dict):
        raise ValueError(f"{config_path}: weights {weights!r} need a \"quantization\" object")
    if q.get("format") != weights:
        raise ValueError(f"{config_path}: quantization.format {q.get('format')!r} differs from weights {weights!r}")
    layers = q.get("layers")
    if not isinstance(layers, list) or not all(isinstance(n, str) for n in layers) or len(set(layers)) != len(layers):
        raise ValueError(f"{config_path}: quantization.layers must be a list of distinct layer names")
    try:
        config_from_dict(q)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{config_path}: quantization.{e}") from None
    return q


def native_files(state: dict[str, torch.Tensor], cfg: ModelConfig, metadata: Optional[dict[str, Any]],
                 quantization: Optional[dict[str, Any]] = None) -> dict[str, Callable[[Path], None]]:
    """The files of a native checkpoint of `state`, as {name: writer} for llama.atomic.write_dir
    (config.json last, so that it marks the folder complete). A training checkpoint adds its own
    files to these and writes them all in one step."""
    tensors = dense(state, cfg)
    config = {
        "format": NATIVE_FORMAT,
        "version": NATIVE_VERSION,
        "weights": "dense" if quantization is None else quantization["format"],
        "dtype": dtype_name(state),
        "model": cfg.to_dict(),
        **({} if quantization is None else {"quantization": quantization}),
        "metadata": metadata or {},
    }
    try:
        config_writer = json_writer(config)
    except TypeError as e:
        raise ValueError(f"metadata: not JSON-serializable ({e})") from None
    return {SAFETENSORS: lambda p: save_safetensors(tensors, p), CONFIG_JSON: config_writer}


def save_native(state: dict[str, torch.Tensor], cfg: ModelConfig, path: Path,
                metadata: Optional[dict[str, Any]], quantization: Optional[dict[str, Any]] = None) -> None:
    """Write `state` (a state dict) as the native checkpoint directory `path`, atomically."""
    write_dir(path, native_files(state, cfg, metadata, quantization), stale=is_weights_file)
