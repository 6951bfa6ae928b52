"""Sentence classification (sentiment) on a LLaMA model: zero-shot prompting, full fine-tuning,
LoRA and QLoRA.

    from llama.classify import read_examples, read_label_names, train_classifier, accuracy
    names = read_label_names("sst-label-mapping.json")          # ["awful", ..., "excellent"]
    train = read_examples("sst-train.txt", len(names))
    dev = read_examples("sst-dev.txt", len(names))
    result = train_classifier(model, tokenizer, train, dev, method="lora", label_names=names)
    preds = result.classifier.predict(dev)
    print(accuracy(preds, [e.label for e in dev]))

    python -m llama.classify --option lora --train T --dev D --pretrained CKPT ...   # see __main__.py

Data files
----------
One example a line, `label ||| sentence`, or `id ||| label ||| sentence` (a line with three or
more fields whose second field is an integer is read as the latter; the sentence is everything
after the label, so it may itself contain `|||`). Blank lines are skipped. Labels are indices
into the label names: 0 .. len(names) - 1. The label -1 is a placeholder (a test file without
gold labels): `read_examples(..., allow_placeholder=True)` accepts it, for prediction only;
training and dev files refuse it. A malformed line or a label out of range is a ValueError
naming the file and the line number.

Label names come from a JSON list file (`["bad", "good"]`) or from comma-separated names.

The methods
-----------
prompt    Zero-shot: the model is frozen and nothing trains. Each sentence goes into a prompt
          that lists the label names (by default "Review: {sentence}\\nSentiment ({labels}):"),
          and each label is scored by the summed log-probabilities of its tokens (" name") after
          the prompt; the prediction is the label with the highest score.
finetune  Full fine-tuning with a classification head: the final hidden state of each
          sentence's last real token (batches are right-padded; attention is causal, so padding
          never reaches a real token), or with `pooling="mean"` the mean of the real tokens'
          final hidden states (better on long reviews), goes through dropout and a linear layer
          to num_labels logits; cross-entropy loss. Every parameter of the model trains, except
          an untied LM output layer, which the head does not use (it is saved unchanged).
lora      The same head, over a model whose chosen linear layers (`lora_targets`) carry LoRA
          adapters (llama.lora.apply_lora): only the adapters and the head train.
qlora     LoRA over a frozen 4-bit base: the model's linear layers are first quantized
          (llama.quantize.quantize_, NF4 by default, or int4); the gradient reaches the adapters
          through the 4-bit matmul's backward while the 4-bit weights stay as they are.

Training (`train_classifier`) uses llama.optim's AdamW over the trainable parameters, a linear
warmup (`warmup_ratio` of the steps) then a cosine decay, and gradient-norm clipping. Batches
group sentences of similar length (`length_batches`: shuffled windows of 50 batches, each sorted
by length), which halves the padding that plain shuffled batches of SST-5 sentences carry;
prediction runs in length order too. After each epoch it measures accuracy on the dev set and
keeps the weights of the best epoch, which it loads back at the end. The same seed gives the
same run (shuffling, head and adapter initialisation, dropout) on the same device.

Saving (`Classifier.save(DIR)`) writes `classifier.json` (method, label names, settings) and
`head.safetensors` (the head's weight and bias), plus, for finetune, the fine-tuned model as a
native checkpoint in DIR (with the tokenizer), and for lora/qlora the adapters in DIR/adapter
(llama.lora.save_adapters), without the base weights. `load_classifier(DIR, ...)` reads it back.

`python -m llama.classify.pipeline` (llama/classify/pipeline.py) runs every method on several
datasets from one config, beside a bag-of-words peer (llama/classify/bow.py), and reports them.

Metrics: `accuracy`, `macro_f1` (the mean F1 over the labels that occur among the gold labels
or the predictions), `confusion_matrix` (rows: gold label, columns: prediction) and
`plot_confusion` (a PNG, written atomically).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from .. import api, checkpoint
from ..api import find_tokenizer
from ..atomic import atomic_file, write_bytes, write_json
from ..lora import apply_lora, load_adapters, save_adapters
from ..model import Transformer
from ..peak import peak_bytes
from ..optim import AdamW, cosine_schedule, param_groups
from ..quantize import Int4Config, NF4Config, quantize_
from ..tokenizer import Tokenizer

__all__ = [
    "METHODS", "Classifier", "ClassifierModel", "Example", "TrainResult", "accuracy", "confusion_matrix",
    "length_batches", "load_classifier", "macro_f1", "parse_label_names", "plot_confusion", "predict",
    "read_examples", "read_label_names", "train_classifier", "trainable_names", "write_predictions",
]

METHODS = ("prompt", "finetune", "lora", "qlora")
PLACEHOLDER = -1
DEFAULT_PROMPT = "Review: {sentence}\nSentiment ({labels}):"
CLASSIFIER_CONFIG = "classifier.json"
HEAD_WEIGHTS = "head.safetensors"
ADAPTER_DIR = "adapter"
FORMAT = "llama-kernels-classifier"

PathLike = Union[str, Path]


# ============================================================================ data
@dataclass(frozen=True)
class Example:
    """One line of a data file: the label index (-1: placeholder), the sentence, and its id if
    the line had one."""

    label: int
    sentence: str
    id: Optional[str] = None


def parse_label_names(text: str, where: str = "label names") -> list[str]:
    """Comma-separated label names ("bad,good"), each non-empty and distinct."""
    names = [n.strip() for n in text.split(",")]
    return _check_names(names, where)


def _check_names(names: Any, where: str) -> list[str]:
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{where}: expected a list of label names (strings)")
    if len(names) < 2:
        raise ValueError(f"{where}: expected at least 2 label names, got {len(names)}")
    for n in names:
        if not n.strip():
            raise ValueError(f"{where}: a label name is empty")
    seen = set()
    for n in names:
        if n in seen:
            raise ValueError(f"{where}: label name {n!r} appears twice")
        seen.add(n)
    return list(names)


def read_label_names(path: PathLike) -> list[str]:
    """The label names in a JSON file holding a list of strings (index i names label i)."""
    path = Path(path)
    try:
        names = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); expected a list of label names") from None
    return _check_names(names, str(path))


def _int(text: str) -> Optional[int]:
    text = text.strip()
    try:
        return int(text) if text.lstrip("+-").isdigit() else None
    except ValueError:
        return None


def read_examples(path: PathLike, num_labels: int, allow_placeholder: bool = False) -> list[Example]:
    """The examples of a data file (see the module docstring for the format).

    ValueError naming the file and line for a malformed line, a label that is not in
    0 .. num_labels - 1, or a placeholder label (-1) unless `allow_placeholder`; also for a file
    without examples.
    """
    path = Path(path)
    if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 2:
        raise ValueError(f"num_labels: expected an integer >= 2, got {num_labels!r}")
    examples = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        fields = line.split("|||")
        if len(fields) < 2:
            raise ValueError(f"{where}: expected 'label ||| sentence' or 'id ||| label ||| sentence', "
                             f"got {line[:60]!r}")
        if len(fields) >= 3 and _int(fields[1]) is not None:
            ident, label_text, sentence = fields[0].strip(), fields[1], "|||".join(fields[2:])
        else:
            ident, label_text, sentence = None, fields[0], "|||".join(fields[1:])
        label = _int(label_text)
        if label is None:
            raise ValueError(f"{where}: the label {label_text.strip()!r} is not an integer; expected "
                             f"'label ||| sentence' or 'id ||| label ||| sentence' with label in 0..{num_labels - 1}")
        sentence = sentence.strip()
        if not sentence:
            raise ValueError(f"{where}: the sentence is empty")
        if label == PLACEHOLDER:
            if not allow_placeholder:
                raise ValueError(f"{where}: placeholder label -1 (no gold label); a file for training or "
                                 f"evaluation needs labels in 0..{num_labels - 1}")
        elif not 0 <= label < num_labels:
            raise ValueError(f"{where}: label {label} is out of range; expected 0..{num_labels - 1} "
                             f"({num_labels} label names)")
        examples.append(Example(label, sentence, ident))
    if not examples:
        raise ValueError(f"{path}: no examples (expected lines 'label ||| sentence')")
    return examples


def write_predictions(path: PathLike, predictions: Sequence[int], examples: Sequence[Example]) -> Path:
    """Write `pred ||| sentence` lines (pred: the predicted label index), atomically."""
    if len(predictions) != len(examples):
        raise ValueError(f"predictions: {len(predictions)} for {len(examples)} examples")
    text = "".join(f"{int(p)} ||| {e.sentence}\n" for p, e in zip(predictions, examples))
    return write_bytes(path, text.encode("utf-8"))


# ============================================================================ metrics
def _arrays(predictions: Sequence[int], labels: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(list(predictions), dtype=np.int64)
    g = np.asarray(list(labels), dtype=np.int64)
    if p.shape != g.shape:
        raise ValueError(f"predictions: {p.size} of them for {g.size} labels")
    if g.size == 0:
        raise ValueError("labels: empty")
    if (g < 0).any():
        raise ValueError("labels: placeholder labels (-1) have no score; these examples have no gold labels")
    return p, g


def accuracy(predictions: Sequence[int], labels: Sequence[int]) -> float:
    p, g = _arrays(predictions, labels)
    return float((p == g).mean())


def confusion_matrix(predictions: Sequence[int], labels: Sequence[int], num_labels: Optional[int] = None) -> np.ndarray:
    """(num_labels, num_labels) counts: row = gold label, column = prediction."""
    p, g = _arrays(predictions, labels)
    n = num_labels if num_labels is not None else int(max(p.max(), g.max())) + 1
    if p.min() < 0 or p.max() >= n or g.max() >= n:
        raise ValueError(f"predictions/labels: expected values in 0..{n - 1}")
    cm = np.zeros((n, n), dtype=np.int64)
    np.add.at(cm, (g, p), 1)
    return cm


def macro_f1(predictions: Sequence[int], labels: Sequence[int], num_labels: Optional[int] = None) -> float:
    """The unweighted mean of per-label F1 over the labels that occur among the gold labels or
    the predictions (a label with no true positives scores 0)."""
    cm = confusion_matrix(predictions, labels, num_labels)
    tp = np.diag(cm).astype(np.float64)
    predicted = cm.sum(axis=0)
    gold = cm.sum(axis=1)
    present = (predicted + gold) > 0
    denom = predicted + gold
    f1 = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)
    return float(f1[present].mean())


def plot_confusion(cm: np.ndarray, names: Sequence[str], path: PathLike, title: Optional[str] = None) -> Path:
    """Draw the confusion matrix `cm` (rows gold, columns predicted) as a PNG at `path`, with the
    label names on both axes and the count (and row share) in each cell; written atomically."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure  # no pyplot: no global state, no display

    cm = np.asarray(cm)
    n = len(names)
    if cm.shape != (n, n):
        raise ValueError(f"cm: expected shape ({n}, {n}) for {n} label names, got {cm.shape}")
    size = max(4.0, 1.0 + 0.9 * n)
    fig = Figure(figsize=(size + 1.2, size), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    rows = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, np.maximum(rows, 1))
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the gold label's examples")
    ax.set_xticks(range(n), labels=list(names), rotation=45 if n > 3 else 0, ha="right" if n > 3 else "center")
    ax.set_yticks(range(n), labels=list(names))
    ax.set_xlabel("predicted label")
    ax.set_ylabel("gold label")
    total = int(cm.sum())
    acc = float(np.trace(cm)) / total if total else 0.0
    ax.set_title(title or f"Confusion matrix ({total} examples, accuracy {acc:.3f})")
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{int(cm[i, j])}\n{share[i, j]:.0%}", ha="center", va="center", fontsize=9,
                    color="white" if share[i, j] > 0.5 else "black")
    fig.tight_layout()
    path = Path(path)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


