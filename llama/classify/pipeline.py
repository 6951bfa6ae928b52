"""The sentiment pipeline in one command: make a base model, run every method on every dataset,
and report them beside a bag-of-words peer.

    python -m llama.classify.pipeline --config configs/classify/reviews.yaml --data-dir DIR [key=value ...]

1. Base model. Without `base`, a BPE tokenizer (`vocab_size` pieces) is trained on the review text
   (the sentences of every dataset's train split, labels dropped) plus botchan.txt (the
   sentencepiece sample, `botchan: false` leaves it out), and a small LLaMA is pretrained on that
   text by the trainer (`pretrain`: llama.train.TrainConfig keys). Each review line is a
   document (bos first, as the classifier reads a sentence); botchan's are its paragraphs.
   With `base` (any checkpoint llama.load reads, e.g. stories42M.pt, with `tokenizer` where
   none lies beside it), that model is the base and nothing is pretrained.
2. For each dataset (`datasets`: file stems in `data_dir`: NAME-train.txt, NAME-dev.txt,
   NAME-label-mapping.json, and NAME-test.txt where present) and each method (`methods`), a
   fresh copy of the base is trained by llama.classify.train_classifier with `classify`'s
   settings, updated by `per_method[method]`, then `per_dataset[name]`, then
   `per_dataset_method["name.method"]`. Each run's folder holds its best-dev model, its dev
   and test predictions (`pred ||| sentence`), a confusion-matrix PNG and result.json.
3. The bag-of-words peer (llama.classify.bow: logistic regression on unigrams and bigrams, L2
   tuned on dev) is trained on the same split.
4. results.json, results.md (a table: dev accuracy and macro-F1 per method and dataset,
   trainable parameters, step time, peak memory, wall time), accuracy.png and cost.png.

A run that stops part way is continued by running the same command again: a finished
pretraining (pretrain/final) and finished (dataset, method) runs are kept, an unfinished
pretraining resumes from its newest checkpoint, the rest is done (`force=true` redoes
everything). Every key is checked before any work starts.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
import typing
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from .. import api, cli
from ..atomic import atomic_file, write_bytes, write_json
from ..config import check_field_types, override_value, read_config_file, type_problem
from . import (METHODS, Example, accuracy, check_pooling, confusion_matrix, macro_f1, plot_confusion,
               read_examples, read_label_names, train_classifier, write_predictions)
from .bow import bag_of_words

__all__ = ["DatasetFiles", "PipelineConfig", "dataset_files", "review_text", "run_pipeline"]

METHOD_LABELS = {"prompt": "prompt (zero-shot)", "finetune": "full fine-tuning", "lora": "LoRA", "qlora": "QLoRA",
                 "bow": "bag of words (peer)"}
# what `classify`, `per_method` and `per_dataset` may set: train_classifier's keyword settings
CLASSIFY_KEYS = ("epochs", "batch_size", "lr", "weight_decay", "warmup_ratio", "max_grad_norm", "lora_rank",
                 "lora_alpha", "lora_dropout", "lora_targets", "dropout", "quant", "quant_block_size", "pooling",
                 "prompt", "max_len", "seed")


@dataclass
class PipelineConfig:
    """The pipeline's settings (see the module docstring); read from YAML and `key=value`
    overrides, with dotted keys for the nested mappings (`classify.epochs=2`, `pretrain.max_steps=100`,
    `per_dataset_method.sst.qlora.lr=1e-3`)."""

    data_dir: Optional[str] = None
    datasets: list[str] = field(default_factory=lambda: ["sst", "cfimdb"])
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    out_dir: str = "runs/classify-reviews"
    base: Optional[str] = None
    tokenizer: Optional[str] = None
    vocab_size: int = 4000
    botchan: bool = True
    botchan_weight: float = 0.15
    pretrain: dict[str, Any] = field(default_factory=dict)
    classify: dict[str, Any] = field(default_factory=dict)
    per_method: dict[str, dict[str, Any]] = field(default_factory=dict)
    per_dataset: dict[str, dict[str, Any]] = field(default_factory=dict)
    per_dataset_method: dict[str, dict[str, Any]] = field(default_factory=dict)
    bow: bool = True
    seed: int = 0
    device: str = "auto"
    force: bool = False
    progress: bool = True

    def __post_init__(self):
        check_field_types(self)
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"methods: expected some of {', '.join(METHODS)}, got {self.methods!r}")
        if not self.datasets or len(set(self.datasets)) != len(self.datasets):
            raise ValueError(f"datasets: expected distinct dataset names, got {self.datasets!r}")
        if not 100 <= self.vocab_size <= 65535:
            raise ValueError(f"vocab_size: expected an integer in [100, 65535], got {self.vocab_size!r}")
        if not 0 <= self.botchan_weight < 1:
            raise ValueError(f"botchan_weight: expected a number in [0, 1), got {self.botchan_weight!r}")
        _check_settings(self.classify, "classify")
        for name, settings in self.per_method.items():
            if name not in METHODS:
                raise ValueError(f"per_method: unknown method {name!r}; methods: {', '.join(METHODS)}")
            _check_settings(settings, f"per_method.{name}")
        # settings may name datasets that this run leaves out (datasets=[cfimdb] with the full config)
        for name, settings in self.per_dataset.items():
            _check_settings(settings, f"per_dataset.{name}")
        for key, settings in self.per_dataset_method.items():
            name, _, method = key.partition(".")
            if not name or method not in METHODS:
                raise ValueError(f"per_dataset_method: expected keys DATASET.METHOD (methods "
                                 f"{', '.join(METHODS)}), got {key!r}")
            _check_settings(settings, f"per_dataset_method.{key}")
        if self.base is None and self.pretrain:
            from ..train import TrainConfig
            TrainConfig.from_dict(self._pretrain_fields(), "pretrain")  # checks keys and types now

    def settings(self, dataset: str, method: str) -> dict[str, Any]:
        """train_classifier's settings for one run."""
        out = {"seed": self.seed, **self.classify, **self.per_method.get(method, {}),
               **self.per_dataset.get(dataset, {}), **self.per_dataset_method.get(f"{dataset}.{method}", {})}
        return out

    def _pretrain_fields(self) -> dict[str, Any]:
        return {"seed": self.seed, "out_dir": str(Path(self.out_dir) / "pretrain"), "sample_tokens": 0,
                **self.pretrain}

    @classmethod
    def from_spec(cls, path: Optional[str | Path], overrides: Sequence[str] = ()) -> "PipelineConfig":
        raw = {} if path is None else read_config_file(path, "pipeline settings")
        where = "config" if path is None else str(path)
        known = {f.name for f in fields(cls)}
        for item in overrides:
            key, sep, value = item.partition("=")
            key = key.strip()
            if not sep or not key:
                raise ValueError(f"override: expected key=value, got {item!r}")
            head = key.partition(".")[0]
            if head not in known:
                raise ValueError(f"override: unknown key {head!r}; keys: {', '.join(sorted(known))}")
            target = raw
            parts = key.split(".")
            if head == "per_dataset_method" and len(parts) > 2:  # its keys are DATASET.METHOD
                parts = [head, f"{parts[1]}.{parts[2]}", *parts[3:]]
            for part in parts[:-1]:
                if not isinstance(target.get(part), dict):
                    target[part] = {}
                target = target[part]
            target[parts[-1]] = override_value(value, f"override: {item!r}")
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; keys: {', '.join(sorted(known))}")
        raw = _numbers(raw)
        try:
            return cls(**raw)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None


