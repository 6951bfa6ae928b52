"""`python -m llama.config [SPEC] [key=value ...]`: show a model config as YAML, with its size.

SPEC is a preset name or a YAML file (none: the defaults); the overrides follow it.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from . import ModelConfig


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llama.config", description="Show a model config")
    parser.add_argument("spec", nargs="?", help="preset name or YAML file")
    parser.add_argument("overrides", nargs="*", help="key=value")
    args = parser.parse_args(argv)
    cfg = ModelConfig.from_spec(args.spec, args.overrides)
    sys.stdout.write(cfg.to_yaml())
    print(f"# parameters: {cfg.num_params():,}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
