"""Generation: prefill time and decode tokens/s, ours against Hugging Face on the same weights.

Shapes: on CPU the stories42M shape with an untied head (58M parameters, fp32); on a GPU
Sheared-LLaMA-1.3B in bf16. Weights are random, written by `transformers` and loaded by ours.

* prefill: one forward over a batch of prompts (tokens/s counts prompt tokens).
* decode: greedy generation of N new tokens after a short prompt (tokens/s counts new tokens
  over all sequences; the prompt's prefill is included and is a few percent of the time).

Ours: `llama.generate` as it runs by default (`llama_kernels`: on the CPU each step is the decode
plan's one C++ call, on a GPU the eager step); on the CPU also the eager step without the plan
(`llama_kernels-eager`); on a GPU the eager step replayed as a CUDA graph (`llama_kernels-graph`)
and the compiled step in a CUDA graph (`llama_kernels-compiled`). `int4` variants quantize every
linear layer including the head (group 32); on the CPU the int4 model's prefill is timed too.
Peers: HF `generate` (eager, dynamic cache), and HF with a static cache and a one-token step
compiled with mode="reduce-overhead" (CUDA graphs on a GPU), marking each step.
On the CPU, llama.cpp through llama-cpp-python (the `peers` extra; README: Export to GGUF /
llama.cpp) on the GGUF files our exporter writes from the same weights (batch 1: its `generate`;
batch 8: its batched decode through the low-level API, one llama_decode per step): `llama.cpp-f32`
(compare with ours in fp32) and `llama.cpp-q4_0` (compare with our int4; its blocks are our Q4_0
arithmetic, the embedding and head included). Greedy, as many new tokens, on as many threads as
torch uses; and the prefill of the same prompt at batch 1 by both. Recorded as missing where
llama_cpp is not importable.
"""
from __future__ import annotations

import importlib.util
import inspect
import tempfile
from functools import lru_cache, partial

import torch

from bench.common import Bench, Item, SuiteContext, Unavailable, dtype_name, suite

PROMPT = 16  # decode-pass prompt length


def _shape(ctx: SuiteContext):
    from llama import ModelConfig

    if ctx.is_cuda:
        return ModelConfig.preset("sheared-1.3b"), torch.bfloat16
    return ModelConfig.preset("stories42M").replace(tie_embeddings=False), torch.float32


