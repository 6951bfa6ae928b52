"""Hugging Face: a LlamaForCausalLM directory, as transformers' save_pretrained writes it.

Layout
------
A directory holding `config.json` (LlamaConfig: hidden_size, intermediate_size,
num_hidden_layers, num_attention_heads, num_key_value_heads, vocab_size, rms_norm_eps,
max_position_embeddings, RoPE settings, tie_word_embeddings, ...) and the weights, as
`model.safetensors` or as `model-0000K-of-0000N.safetensors` shards listed in
`model.safetensors.index.json` ({"metadata": {"total_size"}, "weight_map": {tensor: shard}}).
Tensor names are transformers' (`model.embed_tokens.weight`, `model.layers.N.self_attn.q_proj.weight`,
`lm_head.weight`, ...). q/k are half-split already, as in our model (no permutation).

RoPE settings are read in the spellings of transformers 4.x (`rope_theta`, `rope_scaling`) and
5.x (`rope_parameters`), and both are written; only default, linear and dynamic scaling map onto
our model. config.json is type-checked field by field (a wrong type is a ValueError naming the
file and the field; rope_scaling and rope_parameters must be objects or null), and before the
model is built the config is checked against the tensors and bytes the safetensors files hold
(llama.formats.common.check_config_fits). Only safetensors weights are read:
`pytorch_model*.bin` needs pickle. Writing keeps unrelated files already in the directory and
removes weight files of an earlier save that this one does not use.
"""
from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from ..atomic import write_dir
from ..config import ModelConfig
from .common import (
    CONFIG_JSON, LAYER_RE, SAFETENSORS, SAFETENSORS_INDEX, Source, dense, dtype_name, get_tensor, is_weights_file,
    json_writer, make_config, open_safetensors, read_json, regular_file_size, save_safetensors,
)

_HF_TOP = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_HF_LAYER = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_HF_IGNORED_RE = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")  # older transformers saved it


def _hf_name(ours: str) -> str:
    if ours in _HF_TOP:
        return _HF_TOP[ours]
    m = LAYER_RE.fullmatch(ours)
    if m is None or m[2] not in _HF_LAYER:
        raise ValueError(f"{ours}: no Hugging Face LLaMA equivalent")
    return f"model.layers.{m[1]}.{_HF_LAYER[m[2]]}"


_MISSING = object()


def _field(raw: dict[str, Any], key: str, where: str, kind: str, default: Any = _MISSING,
           nullable: bool = False) -> Any:
    """raw[key] checked to be of `kind` ("int", "number", "bool", "str", "object"); `default` when
    absent (required when no default); None allowed only if `nullable`. ValueError naming the
    file and the field otherwise."""
    if key not in raw:
        if default is _MISSING:
            raise ValueError(f"{where}: missing field {key}")
        return default
    value = raw[key]
    if value is None and nullable:
        return None
    ok = {
        "int": lambda x: isinstance(x, int) and not isinstance(x, bool),
        "number": lambda x: isinstance(x, (int, float)) and not isinstance(x, bool),
        "bool": lambda x: isinstance(x, bool),
        "str": lambda x: isinstance(x, str),
        "object": lambda x: isinstance(x, dict),
    }[kind](value)
    if not ok:
        expected = {"int": "an integer", "number": "a number", "bool": "true or false", "str": "a string",
                    "object": "a JSON object"}[kind]
        raise ValueError(f"{where}: {key}: expected {expected}{' or null' if nullable else ''}, "
                         f"got {value!r} ({type(value).__name__})")
    return float(value) if kind == "number" else value


