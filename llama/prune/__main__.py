"""`python -m llama.prune`: structured pruning (Sheared LLaMA). One subcommand per step:

    python -m llama.prune train --config configs/prune/NAME.yaml [key=value ...] [--resume]
    python -m llama.prune compact CKPT --out OUT [--format native|hf] [--force]

train: learns hard-concrete masks toward a target shape while the weights (or LoRA adapters over
a frozen base) train, with dynamic batch loading over the data domains (llama/prune/train.py has
the keys and the method). It writes checkpoints that --resume continues, metrics.jsonl, prune.png
and final/ (the model and its masks), the input of compact.

compact: CKPT is a directory holding a model checkpoint that llama.load reads (native or Hugging
Face) and the pruning masks beside it (masks.safetensors and masks.json, as
llama.prune.save_masks writes them). The masks' deterministic values (the target's counts, kept
gates at their soft values) are folded into the weights and the pruned parts sliced away
(llama.prune.compact); the result, checked against the masks' target config, is written to OUT
as a dense checkpoint, with the tokenizer found in CKPT, if any. OUT must be new or an empty
directory; --force lets it write into a non-empty one (a checkpoint there is replaced). OUT may
never be CKPT itself. Arguments are checked before the model is loaded; exit status and `error:`
lines as every tool's (llama/cli.py).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from .. import checkpoint, cli
from ..api import find_tokenizer
from .compact import OUTPUT_FORMATS, compact_checkpoint
from ..train import TrainingDiverged
from .masks import MASKS_CONFIG, MASKS_WEIGHTS
from .train import PruneConfig, build_prune


# ----------------------------------------------------------------------------- subcommands
def _add_compact(sub: "argparse._SubParsersAction") -> None:
    p = sub.add_parser("compact", help="fold trained masks into a smaller dense checkpoint",
                       description="Fold the masks saved beside a checkpoint into its weights and write the "
                                   "compact dense model.")
    p.add_argument("checkpoint", metavar="CKPT",
                   help=f"directory with a checkpoint llama.load reads, plus {MASKS_WEIGHTS} and {MASKS_CONFIG}")
    p.add_argument("--out", required=True, help="directory for the compact checkpoint (new or empty)")
    p.add_argument("--format", default="native", choices=OUTPUT_FORMATS, help="checkpoint format (default: native)")
    p.add_argument("--force", action="store_true", help="write into --out even if it is not empty")
    p.set_defaults(run=_compact)


def _add_train(sub: "argparse._SubParsersAction") -> None:
    p = sub.add_parser("train", help="learn the masks toward a target shape (and train the weights)",
                       description="Prune a model toward a target shape with hard-concrete masks, the Lagrangian "
                                   "and dynamic batch loading (llama.prune.train.PruneConfig lists the keys).")
    p.add_argument("--config", metavar="YAML", default=None, help="pruning config (configs/prune/*.yaml)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in out_dir")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config changes, e.g. max_steps=200 target_overrides=[dim=64,n_heads=2]")
    p.set_defaults(run=_train)


SUBCOMMANDS = (_add_train, _add_compact)


def _parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m llama.prune",
                                     description="Structured pruning of a LLaMA (Sheared LLaMA).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    return parser.parse_args(argv)


def _run(args: argparse.Namespace) -> int:
    return args.run(args)


def main(argv: Optional[Sequence[str]] = None) -> int:
    return cli.run(_parse, _run, argv)


# ----------------------------------------------------------------------------- train
def _train(args: argparse.Namespace) -> int:
    if args.config is not None:
        cli.input_path(args.config, "--config")
    cfg = PruneConfig.from_spec(args.config, args.overrides + (["resume=true"] if args.resume else []))
    cli.output_dir(cfg.out_dir, "out_dir")
    try:
        trainer = build_prune(cfg)
        result = trainer.fit()
    except TrainingDiverged as e:  # the run failed; not a bad argument
        cli.error(str(e))
        return cli.EXIT_FAILURE
    if result.get("stopped_early"):
        print(f"stopped at step {trainer.step}; continue with --resume (checkpoints in {cfg.out_dir})")
        return 0
    sizes = trainer.masks.expected_sizes(
        {k: v.float() for k, v in trainer.masks.keep().items()})  # what the deterministic masks keep
    kept = ", ".join(f"{k} {float(v):.0f}/{trainer.masks.source_sizes[k]}" for k, v in sizes.items())
    if "val_loss" in result:
        print(f"validation loss under the final masks {result['val_loss']:.4f}, perplexity {result['val_ppl']:.2f}")
    print(f"kept: {kept}")
    print(f"masks and model: {cfg.out_dir}/final   metrics: {cfg.out_dir}/metrics.jsonl   chart: {cfg.out_dir}/prune.png")
    print(f"next: python -m llama.prune compact {cfg.out_dir}/final --out OUT")
    return 0


# ----------------------------------------------------------------------------- compact
def _check_checkpoint(value: str) -> Path:
    """CKPT: a checkpoint directory with both mask files."""
    path = cli.checkpoint_path(value, "CKPT")
    if not path.is_dir():
        raise cli.UsageError(f"CKPT: {value!r} is a file; expected a checkpoint directory holding "
                             f"{MASKS_WEIGHTS} and {MASKS_CONFIG} too")
    for name in (MASKS_CONFIG, MASKS_WEIGHTS):
        if not (path / name).exists():
            raise cli.UsageError(f"CKPT: {value!r} has no {name}; save the masks there first "
                                 "(llama.prune.save_masks)")
        cli.input_path(str(path / name), "CKPT")
    return path


def _check_out(source: Path, value: str, force: bool) -> Path:
    """--out: not CKPT, writable, and new or empty unless --force."""
    out = Path(value)
    if out.resolve() == source.resolve():
        raise cli.UsageError(f"--out: {value!r} is CKPT itself; write the compact model elsewhere "
                             "(--force does not allow this)")
    cli.output_dir(value, "--out")
    if out.is_dir() and not force:
        entries = os.listdir(out)
        if entries:
            held = "already holds a checkpoint" if (out / "config.json").exists() else \
                f"is not empty ({len(entries)} entries)"
            raise cli.UsageError(f"--out: {value!r} {held}; pass --force to write into it anyway")
    return out


def _compact(args: argparse.Namespace) -> int:
    source = _check_checkpoint(args.checkpoint)
    out = _check_out(source, args.out, args.force)
    small = compact_checkpoint(source, out, format=args.format, force=True)  # --out checked above
    tokenizer = find_tokenizer(source)
    c, s = small.config, checkpoint.read_config(source)
    print(f"wrote {out} ({args.format}): {c.n_layers}/{s.n_layers} layers, {c.n_heads}/{s.n_heads} heads, "
          f"dim {c.dim}/{s.dim}, hidden_dim {c.hidden_dim}/{s.hidden_dim}; "
          f"{c.num_params() / 1e6:.2f}M of {s.num_params() / 1e6:.2f}M parameters"
          + (f", with {tokenizer.name}" if tokenizer is not None else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