# ============================================================================ the model
POOLINGS = ("last", "mean")


def check_pooling(pooling: object, name: str = "pooling") -> None:
    """ValueError naming `name` unless `pooling` is one of POOLINGS."""
    if pooling not in POOLINGS:
        raise ValueError(f"{name}: expected one of {', '.join(POOLINGS)}, got {pooling!r}")


class ClassifierModel(nn.Module):
    """A base Transformer and a head: a pooled final hidden state -> dropout -> linear
    (num_labels). `pooling` "last": the last real token's hidden state (it has attended to the
    whole sentence); "mean": the mean over the real tokens' hidden states (long reviews)."""

    def __init__(self, base: Transformer, num_labels: int, dropout: float = 0.1, pooling: str = "last"):
        super().__init__()
        check_pooling(pooling)
        self.base = base
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(base.config.dim, num_labels)
        device = next(base.parameters()).device
        self.head.to(device)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """tokens (B, S), right-padded, with `lengths` (B,) real tokens -> logits (B, num_labels)."""
        if self.pooling == "last":
            h = self.base(tokens, lengths=lengths, last_only=True, return_hidden=True).float()
        else:
            h = self.base(tokens, return_hidden=True).float()  # (B, S, dim); causal: padding reaches no real token
            real = (torch.arange(tokens.shape[1], device=h.device)[None, :] < lengths.to(h.device)[:, None])
            h = (h * real[..., None]).sum(1) / lengths.to(h.device, h.dtype).clamp(min=1)[:, None]
        return self.head(self.dropout(h))


