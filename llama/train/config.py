"""What a training run is told: one dataclass, read from YAML and `key=value` overrides, every
key and type checked before any work starts.

    cfg = TrainConfig.from_spec("configs/train/botchan-tiny.yaml", ["lr=1e-3", "max_steps=200"])
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Sequence, Union


from ..config import check_field_types, override_value, parse_overrides, read_config_file

DTYPES = ("fp32", "bf16", "fp16")


@dataclass
class TrainConfig:
    """A training run.

    Model: `model` is a preset name or a model YAML (configs/*.yaml), changed by
    `model_overrides` (`key=value` strings); `init_from` starts from any checkpoint llama.load
    reads instead. Data: `data` is a prepared token folder (`python -m llama.data prepare`), or
    a mapping {domain: folder} mixed by `data_weights`; None trains on the botchan sample (its
    tokens prepared into out_dir/data with `tokenizer`, else the sample's own BPE model).
    """

    # model
    model: str = "stories260K"
    model_overrides: list[str] = field(default_factory=list)
    init_from: Optional[str] = None
    # data
    data: Union[str, dict[str, str], None] = None
    data_weights: Optional[dict[str, float]] = None
    tokenizer: Optional[str] = None
    seq_len: int = 256
    batch_size: int = 8  # the global batch: under torchrun, split evenly across the ranks
    grad_accum: int = 1
    # optimizer and schedule
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    max_steps: int = 1000
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    correct_bias: bool = True
    layer_decay: Optional[float] = None
    decay_norms_and_embeddings: bool = False
    grad_clip: float = 1.0
    # numerics and speed
    dtype: str = "fp32"  # autocast dtype over fp32 master weights
    fused: bool = True  # fused SwiGLU and linear + cross-entropy; false: the eager ops
    gradient_checkpointing: bool = False
    compile: bool = False
    dropout: Optional[float] = None  # None keeps the model's
    attn_dropout: Optional[float] = None
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    # LoRA / QLoRA
    lora: bool = False
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: ["wq", "wk", "wv", "wo"])
    trainable: list[str] = field(default_factory=list)
    # run
    out_dir: str = "runs/train"
    seed: int = 0
    device: str = "auto"
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 20
    save_every: int = 200
    keep_last: int = 3
    resume: bool = False
    tensorboard: bool = False
    sample_tokens: int = 64  # generated at the end from the trained model; 0 for none

    def __post_init__(self):
        check_field_types(self)
        positive = ("seq_len", "batch_size", "grad_accum", "max_steps", "log_every", "eval_every", "eval_batches",
                    "save_every", "keep_last", "lora_rank")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: expected a positive integer, got {getattr(self, name)!r}")
        if not 0 <= self.warmup_steps <= self.max_steps:
            raise ValueError(f"warmup_steps: expected 0 <= warmup_steps <= max_steps ({self.max_steps}), "
                             f"got {self.warmup_steps}")
        for name, lo, hi in (("lr", 0.0, float("inf")), ("min_lr_ratio", 0.0, 1.0), ("weight_decay", 0.0, float("inf")),
                             ("beta1", 0.0, 1.0), ("beta2", 0.0, 1.0), ("grad_clip", 0.0, float("inf")),
                             ("label_smoothing", 0.0, 1.0), ("z_loss", 0.0, float("inf")),
                             ("lora_dropout", 0.0, 1.0)):
            value = getattr(self, name)
            if not lo <= value < hi and not (name == "min_lr_ratio" and value == 1.0):
                raise ValueError(f"{name}: expected a number in [{lo}, {hi}), got {value!r}")
        if not self.eps > 0:
            raise ValueError(f"eps: expected a positive number, got {self.eps!r}")
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            raise ValueError(f"layer_decay: expected a number in (0, 1], got {self.layer_decay!r}")
        for name in ("dropout", "attn_dropout"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < 1:
                raise ValueError(f"{name}: expected a probability in [0, 1), got {value!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: expected one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.seed < 0 or self.seed >= 2**63:
            raise ValueError(f"seed: expected an integer in [0, 2**63), got {self.seed!r}")
        if isinstance(self.data, dict) and not self.data:
            raise ValueError("data: an empty mapping; give a folder or {domain: folder}")
        if self.data_weights is not None and not isinstance(self.data, dict):
            raise ValueError("data_weights: applies only when data is a mapping {domain: folder}")
        if self.data_weights is not None:
            unknown = sorted(set(self.data_weights) - set(self.data))
            if unknown:
                raise ValueError(f"data_weights: unknown domain(s) {', '.join(unknown)}; domains: "
                                 f"{', '.join(self.data)}")

    # ------------------------------------------------------------------ reading
    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "config") -> "TrainConfig":
        if not isinstance(raw, dict):
            raise ValueError(f"{where}: expected a mapping of training settings")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; keys: {', '.join(sorted(known))}")
        try:
            return cls(**raw)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None

    @classmethod
    def from_spec(cls, path: Optional[Union[str, Path]], overrides: Sequence[str] = ()) -> "TrainConfig":
        """The YAML file at `path` (None: the defaults), then `key=value` overrides (YAML values)."""
        raw = {} if path is None else read_config_file(path, "training settings")
        raw.update(parse_overrides(overrides, known=[f.name for f in fields(cls)], what="key"))
        return cls.from_dict({k: _numeric(v) for k, v in raw.items()}, str(path) if path is not None else "config")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _numeric(value: Any) -> Any:
    """YAML 1.1 reads `1e-5` (no dot) as text, in a file as in an override; read it as a number."""
    return override_value(value) if isinstance(value, str) and value.strip() else value
