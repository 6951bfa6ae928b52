"""Model configuration: one dataclass, named presets, YAML files and `key=value` overrides.

    cfg = ModelConfig.preset("stories42M")
    cfg = ModelConfig.from_spec("configs/sheared-1.3b.yaml", ["max_seq_len=8192", "rope_scaling=dynamic"])

    python -m llama.config stories42M tie_embeddings=false     # show a config (see __main__.py)

The config travels inside every checkpoint this project writes (`to_dict` / `from_dict`). This
module also holds `ensure_own_package`, run on import: the check that the `llama` package around
our modules is this project's.
"""
from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

# The distribution this package ships in; `llama/__init__.py` sets it on the package first thing.
DISTRIBUTION = "llama-kernels"


def ensure_own_package(package: str = __name__.split(".")[0]) -> None:
    """Raise ImportError when `package` (the top-level package of this module) is not this
    project's `llama`.

    PyPI's unrelated `llama`, or a folder named `llama` earlier on sys.path, could otherwise be
    imported around this project's modules and fail later with an obscure error."""
    parent = sys.modules.get(package)
    if parent is not None and getattr(parent, "DISTRIBUTION", None) != DISTRIBUTION:
        where = getattr(parent, "__file__", None) or list(getattr(parent, "__path__", []))
        raise ImportError(
            f"`import {package}` gave a package from {where}, not the `{package}` of {DISTRIBUTION}; "
            f"remove or rename it (or fix sys.path / PYTHONPATH), then reinstall {DISTRIBUTION}")


ensure_own_package()

ROPE_SCALINGS = ("none", "linear", "dynamic")
NORMS = ("rms", "layer")
MLPS = ("swiglu", "gelu")