def trainable_names(module: nn.Module) -> set[str]:
    """Names of the parameters of `module` that train (requires_grad)."""
    return {name for name, p in module.named_parameters() if p.requires_grad}


def _device_of(module: nn.Module) -> torch.device:
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def length_batches(lengths: Sequence[int], batch_size: int, generator: Optional[torch.Generator] = None,
                   window: int = 50) -> list[list[int]]:
    """Batches of indices into `lengths` whose members have similar lengths, so that little of a
    padded batch is padding. Without a generator: every index sorted by length (longest first),
    cut into batches. With one (training): a random order is cut into windows of `window`
    batches, each window is sorted by length and cut into batches, and the batches are shuffled;
    there are ceil(n / batch_size) of them, as in plain shuffled batching."""
    n = len(lengths)
    if generator is None:
        order = sorted(range(n), key=lambda i: -lengths[i])
        return [order[k:k + batch_size] for k in range(0, n, batch_size)]
    order = torch.randperm(n, generator=generator).tolist()
    span = batch_size * window
    batches = []
    for start in range(0, n, span):
        chunk = sorted(order[start:start + span], key=lambda i: -lengths[i])
        batches += [chunk[k:k + batch_size] for k in range(0, len(chunk), batch_size)]
    return [batches[k] for k in torch.randperm(len(batches), generator=generator).tolist()]


