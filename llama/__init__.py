"""A lean PyTorch LLaMA on the kernels of this project."""
from .config import PRESETS, ModelConfig
from .model import KVCache, Transformer, build

__all__ = ["KVCache", "ModelConfig", "PRESETS", "Transformer", "build"]