@lru_cache(maxsize=2)
def _models(device: str, quick: bool):
    """(ours, hf) with identical random weights (the shape does not depend on ``quick``)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import llama.checkpoint

    ctx = SuiteContext(torch.device(device), quick)
    cfg, dtype = _shape(ctx)
    hf_cfg = LlamaConfig(
        hidden_size=cfg.dim, intermediate_size=cfg.hidden_dim, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads, vocab_size=cfg.vocab_size,
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings,
    )
    torch.manual_seed(0)
    with torch.device(device):
        hf = LlamaForCausalLM(hf_cfg).to(dtype).eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = llama.checkpoint.load_model(tmp, device=device, dtype=dtype).eval()
    return ours, hf


def _tokens(ctx: SuiteContext, batch: int, length: int, vocab: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(batch * 1000 + length)
    return torch.randint(3, vocab, (batch, length), generator=gen).to(ctx.device)


# ----------------------------------------------------------------------------- the calls
@lru_cache(maxsize=2)
def _ours_int4(device: str, quick: bool):
    """Our model with every linear layer (head included) in int4, group 32 (1376 = 43 x 32)."""
    import copy

    from llama.quantize import Int4Config, quantize_

    ours, _ = _models(device, quick)
    return quantize_(copy.deepcopy(ours), Int4Config(group_size=32))


def _ours_decode(ctx, batch, new, variant):
    """variant: '' (generate's default: on the CPU the decode plan, on a GPU the eager step),
    'eager' (CPU: the eager step, without the plan), 'graph' (the eager step as a CUDA graph),
    'compiled' (compiled, in a CUDA graph), each optionally with 'int4' weights."""
    import llama.generate
    from llama.generate import Sampling, generate

    int4 = "int4" in variant
    ours = _ours_int4(str(ctx.device), ctx.quick) if int4 else _models(str(ctx.device), ctx.quick)[0]
    prompts = _tokens(ctx, batch, PROMPT, ours.config.vocab_size).tolist()
    compile, graph = "compiled" in variant, "graph" in variant or "compiled" in variant
    plan = "eager" not in variant

    def call():
        llama.generate.CPU_DECODE_PLAN = plan
        try:
            return generate(ours, prompts, new, Sampling(temperature=0), compile=compile, cuda_graph=graph)
        finally:
            llama.generate.CPU_DECODE_PLAN = True

    return [call]


def _ours_prefill(ctx, batch, length, int4=False):
    from llama import KVCache

    ours = _ours_int4(str(ctx.device), ctx.quick) if int4 else _models(str(ctx.device), ctx.quick)[0]
    tokens = _tokens(ctx, batch, length, ours.config.vocab_size)
    w = ours.tok_embeddings.weight
    cache = KVCache.allocate(ours.config, batch, length, device=w.device, dtype=w.dtype)

    @torch.inference_mode()
    def call():
        cache.reset()
        return ours(tokens, cache=cache, last_only=True)

    return [call]


def _hf_decode(ctx, batch, new):
    _, hf = _models(str(ctx.device), ctx.quick)
    tokens = _tokens(ctx, batch, PROMPT, hf.config.vocab_size)

    @torch.inference_mode()
    def call():
        return hf.generate(tokens, attention_mask=torch.ones_like(tokens), max_new_tokens=new,
                           min_new_tokens=new, do_sample=False, pad_token_id=0)

    return [call]


def _hf_prefill(ctx, batch, length):
    _, hf = _models(str(ctx.device), ctx.quick)
    tokens = _tokens(ctx, batch, length, hf.config.vocab_size)

    @torch.inference_mode()
    def call():
        return hf(tokens, use_cache=True, logits_to_keep=1).logits

    return [call]


def _hf_static_compiled(ctx, batch, new):
    """A static cache, a prefill, then a compiled one-token step per new token."""
    from transformers import StaticCache

    _, hf = _models(str(ctx.device), ctx.quick)
    tokens = _tokens(ctx, batch, PROMPT, hf.config.vocab_size)
    capacity = PROMPT + new
    cache = StaticCache(config=hf.config, max_cache_len=capacity)
    graphs = ctx.is_cuda

    cache_kw = _cache_keyword(hf)

    def one_step(tok, position):
        out = hf(tok, position_ids=position[None].expand(tok.shape[0], 1), cache_position=position,
                 use_cache=True, **{cache_kw: cache})
        return out.logits[:, -1]

    step = torch.compile(one_step, mode="reduce-overhead" if graphs else None, fullgraph=True)

    @torch.inference_mode()
    def call():
        cache.reset()
        pos = torch.arange(PROMPT, device=ctx.device)
        logits = hf(tokens, cache_position=pos, use_cache=True, **{cache_kw: cache}).logits[:, -1]
        out = [logits.argmax(-1)]
        for i in range(PROMPT, capacity - 1):
            if graphs:
                torch.compiler.cudagraph_mark_step_begin()
            logits = step(out[-1][:, None], torch.tensor([i], device=ctx.device))
            out.append(logits.argmax(-1).clone())
        return torch.stack(out, 1)

    return [call]


def _llama_cpp_decode(ctx, new, quant):
    """Batch-1 greedy decode by llama.cpp of our model written as GGUF (`quant`: f32 or q4_0)."""
    from llama_cpp import Llama

    import llama.checkpoint

    ours, _ = _models(str(ctx.device), ctx.quick)
    prompt = _tokens(ctx, 1, PROMPT, ours.config.vocab_size)[0].tolist()
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        path = llama.checkpoint.save(ours, f"{tmp}/model-{quant}.gguf", "gguf", quant=quant)
        llm = Llama(model_path=str(path), n_ctx=PROMPT + new, n_batch=PROMPT, n_threads=threads,
                    n_threads_batch=threads, logits_all=False, use_mmap=False, verbose=False)

    def call():
        llm.reset()  # else generate() reuses the cached prompt
        out = []
        for token in llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0,
                                  reset=False):
            out.append(token)
            if len(out) == new:
                return out

    return [call]


def _llama_cpp_batched_decode(ctx, batch, new, quant):
    """llama.cpp's own batched greedy decode of `batch` sequences (its low-level API, as its
    `batched` example does): one llama_decode per step with a token of each sequence, every
    sequence under its own id in one KV cache; the prompts' prefill is one call. The argmax is
    taken from each sequence's logits row (numpy, a few microseconds each)."""
    import ctypes

    import llama_cpp as lc
    import numpy as np
    from llama_cpp._utils import suppress_stdout_stderr

    import llama.checkpoint

    ours, _ = _models(str(ctx.device), ctx.quick)
    prompts = _tokens(ctx, batch, PROMPT, ours.config.vocab_size).tolist()
    threads = torch.get_num_threads()
    params = lc.llama_context_default_params()
    params.n_ctx = batch * (PROMPT + new)
    params.n_batch = params.n_ubatch = batch * PROMPT
    params.n_seq_max = batch
    params.n_threads = params.n_threads_batch = threads
    model_params = lc.llama_model_default_params()
    model_params.use_mmap = False  # read whole, as _llama_cpp_decode loads: the file can go
    with tempfile.TemporaryDirectory() as tmp, suppress_stdout_stderr(disable=False):  # as Llama(verbose=False)
        path = llama.checkpoint.save(ours, f"{tmp}/model-{quant}.gguf", "gguf", quant=quant)
        lc.llama_backend_init()
        model = lc.llama_model_load_from_file(str(path).encode(), model_params)
        context = lc.llama_init_from_model(model, params) if model else None
    if not model or not context:
        raise RuntimeError(f"llama.cpp could not load {path}")
    vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(model))
    tokens = lc.llama_batch_init(batch * PROMPT, 0, 1)

    def fill(entries):  # (token, position, sequence, wants logits)
        for i, (token, pos, seq, logits) in enumerate(entries):
            tokens.token[i], tokens.pos[i], tokens.n_seq_id[i] = token, pos, 1
            tokens.seq_id[i][0], tokens.logits[i] = seq, logits
        tokens.n_tokens = len(entries)

    def argmax(i):
        row = lc.llama_get_logits_ith(context, i)
        return int(np.ctypeslib.as_array(ctypes.cast(row, ctypes.POINTER(ctypes.c_float)), shape=(vocab,)).argmax())

    def call():
        lc.llama_memory_clear(lc.llama_get_memory(context), True)
        fill([(t, i, s, i == PROMPT - 1) for s, p in enumerate(prompts) for i, t in enumerate(p)])
        if lc.llama_decode(context, tokens) != 0:
            raise RuntimeError("llama_decode failed on the prompts")
        out = [[argmax((s + 1) * PROMPT - 1)] for s in range(batch)]
        for step in range(1, new):
            fill([(out[s][-1], PROMPT + step - 1, s, True) for s in range(batch)])
            if lc.llama_decode(context, tokens) != 0:
                raise RuntimeError("llama_decode failed")
            for s in range(batch):
                out[s].append(argmax(s))
        return out

    return [call]


