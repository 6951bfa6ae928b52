"""`python -m llama.config [SPEC] [key=value ...]`: show a model config as YAML, with its size.

SPEC is a preset name or a YAML file (none: the defaults); the overrides follow it. Exit status
and error lines as every tool's (see llama/cli.py): 2 for a bad SPEC or override.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

import yaml

from .. import cli
from . import PRESETS, ModelConfig


def _parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m llama.config", description="Show a model config")
    parser.add_argument("spec", nargs="?", metavar="SPEC", help="preset name or YAML file")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="field changes")
    return parser.parse_args(argv)


def _run(args: argparse.Namespace) -> int:
    spec = args.spec
    if spec is not None and spec not in PRESETS:
        if not os.path.lexists(spec):
            raise cli.UsageError(f"SPEC: {spec!r} is neither a preset ({', '.join(PRESETS)}) nor a file")
        cli.input_path(spec, "SPEC", what="YAML file")
    cli.check_overrides(args.overrides)
    try:
        cfg = ModelConfig.from_spec(spec, args.overrides)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or "cannot be parsed"
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise cli.UsageError(f"SPEC: {spec!r} is not valid YAML: {problem}{where}") from None
    except UnicodeDecodeError:
        raise cli.UsageError(f"SPEC: {spec!r} is not UTF-8 text") from None
    sys.stdout.write(cfg.to_yaml())
    print(f"# parameters: {cfg.num_params():,}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return cli.run(_parse, _run, argv)


if __name__ == "__main__":
    sys.exit(main())
