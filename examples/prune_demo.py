"""Sheared-LLaMA pruning end to end on the CPU, on real text in two domains.

    python examples/prune_demo.py [--out runs/prune-demo] [--sentiment DIR] [--scale 1.0]

1. Data: botchan.txt (the sentencepiece sample, fetched with pip on first use) and the movie
   reviews of the SST-5 and CFIMDB train splits (sentences only, labels dropped) from
   `--sentiment` (default ../shared/data/sentiment beside the repository, where present; without
   it, botchan alone). One BPE tokenizer is trained on both, and each domain becomes a token
   folder (`llama.data.prepare`) with its own validation split.
2. Pretrain a small LLaMA (4 layers, dim 128, 4 heads, FFN 384) on the mix (`llama.train`).
3. Prune it to half its heads, FFN channels and model dims (dim 64, 2 heads, FFN 192) with
   hard-concrete masks, the Lagrangian and dynamic batch loading (`llama.prune train`).
4. Compact the masked model into a dense one of exactly the target shape (`llama.prune compact`),
   and continue training it briefly (`llama.train` from the compacted checkpoint).

It reports the validation perplexity of each domain before pruning, after compaction and after
continued training (report.md, perplexity.png), beside the pruning run's chart of expected size
against target and of the domain weights (prune/prune.png). `--scale` multiplies every step count.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

import llama
from llama.atomic import atomic_file, write_bytes
from llama.data import prepare, sample_files, val_batches
from llama.prune.compact import compact_checkpoint
from llama.prune.train import PruneConfig, build_prune
from llama.tokenizer import train as train_tokenizer
from llama.train import TrainConfig, build_run

SOURCE = ["dim=128", "n_layers=4", "n_heads=4", "n_kv_heads=4", "hidden_dim=384", "max_seq_len=128", "dropout=0.0"]
TARGET = ["dim=64", "n_heads=2", "n_kv_heads=2", "hidden_dim=192"]
REVIEW_FILES = ("sst-train.txt", "cfimdb-train.txt")


def review_sentences(folder: Path) -> list[str]:
    """The sentences of the train splits, `label ||| sentence` or `id ||| label ||| sentence`."""
    out = []
    for name in REVIEW_FILES:
        for line in (folder / name).read_text(encoding="utf-8").splitlines():
            parts = line.split(" ||| ")
            if len(parts) >= 2 and parts[-1].strip():
                out.append(parts[-1].strip())
    return out


def domain_ppl(model: llama.Transformer, sources: dict[str, str], seq_len: int, batches: int = 40) -> dict[str, float]:
    """Validation perplexity per domain (the same windows for every model)."""
    model.eval()
    out = {}
    with torch.no_grad():
        for name, stream in val_batches(sources, seq_len, 16, max_batches=batches).items():
            total, count = 0.0, 0
            for x, y in stream:
                total += float(model(x, y)) * y.numel()
                count += y.numel()
            out[name] = math.exp(total / count)
    return out


def plot(stages: dict[str, dict[str, float]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(next(iter(stages.values())))
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    width = 0.8 / len(stages)
    for i, (stage, ppl) in enumerate(stages.items()):
        xs = [j + (i - (len(stages) - 1) / 2) * width for j in range(len(names))]
        bars = ax.bar(xs, [ppl[n] for n in names], width, label=stage)
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("validation perplexity (lower is better)")
    ax.set_title("Per-domain perplexity through pruning")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/prune-demo", help="output folder")
    parser.add_argument("--sentiment", default=str(Path(__file__).resolve().parents[1].parent / "shared" / "data" /
                                                   "sentiment"), help="folder with sst-train.txt and cfimdb-train.txt")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every step count")
    parser.add_argument("--vocab", type=int, default=2000, help="BPE vocabulary size")
    args = parser.parse_args(argv)
    if not args.scale > 0:
        parser.error("--scale: expected a positive number")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    steps = lambda n: max(2, int(round(n * args.scale)))  # noqa: E731
    started = time.perf_counter()

    # 1. data
    texts = {"botchan": sample_files().text}
    sentiment = Path(args.sentiment)
    if all((sentiment / f).is_file() for f in REVIEW_FILES):
        reviews = out / "reviews.txt"
        write_bytes(reviews, ("\n".join(review_sentences(sentiment)) + "\n").encode("utf-8"))
        texts["reviews"] = reviews
    else:
        print(f"{sentiment}: no SST/CFIMDB train files; pruning on botchan alone")
    tokenizer = out / "tokenizer" / "tokenizer.model"
    if not tokenizer.is_file():
        train_tokenizer(list(texts.values()), args.vocab, tokenizer.parent, quiet=True)
    sources = {}
    for name, text in texts.items():
        folder = out / "data" / name
        if not (folder / "manifest.json").is_file():
            prepare(tokenizer, [text], folder)
        sources[name] = str(folder)
    common = dict(data=sources, tokenizer=str(tokenizer), seq_len=128, batch_size=16, eval_batches=10,
                  sample_tokens=0, save_every=10_000, log_every=10)

    # 2. pretrain
    pre = TrainConfig(model="stories260K", model_overrides=SOURCE + [f"vocab_size={args.vocab}"],
                      lr=2e-3, warmup_steps=steps(30), max_steps=steps(500), eval_every=steps(100),
                      out_dir=str(out / "pretrain"), **common)
    build_run(pre).fit()
    source = llama.load(out / "pretrain" / "final").model
    stages = {"source (before pruning)": domain_ppl(source, sources, 128)}

    # 3. prune
    prune_steps = steps(300)
    cfg = PruneConfig(init_from=str(out / "pretrain" / "final"), target_overrides=TARGET,
                      prune_modules=["head", "intermediate", "hidden"], lagrangian_warmup_steps=steps(200),
                      lr=1e-3, warmup_steps=steps(20), max_steps=prune_steps, eval_every=steps(50),
                      mask_lr=0.1, lag_lr=0.1, out_dir=str(out / "prune"), **common)
    pruner = build_prune(cfg)
    pruner.fit()

    # 4. compact, continue
    compact_checkpoint(out / "prune" / "final", out / "compact", force=True)
    compacted = llama.load(out / "compact").model
    stages["compacted"] = domain_ppl(compacted, sources, 128)
    cont = TrainConfig(init_from=str(out / "compact"), lr=1e-3, warmup_steps=steps(10), max_steps=steps(200),
                       eval_every=steps(100), out_dir=str(out / "continued"), **common)
    build_run(cont).fit()
    stages["continued training"] = domain_ppl(llama.load(out / "continued" / "final").model, sources, 128)

    # report
    plot(stages, out / "perplexity.png")
    src_params, dst_params = source.config.num_params(), compacted.config.num_params()
    lines = ["# Pruning demo", "",
             f"Source {src_params / 1e6:.2f} M parameters ({', '.join(SOURCE[:5])}) -> target "
             f"{dst_params / 1e6:.2f} M ({', '.join(TARGET)}); steps: pretrain {pre.max_steps}, prune "
             f"{prune_steps}, continued {cont.max_steps}; {time.perf_counter() - started:.0f} s in all.", "",
             "| stage | " + " | ".join(f"{n} ppl" for n in sources) + " |",
             "|---|" + "---|" * len(sources)]
    for stage, ppl in stages.items():
        lines.append(f"| {stage} | " + " | ".join(f"{ppl[n]:.2f}" for n in sources) + " |")
    weights = [json.loads(line) for line in (out / "prune" / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in weights if any(k.startswith("weight_") for k in r)]
    if last:
        lines += ["", "Domain weights after pruning (dynamic batch loading): " +
                  ", ".join(f"{k[len('weight_'):]} {v:.3f}" for k, v in last[-1].items() if k.startswith("weight_"))]
    lines += ["", "![perplexity](perplexity.png)", "", "![pruning](prune/prune.png)", ""]
    write_bytes(out / "report.md", "\n".join(lines).encode("utf-8"))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
