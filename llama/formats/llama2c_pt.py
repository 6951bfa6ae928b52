"""llama2.c's and minllama's `.pt` training checkpoints (formats llama2c-pt and minllama-pt).

Layout
------
llama2c-pt      llama2.c's train.py checkpoint: a torch dict {"model": state_dict,
                "model_args": {...}} (other keys - optimizer, iter_num, config, best_val_loss -
                are ignored). `_orig_mod.` (torch.compile) and `module.` (DDP) prefixes are
                stripped. The output layer is tied when `output.weight` is absent or equal to
                the embedding. wq/wk rows use interleaved RoPE pairs (permuted on the way in
                and out, see llama.formats.common).
minllama-pt     The same, with minllama's names `attention.compute_query/compute_key/
                compute_value/compute_output` for wq/wk/wv/wo.

Files are read with torch.load(weights_only=True), memory-mapped when they are zip-format: a
file that holds pickled Python objects is refused, never run, and what the model does not use
(the optimizer state) is never read.

Assumptions
-----------
* minllama (the CMU 11-711 assignment): its `load_pretrained` reads {"model", "model_args"}
  with llama2.c's keys, plus `layer_norm_eps` for the norm epsilon; its RoPE is interleaved and
  its embedding is always tied to the output. A `config` dict is used when `model_args` is
  absent. Writing minllama-pt therefore requires tied embeddings.
* Missing `model_args` entries take the defaults of the code that wrote the file (llama2.c:
  multiple_of 256, max_seq_len 2048; minllama: 32, 1024; both norm_eps 1e-5). An entry this
  module does not know is an error rather than a silent guess.
* The files have no field for RoPE scaling and llama2.c writes no rope_theta: they are read as
  none and 10000 (a rope_theta in model_args is honoured), and writing a model that differs from
  those is refused, as is writing a LayerNorm or GELU variant.
* dropout is carried in model_args; attn_dropout, which has no field, is dropped.
* model_args are type-checked (ModelConfig), and what they declare is bounded by the tensors
  the file holds and its size before the model is built (llama.formats.common.check_config_fits).
"""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_file
from ..config import ModelConfig
from .common import LAYER_RE, Source, make_config, regular_file_size, to_interleaved

ZIP_MAGIC = b"PK\x03\x04"  # how a zip-format torch file opens

_PT_WRAPPER_PREFIXES = ("_orig_mod.", "module.")  # torch.compile, DistributedDataParallel
_PT_IGNORED = ("freqs_cos", "freqs_sin", "freqs_cis", "rope.freqs")  # RoPE tables some versions saved
_MINLLAMA_NAMES = {
    "attention.wq.weight": "attention.compute_query.weight",
    "attention.wk.weight": "attention.compute_key.weight",
    "attention.wv.weight": "attention.compute_value.weight",
    "attention.wo.weight": "attention.compute_output.weight",
}
# model_args entry -> ModelConfig field. Anything else is an error, except _PT_ARGS_NO_EFFECT.
_PT_ARGS = {
    "dim": "dim", "n_layers": "n_layers", "n_heads": "n_heads", "n_kv_heads": "n_kv_heads",
    "vocab_size": "vocab_size", "hidden_dim": "hidden_dim", "multiple_of": "multiple_of",
    "ffn_dim_multiplier": "ffn_dim_multiplier", "norm_eps": "norm_eps", "layer_norm_eps": "norm_eps",
    "max_seq_len": "max_seq_len", "dropout": "dropout", "rope_theta": "rope_theta",
}
_PT_ARGS_NO_EFFECT = ("use_cache", "flash")
_PT_DEFAULTS = {  # the defaults of llama2.c's ModelArgs and minllama's LlamaConfig
    "llama2c-pt": dict(multiple_of=256, max_seq_len=2048, norm_eps=1e-5),
    "minllama-pt": dict(multiple_of=32, max_seq_len=1024, norm_eps=1e-5),
}


def torch_load(path: Path) -> Any:
    """torch.load with weights_only=True, memory-mapped when the file is zip-format."""
    with open(path, "rb") as f:
        is_zip = f.read(4) == ZIP_MAGIC
    if is_zip:
        try:
            with zipfile.ZipFile(path) as archive:
                if not any(n.endswith("data.pkl") for n in archive.namelist()):
                    raise ValueError(f"{path}: a zip archive but not a torch checkpoint (no data.pkl)")
        except zipfile.BadZipFile as e:
            raise ValueError(f"{path}: corrupt or truncated torch checkpoint ({e})") from None
    for mmap in ((True, False) if is_zip else (False,)):
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as e:
            detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(
                f"{path}: refusing to load: the checkpoint holds pickled Python objects that "
                "torch.load(weights_only=True) will not run, since unpickling arbitrary objects can "
                "execute code. Re-save it with plain tensors, dicts, lists and numbers only "
                f"(e.g. {{'model': state_dict, 'model_args': dict(...)}}). Detail: {detail}"
            ) from None
        except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as e:
            if mmap:
                continue  # a zip that cannot be memory-mapped: read it normally
            raise ValueError(f"{path}: corrupt or truncated torch checkpoint ({e})") from None
    raise AssertionError("unreachable")