def _hf_rope(raw: dict[str, Any], where: str) -> tuple[float, str, float]:
    """(rope_theta, rope_scaling, factor) from transformers 4.x (`rope_theta`, `rope_scaling`)
    or 5.x (`rope_parameters`) spellings."""
    spec: dict[str, Any] = {}
    for key in ("rope_scaling", "rope_parameters"):  # each an object or null
        spec.update(_field(raw, key, where, "object", default=None, nullable=True) or {})
    if "rope_theta" in spec:  # 5.x; a 4.x rope_theta beside it may be null
        _field(raw, "rope_theta", where, "number", default=None, nullable=True)
        theta = _field(spec, "rope_theta", f"{where}: rope_parameters", "number")
        spec.pop("rope_theta")
    else:
        theta = _field(raw, "rope_theta", where, "number", default=10000.0)
    kinds = [_field(spec, key, f"{where}: rope scaling", "str", default=None, nullable=True)
             for key in ("rope_type", "type")]
    spec.pop("rope_type", None)
    spec.pop("type", None)
    kind = kinds[0] or kinds[1] or "default"
    original = _field(spec, "original_max_position_embeddings", f"{where}: rope scaling", "int", default=None,
                      nullable=True)
    spec.pop("original_max_position_embeddings", None)
    if original is not None and original != raw.get("max_position_embeddings"):
        raise ValueError(f"{where}: rope original_max_position_embeddings {original} differs from "
                         f"max_position_embeddings {raw.get('max_position_embeddings')}; not supported")
    if kind == "default":
        factor = _field(spec, "factor", f"{where}: rope scaling", "number", default=1.0)
        spec.pop("factor", None)
        if factor != 1.0:
            raise ValueError(f"{where}: rope factor {factor} without a scaling type")
        scaling = "none"
    elif kind in ("linear", "dynamic"):
        factor, scaling = _field(spec, "factor", f"{where}: rope scaling {kind!r}", "number"), kind
        spec.pop("factor")
    else:
        raise ValueError(f"{where}: rope scaling type {kind!r} is not supported (none, linear, dynamic)")
    if spec:
        raise ValueError(f"{where}: unsupported rope scaling field(s) {', '.join(sorted(spec))}")
    return theta, scaling, factor


