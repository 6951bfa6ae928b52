"""One optimizer step of a LLaMA (forward, backward, AdamW): tokens/s and peak memory.

Impls, one model shape each, the same weights and batch:

* ``llama_kernels-fused``: our model on fused SwiGLU and the chunked linear + cross-entropy (the
  (tokens x vocab) logits never exist), our fused AdamW;
* ``llama_kernels-eager``: our model on eager PyTorch ops (full logits, F.silu * up), torch's
  foreach AdamW: what the fused ops replace;
* ``hf``: transformers' LlamaForCausalLM of the same shape (SDPA attention), foreach AdamW;
* ``hf+liger``: the same with Liger-Kernel's LLaMA patches (fused linear + cross-entropy,
  SwiGLU, RMSNorm, RoPE), where liger-kernel is installed.

CPU: the stories15M shape (dim 288, 6 layers, vocab 32000, tied head) at batch 8 x 256 in fp32.
GPU: Sheared-LLaMA-1.3B at 4 x 2048 in bf16 autocast over fp32 weights, with and without
gradient checkpointing. tokens = batch x sequence per step. Quick runs use batch 2 x 128.
"""
from __future__ import annotations

import contextlib

import torch

from bench.common import Bench, Item, SuiteContext, Unavailable, suite

VOCAB = 32000


def _shape(ctx: SuiteContext) -> tuple[str, int, int, torch.dtype | None]:
    """(preset, batch, sequence, autocast dtype)."""
    if ctx.is_cuda:
        return "sheared-1.3b", (1 if ctx.quick else 4), (512 if ctx.quick else 2048), torch.bfloat16
    return "stories15M", (2 if ctx.quick else 8), (128 if ctx.quick else 256), None


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _batch(device: torch.device, batch: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (batch, seq + 1), generator=g)
    return tokens[:, :-1].to(device), tokens[:, 1:].to(device)


def _ours(ctx: SuiteContext, fused: bool, checkpointing: bool):
    def setup():
        from llama.config import ModelConfig
        from llama.model import build
        from llama.optim import AdamW

        preset, batch, seq, dtype = _shape(ctx)
        torch.manual_seed(0)
        model = build(ModelConfig.preset(preset).replace(max_seq_len=seq), device=ctx.device).train()
        model.use_fused_ops(fused)
        model.gradient_checkpointing = checkpointing
        opt = AdamW(model.parameters(), lr=1e-4, weight_decay=0.1) if fused else \
            torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, foreach=True)
        x, y = _batch(ctx.device, batch, seq)

        def step():
            opt.zero_grad(set_to_none=True)
            with _autocast(ctx.device, dtype):
                loss = model(x, y)
            loss.backward()
            opt.step()
            return loss

        return [step]

    return setup


def _hf(ctx: SuiteContext, liger: bool, checkpointing: bool):
    def setup():
        from transformers import LlamaConfig, LlamaForCausalLM

        from llama.config import ModelConfig

        preset, batch, seq, dtype = _shape(ctx)
        cfg = ModelConfig.preset(preset)
        if liger:
            from liger_kernel.transformers import apply_liger_kernel_to_llama

            apply_liger_kernel_to_llama()
        torch.manual_seed(0)
        hf_cfg = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.hidden_dim,
                             num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                             num_key_value_heads=cfg.n_kv_heads, max_position_embeddings=seq,
                             rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
                             attn_implementation="sdpa")
        model = LlamaForCausalLM(hf_cfg).to(ctx.device).train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, foreach=True)
        x, _ = _batch(ctx.device, batch, seq)

        def step():  # HF shifts the labels itself: labels are the inputs
            opt.zero_grad(set_to_none=True)
            with _autocast(ctx.device, dtype):
                loss = model(input_ids=x, labels=x).loss
            loss.backward()
            opt.step()
            return loss

        return [step]

    return setup


def headline(ctx: SuiteContext, bench: Bench) -> bool:
    return not bench.case.get("checkpointing") or ctx.is_cuda


@suite("train", headline=headline)
def train(ctx: SuiteContext) -> list[Item]:
    preset, batch, seq, dtype = _shape(ctx)
    dtype_name = "bf16" if dtype == torch.bfloat16 else "fp32"
    items: list[Item] = []
    try:
        import transformers  # noqa: F401
        have_hf = True
    except ImportError as exc:
        have_hf = False
        items.append(Unavailable("hf", f"transformers is not installed: {exc}"))
    have_liger = False
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        items.append(Unavailable("hf+liger", "liger-kernel is not installed"))
    else:
        have_liger = have_hf and ctx.is_cuda
        if not have_liger:
            items.append(Unavailable("hf+liger", "Liger-Kernel's Triton kernels need a GPU"))
    for checkpointing in ((False, True) if ctx.is_cuda else (False,)):
        case = {"model": preset, "batch": batch, "seq": seq, "checkpointing": checkpointing}
        tokens = batch * seq
        for name, setup in (("llama_kernels-fused", _ours(ctx, True, checkpointing)),
                            ("llama_kernels-eager", _ours(ctx, False, checkpointing))):
            items.append(Bench(name, case, dtype_name, "step", setup, tokens=tokens))
        if have_hf:
            items.append(Bench("hf", case, dtype_name, "step", _hf(ctx, False, checkpointing), tokens=tokens))
        if have_liger:
            items.append(Bench("hf+liger", case, dtype_name, "step", _hf(ctx, True, checkpointing), tokens=tokens))
    return items