def _pt_state_dict(ckpt: Any, path: Path) -> dict[str, torch.Tensor]:
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise ValueError(f"{path}: expected a llama2.c-style checkpoint, a dict with a 'model' state dict "
                         "and 'model_args'")
    state = {}
    for name, t in ckpt["model"].items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise ValueError(f"{path}: 'model' entry {name!r} is not a named tensor")
        for prefix in _PT_WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
        state[name] = t
    return state


def pt_flavour(ckpt: Any, path: Path) -> str:
    """"llama2c-pt" or "minllama-pt", by the attention weights' names of a loaded checkpoint."""
    names = _pt_state_dict(ckpt, path)
    if any(".attention.compute_query." in n for n in names):
        return "minllama-pt"
    if any(".attention.wq." in n for n in names):
        return "llama2c-pt"
    raise ValueError(f"{path}: a torch checkpoint without attention.wq or attention.compute_query weights; "
                     "not a llama2.c or minllama model")


def _pt_args(ckpt: dict[str, Any], path: Path) -> dict[str, Any]:
    args = ckpt.get("model_args")
    if args is None:  # minllama variants keep it under `config`; llama2.c's `config` is the training config
        config = ckpt.get("config")
        if isinstance(config, dict) and "dim" in config and "n_layers" in config:
            args = config
    if not isinstance(args, dict):
        raise ValueError(f"{path}: no 'model_args' dict with the model's shape (dim, n_layers, n_heads, ...)")
    return args


def pt_source(ckpt: dict[str, Any], path: Path, fmt: str) -> Source:
    """The tensors and config of a loaded .pt checkpoint of format `fmt`."""
    state = _pt_state_dict(ckpt, path)
    args = dict(_pt_args(ckpt, path))
    position = args.pop("position_embedding_type", "rotary")
    if position != "rotary":
        raise ValueError(f"{path}: model_args position_embedding_type {position!r} is not supported (rotary only)")
    unknown = sorted(k for k in args if k not in _PT_ARGS and k not in _PT_ARGS_NO_EFFECT)
    if unknown:
        raise ValueError(f"{path}: unknown model_args entr{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)}")
    fields = dict(_PT_DEFAULTS[fmt])
    fields.update({_PT_ARGS[k]: v for k, v in args.items() if k in _PT_ARGS and v is not None})
    for required in ("dim", "n_layers", "n_heads", "vocab_size"):
        if required not in fields:
            raise ValueError(f"{path}: model_args lacks {required!r}")
    output, embedding = state.get("output.weight"), state.get("tok_embeddings.weight")
    fields["tie_embeddings"] = output is None or (embedding is not None and torch.equal(output, embedding))
    cfg = make_config(str(path), **fields)
    if fmt == "minllama-pt":
        def stored_name(ours: str) -> str:
            m = LAYER_RE.fullmatch(ours)
            return f"layers.{m[1]}.{_MINLLAMA_NAMES[m[2]]}" if m and m[2] in _MINLLAMA_NAMES else ours
    else:
        def stored_name(ours: str) -> str:
            return ours
    return Source(cfg, list(state), state.__getitem__, stored_name=stored_name, interleaved=True,
                  ignored=lambda name: name in _PT_IGNORED, mapped=True, stored_bytes=regular_file_size(path))


def save_pt(state: dict[str, torch.Tensor], cfg: ModelConfig, path: Path, fmt: str) -> None:
    """Write `state` as a llama2c-pt or minllama-pt file at `path`, atomically."""
    state = to_interleaved({name: t.to("cpu") for name, t in state.items()}, cfg)
    if cfg.tie_embeddings:  # both names, one storage: what llama2.c's state_dict() holds
        state["output.weight"] = state["tok_embeddings.weight"]
    args: dict[str, Any] = {
        "dim": cfg.dim, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads,
        "vocab_size": cfg.vocab_size, "hidden_dim": cfg.hidden_dim, "multiple_of": cfg.multiple_of,
        "norm_eps": cfg.norm_eps, "max_seq_len": cfg.max_seq_len, "dropout": cfg.dropout,
    }
    if fmt == "minllama-pt":
        args["layer_norm_eps"] = args.pop("norm_eps")
        renamed = {}
        for name, t in state.items():
            m = LAYER_RE.fullmatch(name)
            renamed[f"layers.{m[1]}.{_MINLLAMA_NAMES[m[2]]}" if m and m[2] in _MINLLAMA_NAMES else name] = t
        state = renamed
    checkpoint = {"model": state, "model_args": args}
    with atomic_file(path) as tmp:
        torch.save(checkpoint, tmp)