def _llama_cpp_prefill(ctx, length, quant="f32"):
    """llama.cpp's prefill of a `length`-token prompt (batch 1) on our model written as GGUF
    (`quant`: f32 or q4_0): the prompt evaluated into an empty context, as _ours_prefill fills an
    empty cache."""
    from llama_cpp import Llama

    import llama.checkpoint

    ours, _ = _models(str(ctx.device), ctx.quick)
    prompt = _tokens(ctx, 1, length, ours.config.vocab_size)[0].tolist()
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        path = llama.checkpoint.save(ours, f"{tmp}/model-{quant}.gguf", "gguf", quant=quant)
        llm = Llama(model_path=str(path), n_ctx=length + 1, n_batch=length, n_threads=threads,
                    n_threads_batch=threads, logits_all=False, use_mmap=False, verbose=False)

    def call():
        llm.reset()
        llm.eval(prompt)

    return [call]


def _llama_cpp_missing(ctx: SuiteContext) -> str | None:
    if ctx.is_cuda:
        return "measured on CPU runs only (a CPU build of llama.cpp)"
    if importlib.util.find_spec("llama_cpp") is None:
        return "llama-cpp-python not installed"
    return None


def _llama_cpp_items(ctx: SuiteContext, case: dict, new: int, batch: int) -> list[Item]:
    impls = {"llama.cpp-f32": "f32", "llama.cpp-q4_0": "q4_0"}
    missing = _llama_cpp_missing(ctx)
    if missing:
        return [Unavailable(impl, missing) for impl in impls] if batch == 1 else []
    # fp32 activations both, as our int4 variants are recorded: one case compares them all.
    # Batch 1 through the high-level generate; more sequences through llama.cpp's batched decode.
    make = partial(_llama_cpp_decode, ctx, new) if batch == 1 else partial(_llama_cpp_batched_decode, ctx, batch, new)
    return [Bench(impl, {**case, "new": new}, dtype_name(torch.float32), "decode", partial(make, quant),
                  tokens=batch * new) for impl, quant in impls.items()]