def _pad_batch(seqs: Sequence[Sequence[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), width), pad, dtype=torch.long)
    for i, s in enumerate(seqs):
        tokens[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    return tokens.to(device), lengths.to(device)


def _pad_id(tokenizer: Tokenizer) -> int:
    for value in (tokenizer.pad_id, tokenizer.eos_id, 0):
        if value is not None:
            return int(value)
    return 0


def _sentences(items: Iterable[Union[Example, str]]) -> list[str]:
    return [e.sentence if isinstance(e, Example) else str(e) for e in items]


@dataclass
class Classifier:
    """A trained (or, for prompt, a frozen) classifier: predict(), save()."""

    method: str
    tokenizer: Tokenizer
    label_names: list[str]
    model: nn.Module  # ClassifierModel, or the bare Transformer for prompt
    max_len: int
    prompt: str = DEFAULT_PROMPT
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def base(self) -> Transformer:
        return self.model if self.method == "prompt" else self.model.base

    def encode(self, sentence: str) -> list[int]:
        """Token ids of a sentence (bos first), cut to max_len."""
        return self.tokenizer.encode(sentence, bos=True, eos=False)[:self.max_len]

    @torch.no_grad()
    def scores(self, items: Sequence[Union[Example, str]], batch_size: int = 16,
               progress: bool = False) -> torch.Tensor:
        """(N, num_labels): logits (trained methods) or summed label log-probabilities (prompt)."""
        sentences = _sentences(items)
        if self.method == "prompt":
            return _prompt_scores(self, sentences, batch_size, progress)
        model = self.model
        was_training = model.training
        model.eval()
        device = _device_of(model)
        pad = _pad_id(self.tokenizer)
        encoded = [self.encode(s) for s in sentences]
        out = torch.empty(len(sentences), len(self.label_names))
        try:
            for idx in tqdm(length_batches([len(e) for e in encoded], batch_size), desc="predict",
                            disable=not progress, leave=False):
                tokens, lengths = _pad_batch([encoded[i] for i in idx], pad, device)
                out[idx] = model(tokens, lengths).float().cpu()
        finally:
            model.train(was_training)
        return out

    def predict(self, items: Sequence[Union[Example, str]], batch_size: int = 16,
                progress: bool = False) -> list[int]:
        """The predicted label index of each example (or sentence)."""
        if len(items) == 0:
            return []
        return self.scores(items, batch_size, progress).argmax(dim=-1).tolist()

    def save(self, path: PathLike, pretrained: Optional[str] = None) -> Path:
        """Write the classifier to the directory `path` (see the module docstring); `pretrained`
        (the base checkpoint's path) is recorded for lora/qlora, whose base is not saved."""

        if self.method == "prompt":
            raise ValueError("method: a prompt classifier has no trained weights to save")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if self.method == "finetune":
            api.save(api.LLaMA(self.model.base, self.tokenizer), path)
        else:
            save_adapters(self.model.base, path / ADAPTER_DIR)
        head = {k: v.detach().to("cpu").contiguous().clone() for k, v in self.model.head.state_dict().items()}
        with atomic_file(path / HEAD_WEIGHTS) as tmp:
            save_file(head, str(tmp), metadata={"format": "pt"})
        meta = {"format": FORMAT, "version": 1, "method": self.method, "label_names": list(self.label_names),
                "max_len": self.max_len, "dim": self.model.base.config.dim,
                "pretrained": pretrained, **self.settings}
        write_json(path / CLASSIFIER_CONFIG, meta)
        return path


def predict(classifier: Classifier, items: Sequence[Union[Example, str]], batch_size: int = 16,
            progress: bool = False) -> list[int]:
    """`classifier.predict(items)`."""
    return classifier.predict(items, batch_size, progress)


def load_classifier(path: PathLike, base: Optional[Transformer] = None, tokenizer: Optional[Tokenizer] = None,
                    device: Union[str, torch.device] = "cpu") -> Classifier:
    """A classifier saved by Classifier.save. finetune: the model is read from `path`; lora/qlora:
    `base` is the pretrained model (else the checkpoint recorded at save time is loaded), which
    gets quantized (qlora) and the adapters."""

    path = Path(path)
    config_path = path / CLASSIFIER_CONFIG
    try:
        meta = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{config_path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{config_path}: not a classifier config (format {FORMAT!r})")
    method = meta.get("method")
    if method not in METHODS[1:]:
        raise ValueError(f"{config_path}: method: expected one of {', '.join(METHODS[1:])}, got {method!r}")
    names = _check_names(meta.get("label_names"), f"{config_path}: label_names")
    if tokenizer is None:
        found = find_tokenizer(path) if method == "finetune" else None
        if found is None and meta.get("pretrained"):
            found = find_tokenizer(meta["pretrained"])
        if found is None:
            raise ValueError(f"{path}: no tokenizer found; pass tokenizer=")
        tokenizer = Tokenizer(found)
    if method == "finetune":
        base = checkpoint.load_model(path, device=device)
    else:
        if base is None:
            if not meta.get("pretrained"):
                raise ValueError(f"{config_path}: no pretrained checkpoint recorded; pass base=")
            base = checkpoint.load_model(meta["pretrained"], device=device)
        if method == "qlora":
            _quantize(base, meta.get("quant", "nf4"), int(meta.get("quant_block_size", 64)))
        base.requires_grad_(False)
        load_adapters(base, path / ADAPTER_DIR)
    if base.config.dim != meta.get("dim"):
        raise ValueError(f"{config_path}: dim {meta.get('dim')} does not match the base model's {base.config.dim}")
    model = ClassifierModel(base, len(names), float(meta.get("dropout", 0.0)), meta.get("pooling", "last"))
    head = load_file(str(path / HEAD_WEIGHTS))
    model.head.load_state_dict(head)
    model.to(device).eval()
    settings = {k: v for k, v in meta.items() if k not in ("format", "version", "method", "label_names",
                                                           "max_len", "dim", "pretrained")}
    return Classifier(method, tokenizer, names, model, int(meta.get("max_len", base.config.max_seq_len)),
                      settings=settings)


# ============================================================================ prompting
def _prompt_scores(clf: Classifier, sentences: list[str], batch_size: int, progress: bool) -> torch.Tensor:
    """Summed log-probs of each label's tokens after each sentence's prompt: (N, num_labels)."""
    model, tok = clf.model, clf.tokenizer
    was_training = model.training
    model.eval()
    device = _device_of(model)
    pad = _pad_id(tok)
    label_ids = [tok.encode(" " + name, bos=False, eos=False) for name in clf.label_names]
    longest = max(len(ids) for ids in label_ids)
    labels_text = ", ".join(clf.label_names)
    prompts = []
    for s in sentences:
        ids = _fit_prompt(clf, s, labels_text, clf.max_len - longest)
        prompts.append(ids)
    out = torch.empty(len(sentences), len(label_ids))
    rows = [(i, j) for i in range(len(sentences)) for j in range(len(label_ids))]
    step = max(1, batch_size) * len(label_ids)  # every label of batch_size sentences
    try:
        for start in tqdm(range(0, len(rows), step), desc="prompt", disable=not progress, leave=False):
            chunk = rows[start:start + step]
            seqs = [prompts[i] + label_ids[j] for i, j in chunk]
            tokens, lengths = _pad_batch(seqs, pad, device)
            h = model(tokens, return_hidden=True)  # (B, S, dim)
            for b, (i, j) in enumerate(chunk):
                n = len(prompts[i])
                k = len(label_ids[j])
                # the token at position t is predicted from the hidden state at t - 1
                logits = model.output(h[b, n - 1:n - 1 + k]).float()
                target = torch.tensor(label_ids[j], device=logits.device)
                out[i, j] = F.log_softmax(logits, dim=-1).gather(1, target[:, None]).sum().cpu()
    finally:
        model.train(was_training)
    return out


def _fit_prompt(clf: Classifier, sentence: str, labels_text: str, limit: int) -> list[int]:
    """Prompt ids for `sentence`, its text cut (by tokens) so that they fit in `limit`."""
    tok = clf.tokenizer
    ids = tok.encode(clf.prompt.format(sentence=sentence, labels=labels_text), bos=True)
    words = tok.encode(sentence, bos=False)
    for _ in range(4):
        if len(ids) <= limit:
            return ids
        keep = max(0, len(words) - (len(ids) - limit) - 1)
        words = words[:keep]
        ids = tok.encode(clf.prompt.format(sentence=tok.decode(words), labels=labels_text), bos=True)
    if len(ids) > limit:
        raise ValueError(f"prompt: {len(ids)} tokens even without the sentence, more than the {limit} "
                         "the model's max_seq_len leaves; use a shorter prompt")
    return ids


# ============================================================================ training
@dataclass
class TrainResult:
    """What train_classifier gives back: the classifier holding the best epoch's weights, its dev
    accuracy (None without a dev set), epoch (1-based) and dev predictions, and per-epoch history."""

    classifier: Classifier
    best_dev_accuracy: Optional[float]
    best_epoch: int
    history: list[dict[str, float]]
    trainable_params: int = 0
    step_seconds: Optional[float] = None  # mean wall time of an optimizer step (the first one left out)
    model_bytes: int = 0  # parameters and buffers (4-bit weights as stored)
    peak_bytes: Optional[int] = None  # model_bytes + the peak of the first step (measure_memory=True)
    dev_predictions: Optional[list[int]] = None  # the best epoch's, one per dev example


def _quantize(model: Transformer, quant: str, block_size: int) -> None:

    if quant == "nf4":
        config = NF4Config(block_size=block_size)
    elif quant == "int4":
        config = Int4Config(group_size=block_size)
    else:
        raise ValueError(f"quant: expected 'nf4' or 'int4', got {quant!r}")
    # the LM head is not used by a classification head; it is quantized too (it stays frozen)
    quantize_(model, config)


def _check_positive(value: Any, name: str, integer: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int,) if integer else (int, float)) or not value > 0 \
            or (not integer and not math.isfinite(value)):
        raise ValueError(f"{name}: expected a positive {'integer' if integer else 'number'}, got {value!r}")


def prepare_model(model: Transformer, method: str, num_labels: int, *, lora_rank: int = 8, lora_alpha: float = 16,
                  lora_dropout: float = 0.0, lora_targets: Sequence[str] = ("wq", "wk", "wv", "wo"),
                  dropout: float = 0.1, quant: str = "nf4", quant_block_size: int = 64,
                  pooling: str = "last") -> nn.Module:
    """Set `model` up for `method`, in place (freezing, adapters, quantization) and return what
    trains: the model itself for prompt (frozen), else a ClassifierModel around it."""

    if method not in METHODS:
        raise ValueError(f"method: expected one of {', '.join(METHODS)}, got {method!r}")
    if method == "prompt":
        return model.requires_grad_(False)
    if method == "finetune":
        model.requires_grad_(True)
        if model.output.weight is not model.tok_embeddings.weight:
            model.output.requires_grad_(False)  # the LM head is not used by the classification head
    else:
        if method == "qlora":
            _quantize(model, quant, quant_block_size)
        apply_lora(model, rank=lora_rank, alpha=lora_alpha, dropout=lora_dropout, targets=tuple(lora_targets))
    return ClassifierModel(model, num_labels, dropout, pooling)


def _check_examples(examples: Sequence[Example], num_labels: int, what: str) -> None:
    for k, e in enumerate(examples):
        if not isinstance(e, Example):
            raise TypeError(f"{what}: expected Example items, got {type(e).__name__} at {k}")
        if not 0 <= e.label < num_labels:
            raise ValueError(f"{what}: example {k} has label {e.label}; training and dev examples need "
                             f"labels in 0..{num_labels - 1}")


def train_classifier(model: Transformer, tokenizer: Tokenizer, train_examples: Sequence[Example],
                     dev_examples: Optional[Sequence[Example]], method: str = "lora", *,
                     label_names: Optional[Sequence[str]] = None, epochs: int = 5, batch_size: int = 8,
                     lr: Optional[float] = None, weight_decay: float = 0.0, warmup_ratio: float = 0.1,
                     max_grad_norm: float = 1.0, lora_rank: int = 8, lora_alpha: float = 16,
                     lora_dropout: float = 0.0, lora_targets: Sequence[str] = ("wq", "wk", "wv", "wo"),
                     dropout: float = 0.1, quant: str = "nf4", quant_block_size: int = 64,
                     pooling: str = "last", prompt: str = DEFAULT_PROMPT, max_len: Optional[int] = None, seed: int = 0,
                     measure_memory: bool = False, progress: bool = True) -> TrainResult:
    """Train a classifier by `method` (see the module docstring) on `model`, which is changed in
    place (fine-tuned, or given adapters, or quantized); returns the best dev epoch's classifier.

    label_names: the names of labels 0..n-1 (by default "0".."n-1" with n one more than the
    largest label seen). lr: by default 2e-5 for finetune and 2e-4 for lora/qlora. max_len: the
    token limit per sentence (default: the model's max_seq_len). For prompt, nothing trains: the
    classifier is scored on the dev set once. measure_memory: profile the first step's peak
    memory (TrainResult.peak_bytes: the model's bytes plus the peak of that step, which holds the
    gradients, the optimizer state it creates, and the activations).
    """

    if not isinstance(model, Transformer):
        raise TypeError(f"model: expected a llama Transformer, got {type(model).__name__}")
    if method not in METHODS:
        raise ValueError(f"method: expected one of {', '.join(METHODS)}, got {method!r}")
    check_pooling(pooling)  # before prepare_model changes the model
    train_examples = list(train_examples or [])
    dev_examples = list(dev_examples or [])
    if label_names is None:
        seen = [e.label for e in train_examples + dev_examples]
        if not seen:
            raise ValueError("label_names: needed when there are no examples to count labels from")
        label_names = [str(i) for i in range(max(2, max(seen) + 1))]
    label_names = _check_names(list(label_names), "label_names")
    n = len(label_names)
    _check_examples(dev_examples, n, "dev_examples")
    if method != "prompt":
        if not train_examples:
            raise ValueError(f"train_examples: method {method!r} needs training examples")
        _check_examples(train_examples, n, "train_examples")
        _check_positive(epochs, "epochs", integer=True)
        _check_positive(batch_size, "batch_size", integer=True)
        lr = (2e-5 if method == "finetune" else 2e-4) if lr is None else lr
        _check_positive(lr, "lr")
        _check_positive(max_grad_norm, "max_grad_norm")
        if not 0.0 <= warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio: expected a number in [0, 1), got {warmup_ratio!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout: expected a number in [0, 1), got {dropout!r}")
    max_len = model.config.max_seq_len if max_len is None else max_len
    _check_positive(max_len, "max_len", integer=True)
    max_len = min(max_len, model.config.max_seq_len)

    torch.manual_seed(seed)  # head and adapter initialisation, dropout
    settings = {"dropout": dropout, "pooling": pooling}
    if method in ("lora", "qlora"):
        settings.update(lora_rank=lora_rank, lora_alpha=lora_alpha, lora_targets=list(lora_targets))
    if method == "qlora":
        settings.update(quant=quant, quant_block_size=quant_block_size)
    net = prepare_model(model, method, n, lora_rank=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                        lora_targets=lora_targets, dropout=dropout, quant=quant, quant_block_size=quant_block_size,
                        pooling=pooling)
    clf = Classifier(method, tokenizer, list(label_names), net, max_len, prompt, settings)
    dev_labels = [e.label for e in dev_examples]

    def evaluate() -> tuple[Optional[float], Optional[list[int]]]:
        if not dev_examples:
            return None, None
        preds = clf.predict(dev_examples, batch_size=max(batch_size if method != "prompt" else 8, 8))
        return accuracy(preds, dev_labels), preds

    model_bytes = sum(t.numel() * t.element_size() for t in (*net.parameters(), *net.buffers()))
    if method == "prompt":
        acc, preds = evaluate()
        return TrainResult(clf, acc, 0, [] if acc is None else [{"epoch": 0, "dev_accuracy": acc}],
                           model_bytes=model_bytes, dev_predictions=preds)

    # token ids once; the order of batches comes from a seeded generator
    encoded = [clf.encode(e.sentence) for e in train_examples]
    sizes = [len(e) for e in encoded]
    labels = torch.tensor([e.label for e in train_examples], dtype=torch.long)
    steps_per_epoch = math.ceil(len(encoded) / batch_size)
    total = steps_per_epoch * epochs
    warmup = min(total, max(1, int(warmup_ratio * total))) if warmup_ratio > 0 else 0
    trainable = [p for p in net.parameters() if p.requires_grad]
    optimizer = AdamW(param_groups(net, lr, weight_decay), lr=lr)
    schedule = cosine_schedule(optimizer, warmup, total)
    generator = torch.Generator().manual_seed(seed)
    device = _device_of(net)
    pad = _pad_id(tokenizer)

    best_acc: Optional[float] = None
    best_epoch = 0
    best_state: Optional[dict[str, torch.Tensor]] = None
    best_preds: Optional[list[int]] = None
    history = []
    step_peak: Optional[int] = None
    timed_steps, timed_seconds = 0, 0.0

    def train_step(tokens: torch.Tensor, lengths: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = net(tokens, lengths)
        loss = F.cross_entropy(logits.float(), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
        optimizer.step()
        schedule.step()
        return loss.detach()
    bar = tqdm(total=total, desc=f"{method}", disable=not progress, unit="step")
    try:
        for epoch in range(1, epochs + 1):
            net.train()
            batches = length_batches(sizes, batch_size, generator)
            running = 0.0
            for step, idx in enumerate(batches):
                tokens, lengths = _pad_batch([encoded[i] for i in idx], pad, device)
                target = labels[idx].to(device)
                first = epoch == 1 and step == 0
                if first and measure_memory:
                    result: list[torch.Tensor] = []
                    step_peak = peak_bytes(lambda: result.append(train_step(tokens, lengths, target)), device)
                    loss = result[0]
                else:
                    started = time.perf_counter()
                    loss = train_step(tokens, lengths, target)
                    loss.item()  # waits for the step (a GPU runs ahead of the host)
                    if not first:
                        timed_steps, timed_seconds = timed_steps + 1, timed_seconds + time.perf_counter() - started
                running += loss.item()
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{loss.item():.4f}")
            acc, preds = evaluate()
            record = {"epoch": epoch, "train_loss": running / steps_per_epoch}
            if acc is not None:
                record["dev_accuracy"] = acc
                bar.set_postfix(epoch=epoch, loss=f"{record['train_loss']:.4f}", dev_acc=f"{acc:.3f}")
            history.append(record)
            if acc is None or best_acc is None or acc > best_acc:
                best_acc, best_epoch, best_preds = acc, epoch, preds
                if acc is not None and epoch < epochs:
                    best_state = {name: p.detach().to("cpu", copy=True)
                                  for name, p in net.named_parameters() if p.requires_grad}
                else:
                    best_state = None  # the weights are the current ones
    finally:
        bar.close()
    if best_state is not None and best_epoch != epochs:
        params = dict(net.named_parameters())
        with torch.no_grad():
            for name, value in best_state.items():
                params[name].copy_(value)
    net.eval()
    return TrainResult(clf, best_acc, best_epoch, history, trainable_params=sum(p.numel() for p in trainable),
                       step_seconds=timed_seconds / timed_steps if timed_steps else None, model_bytes=model_bytes,
                       peak_bytes=None if step_peak is None else model_bytes + step_peak, dev_predictions=best_preds)
