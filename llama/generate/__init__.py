"""Text generation with a preallocated KV cache: `generate`, `Sampling`, and the `Decoder` that
runs the model step by step.

    new_ids = generate(model, [prompt_ids], max_new_tokens=200, sampling=Sampling(temperature=0.8))

    python -m llama.generate --checkpoint PATH [--tokenizer PATH] --prompt "Once upon a time" \
        --max-new-tokens 200 --temperature 0.8 --top-p 0.9 --seed 0     # see __main__.py

Prompts of different lengths are batched with right padding: every sequence keeps its own
position in the cache (`KVCache.seqlens`). Temperature 0 is greedy decoding (on the CPU each
step after the prefill takes its tokens from the fused head and argmax, `Decoder.greedy_step`:
the same tokens, without the logits). Sampling filters compose in the order top-k, epsilon (drop
tokens below a probability), top-p. On the CPU, a float32 model of our dense or 4-bit layers
decodes through the decode plan (`llama.generate.plan`): each step is one C++ call that runs the
same kernels as the eager step, with the same results; the KV cache of a float32 model there is
float16 (CPU_CACHE_DTYPE). On a GPU the one-token decode step is compiled and replayed as a CUDA
graph over the static cache.

`generate` may be called from several threads: calls on one model take turns (a lock per model),
calls on different models run at once.
"""
from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

import llama_kernels

from ..model import KVCache, Linear, Transformer
from . import plan

# Greedy decoding on the CPU takes the next token from the fused head and argmax
# (llama_kernels.linear_argmax: the same token, without writing and re-reading the logits);
# False runs the head and then sample(), for comparison.
FUSED_GREEDY_HEAD = True
# On the CPU, a decode step of a model the plan runs (llama.generate.plan) is one C++ call;
# False runs the eager step, for comparison.
CPU_DECODE_PLAN = True
# The KV cache of a float32 model on the CPU: float16, as llama.cpp keeps it by default (half the
# bytes that each decode step streams; keys and values are rounded once, as they are written, and
# attention reads them back in fp32). None keeps the model's dtype.
CPU_CACHE_DTYPE: Optional[torch.dtype] = torch.float16


def cache_dtype(weight: torch.Tensor) -> torch.dtype:
    """The KV cache dtype generation uses for a model whose embedding is `weight`."""
    if weight.device.type == "cpu" and weight.dtype == torch.float32 and CPU_CACHE_DTYPE is not None:
        return CPU_CACHE_DTYPE
    return weight.dtype


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.8
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    epsilon: Optional[float] = None

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature: expected >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k: expected >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: expected a probability in (0, 1], got {self.top_p}")
        if self.epsilon is not None and not 0 <= self.epsilon < 1:
            raise ValueError(f"epsilon: expected a probability in [0, 1), got {self.epsilon}")


