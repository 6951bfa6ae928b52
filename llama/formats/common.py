"""What the checkpoint formats share: the format names, file names of the directory formats,
RoPE permutations, a checkpoint's tensors before they become parameters (`Source`) and the strict
gathering of them into a state dict, safetensors reading and writing, and small JSON helpers.

RoPE: our model rotates half-split pairs (i, i + D/2), as Hugging Face does. Meta, llama2.c and
minllama rotate interleaved pairs (2i, 2i + 1); their wq/wk rows are permuted on the way in
(`permute_interleaved_to_half`) and back on the way out (`permute_half_to_interleaved`).

Name maps are strict (`gather`): a missing, unexpected or mis-shaped tensor is a ValueError that
names it as the checkpoint spells it. A dense tensor must be float32, float16 or bfloat16 (what
the model runs in) unless a `dtype` to cast to is given; 4-bit layers keep their exact dtypes.

Hostile files: nothing is allocated for what a header or config declares before it is checked
against the bytes there are. `check_config_fits` bounds the tensor count and parameter count a
config declares by what the checkpoint stores, before the model is built; `path_stat` refuses a
FIFO, socket or device before anything opens it; `read_json` turns any failure to parse
(including nesting too deep) into a ValueError naming the file.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file as _safetensors_save_file

from ..config import ModelConfig
from ..model import Transformer
from ..quantize import quantized_layers

PathLike = Union[str, os.PathLike]

FORMATS = (
    "native",
    "hf",
    "llama2c-pt",
    "minllama-pt",
    "llama2c-bin-v0",
    "llama2c-bin-v1",
    "llama2c-bin-v2",
)

CONFIG_JSON = "config.json"
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
SHARD_RE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
LAYER_RE = re.compile(r"layers\.(\d+)\.(.+)")  # our per-layer parameter names: index, rest


# ============================================================================ RoPE permutations
def _rope_geometry(w: torch.Tensor, n_heads: int) -> int:
    if not isinstance(n_heads, int) or n_heads <= 0:
        raise ValueError(f"n_heads: expected a positive integer, got {n_heads!r}")
    if w.dim() < 1 or w.shape[0] % n_heads:
        raise ValueError(f"weight: {w.shape[0] if w.dim() else 0} rows do not split into {n_heads} heads")
    head_dim = w.shape[0] // n_heads
    if head_dim % 2:
        raise ValueError(f"weight: head_dim {head_dim} must be even for rotary embeddings")
    return head_dim


def permute_interleaved_to_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a query/key projection (n_heads * head_dim, ...) from interleaved RoPE pairs
    (2i, 2i+1) (Meta, llama2.c) to half-split pairs (i, i + head_dim/2) (Hugging Face, ours).

    Within each head, row 2i + j moves to row j * head_dim/2 + i. For wk pass n_kv_heads.
    """
    head_dim = _rope_geometry(w, n_heads)
    rest = tuple(w.shape[1:])
    return w.reshape(n_heads, head_dim // 2, 2, *rest).transpose(1, 2).reshape(w.shape)


def permute_half_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of `permute_interleaved_to_half`."""
    head_dim = _rope_geometry(w, n_heads)
    rest = tuple(w.shape[1:])
    return w.reshape(n_heads, 2, head_dim // 2, *rest).transpose(1, 2).reshape(w.shape)


def to_interleaved(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our half-split wq/wk as Meta/llama2.c store them; other tensors unchanged."""
    out = {}
    for name, t in state.items():
        if name.endswith("attention.wq.weight"):
            t = permute_half_to_interleaved(t, cfg.n_heads)
        elif name.endswith("attention.wk.weight"):
            t = permute_half_to_interleaved(t, cfg.n_kv_heads)
        out[name] = t
    return out


# ============================================================================ small helpers
def file_kind(mode: int) -> str:
    """What an st_mode that is neither a regular file nor a directory is, in words."""
    for test, kind in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return kind
    return "not a regular file"


def path_stat(path: Path) -> os.stat_result:
    """os.stat(path) (following links), checked: FileNotFoundError if nothing is there, and a
    ValueError naming it if it is neither a regular file nor a directory (a FIFO or device would
    block or never end when read)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file or directory") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot be examined ({e.strerror or e})") from None
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        raise ValueError(f"{path}: {file_kind(st.st_mode)}, not a checkpoint file or directory")
    return st


def regular_file_size(path: Path, what: str = "file") -> int:
    """The size in bytes of the regular file at `path`; FileNotFoundError if it is missing, a
    ValueError naming it (and `what` it should be) if it is a directory, FIFO, socket or device."""
    st = path_stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{path}: a directory, expected a {what}")
    return st.st_size


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in `path`; ValueError naming the file if it is not one (FileNotFoundError
    if it is missing). Nesting too deep for the parser is a ValueError too, as is a FIFO."""
    regular_file_size(path, "JSON file")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise ValueError(f"{path}: not usable JSON (nested too deeply)") from None
    except FileNotFoundError:
        raise
    except (ValueError, OSError, MemoryError) as e:  # e.g. an integer with too many digits
        raise ValueError(f"{path}: cannot be read as JSON ({type(e).__name__}: {e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return raw


def make_config(where: str, **fields: Any) -> ModelConfig:
    """ModelConfig(**fields), a bad field a ValueError naming `where` (the file it came from)."""
    try:
        return ModelConfig(**fields)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: invalid model configuration: {e}") from None


def json_writer(obj: dict[str, Any]) -> Callable[[Path], None]:
    """A writer of `obj` as a JSON file (for llama.atomic.write_dir); TypeError now if it is not
    JSON-serializable."""
    text = json.dumps(obj, indent=2, sort_keys=False) + "\n"
    return lambda p: p.write_text(text, encoding="utf-8")


def is_weights_file(name: str) -> bool:
    """Whether a file in a checkpoint directory holds weights (safetensors file, shard or index):
    those of an earlier save that a new one does not write are removed."""
    return name in (SAFETENSORS, SAFETENSORS_INDEX) or SHARD_RE.fullmatch(name) is not None


# ============================================================================ loading
@dataclass
class Source:
    """One checkpoint's tensors, before they become our parameters.

    names: the tensors as stored; fetch(stored_name) reads one; stored_name(our_name) maps our
    parameter names to the checkpoint's; interleaved: wq/wk rows use interleaved RoPE pairs;
    ignored: stored tensors known not to be weights (e.g. RoPE tables), skipped by name;
    mapped: fetch returns views of a memory-mapped file (torch.load(mmap=True), safetensors).
    quantization: a native checkpoint's "quantization" entry (4-bit layers), else None.
    stored_bytes: the size of the file(s) holding the tensors, which bounds what the config may
    declare (`check_config_fits`); None where the loader has checked it exactly already.
    """

    config: ModelConfig
    names: list[str]
    fetch: Callable[[str], torch.Tensor]
    stored_name: Callable[[str], str] = lambda name: name
    interleaved: bool = False
    ignored: Callable[[str], bool] = lambda name: False
    mapped: bool = False
    quantization: Optional[dict[str, Any]] = None
    stored_bytes: Optional[int] = None


MIN_BYTES_PER_PARAM = 0.5  # 4-bit weights; no format stores a parameter in less
RUNNABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what the model's dense layers run in


def check_config_fits(source: Source, cfg: ModelConfig, where: str) -> None:
    """Refuse, before a model is built for it, a config that declares more than the checkpoint
    can hold: more than twice the tensors stored, or more parameters than the files' bytes hold at
    MIN_BYTES_PER_PARAM. Building the model (even on the meta device) costs time and memory in
    proportion to what the config declares, so a small file could otherwise make it run out."""
    if source.stored_bytes is not None:
        params = cfg.num_params()
        if params * MIN_BYTES_PER_PARAM > source.stored_bytes:
            raise ValueError(
                f"{where}: the config (dim {cfg.dim}, hidden_dim {cfg.hidden_dim}, n_layers {cfg.n_layers}, "
                f"vocab_size {cfg.vocab_size}) declares {params} parameters, more than the checkpoint's "
                f"{source.stored_bytes} bytes can hold (at least {MIN_BYTES_PER_PARAM} byte a parameter)")
    # Which tensors a layer holds depends on the variant only: a tiny model of it on the meta
    # device (nothing allocated) shows them.
    tiny = ModelConfig(dim=8, n_layers=1, n_heads=1, vocab_size=1, hidden_dim=1, max_seq_len=1, norm=cfg.norm,
                       mlp=cfg.mlp, tie_embeddings=cfg.tie_embeddings)
    with torch.device("meta"):
        names = list(Transformer(tiny).state_dict())
    per_layer = sum(1 for n in names if LAYER_RE.fullmatch(n))
    top = sum(1 for n in names if not LAYER_RE.fullmatch(n) and not (cfg.tie_embeddings and n == "output.weight"))
    needed = top + cfg.n_layers * per_layer
    stored = len(source.names)
    # A few missing tensors are left to `gather`, which names them; building the model for up to
    # twice the tensors stored costs no more than a small multiple of the checkpoint's size.
    if needed > 2 * stored:
        raise ValueError(f"{where}: the config declares n_layers {cfg.n_layers}, which needs at least {needed} "
                         f"tensors ({per_layer} a layer), but the checkpoint stores {stored}")

def gather(source: Source, model: Transformer, where: str, device: torch.device,
           dtype: Optional[torch.dtype]) -> dict[str, torch.Tensor]:
    """Our state dict from `source`, checked strictly against `model` (on the meta device)."""
    cfg = source.config
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    # The stored tensors of 4-bit layers (codes, scales, ...) keep their exact dtype.
    quantized = tuple(f"{name}." for name in quantized_layers(model))
    frozen = {name: t.dtype for name, t in model.state_dict().items()
              if name.startswith(quantized) and not name.endswith(".bias")} if quantized else {}
    tied_output = None
    if cfg.tie_embeddings:
        expected.pop("output.weight", None)
        tied_output = source.stored_name("output.weight")
    wanted = {source.stored_name(ours): ours for ours in expected}
    given = {name for name in source.names if not source.ignored(name)}
    missing = sorted(set(wanted) - given)
    unexpected = sorted(given - set(wanted) - {tied_output})
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensor(s) {', '.join(missing)}")
        if unexpected:
            parts.append(f"unexpected tensor(s) {', '.join(unexpected)}")
        raise ValueError(f"{where}: {'; '.join(parts)}")

    state: dict[str, torch.Tensor] = {}
    for stored, ours in wanted.items():
        raw = t = source.fetch(stored)
        if tuple(t.shape) != expected[ours]:
            raise ValueError(f"{where}: tensor {stored}: expected shape {expected[ours]} for this config, "
                             f"got {tuple(t.shape)}")
        if ours in frozen:
            if t.dtype != frozen[ours]:
                raise ValueError(f"{where}: tensor {stored}: expected {frozen[ours]} for a 4-bit layer, got {t.dtype}")
            t = t.to(device=device)
        else:
            if not t.is_floating_point():
                raise ValueError(f"{where}: tensor {stored}: expected floating point, got {t.dtype}")
            if dtype is None and t.dtype not in RUNNABLE_DTYPES:
                raise ValueError(f"{where}: tensor {stored}: dtype {t.dtype} is not one the model runs in "
                                 "(float32, float16, bfloat16); pass dtype= to cast it on loading")
            if source.interleaved and ours.endswith("attention.wq.weight"):
                t = permute_interleaved_to_half(t, cfg.n_heads)
            elif source.interleaved and ours.endswith("attention.wk.weight"):
                t = permute_interleaved_to_half(t, cfg.n_kv_heads)
            t = t.to(device=device, dtype=dtype)
        if source.mapped and t.untyped_storage().data_ptr() == raw.untyped_storage().data_ptr():
            # Mapping is lazy (a .pt's optimizer state is never read), but the parameters get
            # memory of their own: a file rewritten in place under a mapping crashes (SIGBUS).
            t = t.clone()
        state[ours] = t
    if tied_output in given:
        embedding = state["tok_embeddings.weight"]
        if not torch.equal(source.fetch(tied_output).to(embedding), embedding):
            raise ValueError(f"{where}: tensor {tied_output}: differs from the embedding, but the config ties them")
    return state


# ============================================================================ safetensors
def open_safetensors(path: Path, stack: contextlib.ExitStack) -> dict[str, Any]:
    """{tensor name: open handle} for one safetensors file (memory-mapped, read lazily)."""
    if not path.exists():
        raise ValueError(f"{path}: missing weights file")
    regular_file_size(path, "safetensors file")
    try:
        handle = stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))
        return {name: handle for name in handle.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path}: corrupt or truncated safetensors file ({e})") from None


def get_tensor(handle: Any, name: str, where: Path) -> torch.Tensor:
    """Tensor `name` through an open_safetensors handle; ValueError naming `where` if unreadable."""
    try:
        return handle.get_tensor(name)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{where}: cannot read tensor {name} ({e})") from None


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write `tensors` as one safetensors file at `path` (a temporary path of llama.atomic)."""
    _safetensors_save_file(tensors, str(path), metadata={"format": "pt"})


def dense(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors that own their memory, the tied output left out (safetensors refuses
    shared storage; weights joined for decoding are views of one tensor, see join_projections)."""
    out = {}
    for name, t in state.items():
        if cfg.tie_embeddings and name == "output.weight":
            continue
        t = t.to("cpu").contiguous()
        out[name] = t if t.untyped_storage().nbytes() == t.nbytes else t.clone()
    return out


def dtype_name(state: dict[str, torch.Tensor]) -> str:
    """The model's dtype as checkpoints spell it ("float32", "bfloat16", ...)."""
    return str(state["tok_embeddings.weight"].dtype).removeprefix("torch.")
