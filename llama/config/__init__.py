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
import re
import sys
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

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
INT_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim", "multiple_of", "max_seq_len")
FLOAT_FIELDS = ("norm_eps", "rope_theta", "rope_scaling_factor", "dropout", "attn_dropout")
MAX_INT = 2**63 - 1  # torch sizes are int64: larger cannot describe a tensor


def _check_int(name: str, value: Any) -> None:
    """A positive int (not a bool) that fits torch's int64 sizes; ValueError naming `name`."""
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= MAX_INT:
        raise ValueError(f"{name}: expected a positive integer (at most 2**63 - 1), got {value!r}")


def _check_float(name: str, value: Any) -> float:
    """A finite int or float (not a bool, None or a string) as a float; ValueError naming `name`."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValueError(f"{name}: expected a number, got {value!r} ({type(value).__name__})")
    try:
        result = float(value)
    except OverflowError:
        result = math.inf
    if not math.isfinite(result):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")
    return result
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

    Every field is checked on construction, a bad one a ValueError that names it: integers must
    be positive ints (not bools), floats finite ints or floats (stored as float; not bools, None
    or strings), tie_embeddings a bool, and rope_scaling, norm and mlp one of their names.
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
        # Every field is type-checked: a config read from a file must fail here, naming the
        # field, rather than later as an arithmetic or allocation error.
        for name in ("n_kv_heads", "hidden_dim"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name))
        for name in ("dim", "n_heads", "multiple_of"):
            _check_int(name, getattr(self, name))
        if self.ffn_dim_multiplier is not None:
            self.ffn_dim_multiplier = _check_float("ffn_dim_multiplier", self.ffn_dim_multiplier)
            if not self.ffn_dim_multiplier > 0:
                raise ValueError(f"ffn_dim_multiplier: expected a positive number or None, "
                                 f"got {self.ffn_dim_multiplier!r}")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.hidden_dim is None:
            self.hidden_dim = self.derived_hidden_dim()
        for name in INT_FIELDS:
            _check_int(name, getattr(self, name))
        for name in FLOAT_FIELDS:
            setattr(self, name, _check_float(name, getattr(self, name)))
        if not isinstance(self.tie_embeddings, bool):
            raise ValueError(f"tie_embeddings: expected true or false (a bool), got {self.tie_embeddings!r}")
        for name, allowed in (("rope_scaling", ROPE_SCALINGS), ("norm", NORMS), ("mlp", MLPS)):
            value = getattr(self, name)
            if not isinstance(value, str) or value not in allowed:
                raise ValueError(f"{name}: expected one of {', '.join(allowed)}, got {value!r}")
        if self.dim % self.n_heads:
            raise ValueError(f"n_heads: {self.n_heads} does not divide dim {self.dim}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_kv_heads: {self.n_kv_heads} does not divide n_heads {self.n_heads}")
        if self.head_dim % 2:
            raise ValueError(f"dim: head_dim {self.head_dim} must be even for rotary embeddings")
        if not self.rope_scaling_factor >= 1.0:
            raise ValueError(f"rope_scaling_factor: expected >= 1, got {self.rope_scaling_factor}")
        for name in ("dropout", "attn_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name}: expected a probability in [0, 1), got {getattr(self, name)}")
        for name in ("norm_eps", "rope_theta"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: expected a positive number, got {getattr(self, name)}")

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


def read_config_file(path: str | Path, what: str) -> dict[str, Any]:
    """The mapping in the YAML file `path` (--config): an empty file is {}; a missing file, YAML
    it cannot read, or anything but a mapping is an error naming --config (`what`: the kind of
    settings the mapping holds, for the message)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"--config: {path}: no such file") from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"--config: {path}: not valid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"--config: {path}: expected a mapping of {what}")
    return raw


def parse_overrides(items: Sequence[str], known: Optional[Iterable[str]] = None, what: str = "field") -> dict[str, Any]:
    """`["dim=512", "rope_scaling=linear"]` -> typed values (YAML scalars), names checked against
    `known` (default: ModelConfig's fields; `what` names them in errors)."""
    known = {f.name for f in fields(ModelConfig)} if known is None else set(known)
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"override: expected key=value, got {item!r}")
        if key not in known:
            raise ValueError(f"override: unknown {what} {key!r}; {what}s: {', '.join(sorted(known))}")
        out[key] = override_value(value, f"override: {item!r}")
    return out


def override_value(text: str, where: str = "override") -> Any:
    """The value of one `key=value` override: a YAML scalar, with numbers in exponent form that
    YAML 1.1 reads as text (`1e-5`, no dot) read as numbers. An empty value is None; YAML it
    cannot read is a ValueError naming `where`."""
    if not text.strip():
        return None
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or "not a YAML value"
        raise ValueError(f"{where}: {problem}") from None
    if isinstance(value, str) and re.fullmatch(r"\s*[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+\s*", value):
        return float(value)
    return value


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


def check_field_types(obj: Any) -> None:
    """Raise ValueError naming the first field of the dataclass instance `obj` whose value does
    not fit its annotation (see type_problem)."""
    hints = typing.get_type_hints(type(obj))
    for f in fields(obj):
        value = getattr(obj, f.name)
        problem = type_problem(value, hints[f.name])
        if problem:
            raise ValueError(f"{f.name}: expected {problem}, got {value!r}")


def type_problem(value: Any, hint: Any) -> Optional[str]:
    """None when `value` fits the type `hint` (bool, int, float, str, Optional/Union of them,
    list[...], dict[str, ...]), else what was expected, in words. An int fits float, a bool fits
    nothing but bool."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is Union:
        if any(type_problem(value, a) is None for a in args):
            return None
        return " or ".join(type_problem(None if a is type(None) else object(), a) or _name(a) for a in args)
    if hint is type(None):
        return None if value is None else "null"
    if hint is bool:
        return None if isinstance(value, bool) else "true or false"
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if hint is float:
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else "a number"
    if hint is str:
        return None if isinstance(value, str) else "a string"
    if origin is list:
        if not isinstance(value, list) or not all(type_problem(v, args[0]) is None for v in value):
            return f"a list of {_name(args[0])}s"
        return None
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) and type_problem(v, args[1]) is None
                                                  for k, v in value.items()):
            return f"a mapping of names to {_name(args[1])}s"
        return None
    return None


def _name(hint: Any) -> str:
    return {int: "integer", float: "number", str: "string", bool: "boolean", type(None): "null"}.get(
        hint, getattr(hint, "__name__", str(hint)))