@dataclass
class ModelConfig:
    """Shape and variant of a LLaMA-family decoder.

    hidden_dim: FFN width; when None it is derived as llama2.c does:
        multiple_of * ceil(ffn_dim_multiplier * (2/3 * 4 * dim) / multiple_of).
    n_kv_heads: None means n_heads (multi-head attention); fewer means GQA/MQA.
    rope_scaling: "none"; "linear" divides positions by rope_scaling_factor; "dynamic" (NTK)
        raises the RoPE base once a sequence runs past max_seq_len.
    """

    dim: int = 288
    n_layers: int = 6
    n_heads: int = 6
    n_kv_heads: Optional[int] = None
    vocab_size: int = 32000
    hidden_dim: Optional[int] = None
    multiple_of: int = 32
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    rope_scaling: str = "none"
    rope_scaling_factor: float = 1.0
    dropout: float = 0.0  # on embeddings and on each residual branch
    attn_dropout: float = 0.0  # on attention probabilities
    tie_embeddings: bool = False
    norm: str = "rms"
    mlp: str = "swiglu"

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.hidden_dim is None:
            self.hidden_dim = self.derived_hidden_dim()
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim",
                     "multiple_of", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        if self.dim % self.n_heads:
            raise ValueError(f"n_heads: {self.n_heads} does not divide dim {self.dim}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_kv_heads: {self.n_kv_heads} does not divide n_heads {self.n_heads}")
        if self.head_dim % 2:
            raise ValueError(f"dim: head_dim {self.head_dim} must be even for rotary embeddings")
        for name, allowed in (("rope_scaling", ROPE_SCALINGS), ("norm", NORMS), ("mlp", MLPS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}: expected one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if not self.rope_scaling_factor >= 1.0:
            raise ValueError(f"rope_scaling_factor: expected >= 1, got {self.rope_scaling_factor}")
        for name in ("dropout", "attn_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name}: expected a probability in [0, 1), got {getattr(self, name)}")
        if not (self.norm_eps > 0 and self.rope_theta > 0):
            raise ValueError("norm_eps and rope_theta: expected positive numbers")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def derived_hidden_dim(self) -> int:
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)

    def num_params(self, include_embeddings: bool = True) -> int:
        d, h, kv = self.dim, self.hidden_dim, self.n_kv_heads * self.head_dim
        ffn = (3 if self.mlp == "swiglu" else 2) * d * h
        norm = d if self.norm == "rms" else 2 * d
        per_layer = d * d * 2 + 2 * d * kv + ffn + 2 * norm
        total = self.n_layers * per_layer + norm
        if include_embeddings:
            total += self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return total

    # ------------------------------------------------------------------ serialization
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"config: unknown field(s) {', '.join(unknown)}")
        return cls(**d)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def preset(cls, name: str) -> "ModelConfig":
        if name not in PRESETS:
            raise ValueError(f"preset: unknown preset {name!r}; known: {', '.join(PRESETS)}")
        return cls(**PRESETS[name])

    @classmethod
    def from_yaml(cls, path: str | Path) -> "ModelConfig":
        return cls.from_dict(_yaml_fields(path))

    @classmethod
    def from_spec(cls, spec: str | Path | None, overrides: Sequence[str] = ()) -> "ModelConfig":
        """A preset name or YAML path (None: the defaults), then `key=value` overrides.

        Derived fields (hidden_dim, n_kv_heads) are derived after the overrides, so `dim=1024`
        on a preset that leaves hidden_dim open also widens the FFN.
        """
        if spec is None:
            raw: dict[str, Any] = {}
        elif str(spec) in PRESETS:
            raw = dict(PRESETS[str(spec)])
        else:
            raw = _yaml_fields(spec)
        raw.update(parse_overrides(overrides))
        return cls.from_dict(raw)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _yaml_fields(path: str | Path) -> dict[str, Any]:
    """The fields a YAML file sets, on top of `preset: NAME` if it names one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config: no preset named {str(path)!r} and no such file")
    data = yaml.safe_load(path.read_text()) or {}
    if isinstance(data, dict) and isinstance(data.get("model"), dict):
        data = data["model"]  # a run config nests the model under `model:`
    if not isinstance(data, dict):
        raise ValueError(f"config: {path} must hold a mapping of model fields")
    data = dict(data)
    preset = data.pop("preset", None)
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"config: {path} names unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    return {**PRESETS.get(preset, {}), **data}


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """`["dim=512", "rope_scaling=linear"]` -> typed values (YAML scalars), field names checked."""
    known = {f.name for f in fields(ModelConfig)}
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"override: expected key=value, got {item!r}")
        if key not in known:
            raise ValueError(f"override: unknown field {key!r}; fields: {', '.join(sorted(known))}")
        out[key] = yaml.safe_load(value) if value.strip() else None
    return out


# llama2.c's TinyStories models share the embedding with the classifier.
PRESETS: dict[str, dict[str, Any]] = {
    "stories260K": dict(dim=64, n_layers=5, n_heads=8, n_kv_heads=4, vocab_size=512, multiple_of=4,
                        max_seq_len=512, tie_embeddings=True),
    "stories15M": dict(dim=288, n_layers=6, n_heads=6, vocab_size=32000, max_seq_len=256, tie_embeddings=True),
    "stories42M": dict(dim=512, n_layers=8, n_heads=8, vocab_size=32000, max_seq_len=1024, tie_embeddings=True),
    "stories110M": dict(dim=768, n_layers=12, n_heads=12, vocab_size=32000, max_seq_len=1024, tie_embeddings=True),
    "minllama": dict(dim=512, n_layers=8, n_heads=8, vocab_size=32000, max_seq_len=1024),
    "sheared-1.3b": dict(dim=2048, n_layers=24, n_heads=16, hidden_dim=5504, vocab_size=32000, max_seq_len=4096),
    "sheared-2.7b": dict(dim=2560, n_layers=32, n_heads=20, hidden_dim=6912, vocab_size=32000, max_seq_len=4096),
    "llama2-7b": dict(dim=4096, n_layers=32, n_heads=32, hidden_dim=11008, vocab_size=32000, max_seq_len=4096),
}

