"""Checkpoints: read and write every weight layout this project meets, recognised by content.

    model = load_model("out/ckpt.pt")                            # llama2.c training checkpoint
    model = load_model("TinyLlama-1.1B/", dtype=torch.bfloat16)   # Hugging Face directory
    save(model, "stories15M.bin", format="llama2c-bin-v0")        # for llama2.c's run.c
    save(model, "runs/exp1/")                                     # our own format

This module is the front door; each format lives in a module of `llama.formats` that documents
its layout (`FORMATS` lists their names):

    native          our directory: config.json + model.safetensors (dense or 4-bit)   native.py
    hf              a Hugging Face LlamaForCausalLM directory (safetensors)           hf.py
    llama2c-pt      llama2.c's train.py checkpoint {"model", "model_args"}            llama2c_pt.py
    minllama-pt     the same, with minllama's attention names                         llama2c_pt.py
    llama2c-bin-v0  llama2.c's legacy run.c export                                    llama2c_bin.py
    llama2c-bin-v1  the 256-byte "ak42" header, then fp32                             llama2c_bin.py
    llama2c-bin-v2  the same header, then Q8_0 matrices                               llama2c_bin.py
    gguf            llama.cpp's file (F32, F16, Q8_0, Q4_0; int4 as Q4_1); written only  gguf.py

`detect_format` looks at magic bytes, zip headers and JSON files, never at file names. Loading
builds the model on the meta device and hands the checkpoint's tensors to
`Transformer.load_weights`, so parameters are allocated once. `.pt` and safetensors files are
memory-mapped: what the model does not use (a training checkpoint's optimizer state) is never
read, and each parameter is copied out of the mapping once, so that rewriting the file later
cannot pull the weights from under the model. Loading never runs pickled code.
Name maps are strict: a missing, unexpected or mis-shaped tensor is a ValueError that names it
as the checkpoint spells it. A truncated or corrupt file is a ValueError that names the file.
Hostile files: every size a header or config declares is checked against the bytes and tensors
the checkpoint holds before anything is allocated for it (a .bin's exact size, a config's tensor
and parameter counts against the safetensors or .pt contents), every config field is
type-checked and named when wrong, and a path that is a FIFO, socket or device is refused
before it is opened; so loading costs at most a small multiple of the file's size. Dense
tensors must be float32, float16 or bfloat16 unless `dtype` asks for a cast.
Every write is atomic (llama.atomic): a directory checkpoint is assembled beside its path and
exchanged with the old one in one step, so a failed or killed save leaves the whole previous
checkpoint or the whole new one, never a mix; a second save to the same path while one runs fails
with llama.atomic.SaveInProgressError. A model with LoRA adapters is refused: merge them
(llama.lora.remove_lora) or save the adapters apart (llama.lora.save_adapters).

RoPE: our model rotates half-split pairs (i, i + D/2), as Hugging Face does. Meta, llama2.c and
minllama rotate interleaved pairs (2i, 2i + 1); their wq/wk rows are permuted on the way in
(`permute_interleaved_to_half`) and back on the way out (`permute_half_to_interleaved`).

What a format cannot hold is refused when saving, never silently dropped: 4-bit layers and the
LayerNorm and GELU variants need native; RoPE settings other than llama2.c's need native or hf.
Training-only settings (dropout, attn_dropout) are carried where a format has a field for them.
load_model returns the model in eval mode, with the checkpoint's dtype unless `dtype` is given.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import torch

from .config import ModelConfig, parse_overrides
from .formats.common import (
    FORMATS, PathLike, Source, check_config_fits, gather, permute_half_to_interleaved,
    permute_interleaved_to_half,
)
from .formats.detect import detect, detect_format
from .formats.gguf import save_gguf
from .formats.hf import open_hf, save_hf
from .formats.llama2c_bin import (
    LLAMA2C_NORM_EPS, LLAMA2C_ROPE_THETA, Llama2cHeader, open_llama2c_bin, read_llama2c_header, save_bin,
)
from .formats.llama2c_pt import pt_source, save_pt, torch_load
from .formats.native import open_native, save_native
from .lora import check_no_lora
from .model import Transformer, build
from .quantize import config_from_dict, prepare_quantized, quantization_info

__all__ = [
    "FORMATS",
    "Llama2cHeader",
    "SAVE_FORMATS",
    "detect_format",
    "load_model",
    "permute_half_to_interleaved",
    "permute_interleaved_to_half",
    "read_config",
    "read_llama2c_header",
    "save",
]

DIRECTORY_FORMATS = ("native", "hf")  # the others are single files
# What save writes: every format load reads, and GGUF, which is for llama.cpp and is not read back.
SAVE_FORMATS = FORMATS + ("gguf",)


# ============================================================================ loading
def read_config(path: PathLike) -> ModelConfig:
    """The model configuration of the checkpoint at `path`, without building the model."""
    path = Path(path)
    fmt, preloaded = detect(path)
    with _open_source(path, fmt, preloaded) as source:
        return source.config


def load_model(path: PathLike, device: Union[str, torch.device] = "cpu",
               dtype: Optional[torch.dtype] = None, overrides: Sequence[str] = ()) -> Transformer:
    """The model stored at `path`, in any of `FORMATS`, on `device`, in eval mode.

    dtype None keeps the checkpoint's (fp32 for llama2.c formats, also v2 which dequantizes);
    a tensor in another dtype than float32, float16 or bfloat16 (float64, say) is then a
    ValueError naming it, where a given dtype casts it.
    `overrides` are `key=value` config changes that keep the weights' shapes, such as
    `rope_scaling=dynamic rope_scaling_factor=4` or `max_seq_len=4096`.
    """
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype: expected a floating-point torch.dtype or None, got {dtype!r}")
    path = Path(path)
    fmt, preloaded = detect(path)
    with _open_source(path, fmt, preloaded) as source:
        config = source.config.replace(**parse_overrides(overrides)) if overrides else source.config
        check_config_fits(source, config, str(path))  # before the model is built for it
        model = build(config, init=False)
        if source.quantization is not None:  # empty 4-bit layers on the meta device, filled below
            q = source.quantization
            prepare_quantized(model, config_from_dict(q), q["layers"])
        state = gather(source, model, str(path), torch.device(device), dtype)
    model.load_weights(state)
    return model.eval()


@contextlib.contextmanager
def _open_source(path: Path, fmt: str, preloaded: Any) -> Iterator[Source]:
    """The checkpoint at `path` in format `fmt` (as detected; `preloaded`: what detection loaded)."""
    if fmt == "native":
        with open_native(path) as source:
            yield source
    elif fmt == "hf":
        with open_hf(path) as source:
            yield source
    elif fmt in ("llama2c-pt", "minllama-pt"):
        yield pt_source(preloaded if preloaded is not None else torch_load(path), path, fmt)
    else:
        with open_llama2c_bin(path) as source:
            yield source


# ============================================================================ saving
def save(
    model: Transformer,
    path: PathLike,
    format: str = "native",
    *,
    max_shard_bytes: Optional[int] = None,
    group_size: Optional[int] = None,
    metadata: Optional[dict[str, Any]] = None,
    quant: Optional[str] = None,
    tokenizer: Optional[Any] = None,
) -> Path:
    """Write `model` to `path` in `format` (one of SAVE_FORMATS) atomically; returns the path.

    Directory formats (native, hf) write into `path`, keeping unrelated files already there.
    max_shard_bytes (hf): split the weights into shards of at most this many bytes (a tensor
    larger than that gets a shard of its own). group_size (llama2c-bin-v2): the Q8_0 group; by
    default 64, halved until it divides dim, as llama2.c does. metadata (native): JSON-able
    information stored in config.json. A model with 4-bit layers (llama.quantize) is written
    only as native, or as gguf (int4 as Q4_1 blocks; llama/formats/gguf.py).
    quant (gguf): f32, f16, q8_0 or q4_0 for the matrices; None: f32 for a float32 model, else f16.
    tokenizer (gguf): a llama.tokenizer.Tokenizer whose vocabulary goes into the file.
    """
    if format not in SAVE_FORMATS:
        raise ValueError(f"format: expected one of {', '.join(SAVE_FORMATS)}, got {format!r}")
    check_no_lora(model)  # adapters: merge them first, or save them apart (llama.lora)
    for option, value, applies in (("max_shard_bytes", max_shard_bytes, "hf"),
                                   ("group_size", group_size, "llama2c-bin-v2"),
                                   ("metadata", metadata, "native"), ("quant", quant, "gguf"),
                                   ("tokenizer", tokenizer, "gguf")):
        if value is not None and format != applies:
            raise ValueError(f"{option}: applies only to format {applies!r}, not {format!r}")
    if max_shard_bytes is not None and (not isinstance(max_shard_bytes, int) or max_shard_bytes <= 0):
        raise ValueError(f"max_shard_bytes: expected a positive integer, got {max_shard_bytes!r}")
    cfg = model.config
    path = Path(path)
    if format == "gguf":  # it checks the model itself: what llama.cpp runs differs from the others
        if path.is_dir():
            raise ValueError(f"{path}: is a directory; this format is a single file")
        save_gguf(model, path, quant, tokenizer)
        return path
    _check_representable(cfg, format)
    quantization = quantization_info(model)
    if quantization is not None and format != "native":
        raise ValueError(f"format: {format!r} cannot hold a model with 4-bit layers "
                         f"({len(quantization['layers'])} of them); save it as 'native' (or 'gguf')")
    if format in DIRECTORY_FORMATS and path.exists() and not path.is_dir():
        raise ValueError(f"{path}: exists and is not a directory; this format is a directory")
    if format not in DIRECTORY_FORMATS and path.is_dir():
        raise ValueError(f"{path}: is a directory; this format is a single file")
    state = {name: t.detach() for name, t in model.state_dict().items()}
    if format == "native":
        save_native(state, cfg, path, metadata, quantization)
    elif format == "hf":
        save_hf(state, cfg, path, max_shard_bytes)
    elif format in ("llama2c-pt", "minllama-pt"):
        save_pt(state, cfg, path, format)
    else:
        save_bin(state, cfg, path, int(format[-1]), group_size)
    return path


def _check_representable(cfg: ModelConfig, fmt: str) -> None:
    problems = []
    if fmt != "native":
        if cfg.norm != "rms":
            problems.append(f"norm {cfg.norm!r} (only 'rms')")
        if cfg.mlp != "swiglu":
            problems.append(f"mlp {cfg.mlp!r} (only 'swiglu')")
    if fmt not in ("native", "hf"):
        if cfg.rope_theta != LLAMA2C_ROPE_THETA:
            problems.append(f"rope_theta {cfg.rope_theta} (fixed at {LLAMA2C_ROPE_THETA})")
        if cfg.rope_scaling != "none":
            problems.append(f"rope_scaling {cfg.rope_scaling!r} (none only)")
    if fmt.startswith("llama2c-bin") and cfg.norm_eps != LLAMA2C_NORM_EPS:
        problems.append(f"norm_eps {cfg.norm_eps} (run.c uses {LLAMA2C_NORM_EPS})")
    if fmt == "minllama-pt" and not cfg.tie_embeddings:
        problems.append("untied output layer (minllama always ties it to the embedding)")
    if problems:
        raise ValueError(f"format {fmt!r} cannot represent this model: {'; '.join(problems)}; "
                         "save as 'native' (or 'hf') instead")