def _numbers(value: Any) -> Any:
    """YAML 1.1 reads `1e-5` (no dot) as text; read such values as numbers, at any depth."""
    if isinstance(value, dict):
        return {k: _numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_numbers(v) for v in value]
    if isinstance(value, str) and value.strip():
        return override_value(value)
    return value


def _check_settings(settings: dict[str, Any], where: str) -> None:
    hints = typing.get_type_hints(train_classifier)
    for key, value in settings.items():
        if key not in CLASSIFY_KEYS:
            raise ValueError(f"{where}: unknown setting {key!r}; settings: {', '.join(CLASSIFY_KEYS)}")
        problem = type_problem(value, hints[key])
        if problem:
            raise ValueError(f"{where}.{key}: expected {problem}, got {value!r}")
    if "pooling" in settings:
        check_pooling(settings["pooling"], f"{where}.pooling")


# ============================================================================ data
@dataclass
class DatasetFiles:
    name: str
    label_names: list[str]
    train: list[Example]
    dev: list[Example]
    test: Optional[list[Example]]


def dataset_files(folder: str | Path, name: str) -> DatasetFiles:
    """Read NAME-label-mapping.json, NAME-train.txt, NAME-dev.txt and NAME-test.txt (optional,
    placeholder labels allowed) from `folder`."""
    folder = Path(folder)
    mapping = folder / f"{name}-label-mapping.json"
    needed = [mapping, folder / f"{name}-train.txt", folder / f"{name}-dev.txt"]
    missing = [p.name for p in needed if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"data_dir: {folder} lacks {', '.join(missing)} (dataset {name!r}); "
                                "`python -m llama.data fetch-sentiment --out DIR` gets the SST-5 and CFIMDB files")
    names = read_label_names(mapping)
    test_path = folder / f"{name}-test.txt"
    return DatasetFiles(name, names, read_examples(needed[1], len(names)), read_examples(needed[2], len(names)),
                        read_examples(test_path, len(names), allow_placeholder=True) if test_path.is_file() else None)