def _config_from_hf(raw: dict[str, Any], where: str) -> ModelConfig:
    model_type = _field(raw, "model_type", where, "str", default="llama")
    if model_type != "llama":
        raise ValueError(f"{where}: model_type {model_type!r} is not supported (only 'llama')")
    hidden_act = _field(raw, "hidden_act", where, "str", default="silu")
    if hidden_act != "silu":
        raise ValueError(f"{where}: hidden_act {hidden_act!r} is not supported (LLaMA uses 'silu')")
    for key in ("attention_bias", "mlp_bias"):
        if _field(raw, key, where, "bool", default=False, nullable=True):
            raise ValueError(f"{where}: {key}=true is not supported (the model has no biases)")
    required = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    absent = [key for key in required if key not in raw]
    if absent:
        raise ValueError(f"{where}: missing field(s) {', '.join(absent)}")
    ints = {key: _field(raw, key, where, "int") for key in required}
    for key, value in ints.items():
        if value <= 0:
            raise ValueError(f"{where}: {key}: expected a positive integer, got {value}")
    n_heads = ints["num_attention_heads"]
    # transformers' default when absent or null
    n_kv_heads = _field(raw, "num_key_value_heads", where, "int", default=None, nullable=True) or n_heads
    head_dim = _field(raw, "head_dim", where, "int", default=None, nullable=True)
    if head_dim is not None and head_dim * n_heads != ints["hidden_size"]:
        raise ValueError(f"{where}: head_dim {head_dim} x {n_heads} heads != hidden_size {ints['hidden_size']}; "
                         "not supported")
    theta, scaling, factor = _hf_rope(raw, where)
    return make_config(
        where,
        dim=ints["hidden_size"],
        n_layers=ints["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        vocab_size=ints["vocab_size"],
        hidden_dim=ints["intermediate_size"],
        norm_eps=_field(raw, "rms_norm_eps", where, "number", default=1e-6),
        max_seq_len=_field(raw, "max_position_embeddings", where, "int", default=2048),
        rope_theta=theta,
        rope_scaling=scaling,
        rope_scaling_factor=factor,
        attn_dropout=_field(raw, "attention_dropout", where, "number", default=0.0),
        tie_embeddings=_field(raw, "tie_word_embeddings", where, "bool", default=False),
    )


@contextlib.contextmanager
def open_hf(path: Path) -> Iterator[Source]:
    """The tensors and config of the Hugging Face directory `path` (weights memory-mapped)."""
    config_path = path / CONFIG_JSON
    cfg = _config_from_hf(read_json(config_path), str(config_path))
    with contextlib.ExitStack() as stack:
        index_path = path / SAFETENSORS_INDEX
        if index_path.exists():
            index = read_json(index_path)
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise ValueError(f"{index_path}: missing or invalid \"weight_map\"")
            tensors: dict[str, Any] = {}
            files = {path / shard for shard in set(weight_map.values())}
            for shard in sorted(set(weight_map.values())):
                if Path(shard).name != shard:
                    raise ValueError(f"{index_path}: shard name {shard!r} must be a plain file name")
                for name, handle in open_safetensors(path / shard, stack).items():
                    if weight_map.get(name) != shard:
                        raise ValueError(f"{path / shard}: tensor {name} is not listed for this shard in "
                                         f"{index_path.name}")
                    tensors[name] = handle
            unlisted = sorted(set(weight_map) - set(tensors))
            if unlisted:
                raise ValueError(f"{index_path}: lists tensor(s) its shards do not hold: {', '.join(unlisted)}")
        elif (path / SAFETENSORS).exists():
            tensors = open_safetensors(path / SAFETENSORS, stack)
            files = {path / SAFETENSORS}
        elif any(path.glob("pytorch_model*.bin")):
            raise ValueError(f"{path}: only safetensors weights are supported (pytorch_model*.bin needs pickle); "
                             "convert with save_pretrained(..., safe_serialization=True)")
        else:
            raise ValueError(f"{path}: no {SAFETENSORS} or {SAFETENSORS_INDEX}")
        yield Source(
            cfg,
            list(tensors),
            lambda name: get_tensor(tensors[name], name, path),
            stored_name=_hf_name,
            ignored=lambda name: _HF_IGNORED_RE.fullmatch(name) is not None,
            mapped=True,
            stored_bytes=sum(regular_file_size(f) for f in files),
        )


def _hf_config(cfg: ModelConfig, dtype: str) -> dict[str, Any]:
    rope_parameters: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    rope_scaling = None
    if cfg.rope_scaling != "none":
        rope_parameters.update(rope_type=cfg.rope_scaling, factor=cfg.rope_scaling_factor)
        rope_scaling = {"type": cfg.rope_scaling, "rope_type": cfg.rope_scaling, "factor": cfg.rope_scaling_factor}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "max_position_embeddings": cfg.max_seq_len,
        "rope_theta": cfg.rope_theta,       # transformers 4.x
        "rope_scaling": rope_scaling,       # transformers 4.x
        "rope_parameters": rope_parameters,  # transformers 5.x
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": cfg.attn_dropout,
        "torch_dtype": dtype,
    }


def save_hf(state: dict[str, torch.Tensor], cfg: ModelConfig, path: Path, max_shard_bytes: Optional[int]) -> None:
    """Write `state` as a Hugging Face directory at `path`, atomically; sharded when the weights
    exceed `max_shard_bytes`."""
    tensors = {_hf_name(name): t for name, t in dense(state, cfg).items()}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    # Shards are filled in order, as huggingface_hub's split_torch_state_dict_into_shards does;
    # that library is not a dependency of this project (it brings an HTTP stack), and the files
    # and index written here are the ones transformers reads (tests load them with it).
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if max_shard_bytes is not None and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    files: dict[str, Callable[[Path], None]] = {}
    if len(shards) == 1:
        files[SAFETENSORS] = lambda p: save_safetensors(tensors, p)
    else:
        weight_map = {}
        for k, shard in enumerate(shards, start=1):
            filename = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
            files[filename] = lambda p, shard=shard: save_safetensors(shard, p)
            weight_map.update(dict.fromkeys(shard, filename))
        files[SAFETENSORS_INDEX] = json_writer({"metadata": {"total_size": total}, "weight_map": weight_map})
    files[CONFIG_JSON] = json_writer(_hf_config(cfg, dtype_name(state)))
    write_dir(path, files, stale=is_weights_file)
