"""`python -m llama.data fetch-sample [--cache-dir DIR] [--force]`: download, check and cache the
sample text and BPE model (see llama.data); prints where they are. Exit status 1 when the sample
cannot be had, with one `error:` line saying why.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional

from . import CACHE_ENV, ChecksumError, SampleUnavailable, fetch_sample


def main(argv: Optional[list[str]] = None) -> int:
    """Command line: ``fetch-sample``."""
    parser = argparse.ArgumentParser(prog="python -m llama.data", description="Sample data for tests and demos.")
    commands = parser.add_subparsers(dest="command", required=True)
    fetch = commands.add_parser("fetch-sample", help="download and cache botchan.txt and a BPE model")
    fetch.add_argument("--cache-dir", metavar="DIR", default=None,
                       help=f"default: ${CACHE_ENV}, else $XDG_CACHE_HOME/llama-kernels or ~/.cache/llama-kernels")
    fetch.add_argument("--force", action="store_true", help="download again even if cached")
    args = parser.parse_args(argv)
    try:
        files = fetch_sample(args.cache_dir, force=args.force)
    except (SampleUnavailable, ChecksumError, ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"text: {files.text}\ntokenizer_model: {files.tokenizer_model}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
