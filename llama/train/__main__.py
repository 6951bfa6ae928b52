"""`python -m llama.train --config configs/train/NAME.yaml [key=value ...] [--resume]`: train a
LLaMA as the config says (llama.train.TrainConfig lists the keys). Unknown keys and values of the
wrong type are reported before any work starts, as one `error:` line with exit status 2 (see
llama/cli.py). At the end it prints the validation loss and perplexity and a generated sample.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from .. import cli
from ..api import LLaMA
from ..checkpoint import load_model
from . import TrainingDiverged, build_run, distributed
from .config import TrainConfig


def _parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m llama.train", description="Train a LLaMA on the fast kernels.")
    parser.add_argument("--config", metavar="YAML", default=None, help="training config (configs/train/*.yaml)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in out_dir")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config changes, e.g. lr=1e-3 max_steps=200")
    return parser.parse_args(argv)


def _run(args: argparse.Namespace) -> int:
    if args.config is not None:
        cli.input_path(args.config, "--config")
    cfg = TrainConfig.from_spec(args.config, args.overrides + (["resume=true"] if args.resume else []))
    cli.output_dir(cfg.out_dir, "out_dir")
    try:
        trainer = build_run(cfg)
        result = trainer.fit()
    except TrainingDiverged as e:  # not a bug and not a bad argument: the run failed
        cli.error(str(e))
        return cli.EXIT_FAILURE
    finally:
        distributed.teardown()
    if distributed.rank_from_env() != 0:  # under torchrun, rank 0 reports
        return 0
    if result.get("stopped_early"):
        print(f"stopped at step {trainer.step}; continue with --resume (checkpoints in {cfg.out_dir})")
        return 0
    if "val_loss" in result:
        print(f"validation loss {result['val_loss']:.4f}, perplexity {result['val_ppl']:.2f}")
    print(f"model: {cfg.out_dir}/final   metrics: {cfg.out_dir}/metrics.jsonl   curve: {cfg.out_dir}/loss.png")
    if trainer.tokenizer is not None and cfg.sample_tokens:
        # sharded (torchrun): the parameters were gathered into final/ and are read from there
        model = load_model(f"{cfg.out_dir}/final") if distributed.launched() else trainer.model
        model.eval()
        prompt = "I"
        text = LLaMA(model, trainer.tokenizer).generate(prompt, max_new_tokens=cfg.sample_tokens,
                                                               temperature=0.8, seed=cfg.seed)
        print(f"sample: {prompt}{text}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    return cli.run(_parse, _run, argv)


if __name__ == "__main__":
    sys.exit(main())