def review_text(datasets: Sequence[DatasetFiles]) -> str:
    """The train splits' sentences, one a line (labels dropped): the pretraining text."""
    return "".join(e.sentence + "\n" for d in datasets for e in d.train)


# ============================================================================ stages
def _pretrain(cfg: PipelineConfig, datasets: list[DatasetFiles], out: Path) -> tuple[Path, Optional[str], dict]:
    """The base checkpoint (pretrained here unless cfg.base) and its tokenizer; info for the report."""
    from ..data import prepare, sample_files
    from ..tokenizer import train as train_tokenizer
    from ..train import TrainConfig, build_run

    if cfg.base is not None:
        return Path(cfg.base), cfg.tokenizer, {"base": cfg.base}
    final = out / "pretrain" / "final"
    text_dir = out / "text"
    texts = {"reviews": text_dir / "reviews.txt"}
    write_bytes(texts["reviews"], review_text(datasets).encode("utf-8"))
    if cfg.botchan:
        texts["botchan"] = sample_files().text
    tokenizer = out / "tokenizer" / "tokenizer.model"
    prepare_started = time.perf_counter()
    if cfg.force or not tokenizer.is_file():
        train_tokenizer([str(p) for p in texts.values()], cfg.vocab_size, tokenizer.parent, quiet=True)
    sources = {}
    for name, path in texts.items():
        folder = out / "tokens" / name
        # a review (line) is a document, bos first, as the classifier reads it; botchan's are paragraphs
        split = "line" if name == "reviews" else "paragraph"
        manifest = folder / "manifest.json"
        if cfg.force or not manifest.is_file() or json.loads(manifest.read_text()).get("split") != split:
            prepare(tokenizer, [path], folder, split=split, force=True)
        sources[name] = str(folder)
    fields_ = cfg._pretrain_fields()
    fields_.update(data=sources, tokenizer=str(tokenizer))
    fields_.setdefault("resume", not cfg.force)  # an interrupted pretraining goes on from its last checkpoint
    if len(sources) > 1 and "data_weights" not in cfg.pretrain:
        fields_["data_weights"] = {"reviews": 1 - cfg.botchan_weight, "botchan": cfg.botchan_weight}
    fields_.setdefault("model_overrides", [])
    fields_["model_overrides"] = list(fields_["model_overrides"]) + [f"vocab_size={cfg.vocab_size}"]
    pre = TrainConfig.from_dict(fields_, "pretrain")
    manifests = {n: json.loads((Path(f) / "manifest.json").read_text()) for n, f in sources.items()}
    info: dict[str, Any] = {"tokens": {n: m.get("train_tokens", 0) + m.get("val_tokens", 0)
                                       for n, m in manifests.items()},
                            "prepare_seconds": time.perf_counter() - prepare_started}  # tokenizer, tokens
    if cfg.force or not (final / "config.json").is_file():
        started = time.perf_counter()
        result = build_run(pre).fit()
        info.update(seconds=time.perf_counter() - started, val_loss=result.get("val_loss"), steps=pre.max_steps)
        write_json(out / "pretrain" / "pipeline.json", info)
    elif (out / "pretrain" / "pipeline.json").is_file():
        info = json.loads((out / "pretrain" / "pipeline.json").read_text())
    return final, str(tokenizer), info


