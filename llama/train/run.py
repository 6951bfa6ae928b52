"""From a TrainConfig to a ready Trainer: the model (a preset, a model YAML or any checkpoint,
with LoRA/QLoRA adapters when asked), the token data (prepared folders, or the botchan sample
prepared on first use) and the device."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import torch

from .. import data as data_mod
from ..checkpoint import load_model
from ..config import ModelConfig
from ..lora import apply_lora
from ..model import Transformer, build as build_model
from ..tokenizer import Tokenizer
from . import distributed
from .config import TrainConfig
from .trainer import Trainer


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device: not a device name: {name!r} (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {name!r} asked for, but CUDA is not available here")
    return device


def make_model(cfg: TrainConfig, vocab_size: Optional[int], device: torch.device) -> Transformer:
    """The model to train, in fp32 (master weights), on `device`."""
    overrides = list(cfg.model_overrides)
    for name in ("dropout", "attn_dropout"):
        if getattr(cfg, name) is not None:
            overrides.append(f"{name}={getattr(cfg, name)}")
    if cfg.init_from is not None:
        model = load_model(cfg.init_from, device=device, overrides=overrides)
        model = model.float() if not any(p.dtype == torch.float32 for p in model.parameters()) else model
    else:
        model_cfg = ModelConfig.from_spec(cfg.model, overrides)
        model = build_model(model_cfg, device=device)
    if vocab_size is not None and vocab_size > model.config.vocab_size:
        raise ValueError(f"model: vocab_size {model.config.vocab_size} is smaller than the data's vocabulary "
                         f"({vocab_size}); set model_overrides: [vocab_size={vocab_size}]")
    if cfg.lora:
        apply_lora(model, rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                   targets=tuple(cfg.lora_targets), trainable=tuple(cfg.trainable))
    return model


def make_data(cfg: TrainConfig) -> tuple[Any, Any, Any, int]:
    """(train loader, validation source, tokenizer or None, vocabulary size of the data)."""
    tokenizer = None
    if cfg.data is None:
        sample = data_mod.sample_files()
        tok_path = Path(cfg.tokenizer) if cfg.tokenizer else sample.tokenizer_model
        folder = Path(cfg.out_dir) / "data"
        if not (folder / "manifest.json").is_file():
            data_mod.prepare(tok_path, [sample.text], folder)
        sources: Any = str(folder)
        tokenizer = Tokenizer(tok_path)
    else:
        sources = cfg.data
        if cfg.tokenizer:
            tokenizer = Tokenizer(cfg.tokenizer)
    loader = data_mod.WindowLoader(sources, cfg.seq_len, cfg.batch_size, weights=cfg.data_weights, seed=cfg.seed)
    return loader, sources, tokenizer, loader.vocab_size


def build(cfg: TrainConfig, on_step: Optional[Callable[[int, dict], None]] = None) -> Trainer:
    """The Trainer for `cfg`. Under torchrun with several ranks, this starts the process group
    (llama.train.distributed) and the Trainer shards the model with FSDP2; every rank builds the
    same model and loader from the same seed, and trains on its rows of each global batch."""
    device = resolve_device(cfg.device)
    if distributed.launched():
        ranks = distributed.world_size_from_env()
        if cfg.batch_size % ranks:
            raise ValueError(f"batch_size: {cfg.batch_size} is not divisible by the number of ranks "
                             f"(WORLD_SIZE={ranks}); the global batch is split evenly across them")
        device = distributed.setup(device)
    torch.manual_seed(cfg.seed)
    loader, val, tokenizer, vocab = make_data(cfg)
    model = make_model(cfg, vocab, device)
    return Trainer(model, cfg, loader, val=val, tokenizer=tokenizer, on_step=on_step)
