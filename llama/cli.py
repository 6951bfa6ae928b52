"""What every `python -m llama.<tool>` shares: bad input ends as one `error:` line, exit status 2."""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional, Sequence


def run(parse: Callable[[Optional[Sequence[str]]], argparse.Namespace],
        body: Callable[[argparse.Namespace], int], argv: Optional[Sequence[str]] = None) -> int:
    try:
        return body(parse(argv))
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