def sample(logits: torch.Tensor, cfg: Sampling, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Next token ids (B,) from logits (B, vocab)."""
    logits = logits.float()
    if cfg.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / cfg.temperature
    if cfg.top_k is not None and cfg.top_k < logits.shape[-1]:
        kth = torch.topk(logits, cfg.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if cfg.epsilon:
        keep = (probs >= cfg.epsilon) | (probs == probs.max(dim=-1, keepdim=True).values)
        probs = probs * keep
    if cfg.top_p is not None and cfg.top_p < 1:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass strictly above each token
        sorted_probs = sorted_probs * (before < cfg.top_p * sorted_probs.sum(-1, keepdim=True))
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class Decoder:
    """Runs the model over a KV cache: one prefill, then one-token steps.

    With `compile=True` the one-token step goes through `torch.compile`. With `cuda_graph=True`
    (CUDA only) the step is captured once into a CUDA graph and replayed: its input token and
    output logits live in static buffers, the cache is updated in place, and each step costs one
    graph launch instead of hundreds of kernel launches.

    A Decoder is not thread-safe: one generation at a time (`generate` sees to it).
    """

    def __init__(self, model: Transformer, batch: int, capacity: int, compile: bool = False,
                 cuda_graph: bool = False):
        weight = model.tok_embeddings.weight
        if cuda_graph and not weight.is_cuda:
            raise ValueError(f"cuda_graph: needs a model on a CUDA device, got {weight.device}")
        self.model = model
        self.cache = KVCache.allocate(model.config, batch, capacity, device=weight.device, dtype=cache_dtype(weight))
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=weight.device)
        self._step = self._eager_step
        if compile:
            # No inductor CUDA graphs: they refuse steps that update the cache in place.
            self._step = torch.compile(self._eager_step, fullgraph=True, dynamic=False)
        self._use_graph = cuda_graph
        self._graph: Optional[torch.cuda.CUDAGraph] = None
        self._logits: Optional[torch.Tensor] = None
        self._captured: tuple[int, ...] = ()
        self._plan = None  # the CPU decode plan (see prefill) and the addresses it was built for
        self._planned: tuple[int, ...] = ()
        self.in_use = False  # set by generate() while a generation runs on this cache

    def _eager_step(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens, cache=self.cache, last_only=True)

    def greedy_fusable(self) -> bool:
        """Whether greedy_step can serve this decoder: the CPU decode plan (any head it runs), or
        an eager CPU step and a plain head (our Linear without bias; a 4-bit, adapted or biased
        head runs as a layer)."""
        head = self.model.output
        if not FUSED_GREEDY_HEAD:
            return False
        if self._plan is not None:
            return True
        return (self._step == self._eager_step and not self._use_graph
                and type(head) is Linear and head.bias is None and not self.cache.k[0].is_cuda)

    def greedy_step(self, next_tokens: torch.Tensor) -> torch.Tensor:
        """One step of greedy decoding: the next tokens (B,), the argmax of the logits that `step`
        returns, from the final hidden state through llama_kernels.linear_argmax (or the plan's head
        and argmax)."""
        self.tokens.copy_(next_tokens.view(-1, 1))
        if self._plan is not None:
            chosen = torch.empty(self.cache.batch, dtype=torch.long)
            self._plan.step(self.tokens.view(-1), argmax=chosen)
            return chosen
        h = self.model(self.tokens, cache=self.cache, last_only=True, return_hidden=True)
        return llama_kernels.linear_argmax(h, self.model.output.weight)

    def _memory(self) -> tuple[int, ...]:
        """Where the step's inputs live: a captured graph is stale once any of them moved
        (weights swapped, e.g. by quantize_, or RoPE tables rebuilt for a longer context)."""
        m = self.model
        tensors = [*m.parameters(), *m.buffers()]  # the RoPE tables are buffers
        return tuple(t.data_ptr() for t in tensors)

    def prefill(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        # On a GPU, Q/K/V and gate/up weights side by side: one launch per group (a no-op once done;
        # redone after quantize_ or a load replaced the weights). On the CPU the multi-weight
        # kernel call does as well (measured), so the model's storage is left as the user made it.
        if self.cache.k[0].is_cuda:
            self.model.join_projections()
        if self._graph is not None and self._captured != self._memory():
            self._graph = self._logits = None
        self.cache.reset()
        logits = self.model(tokens, cache=self.cache, lengths=lengths, last_only=True)
        self._update_plan()
        return logits

    def _update_plan(self) -> None:
        """The CPU decode plan for the model as it is now: kept while the model's tensors stay
        where they were (the cache is this decoder's own), rebuilt when any moved (quantize_, a load,
        longer RoPE tables), dropped where the plan cannot run the model or the step is compiled."""
        if not CPU_DECODE_PLAN or self._step != self._eager_step or self.cache.k[0].is_cuda:
            self._plan = None
            return
        memory = self._memory()
        if self._plan is None or self._planned != memory:
            self._plan, self._planned = plan.build(self.model, self.cache), memory

    def _capture(self) -> None:
        """Warm up (compiles, autotunes) on a side stream, then capture one step.

        Warm-up steps really run: they write this step's keys and values at the current
        positions (the replay rewrites the same slots) and advance `seqlens`, which is restored.
        """
        seqlens = self.cache.seqlens.clone()
        stream = torch.cuda.Stream(self.tokens.device)
        stream.wait_stream(torch.cuda.current_stream(self.tokens.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._step(self.tokens)
                self.cache.seqlens.copy_(seqlens)
        torch.cuda.current_stream(self.tokens.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._logits = self._step(self.tokens)
        self._graph, self._captured = graph, self._memory()

    def step(self, next_tokens: torch.Tensor) -> torch.Tensor:
        self.tokens.copy_(next_tokens.view(-1, 1))
        if self._plan is not None:
            logits = torch.empty(self.cache.batch, self.model.config.vocab_size)
            self._plan.step(self.tokens.view(-1), logits=logits)
            return logits
        if not self._use_graph:
            return self._step(self.tokens)
        if self._graph is None:
            self._capture()
        self._graph.replay()
        return self._logits.clone()


_LOCKS: "weakref.WeakKeyDictionary[Transformer, threading.RLock]" = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def _model_lock(model: Transformer) -> threading.RLock:
    """The lock that generate() holds on `model` (made on first use; dropped with the model)."""
    with _LOCKS_GUARD:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = threading.RLock()
        return lock


CAPACITY_ROUNDING = 128  # cache sizes are rounded up so that compiled steps get reused


def _decoder(model: Transformer, batch: int, capacity: int, compile: bool, cuda_graph: bool) -> Decoder:
    """A Decoder kept on the model per (batch, rounded capacity, compile, graph, device, dtype), so
    a compiled or captured step is built once and reused by later generate() calls."""
    capacity = -(-capacity // CAPACITY_ROUNDING) * CAPACITY_ROUNDING
    if model.config.rope_scaling == "none":
        capacity = min(capacity, model.config.max_seq_len)
    weight = model.tok_embeddings.weight
    key = (batch, capacity, compile, cuda_graph, weight.device, weight.dtype, cache_dtype(weight))
    decoders = model.__dict__.setdefault("_decoders", {})  # dropped when the model is copied
    if key in decoders and decoders[key].in_use:
        # Only a generate() nested in another's on_token gets here (the model's lock is held):
        # a cache of its own, not kept, so that the outer generation's cache is left alone.
        return Decoder(model, batch, capacity, compile=compile, cuda_graph=cuda_graph)
    if key not in decoders:
        if len(decoders) >= 4:  # bound the memory held by idle caches
            decoders.pop(next(iter(decoders)))
        decoders[key] = Decoder(model, batch, capacity, compile=compile, cuda_graph=cuda_graph)
    return decoders[key]


@torch.inference_mode()
def generate(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    eos_id: Optional[int] = None,
    seed: Optional[int] = None,
    on_token: Optional[Callable[[int, int], None]] = None,
    compile: Optional[bool] = None,
    cuda_graph: Optional[bool] = None,
) -> list[list[int]]:
    """Continue each prompt (token ids) by up to `max_new_tokens`; returns the new ids per prompt.

    A sequence stops at `eos_id` (which is included in its output). `on_token(index, token)` is
    called for each new token as it is produced. `compile` (torch.compile the one-token step) and
    `cuda_graph` (replay it as a CUDA graph) default to True on CUDA.

    Thread safety: a call holds a lock on the model from start to end, so concurrent calls on one
    model run one after another, each with the result it would have alone. The model keeps its
    decoders (KV cache, compiled step, captured CUDA graph) for reuse across calls, and a call also
    changes the model itself (RoPE tables, train/eval mode, joined projections on a GPU); a lock
    keeps one decoder per shape, so a single thread is as fast as before and a graph is captured
    once, where a decoder per thread would hold a cache and a graph per thread and still leave the
    model's own state shared. For parallel generation use one model per thread, or one call with a
    batch of prompts. The lock is reentrant: `on_token` may generate on the same model (that nested
    call gets a cache of its own).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts: expected one or more non-empty token lists")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens: expected >= 0, got {max_new_tokens}")
    cfg = model.config
    vocab = cfg.vocab_size
    for i, p in enumerate(prompts):
        if min(p) < 0 or max(p) >= vocab:
            raise ValueError(f"prompts[{i}]: token ids must lie in [0, {vocab})")
    device = model.tok_embeddings.weight.device
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    capacity = int(lengths.max()) + max_new_tokens
    if capacity > cfg.max_seq_len and cfg.rope_scaling == "none":
        raise ValueError(
            f"max_new_tokens: prompt plus {max_new_tokens} new tokens is {capacity} positions, more than "
            f"max_seq_len {cfg.max_seq_len}; shorten it or set rope_scaling=linear or dynamic"
        )
    if max_new_tokens == 0:
        return [[] for _ in prompts]
    if compile is None:
        compile = device.type == "cuda"
    if cuda_graph is None:
        cuda_graph = device.type == "cuda"
    elif cuda_graph and device.type != "cuda":
        raise ValueError(f"cuda_graph: needs a model on a CUDA device, got {device}")

    batch = len(prompts)
    padded = torch.zeros(batch, int(lengths.max()), dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        padded[i, : len(p)] = torch.tensor(p, device=device)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)

    with _model_lock(model):
        model.setup_rope(capacity)
        decoder = _decoder(model, batch, capacity, compile, cuda_graph)
        was_training = model.training
        decoder.in_use = True
        model.eval()
        try:
            logits = decoder.prefill(padded, lengths)
            greedy = sampling.temperature == 0 and decoder.greedy_fusable()
            chosen: Optional[torch.Tensor] = None  # the fused greedy step's tokens
            out: list[list[int]] = [[] for _ in prompts]
            finished = torch.zeros(batch, dtype=torch.bool, device=device)
            for step in range(max_new_tokens):
                next_tokens = sample(logits, sampling, generator) if chosen is None else chosen
                if eos_id is not None:
                    next_tokens = torch.where(finished, torch.full_like(next_tokens, eos_id), next_tokens)
                ids = next_tokens.tolist()
                done = finished.tolist()
                for i, tok in enumerate(ids):
                    if not done[i]:
                        out[i].append(tok)
                        if on_token is not None:
                            on_token(i, tok)
                if eos_id is not None:
                    finished |= next_tokens == eos_id
                    if bool(finished.all()):
                        break
                if step + 1 < max_new_tokens:
                    if greedy:
                        chosen = decoder.greedy_step(next_tokens)
                    else:
                        logits = decoder.step(next_tokens)
            return out
        finally:
            decoder.in_use = False
            model.train(was_training)
