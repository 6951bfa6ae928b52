"""Which checkpoint format a file or directory holds, judged by its content, never by its name.

A directory is native when its `config.json` says {"format": "llama-kernels"}, and Hugging Face
when it describes a LLaMA (model_type "llama" or architecture LlamaForCausalLM). A file is a
llama2.c .bin v1/v2 by its magic number; a torch file (zip, or the legacy pickle format) is
loaded safely and is llama2c-pt or minllama-pt by its tensor names; GGUF and bare safetensors
files are refused with a hint (GGUF is written, for llama.cpp, not read); a file that opens
with a plausible llama2.c v0 header (7 int32, no magic) is llama2c-bin-v0. Anything else is a
ValueError that names the path, as is a path that is neither a regular file nor a directory (a
FIFO, socket or device), refused before it is opened.
"""
from __future__ import annotations

import stat
import struct
from pathlib import Path
from typing import Any

from .common import CONFIG_JSON, FORMATS, PathLike, path_stat, read_json
from .llama2c_bin import LLAMA2C_HEADER_BYTES, LLAMA2C_MAGIC, plausible_v0
from .llama2c_pt import ZIP_MAGIC, pt_flavour, torch_load
from .native import NATIVE_FORMAT

_GGUF_MAGIC = b"GGUF"
# torch's legacy (pre-zip) format opens with a pickled long: 0x1950a86a20f9469cfc6c.
_TORCH_LEGACY_MAGIC = b"\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")


def detect_format(path: PathLike) -> str:
    """Which of `FORMATS` the file or directory at `path` holds, judged by its content.

    FileNotFoundError if nothing is there; ValueError (naming the path) for anything else that
    is not a checkpoint this module reads.
    """
    return detect(Path(path))[0]


def detect(path: Path) -> tuple[str, Any]:
    """The format, and whatever was loaded to decide it (a .pt's contents) for reuse."""
    if stat.S_ISDIR(path_stat(path).st_mode):  # a FIFO, socket or device: refused unopened
        return _detect_dir(path), None
    with open(path, "rb") as f:
        head = f.read(LLAMA2C_HEADER_BYTES)
    if len(head) >= 8 and struct.unpack_from("<I", head)[0] == LLAMA2C_MAGIC:
        version = struct.unpack_from("<i", head, 4)[0]
        if version not in (1, 2):
            raise ValueError(f"{path}: llama2.c checkpoint of unsupported version {version} (known: 0, 1, 2)")
        return f"llama2c-bin-v{version}", None
    if head.startswith(ZIP_MAGIC) or _is_torch_legacy(head):
        ckpt = torch_load(path)
        return pt_flavour(ckpt, path), ckpt
    if head.startswith(_GGUF_MAGIC):
        raise ValueError(f"{path}: a GGUF file; GGUF is written for llama.cpp (save format='gguf') but not read "
                         f"(formats read: {', '.join(FORMATS)})")
    if _is_safetensors(head):
        raise ValueError(f"{path}: a bare safetensors file; pass the directory holding it and its {CONFIG_JSON}")
    if len(head) >= 28 and plausible_v0(struct.unpack_from("<7i", head)):
        return "llama2c-bin-v0", None
    raise ValueError(
        f"{path}: not a recognised checkpoint (no llama2.c magic, not a torch file, and the first "
        f"bytes are not a plausible llama2.c v0 header); formats: {', '.join(FORMATS)}"
    )


def _detect_dir(path: Path) -> str:
    config_path = path / CONFIG_JSON
    if not config_path.exists():
        raise ValueError(f"{path}: a directory without {CONFIG_JSON}, so neither a native nor a Hugging Face "
                         "checkpoint")
    raw = read_json(config_path)
    if raw.get("format") == NATIVE_FORMAT:
        return "native"
    model_type = raw.get("model_type")
    architectures = raw.get("architectures")
    if model_type == "llama" or (isinstance(architectures, list) and "LlamaForCausalLM" in architectures):
        return "hf"
    raise ValueError(
        f"{config_path}: neither our format (\"format\": \"{NATIVE_FORMAT}\") nor a Hugging Face LLaMA "
        f"(model_type {model_type!r}, architectures {architectures!r}; only model_type 'llama' or "
        "architectures [\"LlamaForCausalLM\"] is supported)"
    )


def _is_torch_legacy(head: bytes) -> bool:
    return len(head) >= 14 and head[0] == 0x80 and 2 <= head[1] <= 5 and head[2:14] == _TORCH_LEGACY_MAGIC


def _is_safetensors(head: bytes) -> bool:
    return len(head) >= 9 and head[8:9] == b"{" and 0 < struct.unpack_from("<Q", head)[0] < 1 << 30
