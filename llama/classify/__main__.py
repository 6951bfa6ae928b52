"""`python -m llama.classify`: sentence classification (sentiment) by prompting, fine-tuning,
LoRA or QLoRA (see llama/classify/__init__.py for the methods and the file format).

    python -m llama.classify --option lora --pretrained CKPT --label-names sst-label-mapping.json \\
        --train sst-train.txt --dev sst-dev.txt --test sst-test.txt \\
        --dev-out sst-dev-output.txt --test-out sst-test-output.txt --out runs/sst-lora

It trains on --train (not for prompt), keeps the epoch with the best dev accuracy, prints the
dev accuracy and macro-F1, writes `pred ||| sentence` lines (pred: the label index) for dev and
test, and a confusion-matrix PNG beside --dev-out (`NAME.confusion.png`). --out saves the best
model: finetune a native checkpoint with the head, lora/qlora the adapters and the head.
The minllama spellings (--batch_size, --dev_out, --test_out, --pretrained-model-path,
--label_names, --lora_rank, --lora_alpha, --use_gpu) are accepted too. Every argument is checked
before a model is loaded; exit status and error lines as every tool's (see llama/cli.py).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from .. import checkpoint, cli
from ..api import find_tokenizer
from ..tokenizer import Tokenizer
from . import (METHODS, accuracy, confusion_matrix, macro_f1, parse_label_names, plot_confusion, read_examples,
               read_label_names, train_classifier, write_predictions)


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m llama.classify",
                                description="Sentence classification by prompting, fine-tuning, LoRA or QLoRA")
    p.add_argument("--option", required=True, help=f"the method: {', '.join(METHODS)}")
    p.add_argument("--pretrained", "--pretrained-model-path", "--pretrained_model_path", dest="pretrained",
                   required=True, help="the base model: any checkpoint llama.load reads")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer.model or tokenizer.bin (default: the one beside --pretrained)")
    p.add_argument("--label-names", "--label_names", dest="label_names", default=None,
                   help="a JSON file with the list of label names, or the names separated by commas "
                        "(required for prompt; default otherwise: 0, 1, ... up to the largest label)")
    p.add_argument("--train", default=None, help="training file (not used by prompt)")
    p.add_argument("--dev", required=True, help="dev file: selects the best epoch, scored at the end")
    p.add_argument("--test", default=None, help="test file; its labels may be -1 (placeholders)")
    p.add_argument("--dev-out", "--dev_out", dest="dev_out", default=None, help="dev predictions file to write")
    p.add_argument("--test-out", "--test_out", dest="test_out", default=None,
                   help="test predictions file to write (needed with --test)")
    p.add_argument("--out", default=None, help="directory for the best model (not for prompt)")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=8)
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default: 2e-5 finetune, 2e-4 lora/qlora)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup-ratio", type=float, default=0.1, help="share of the steps for the linear warmup")
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--dropout", "--hidden_dropout_prob", dest="dropout", type=float, default=0.1,
                   help="dropout before the classification head")
    p.add_argument("--pooling", choices=("last", "mean"), default="last",
                   help="what the head reads: the last real token's hidden state, or the mean over the tokens")
    p.add_argument("--lora-rank", "--lora_rank", dest="lora_rank", type=int, default=8)
    p.add_argument("--lora-alpha", "--lora_alpha", dest="lora_alpha", type=float, default=16.0)
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument("--lora-targets", default="wq,wk,wv,wo", help="comma-separated linear layers to adapt")
    p.add_argument("--quant", default="nf4", help="qlora: the 4-bit format of the base, nf4 or int4")
    p.add_argument("--quant-block-size", type=int, default=64, help="qlora: inputs per scale (32, 64 or 128)")
    p.add_argument("--max-len", type=int, default=None, help="tokens per sentence (default: the model's max_seq_len)")
    p.add_argument("--prompt", default=None,
                   help="prompt: the template, with {sentence} and {labels} (the names joined by commas)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--use_gpu", "--use-gpu", dest="use_gpu", action="store_true", help="same as --device cuda")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    return cli.run(_parse, _run, argv)


def _positive(value, option: str) -> None:
    if value is not None and not value > 0:
        raise cli.UsageError(f"{option}: expected a positive number, got {value}")


def _label_names(value: str) -> list[str]:
    path = Path(value)
    if path.exists() or value.lower().endswith(".json"):
        cli.input_path(value, "--label-names", what="JSON file of label names")
        try:
            return read_label_names(path)
        except ValueError as exc:
            raise cli.UsageError(f"--label-names: {exc}") from None
    if "," not in value:
        raise cli.UsageError(f"--label-names: {value!r} is neither a file nor comma-separated names; expected a "
                             "JSON list file (e.g. [\"bad\", \"good\"]) or names such as bad,good")
    try:
        return parse_label_names(value, "--label-names")
    except ValueError as exc:
        raise cli.UsageError(str(exc)) from None


def _check(args: argparse.Namespace) -> dict:
    """Every argument, before anything is loaded or trained."""
    method = args.option
    if method not in METHODS:
        raise cli.UsageError(f"--option: expected one of {', '.join(METHODS)}, got {method!r}")
    if args.use_gpu and args.device not in (None, "cuda") and not str(args.device).startswith("cuda"):
        raise cli.UsageError(f"--use_gpu: conflicts with --device {args.device!r}")
    device = cli.device("cuda" if args.use_gpu and args.device is None else args.device,
                        "--use_gpu" if args.use_gpu and args.device is None else "--device")
    cli.seed(args.seed)
    for option, value in (("--epochs", args.epochs), ("--batch-size", args.batch_size), ("--lr", args.lr),
                          ("--lora-rank", args.lora_rank), ("--lora-alpha", args.lora_alpha),
                          ("--max-grad-norm", args.max_grad_norm), ("--max-len", args.max_len),
                          ("--quant-block-size", args.quant_block_size)):
        _positive(value, option)
    for option, value in (("--warmup-ratio", args.warmup_ratio), ("--dropout", args.dropout),
                          ("--lora-dropout", args.lora_dropout)):
        if not 0.0 <= value < 1.0:
            raise cli.UsageError(f"{option}: expected a number in [0, 1), got {value}")
    if args.weight_decay < 0:
        raise cli.UsageError(f"--weight-decay: expected a number >= 0, got {args.weight_decay}")
    if args.quant not in ("nf4", "int4"):
        raise cli.UsageError(f"--quant: expected nf4 or int4, got {args.quant!r}")
    if args.quant_block_size not in (32, 64, 128):
        raise cli.UsageError(f"--quant-block-size: expected 32, 64 or 128, got {args.quant_block_size}")
    targets = [t.strip() for t in args.lora_targets.split(",") if t.strip()]
    if not targets:
        raise cli.UsageError("--lora-targets: expected at least one layer name, such as wq,wv")
    if args.prompt is not None and method != "prompt":
        raise cli.UsageError(f"--prompt: applies only to --option prompt, not {method!r}")
    if args.prompt is not None and "{sentence}" not in args.prompt:
        raise cli.UsageError("--prompt: the template must contain {sentence}")

    pretrained = cli.checkpoint_path(args.pretrained, "--pretrained")
    if args.tokenizer is not None:
        tokenizer = cli.input_path(args.tokenizer, "--tokenizer", what="tokenizer file")
    else:

        tokenizer = find_tokenizer(pretrained)
        if tokenizer is None:
            raise cli.UsageError(f"--tokenizer: none given and no tokenizer.model or tokenizer.bin beside "
                                 f"--pretrained {args.pretrained!r}")
    if method == "prompt":
        if args.train is not None:
            raise cli.UsageError("--train: --option prompt trains nothing; leave --train out")
        if args.out is not None:
            raise cli.UsageError("--out: --option prompt has no trained model to save")
        if args.label_names is None:
            raise cli.UsageError("--label-names: --option prompt needs the label names (they go in the prompt)")
    elif args.train is None:
        raise cli.UsageError(f"--train: --option {method} needs a training file")
    files = {}
    for option, value in (("--train", args.train), ("--dev", args.dev), ("--test", args.test)):
        if value is not None:
            files[option] = cli.input_path(value, option, what="data file")
    if args.test is not None and args.test_out is None:
        raise cli.UsageError("--test-out: needed with --test (where to write the test predictions)")
    if args.test_out is not None and args.test is None:
        raise cli.UsageError("--test-out: given without --test")
    outputs = {}
    for option, value in (("--dev-out", args.dev_out), ("--test-out", args.test_out)):
        if value is not None:
            outputs[option] = cli.output_file(value, option)
    if "--dev-out" in outputs and "--test-out" in outputs \
            and outputs["--dev-out"].resolve() == outputs["--test-out"].resolve():
        raise cli.UsageError("--test-out: the same file as --dev-out")
    for option, path in outputs.items():
        if any(path.resolve() == f.resolve() for f in files.values()):
            raise cli.UsageError(f"{option}: {str(path)!r} is one of the input files; write elsewhere")
    confusion = None
    if "--dev-out" in outputs:
        dev_out = outputs["--dev-out"]
        confusion = cli.output_file(str(dev_out.with_name(dev_out.stem + ".confusion.png")), "--dev-out")
    out = None
    if args.out is not None:
        out = cli.output_dir(args.out, "--out")
        home = pretrained.resolve() if pretrained.is_dir() else pretrained.resolve().parent
        if out.resolve() == home:
            raise cli.UsageError(f"--out: {args.out!r} is where --pretrained is; save the model elsewhere")

    if args.label_names is not None:
        names = _label_names(args.label_names)
    else:
        names = None
    # the data files: malformed lines are reported now, before the model is loaded
    probe = len(names) if names is not None else 1 << 30
    data = {option: read_examples(path, probe, allow_placeholder=(option == "--test"))
            for option, path in files.items()}
    if names is None:
        largest = max(e.label for option in ("--train", "--dev") for e in data.get(option, []))
        names = [str(i) for i in range(max(2, largest + 1))]
        for e in data.get("--test", []):
            if e.label >= len(names):
                raise cli.UsageError(f"--test: label {e.label} does not occur in --train or --dev; pass "
                                     "--label-names")
    return dict(method=method, device=device, pretrained=pretrained, tokenizer=tokenizer, names=names,
                data=data, outputs=outputs, confusion=confusion, out=out, targets=targets)


def _run(args: argparse.Namespace) -> int:
    c = _check(args)

    tokenizer = Tokenizer(c["tokenizer"])
    model = checkpoint.load_model(c["pretrained"], device=c["device"])
    if model.config.vocab_size < tokenizer.vocab_size:
        raise cli.UsageError(f"--tokenizer: {tokenizer.vocab_size} tokens, more than the model's vocab_size "
                             f"{model.config.vocab_size}")
    method, names, data = c["method"], c["names"], c["data"]
    extra = {} if args.prompt is None else {"prompt": args.prompt}
    result = train_classifier(
        model, tokenizer, data.get("--train", []), data["--dev"], method, label_names=names, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay, warmup_ratio=args.warmup_ratio,
        max_grad_norm=args.max_grad_norm, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout, lora_targets=c["targets"], dropout=args.dropout, quant=args.quant,
        quant_block_size=args.quant_block_size, pooling=args.pooling, max_len=args.max_len, seed=args.seed,
        progress=not args.no_progress, **extra)
    clf = result.classifier
    if method != "prompt":
        print(f"best epoch {result.best_epoch} of {args.epochs}")
    if c["out"] is not None:
        clf.save(c["out"], pretrained=str(c["pretrained"]))
        print(f"saved the best model to {c['out']}")

    dev = data["--dev"]
    preds = clf.predict(dev, batch_size=args.batch_size, progress=not args.no_progress)
    gold = [e.label for e in dev]
    acc, f1 = accuracy(preds, gold), macro_f1(preds, gold, len(names))
    print(f"dev accuracy: {acc:.4f}  macro-F1: {f1:.4f}  ({len(dev)} examples)")
    if "--dev-out" in c["outputs"]:
        write_predictions(c["outputs"]["--dev-out"], preds, dev)
        cm = confusion_matrix(preds, gold, len(names))
        try:
            plot_confusion(cm, names, c["confusion"], title=f"{method}: dev accuracy {acc:.3f}, macro-F1 {f1:.3f}")
            print(f"wrote {c['outputs']['--dev-out']} and {c['confusion']}")
        except ImportError:  # matplotlib is optional outside the pinned set-up
            cli.warning("matplotlib is not installed: no confusion-matrix PNG (pip install matplotlib)")
            print(f"wrote {c['outputs']['--dev-out']}")
    if "--test" in data:
        test = data["--test"]
        test_preds = clf.predict(test, batch_size=args.batch_size, progress=not args.no_progress)
        write_predictions(c["outputs"]["--test-out"], test_preds, test)
        gold = [e.label for e in test]
        if all(g >= 0 for g in gold):
            print(f"test accuracy: {accuracy(test_preds, gold):.4f}  "
                  f"macro-F1: {macro_f1(test_preds, gold, len(names)):.4f}  ({len(test)} examples)")
        print(f"wrote {c['outputs']['--test-out']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
