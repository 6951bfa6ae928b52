"""A lean PyTorch LLaMA on the kernels of this project.

    import llama
    m = llama.load("path/to/checkpoint")        # llama2.c .pt/.bin, minllama, Hugging Face, native
    print(m.generate("Once upon a time", max_new_tokens=100, temperature=0.7))
"""
# Set before the submodules load: each checks that the `llama` it belongs to is this one.
DISTRIBUTION = "llama-kernels"

import llama_kernels  # noqa: E402

if getattr(llama_kernels, "DISTRIBUTION", None) != DISTRIBUTION:
    raise ImportError(
        f"llama: `import llama_kernels` gave {getattr(llama_kernels, '__file__', None)}, not the ops package "
        f"of {DISTRIBUTION}; remove it from sys.path or reinstall {DISTRIBUTION}")

from . import checkpoint  # noqa: E402
from .api import LLaMA, load, save  # noqa: E402
from .config import PRESETS, ModelConfig  # noqa: E402
from .model import KVCache, Transformer, build  # noqa: E402
from .tokenizer import Tokenizer  # noqa: E402

__version__ = llama_kernels.__version__

# Also importable: llama.generate (generate, Sampling), llama.quantize (quantize_, Int4Config, NF4Config),
# llama.formats (one module per checkpoint format), llama.atomic (atomic writes), llama.data (sample data).
__all__ = [
    "KVCache", "LLaMA", "ModelConfig", "PRESETS", "Tokenizer", "Transformer", "build", "checkpoint", "load", "save",
]

