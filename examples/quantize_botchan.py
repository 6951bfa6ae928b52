"""Train a tiny LLaMA on Botchan, then measure what 4-bit weights cost in held-out perplexity.

    python examples/quantize_botchan.py [--steps 600] [--out runs/botchan]

Fetches the sample (`llama.data.sample_files()`), trains a BPE tokenizer (vocab 1024) on
botchan.txt, trains a small GQA model on the first 90% of the text, and reports the perplexity
on the last 10% of the fp32 model and of int4 (groups of 32, 64, 128) and NF4 (with and without
double quantization) copies of it. Every linear layer is quantized, the output head included;
embeddings and norms stay fp32. With `--out`, the tokenizer and the fp32 and int4-g64 models
are written there as native checkpoints (try `python -m llama.generate --checkpoint OUT/int4-g64`).
"""
from __future__ import annotations

import argparse
import copy
import math
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

import llama
from llama.data import batches, sample_files, tokenize_file, train_val_split
from llama.quantize import Int4Config, NF4Config, model_size_bytes, quantize_
from llama.tokenizer import train as train_tokenizer

VARIANTS = {
    "fp32": None,
    "int4-g32": Int4Config(group_size=32),
    "int4-g64": Int4Config(group_size=64),
    "int4-g128": Int4Config(group_size=128),
    "nf4-b64-dq": NF4Config(block_size=64, double_quant=True),
    "nf4-b64": NF4Config(block_size=64, double_quant=False),
}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def model_config(vocab_size: int, dim: int = 128, n_layers: int = 4, max_seq_len: int = 128) -> llama.ModelConfig:
    """GQA (4 query heads, 2 key/value heads) with every matrix dimension a multiple of 128."""
    return llama.ModelConfig(dim=dim, n_layers=n_layers, n_heads=4, n_kv_heads=2, hidden_dim=3 * dim,
                             vocab_size=vocab_size, max_seq_len=max_seq_len)


def train_model(cfg: llama.ModelConfig, tokens: torch.Tensor, steps: int, batch_size: int = 16,
                seq_len: Optional[int] = None, lr: float = 3e-3, warmup: Optional[int] = None, seed: int = 0,
                log_every: int = 0) -> llama.Transformer:
    """AdamW with linear warmup and cosine decay to lr/10; weight decay on matrices only."""
    seq_len = seq_len or cfg.max_seq_len
    warmup = max(1, steps // 10) if warmup is None else warmup
    model = llama.build(cfg).reset_parameters(seed).train()
    decay = [p for p in model.parameters() if p.dim() == 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for step, (x, y) in enumerate(batches(tokens, batch_size, seq_len, gen, num_batches=steps)):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"step {step:5d}  loss {loss.item():.3f}  lr {lr_at(step):.2e}  "
                  f"{time.perf_counter() - start:6.1f} s", file=sys.stderr)
    return model.eval()


@torch.no_grad()
def perplexity(model: torch.nn.Module, tokens: torch.Tensor, seq_len: int, batch_size: int = 32) -> float:
    """exp(mean next-token cross-entropy) over consecutive, non-overlapping windows of `tokens`."""
    n = (tokens.numel() - 1) // seq_len
    if n < 1:
        raise ValueError(f"tokens: {tokens.numel()} are too few for windows of {seq_len}")
    x = tokens[: n * seq_len].long().view(n, seq_len)
    y = tokens[1: n * seq_len + 1].long().view(n, seq_len)
    total = 0.0
    for i in range(0, n, batch_size):
        total += model(x[i:i + batch_size], y[i:i + batch_size]).item() * x[i:i + batch_size].numel()
    return math.exp(total / x.numel())


def evaluate_variants(model: llama.Transformer, val: torch.Tensor, seq_len: int,
                      variants: Optional[dict] = None) -> list[dict]:
    """Perplexity and checkpoint size of `model` and of a quantized copy per variant."""
    rows = []
    for name, config in (variants or VARIANTS).items():
        m = model if config is None else quantize_(copy.deepcopy(model), config)
        rows.append({"variant": name, "bytes": model_size_bytes(m), "ppl": perplexity(m, val, seq_len)})
    base = rows[0]["ppl"]
    for row in rows:
        row["delta"] = row["ppl"] / base - 1
    return rows


def format_table(rows: list[dict], random_ppl: Optional[float] = None) -> str:
    lines = ["| weights | size (MB) | val perplexity | vs fp32 |", "|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['bytes'] / 1e6:.2f} | {r['ppl']:.2f} | {100 * r['delta']:+.1f}% |")
    if random_ppl is not None:
        lines.append(f"| untrained (random init) | | {random_ppl:.1f} | |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=600, help="training steps (default: 600)")
    p.add_argument("--out", help="write the tokenizer and the fp32 and int4-g64 checkpoints here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--dim", type=int, default=128, help="a multiple of 128, so every group size divides it")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice; 1 is faster on a busy CPU)")
    args = p.parse_args(argv)
    seed_everything(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)

    text = sample_files().text
    with tempfile.TemporaryDirectory() as tmp:  # the tokenizer is held in memory; --out gets a copy
        tok = train_tokenizer([text], args.vocab_size, tmp, quiet=True, num_threads=1)
    tokens = tokenize_file(tok, text, progress=False)
    train_tokens, val_tokens = train_val_split(tokens, 0.1)
    cfg = model_config(tok.vocab_size, args.dim, args.layers)
    print(f"{tokens.numel()} tokens ({train_tokens.numel()} train, {val_tokens.numel()} held out); "
          f"model: {cfg.num_params() / 1e6:.2f} M parameters, {torch.get_num_threads()} threads", file=sys.stderr)

    random_ppl = perplexity(llama.build(cfg).reset_parameters(args.seed).eval(), val_tokens, cfg.max_seq_len)
    start = time.perf_counter()
    model = train_model(cfg, train_tokens, args.steps, args.batch_size, seed=args.seed,
                        log_every=max(1, args.steps // 10))
    trained_s = time.perf_counter() - start
    rows = evaluate_variants(model, val_tokens, cfg.max_seq_len)
    print(f"\n{args.steps} steps of batch {args.batch_size} x {cfg.max_seq_len} in {trained_s:.0f} s\n")
    print(format_table(rows, random_ppl))

    if args.out:
        out = Path(args.out)
        lm = llama.LLaMA(model, tok)
        llama.save(lm, out / "fp32")
        llama.save(llama.LLaMA(quantize_(copy.deepcopy(model), VARIANTS["int4-g64"]), tok), out / "int4-g64")
        print(f"\nwrote {out / 'fp32'} and {out / 'int4-g64'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