def _load_base(path: Path, tokenizer: Optional[str], device: str):
    model = api.load(path, tokenizer=tokenizer, device=device)
    if model.tokenizer is None:
        raise ValueError(f"base: no tokenizer found for {path}; set tokenizer")
    return model


def _run_one(cfg: PipelineConfig, data: DatasetFiles, method: str, base: Path, tokenizer: Optional[str],
             device: str, folder: Path) -> dict[str, Any]:
    settings = cfg.settings(data.name, method)
    stage_started = time.perf_counter()
    llm = _load_base(base, tokenizer, device)
    started = time.perf_counter()
    result = train_classifier(llm.model, llm.tokenizer, data.train, data.dev, method, label_names=data.label_names,
                              measure_memory=method != "prompt", progress=cfg.progress, **settings)
    seconds = time.perf_counter() - started
    clf = result.classifier
    batch = int(settings.get("batch_size", 8))
    preds = result.dev_predictions  # the best epoch's, made while training
    gold = [e.label for e in data.dev]
    acc, f1 = accuracy(preds, gold), macro_f1(preds, gold, len(data.label_names))
    folder.mkdir(parents=True, exist_ok=True)
    write_predictions(folder / "dev-predictions.txt", preds, data.dev)
    if data.test is not None:
        write_predictions(folder / "test-predictions.txt", clf.predict(data.test, batch_size=max(batch, 8)), data.test)
    try:
        plot_confusion(confusion_matrix(preds, gold, len(data.label_names)), data.label_names,
                       folder / "confusion.png", title=f"{data.name} {METHOD_LABELS[method]}: dev accuracy {acc:.3f}")
    except ImportError:  # matplotlib is optional outside the pinned set-up; plot_results says so once
        pass
    if method != "prompt":
        clf.save(folder / "model", pretrained=str(base))
    record = {"dataset": data.name, "method": method, "dev_accuracy": acc, "dev_macro_f1": f1,
              "best_epoch": result.best_epoch, "history": result.history,
              "trainable_params": result.trainable_params, "step_seconds": result.step_seconds,
              "peak_bytes": result.peak_bytes, "model_bytes": result.model_bytes, "seconds": seconds,
              "stage_seconds": time.perf_counter() - stage_started,  # with loading, predictions and saving
              "settings": settings, "train_examples": len(data.train), "dev_examples": len(data.dev)}
    write_json(folder / "result.json", record)
    return record


def _run_bow(data: DatasetFiles, folder: Path) -> dict[str, Any]:
    started = time.perf_counter()
    peer = bag_of_words(data.train, data.dev, len(data.label_names))
    preds = peer.predict([e.sentence for e in data.dev])
    gold = [e.label for e in data.dev]
    folder.mkdir(parents=True, exist_ok=True)
    write_predictions(folder / "dev-predictions.txt", preds, data.dev)
    record = {"dataset": data.name, "method": "bow", "dev_accuracy": accuracy(preds, gold),
              "dev_macro_f1": macro_f1(preds, gold, len(data.label_names)), "l2": peer.l2,
              "trainable_params": int(peer.weight.numel()), "seconds": time.perf_counter() - started}
    write_json(folder / "result.json", record)
    return record


