"""`python -m llama.data fetch-sample [--cache-dir DIR] [--force]`: download, check and cache the
sample text and BPE model (see llama.data); prints where they are. Exit status 1 when the sample
cannot be had (no network, a download that fails its checksum), 2 for a bad --cache-dir, each
with one `error:` line saying why (see llama/cli.py).

`python -m llama.data fetch-sentiment --out DIR [--force]`: download the SST-5 and CFIMDB
sentiment files (see llama.data.sentiment) into DIR, checked against pinned SHA-256 sums. Exit
status 1 without a network, with one `error:` line saying what to download and from where.

`python -m llama.data prepare --tokenizer T --input FILE [FILE ...] --out DIR [--val-fraction X]
[--seed S] [--split paragraph|line|file] [--no-eos] [--force] [--quiet]`: tokenize text files into
token shards (see llama.data.shards) and print a one-line summary. DIR must be new or empty unless
--force. The tokenizer, the inputs and DIR are checked before any tokenizing; a bad one exits 2.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Optional, Sequence

from .. import cli
from ..tokenizer import Tokenizer
from . import CACHE_ENV, ChecksumError, SampleUnavailable, fetch_sample
from .shards import prepare


def _fraction(value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {value!r}") from None
    if not 0 < x < 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {value!r}")
    return x


def _parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m llama.data",
                                     description="Sample data for tests and demos; token shards for training.")
    commands = parser.add_subparsers(dest="command", required=True)
    fetch = commands.add_parser("fetch-sample", help="download and cache botchan.txt and a BPE model")
    fetch.add_argument("--cache-dir", metavar="DIR", default=None,
                       help=f"default: ${CACHE_ENV}, else $XDG_CACHE_HOME/llama-kernels or ~/.cache/llama-kernels")
    fetch.add_argument("--force", action="store_true", help="download again even if cached")
    senti = commands.add_parser("fetch-sentiment", help="download the SST-5 and CFIMDB sentiment files")
    senti.add_argument("--out", required=True, metavar="DIR", help="folder for the files")
    senti.add_argument("--force", action="store_true", help="download again files already there")
    prep = commands.add_parser("prepare", help="tokenize text files into memory-mapped train/val token shards")
    prep.add_argument("--tokenizer", required=True, help="a SentencePiece .model or llama2.c tokenizer.bin")
    prep.add_argument("--input", required=True, nargs="+", metavar="FILE", help="UTF-8 text files")
    prep.add_argument("--out", required=True, metavar="DIR", help="directory for the shards (new or empty)")
    prep.add_argument("--val-fraction", type=_fraction, default=0.05,
                      help="share of the text, in whole documents, kept for validation (default: 0.05)")
    prep.add_argument("--seed", type=int, default=0, help="seed of the validation choice (default: 0)")
    prep.add_argument("--split", choices=("paragraph", "line", "file"), default="paragraph",
                      help="what a document is: text between blank lines (default), a line, or a file")
    prep.add_argument("--no-eos", dest="eos", action="store_false", help="no eos token after each document")
    prep.add_argument("--force", action="store_true", help="write into --out even if it is not empty")
    prep.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def _check_out(value: str, force: bool) -> Path:
    out = cli.output_dir(value, "--out")
    if out.is_dir() and not force:
        entries = sorted(p.name for p in out.iterdir())
        if entries:
            holds = " (it holds token shards)" if "manifest.json" in entries else ""
            raise cli.UsageError(f"--out: {value!r} is not empty ({len(entries)} entries){holds}; pass "
                                 "--force to write into it anyway")
    return out


def _prepare(args: argparse.Namespace) -> int:
    tokenizer_path = cli.input_path(args.tokenizer, "--tokenizer")
    inputs = [cli.input_path(value, "--input") for value in args.input]
    cli.seed(args.seed)
    out = _check_out(args.out, args.force)
    try:
        tokenizer = Tokenizer(tokenizer_path)
    except ValueError as e:
        raise cli.UsageError(f"--tokenizer: {re.sub(r'^path: ', '', str(e))}") from None
    try:
        manifest = prepare(tokenizer, inputs, out, val_fraction=args.val_fraction, seed=args.seed,
                           split=args.split, eos=args.eos, progress=False if args.quiet else None,
                           force=True)  # --out was checked above
    except ValueError as e:
        raise cli.UsageError(re.sub(r"^inputs(\[\d+\])?:", "--input:", str(e))) from None
    train, val = manifest["train_tokens"], manifest["val_tokens"]
    print(f"{train + val} tokens ({train} train, {val} val; {manifest['dtype']}) from {len(inputs)} "
          f"file(s) written to {out}")
    return 0


def _fetch_sentiment(args: argparse.Namespace) -> int:
    from .sentiment import fetch_sentiment

    out = cli.output_dir(args.out, "--out")
    try:
        paths = fetch_sentiment(out, force=args.force)
    except (SampleUnavailable, ChecksumError) as e:
        cli.error(str(e))
        return cli.EXIT_FAILURE
    print(f"{len(paths)} files in {out}: {', '.join(p.name for p in paths)}")
    return 0


def _run(args: argparse.Namespace) -> int:
    if args.command == "prepare":
        return _prepare(args)
    if args.command == "fetch-sentiment":
        return _fetch_sentiment(args)
    if args.cache_dir is not None:
        cli.output_dir(args.cache_dir, "--cache-dir")
    try:
        files = fetch_sample(args.cache_dir, force=args.force)
    except (SampleUnavailable, ChecksumError) as e:
        cli.error(str(e))
        return cli.EXIT_FAILURE
    print(f"text: {files.text}\ntokenizer_model: {files.tokenizer_model}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    """Command line: ``fetch-sample``, ``fetch-sentiment``, ``prepare``."""
    return cli.run(_parse, _run, argv)


if __name__ == "__main__":
    sys.exit(main())
