"""A lean PyTorch LLaMA on the kernels of this project.

    import llama
    m = llama.load("path/to/checkpoint")        # llama2.c .pt/.bin, minllama, Hugging Face, native
    print(m.generate("Once upon a time", max_new_tokens=100, temperature=0.7))
"""
from . import checkpoint
from .api import LLaMA, load, save
from .config import PRESETS, ModelConfig
from .model import KVCache, Transformer, build
from .tokenizer import Tokenizer

# llama.generate (the module: generate(), Sampling, and `python -m llama.generate`) is imported on use.
__all__ = [
    "KVCache", "LLaMA", "ModelConfig", "PRESETS", "Tokenizer", "Transformer", "build", "checkpoint", "load", "save",
]