def run_pipeline(cfg: PipelineConfig) -> dict[str, Any]:
    """Run the pipeline (see the module docstring); returns what results.json holds."""
    if cfg.data_dir is None:
        raise ValueError("data_dir: expected the folder with the sentiment files (--data-dir DIR); "
                         "`python -m llama.data fetch-sentiment --out DIR` gets them")
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = cli.device(None if cfg.device == "auto" else cfg.device, "device")
    started = time.perf_counter()
    datasets = [dataset_files(cfg.data_dir, name) for name in cfg.datasets]
    torch.manual_seed(cfg.seed)
    base, tokenizer, base_info = _pretrain(cfg, datasets, out)
    runs: list[dict[str, Any]] = []
    for data in datasets:
        for method in (["bow"] if cfg.bow else []) + cfg.methods:
            folder = out / data.name / method
            runs.append(_cached(folder, cfg.force, lambda: _run_bow(data, folder) if method == "bow" else
                                _run_one(cfg, data, method, base, tokenizer, device, folder)))
            r = runs[-1]
            print(f"{data.name} {METHOD_LABELS[method]}: dev accuracy {r['dev_accuracy']:.4f}, "
                  f"macro-F1 {r['dev_macro_f1']:.4f}", flush=True)
    results = {"config": dataclasses.asdict(cfg), "base": str(base), "pretrain": base_info, "runs": runs,
               "device": device, "torch": torch.__version__, "threads": torch.get_num_threads(),
               "machine": platform.processor() or platform.machine(),
               "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
               "seconds": time.perf_counter() - started}
    write_json(out / "results.json", results)
    write_bytes(out / "results.md", report(results).encode("utf-8"))
    plot_results(results, out)
    return results


def _cached(folder: Path, force: bool, make) -> dict[str, Any]:
    path = folder / "result.json"
    if not force and path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    return make()


# ============================================================================ report
def _mib(value: Optional[float]) -> str:
    return "" if value is None else f"{value / 2**20:.0f} MiB"


