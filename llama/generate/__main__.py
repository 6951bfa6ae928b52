"""`python -m llama.generate`: generate text from a checkpoint of any format.

    python -m llama.generate --checkpoint PATH [--tokenizer PATH] --prompt "Once upon a time" \
        --max-new-tokens 200 --temperature 0.8 --top-p 0.9 --seed 0

One prompt streams its continuation to stdout; repeated --prompt runs a batch. Trailing
`key=value` arguments change the config without touching the weights (RoPE scaling, say).
Every argument is checked before the checkpoint is loaded; exit status and error lines as every
tool's (see llama/cli.py).
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Optional, Sequence

import torch

from .. import cli
from ..api import TOKENIZER_NAMES, find_tokenizer, load
from . import Sampling


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m llama.generate", description="Generate text from a checkpoint")
    p.add_argument("--checkpoint", required=True, help="any format llama.load reads")
    p.add_argument("--tokenizer", help="SentencePiece .model or llama2.c tokenizer.bin (default: found beside the checkpoint)")
    p.add_argument("--prompt", action="append", help="prompt text; repeat for a batch (default: empty, i.e. BOS only)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--epsilon", type=float, help="drop tokens whose probability is below this")
    p.add_argument("--seed", type=int, help="0 to 2**64 - 1")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="default: the checkpoint's")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="compile the decode step (default: on for CUDA)")
    p.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                   help="replay the decode step as a CUDA graph (default: on for CUDA)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config changes that keep the weights, e.g. rope_scaling=dynamic rope_scaling_factor=4")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    return cli.run(_parse, _run, argv)


def _check(args: argparse.Namespace) -> str:
    """Everything that can be checked before loading; returns the device."""
    cli.checkpoint_path(args.checkpoint, "--checkpoint")
    if args.tokenizer is not None:
        cli.input_path(args.tokenizer, "--tokenizer", what="tokenizer file (tokenizer.model or tokenizer.bin)")
    elif find_tokenizer(args.checkpoint) is None:
        raise cli.UsageError(f"--tokenizer: none given, and no {' or '.join(TOKENIZER_NAMES)} beside "
                             f"--checkpoint {args.checkpoint!r}")
    device = cli.device(args.device, "--device")
    cli.seed(args.seed, "--seed")
    if args.max_new_tokens < 0:
        raise cli.UsageError(f"--max-new-tokens: expected >= 0, got {args.max_new_tokens}")
    Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, epsilon=args.epsilon)
    if args.cuda_graph and torch.device(device).type != "cuda":
        raise cli.UsageError(f"--cuda-graph: needs a CUDA device, got --device {device}")
    cli.check_overrides(args.overrides)
    return device


def _run(args: argparse.Namespace) -> int:
    device = _check(args)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    lm = load(args.checkpoint, tokenizer=args.tokenizer, device=device, dtype=dtype, overrides=args.overrides)
    prompts = args.prompt or [""]
    if len(prompts) == 1:
        sys.stdout.write(prompts[0])  # the continuation streams after it
    start = time.perf_counter()
    texts = lm.generate(
        prompts if len(prompts) > 1 else prompts[0],
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        epsilon=args.epsilon,
        seed=args.seed,
        stream=sys.stdout if len(prompts) == 1 else None,
        compile=args.compile,
        cuda_graph=args.cuda_graph,
    )
    elapsed = time.perf_counter() - start
    if len(prompts) > 1:
        for prompt, text in zip(prompts, texts):
            print(f"--- {prompt!r}\n{prompt}{text}")
    else:
        print()
    print(f"[{lm.last_generated_tokens} tokens in {elapsed:.2f} s]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