def _cache_keyword(hf) -> str:
    """transformers 5 renamed forward's `past_key_values` to `cache` in some releases."""
    return "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"


def headline(ctx: SuiteContext, bench: Bench) -> bool:
    """Default run: batch 1. On a GPU without the plain eager loops (ours ~40 tok/s, HF's ~13:
    minutes per case) and without our compiled steps (a minute of compiling each, within 1-3% of
    the graph-replayed eager step); HF's compiled static-cache step, the strongest peer, stays."""
    if bench.case.get("batch") != 1:
        return False
    slow = ("llama_kernels", "hf-generate", "llama_kernels-compiled", "llama_kernels-int4-compiled")
    return not (ctx.is_cuda and bench.pass_ == "decode" and bench.impl in slow)


@suite("decode", headline=headline)
def decode(ctx: SuiteContext) -> list[Item]:
    try:
        import transformers  # noqa: F401
    except ImportError as exc:
        return [Unavailable("decode", f"transformers is needed for the shared weights: {exc}")]
    cfg, dtype = _shape(ctx)
    # New tokens: the default run decodes fewer on the CPU than --full (HF generate: ~1-3 s per 64).
    new = (32 if ctx.quick else 128 if ctx.full else 64) if not ctx.is_cuda else (64 if ctx.quick else 256)
    prefill = 128 if not ctx.is_cuda else 1024
    batches = (1,) if ctx.quick else (1, 8)
    shape = "sheared-1.3b" if ctx.is_cuda else "stories42M-untied"
    variants = ["", "int4", "eager", "int4-eager"] if not ctx.is_cuda else [
        "", "graph", "compiled", "int4-graph", "int4-compiled"]
    if ctx.is_cuda and ctx.quick:
        variants = variants[1:]  # plain eager decodes ~40 tok/s on a GPU: half a minute per case
    items: list[Item] = []
    for batch in batches:
        case = {"model": shape, "batch": batch}
        for variant in variants:
            items.append(Bench("-".join(filter(None, ("llama_kernels", variant))), {**case, "new": new}, dtype_name(dtype),
                               "decode", partial(_ours_decode, ctx, batch, new, variant), tokens=batch * new))
        if not (ctx.is_cuda and ctx.quick):  # eager HF decodes ~13 tok/s on a GPU: minutes per case
            items.append(Bench("hf-generate", {**case, "new": new}, dtype_name(dtype), "decode",
                               partial(_hf_decode, ctx, batch, new), tokens=batch * new))
        items.append(Bench("hf-static-compiled", {**case, "new": new}, dtype_name(dtype), "decode",
                           partial(_hf_static_compiled, ctx, batch, new), tokens=batch * new))
        items += _llama_cpp_items(ctx, case, new, batch)
        pcase = {**case, "prompt": prefill}
        items.append(Bench("llama_kernels", pcase, dtype_name(dtype), "prefill",
                           partial(_ours_prefill, ctx, batch, prefill), tokens=batch * prefill))
        if not ctx.is_cuda:
            items.append(Bench("llama_kernels-int4", pcase, dtype_name(dtype), "prefill",
                               partial(_ours_prefill, ctx, batch, prefill, True), tokens=batch * prefill))
        items.append(Bench("hf", pcase, dtype_name(dtype), "prefill",
                           partial(_hf_prefill, ctx, batch, prefill), tokens=batch * prefill))
        if batch == 1 and not _llama_cpp_missing(ctx):  # (missing: recorded once, with decode)
            for quant in ("f32", "q4_0"):
                items.append(Bench(f"llama.cpp-{quant}", pcase, dtype_name(dtype), "prefill",
                                   partial(_llama_cpp_prefill, ctx, prefill, quant), tokens=prefill))
    return items
