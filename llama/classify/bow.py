"""The bag-of-words peer: logistic regression on unigram and bigram features, tuned on dev.

A LLaMA classifier should beat it; the classification results carry it as a peer row, trained on
the same split. Features are the lowercased word and punctuation tokens of a sentence and their
adjacent pairs, seen at least `min_count` times in the training sentences, as sublinear counts
(1 + log count) scaled to unit length per sentence. The model is a multinomial logistic regression trained full
batch with L-BFGS on a sparse feature matrix; the L2 strength is chosen from a grid by dev
accuracy (ties: the stronger regularisation).

    result = bag_of_words(train_examples, dev_examples, num_labels)
    result.dev_accuracy, result.l2, result.predict(["a fine film"])
"""
from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["BagOfWords", "bag_of_words", "features"]

_TOKEN_RE = re.compile(r"[a-z0-9']+|[^\sa-z0-9']")
L2_GRID = (1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3)


def features(sentence: str) -> list[str]:
    """The unigrams and bigrams of a sentence (lowercased word and punctuation tokens)."""
    tokens = _TOKEN_RE.findall(sentence.lower())
    return tokens + [f"{a} {b}" for a, b in zip(tokens, tokens[1:])]


@dataclass
class BagOfWords:
    vocabulary: dict[str, int]
    weight: torch.Tensor  # (num_labels, features + 1), the last column the bias
    l2: float
    dev_accuracy: float

    def matrix(self, sentences: Sequence[str]) -> torch.Tensor:
        return _matrix(sentences, self.vocabulary)

    def predict(self, sentences: Sequence[str]) -> list[int]:
        return _logits(self.matrix(sentences), self.weight).argmax(-1).tolist()


def _matrix(sentences: Sequence[str], vocabulary: dict[str, int]) -> torch.Tensor:
    """Sparse (sentences, features + 1): unit-length binary features, then a constant 1 (bias)."""
    rows, cols, vals = [], [], []
    bias = len(vocabulary)
    for i, sentence in enumerate(sentences):
        counts = Counter(vocabulary[f] for f in features(sentence) if f in vocabulary)
        present = sorted(counts)
        weights = [1.0 + math.log(counts[c]) for c in present]  # sublinear counts
        norm = math.sqrt(sum(w * w for w in weights)) or 1.0
        rows += [i] * (len(present) + 1)
        cols += present + [bias]
        vals += [w / norm for w in weights] + [1.0]
    index = torch.tensor([rows, cols], dtype=torch.long)
    return torch.sparse_coo_tensor(index, torch.tensor(vals), (len(sentences), bias + 1),
                                   check_invariants=True).coalesce()


def _logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.sparse.mm(x, weight.t())


def _fit(x: torch.Tensor, labels: torch.Tensor, num_labels: int, l2: float, iterations: int) -> torch.Tensor:
    weight = torch.zeros(num_labels, x.shape[1], requires_grad=True)
    opt = torch.optim.LBFGS([weight], lr=1.0, max_iter=iterations, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-6, tolerance_change=1e-9)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(_logits(x, weight), labels) + l2 * weight[:, :-1].pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return weight.detach()


def bag_of_words(train: Sequence, dev: Sequence, num_labels: int, *, min_count: int = 1,
                 l2_grid: Sequence[float] = L2_GRID, iterations: int = 200) -> BagOfWords:
    """Train the baseline on `train` examples (objects with .sentence and .label, as
    llama.classify.read_examples gives), choosing the L2 strength by accuracy on `dev`."""
    if not train or not dev:
        raise ValueError("train, dev: expected at least one example each")
    if not isinstance(num_labels, int) or num_labels < 2:
        raise ValueError(f"num_labels: expected an integer >= 2, got {num_labels!r}")
    if not l2_grid or any(not (isinstance(v, (int, float)) and v >= 0) for v in l2_grid):
        raise ValueError(f"l2_grid: expected non-negative numbers, got {l2_grid!r}")
    for name, examples in (("train", train), ("dev", dev)):
        bad = [e.label for e in examples if not 0 <= e.label < num_labels]
        if bad:
            raise ValueError(f"{name}: labels must lie in [0, {num_labels}), got {bad[0]}")
    counts = Counter(f for e in train for f in set(features(e.sentence)))
    vocabulary = {f: i for i, f in enumerate(sorted(f for f, c in counts.items() if c >= min_count))}
    x_train, x_dev = _matrix([e.sentence for e in train], vocabulary), _matrix([e.sentence for e in dev], vocabulary)
    y_train = torch.tensor([e.label for e in train])
    y_dev = torch.tensor([e.label for e in dev])
    best = None
    for l2 in sorted(l2_grid, reverse=True):  # ties keep the stronger regularisation
        weight = _fit(x_train, y_train, num_labels, float(l2), iterations)
        acc = float((_logits(x_dev, weight).argmax(-1) == y_dev).float().mean())
        if best is None or acc > best.dev_accuracy:
            best = BagOfWords(vocabulary, weight, float(l2), acc)
    return best
