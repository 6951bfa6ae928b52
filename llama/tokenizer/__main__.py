"""Command line: ``python -m llama.tokenizer train|export``.

    python -m llama.tokenizer train --input FILE [FILE ...] --vocab-size N --out DIR
    python -m llama.tokenizer export --model tokenizer.model --out tokenizer.bin

Paths are checked before any work (``--out`` of ``train`` before training). Errors end as one
``error:`` line on stderr with exit status 2, as in every tool (see llama/cli.py); warnings,
such as what a tokenizer.bin cannot carry, are printed as ``warning:`` lines.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from typing import Optional, Sequence

from .. import cli
from . import export_llama2c, train


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m llama.tokenizer",
        description="Train a LLaMA-style SentencePiece tokenizer, or export one as a llama2.c tokenizer.bin.")
    commands = parser.add_subparsers(dest="command", required=True)
    t = commands.add_parser("train", help="train a LLaMA-style BPE SentencePiece model")
    t.add_argument("--input", nargs="+", required=True, metavar="FILE", help="UTF-8 text, a sentence a line")
    t.add_argument("--vocab-size", type=int, required=True, metavar="N", help="tokens, at least 260")
    t.add_argument("--out", required=True, metavar="DIR", help="gets tokenizer.model and tokenizer.bin")
    t.add_argument("--model-type", choices=["bpe"], default="bpe")
    t.add_argument("--character-coverage", type=float, default=0.99995, metavar="F",
                   help="share of characters given their own token; rarer ones become bytes (default: 0.99995)")
    t.add_argument("--input-sentence-size", type=int, default=0, metavar="N",
                   help="train on a random sample of N lines (0: all)")
    t.add_argument("--num-threads", type=int, default=None, metavar="N", help="default: all cores")
    t.add_argument("--quiet", action="store_true", help="no SentencePiece log")
    e = commands.add_parser("export", help="write a llama2.c tokenizer.bin")
    e.add_argument("--model", required=True, metavar="FILE", help="tokenizer.model (or .bin)")
    e.add_argument("--out", required=True, metavar="FILE")
    return parser


def _check_train(args: argparse.Namespace) -> None:
    for value in args.input:
        cli.input_path(value, "--input", what="text file")
    out = cli.output_dir(args.out, "--out")
    for name in ("tokenizer.model", "tokenizer.bin"):
        if out.is_dir():
            cli.output_file(str(out / name), "--out")


def _run(args: argparse.Namespace) -> int:
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if args.command == "train":
                _check_train(args)
                tok = train(args.input, args.vocab_size, args.out, model_type=args.model_type,
                            character_coverage=args.character_coverage,
                            input_sentence_size=args.input_sentence_size,
                            num_threads=args.num_threads, quiet=args.quiet)
                print(f"wrote {tok.path} and {tok.path.with_name('tokenizer.bin')} "
                      f"({tok.vocab_size} tokens)")
            else:
                cli.input_path(args.model, "--model", what="tokenizer file")
                cli.output_file(args.out, "--out", parent_must_exist=True)
                path = export_llama2c(args.model, args.out)
                print(f"wrote {path}")
    finally:
        for w in caught:
            cli.warning(str(w.message))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit status."""
    return cli.run(lambda a: _parser().parse_args(a), _run, argv)


if __name__ == "__main__":
    sys.exit(main())