def report(results: dict[str, Any]) -> str:
    """results.md: one table per dataset, the peer row included."""
    cfg = results["config"]
    pre = results.get("pretrain") or {}
    lines = ["# Sentiment classification", ""]
    if "base" in pre:
        lines.append(f"Base model: {pre['base']}.")
    else:
        steps = pre.get("steps")
        secs = pre.get("seconds")
        lines.append(f"Base model: pretrained here on the train splits' sentences"
                     f"{' and botchan.txt' if cfg['botchan'] else ''} ({', '.join(f'{n} {t:,} tokens' for n, t in (pre.get('tokens') or {}).items() if t)}), "
                     f"a {cfg['vocab_size']}-piece BPE tokenizer"
                     + (f", {steps} steps in {secs / 60:.1f} min" if steps and secs else "")
                     + (f", validation loss {pre['val_loss']:.3f}" if pre.get("val_loss") else "") + ".")
    stages = ((pre.get("prepare_seconds") or 0) + (pre.get("seconds") or 0)
              + sum(r.get("stage_seconds", r["seconds"]) for r in results["runs"]))
    lines += [f"Device {results['device']} ({results['machine']}, {results['threads']} threads), torch "
              f"{results['torch']}, seed {cfg['seed']}, {results['date']}; {stages / 60:.1f} min in all: every "
              "stage, each timed when it ran (the tokenizer and tokenizing, the pretraining, and each run with "
              "its loading, predictions and saving).", ""]
    for name in cfg["datasets"]:
        rows = [r for r in results["runs"] if r["dataset"] == name]
        lines += [f"## {name}", "",
                  "| method | dev accuracy | dev macro-F1 | trainable params | step time | peak memory | best epoch | wall time |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            step = r.get("step_seconds")
            lines.append(
                f"| {METHOD_LABELS[r['method']]} | {r['dev_accuracy']:.4f} | {r['dev_macro_f1']:.4f} | "
                f"{r.get('trainable_params') or 0:,} | {'' if step is None else f'{step * 1e3:.0f} ms'} | "
                f"{_mib(r.get('peak_bytes'))} | {r.get('best_epoch', '') or ''} | {r.get('stage_seconds', r['seconds']) / 60:.1f} min |")
        lines.append("")
    lines += ["Step time: the mean wall time of an optimizer step (the first left out); peak memory: the model's "
              "parameters and buffers plus the peak of the first step (gradients, optimizer state, activations). "
              "The bag-of-words peer is trained by the pipeline on the same split (L2 tuned on dev).", "",
              "![accuracy](accuracy.png)", "", "![cost](cost.png)", ""]
    return "\n".join(lines)


def _grouped_bars(ax, runs: list[dict], datasets: Sequence[str], methods: Sequence[str], key: str, scale: float,
                  colors: dict[str, str], **label) -> None:
    """One group of bars per dataset, one bar per method: run[key] * scale, where the run has it."""
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        xs, ys = [], []
        for j, d in enumerate(datasets):
            r = next((r for r in runs if r["dataset"] == d and r["method"] == m), None)
            if r is not None and r.get(key) is not None:
                xs.append(j + (i - (len(methods) - 1) / 2) * width)
                ys.append(r[key] * scale)
        ax.bar_label(ax.bar(xs, ys, width, label=METHOD_LABELS[m], color=colors[m]), fontsize=7, **label)
    ax.set_xticks(range(len(datasets)), datasets)


def _save_chart(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_results(results: dict[str, Any], out: Path) -> list[Path]:
    """accuracy.png (dev accuracy per method and dataset) and cost.png (trainable parameters, step
    time and peak memory per method and dataset)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        cli.warning("matplotlib is not installed: no charts (pip install matplotlib)")
        return []
    runs = results["runs"]
    datasets = results["config"]["datasets"]
    methods = [m for m in ("bow", *METHODS) if any(r["method"] == m for r in runs)]
    colors = {m: c for m, c in zip(("bow", *METHODS), ("#888888", "#c9a227", "#1f77b4", "#2ca02c", "#d62728"))}

    fig, ax = plt.subplots(figsize=(8, 4.2))
    _grouped_bars(ax, runs, datasets, methods, "dev_accuracy", 1.0, colors, fmt="%.3f", rotation=90, padding=2)
    ax.set_ylim(0, 1.12)
    ax.set_ylabel("dev accuracy (higher is better)")
    ax.set_title("Sentiment classification: dev accuracy")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    written = [_save_chart(fig, out / "accuracy.png")]

    trained = [m for m in methods if m in ("finetune", "lora", "qlora")]
    if trained:
        metrics = (("trainable_params", "trainable parameters (M)", 1e-6), ("step_seconds", "step time (ms)", 1e3),
                   ("peak_bytes", "peak memory (MiB)", 1 / 2**20))
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
        for ax, (key, label, scale) in zip(axes, metrics):
            _grouped_bars(ax, runs, datasets, trained, key, scale, colors, fmt="%.3g", padding=1)
            ax.set_title(label, fontsize=9)
            ax.margins(y=0.15)
        axes[-1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8)
        fig.suptitle("Cost per method (lower is better)")
        fig.tight_layout()
        written.append(_save_chart(fig, out / "cost.png"))
    return written


# ============================================================================ command line
def _parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m llama.classify.pipeline",
                                     description="Pretrain a base model, run every classification method on SST-5 "
                                                 "and CFIMDB, and report them beside a bag-of-words peer.")
    parser.add_argument("--config", metavar="YAML", default=None, help="pipeline config (configs/classify/*.yaml)")
    parser.add_argument("--data-dir", metavar="DIR", default=None,
                        help="folder with the sentiment files (sets data_dir)")
    parser.add_argument("--out", metavar="DIR", default=None, help="output folder (sets out_dir)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config changes, e.g. classify.epochs=2 pretrain.max_steps=100 methods=[lora]")
    return parser.parse_args(argv)


def _run(args: argparse.Namespace) -> int:
    if args.config is not None:
        cli.input_path(args.config, "--config")
    extra = [f"data_dir={args.data_dir}"] if args.data_dir is not None else []
    extra += [f"out_dir={args.out}"] if args.out is not None else []
    cfg = PipelineConfig.from_spec(args.config, list(args.overrides) + extra)
    if cfg.data_dir is not None:
        cli.input_path(cfg.data_dir, "--data-dir", directory=True)
    cli.output_dir(cfg.out_dir, "out_dir")
    results = run_pipeline(cfg)
    print(report(results))
    print(f"results: {Path(cfg.out_dir) / 'results.md'}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return cli.run(_parse, _run, argv)


if __name__ == "__main__":
    sys.exit(main())
