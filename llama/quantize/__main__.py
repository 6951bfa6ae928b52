"""`python -m llama.quantize`: quantize a checkpoint's linear layers to 4 bits, written as a
native checkpoint (with the tokenizer found beside the input, if any).

    python -m llama.quantize --checkpoint IN --out OUT --format int4 --group-size 64
    python -m llama.quantize --checkpoint IN --out OUT --format nf4 [--group-size 64] [--no-double-quant]

OUT must be new or an empty directory; --force lets it replace what a non-empty OUT holds (a
checkpoint there is overwritten, a tokenizer the new one does not bring is removed). OUT may never
be the input checkpoint, or the directory of an input file. Everything is checked before the
model is loaded; exit status and error lines as every tool's (see llama/cli.py).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from .. import checkpoint, cli
from ..api import TOKENIZER_NAMES, find_tokenizer
from ..atomic import atomic_file
from . import config_from_dict, model_size_bytes, quantize_, quantized_layers


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m llama.quantize",
                                description="Quantize a checkpoint's linear layers to 4 bits (native format out)")
    p.add_argument("--checkpoint", required=True, help="any format llama.load reads")
    p.add_argument("--out", required=True, help="directory for the quantized native checkpoint (new or empty)")
    p.add_argument("--force", action="store_true",
                   help="write into --out even if it is not empty, replacing a checkpoint there")
    p.add_argument("--format", default="int4", help="int4 or nf4 (default: int4)")
    p.add_argument("--group-size", type=int, default=None,
                   help="inputs per scale: 32, 64 or 128 (default: 128 for int4, 64 for nf4)")
    p.add_argument("--double-quant", action=argparse.BooleanOptionalAction, default=None,
                   help="nf4: store the absmax values in 8 bits (default: on)")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    return cli.run(_parse, _run, argv)


def _check_out(source: Path, out: Path, value: str, force: bool) -> None:
    """--out: not the input (nor an input file's directory), writable, and new or empty unless --force."""
    target = out.resolve()
    home = source.resolve() if source.is_dir() else source.resolve().parent
    if target == source.resolve() or target == home:
        what = "the input checkpoint" if source.is_dir() else "the directory of the input checkpoint"
        raise cli.UsageError(f"--out: {value!r} is {what}; write the quantized model elsewhere "
                             "(--force does not allow this)")
    cli.output_dir(value, "--out")
    if out.is_dir() and not force:
        entries = os.listdir(out)
        if (out / "config.json").exists():
            raise cli.UsageError(f"--out: {value!r} already holds a checkpoint; pass --force to replace it")
        if entries:
            raise cli.UsageError(f"--out: {value!r} is not empty ({len(entries)} entries); pass --force "
                                 "to write into it anyway")


def _run(args: argparse.Namespace) -> int:
    settings: dict[str, Any] = {"format": args.format}
    if args.group_size is not None:
        settings["group_size"] = args.group_size
    if args.double_quant is not None:
        if args.format == "int4":
            raise ValueError("double_quant: applies only to format 'nf4'")
        settings["double_quant"] = args.double_quant
    config = config_from_dict(settings)
    source = cli.checkpoint_path(args.checkpoint, "--checkpoint")
    out = Path(args.out)
    _check_out(source, out, args.out, args.force)

    model = checkpoint.load_model(source, device="cpu")
    before = model_size_bytes(model)
    quantize_(model, config, progress=True)
    after = model_size_bytes(model)
    checkpoint.save(model, out, format="native")
    tokenizer = find_tokenizer(source)
    if tokenizer is not None:
        with atomic_file(out / tokenizer.name) as tmp:
            shutil.copyfile(tokenizer, tmp)
    for name in TOKENIZER_NAMES:  # a tokenizer left by what --force replaced is not this model's
        stale = out / name
        if (tokenizer is None or name != tokenizer.name) and stale.is_file():
            stale.unlink()
    n = len(quantized_layers(model))
    print(f"wrote {out}: {n} layers in {config.format} (group {config.group_size}"
          f"{', double quant' if config.double_quant else ''}), {before / 1e6:.2f} MB -> {after / 1e6:.2f} MB"
          + (f", with {tokenizer.name}" if tokenizer is not None else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
