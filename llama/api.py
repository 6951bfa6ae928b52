"""The plain Python API: `LLaMA` (a model with its tokenizer), `load`, `save` and `find_tokenizer`.

    import llama
    m = llama.load("stories42M.pt")                 # any checkpoint format; tokenizer found beside it
    print(m.generate("Once upon a time", max_new_tokens=100, temperature=0.7))
    llama.save(m, "out/", format="hf")
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, TextIO, Union

import torch

from . import checkpoint
from .generate import Sampling, generate
from .model import Transformer
from .tokenizer import Tokenizer

TOKENIZER_NAMES = ("tokenizer.model", "tokenizer.bin")  # SentencePiece, llama2.c


class LLaMA:
    """A Transformer plus the tokenizer that goes with it."""

    def __init__(self, model: Transformer, tokenizer: Optional[Tokenizer] = None):
        self.model = model
        self.tokenizer = tokenizer
        self.last_generated_tokens = 0

    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.model.tok_embeddings.weight.device

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def to(self, *args, **kwargs) -> "LLaMA":
        self.model.to(*args, **kwargs)
        return self

    def generate(
        self,
        prompt: Union[str, Sequence[str]],
        max_new_tokens: int = 100,
        temperature: float = 0.8,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        epsilon: Optional[float] = None,
        seed: Optional[int] = None,
        stream: Optional[TextIO] = None,
        compile: Optional[bool] = None,
        cuda_graph: Optional[bool] = None,
    ) -> Union[str, list[str]]:
        """Continue a prompt (or a list of prompts, batched); returns the new text only.

        `stream`, a text file such as sys.stdout, receives the text of a single prompt as it is
        produced. Generation stops at the tokenizer's end-of-sequence token. Safe to call from
        several threads: calls on one model take turns (see `llama.generate.generate`), and
        `last_generated_tokens` is then that of the call that finished last.
        """
        if self.tokenizer is None:
            raise ValueError("tokenizer: this model was loaded without one; pass tokenizer=PATH to llama.load")
        single = isinstance(prompt, str)
        prompts = [prompt] if single else list(prompt) if isinstance(prompt, (list, tuple)) else []
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise TypeError("prompt: expected a string or a non-empty list of strings")
        if stream is not None and not single:
            raise ValueError("stream: only a single prompt can be streamed")
        tok = self.tokenizer
        ids = [tok.encode(p, bos=True) for p in prompts]
        decoder = tok.stream() if stream is not None else None

        def write(_index: int, token: int) -> None:
            if token != tok.eos_id:
                stream.write(decoder.push(token))
                stream.flush()

        out = generate(
            self.model, ids, max_new_tokens,
            Sampling(temperature=temperature, top_k=top_k, top_p=top_p, epsilon=epsilon),
            eos_id=tok.eos_id, seed=seed, on_token=write if stream is not None else None, compile=compile,
            cuda_graph=cuda_graph,
        )
        if stream is not None:
            stream.write(decoder.flush())  # a character cut short by the token limit
            stream.flush()
        self.last_generated_tokens = sum(len(o) for o in out)
        texts = [tok.decode([t for t in o if t != tok.eos_id]) for o in out]
        return texts[0] if single else texts


def find_tokenizer(path: Union[str, Path]) -> Optional[Path]:
    """A tokenizer stored in a checkpoint directory or beside a checkpoint file."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    for name in TOKENIZER_NAMES:
        if (folder / name).is_file():
            return folder / name
    return None


def load(
    path: Union[str, Path],
    tokenizer: Union[str, Path, Tokenizer, None] = None,
    device: Union[str, torch.device, None] = None,
    dtype: Optional[torch.dtype] = None,
    overrides: Sequence[str] = (),
) -> LLaMA:
    """Load a checkpoint in any supported format (detected by content) and its tokenizer.

    `overrides` are `key=value` config changes that keep the weights' shapes (RoPE scaling, say).
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = checkpoint.load_model(path, device=device, dtype=dtype, overrides=overrides).eval()
    if tokenizer is None:
        found = find_tokenizer(path)
        tokenizer = Tokenizer(found) if found is not None else None
    elif not isinstance(tokenizer, Tokenizer):
        tokenizer = Tokenizer(tokenizer)
    return LLaMA(model, tokenizer)


def save(model: Union[LLaMA, Transformer], path: Union[str, Path], format: str = "native", *,
         quant: Optional[str] = None) -> None:
    """Write a model in one of checkpoint.SAVE_FORMATS; a LLaMA's tokenizer is saved beside it
    (tokenizer.model, or tokenizer.bin for a llama2.c tokenizer), or, for format="gguf", inside
    the file. quant (gguf only): f32, f16, q8_0 or q4_0 (llama/formats/gguf.py)."""
    lm = model if isinstance(model, LLaMA) else LLaMA(model)
    if format == "gguf":  # the vocabulary travels inside a GGUF file
        checkpoint.save(lm.model, path, format=format, quant=quant, tokenizer=lm.tokenizer)
        return
    written = checkpoint.save(lm.model, path, format=format, quant=quant)
    if lm.tokenizer is not None:
        folder = written if written.is_dir() else written.parent
        name = TOKENIZER_NAMES[0] if lm.tokenizer.format == "sentencepiece" else TOKENIZER_NAMES[1]
        lm.tokenizer.save(folder / name)
