"""Token shards for training: text tokenized once into memory-mapped files, read as random windows.

``prepare`` (``python -m llama.data prepare``) tokenizes UTF-8 text files document by document
(every document starts with bos and, by default, ends with eos) and writes a directory::

    train.bin       token ids, raw little-endian uint16 (uint32 when the vocabulary has over
    val.bin         65536 tokens), one stream of documents after another
    manifest.json   {"format": "llama-kernels-tokens", "version": 1, "dtype", "vocab_size",
                     "tokenizer": {"path" (file name only), "sha256"},
                     "inputs": [{"name", "sha256", "bytes"}], "split", "val_fraction", "seed",
                     "split_at", "train_tokens", "val_tokens", "train_documents",
                     "val_documents", "bos_id", "eos_id", "created"}

The validation split is a seeded random choice of whole documents holding about `val_fraction`
of the text (counted in characters); an input of a single document is split by tokens instead
(its last `val_fraction` of tokens), which the manifest records as ``"split_at": "tokens"``. The
directory is written in one step (llama.atomic.write_dir); tokens are appended to the files as
they are made, so no more than one input file's text is held in memory.

Reading:

* ``TokenShards(dir)`` checks the manifest (types, format, version, dtype, that each file holds
  exactly its token count) and memory-maps ``.train`` and ``.val`` as read-only numpy arrays.
  Errors are ValueError naming the file and the field. Token ids are not scanned on open (that
  would read every byte); ``verify()`` scans them for ids outside the vocabulary.
* ``WindowLoader(sources, seq_len, batch_size, ...)`` draws batches of random contiguous
  windows of ``seq_len + 1`` tokens from one directory or from several domains mixed with
  weights that ``set_weights`` changes while training; ``state_dict`` / ``load_state_dict``
  resume it exactly.
* ``val_batches(source, seq_len, batch_size)`` walks the validation split in order, in
  non-overlapping windows, for validation loss and perplexity.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import re
import stat
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from tqdm import tqdm

from ..atomic import write_dir
from ..tokenizer import Tokenizer

__all__ = ["MANIFEST", "TokenShards", "WindowLoader", "prepare", "val_batches"]

PathLike = Union[str, "os.PathLike[str]"]
Source = Union[PathLike, "TokenShards"]
Batches = Iterator[tuple[torch.Tensor, torch.Tensor]]

FORMAT = "llama-kernels-tokens"
VERSION = 1
MANIFEST = "manifest.json"
SPLIT_FILES = {"train": "train.bin", "val": "val.bin"}
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
MAX_MANIFEST_BYTES = 64 << 20
DEFAULT_DOMAIN = "default"
LOADER_FORMAT = "llama-kernels-window-loader"
_DOC_SPLITS = ("paragraph", "line", "file")
_ENCODE_CHUNK = 1024  # documents per encode call
_SHA256 = re.compile(r"[0-9a-f]{64}")


# ----------------------------------------------------------------------------- small checks
def _as_path(value: object, name: str) -> Path:
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name}: expected a path, got {type(value).__name__}")
    return Path(value)


def _int(value: object, name: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")
    return value


def _sha256(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


def dtype_for(vocab_size: int) -> str:
    """The smallest shard dtype that holds every id of a vocabulary: "uint16" or "uint32"."""
    vocab_size = _int(vocab_size, "vocab_size", 1)
    if vocab_size <= 1 << 16:
        return "uint16"
    if vocab_size <= 1 << 32:
        return "uint32"
    raise ValueError(f"vocab_size: {vocab_size} does not fit in uint32 token ids")


# ----------------------------------------------------------------------------- prepare
def _non_empty(directory: Path) -> bool:
    with os.scandir(directory) as entries:
        return any(True for _ in entries)


def split_documents(text: str, split: str) -> list[str]:
    """The non-blank documents of a text: "paragraph" (text between blank lines), "line" or
    "file" (the whole text). llama.data.tokenize_file and prepare split alike."""
    if split == "paragraph":
        docs = [p.strip("\n") for p in re.split(r"\n[^\S\n]*\n", text)]
    elif split == "line":
        docs = text.split("\n")
    else:
        docs = [text]
    return [d for d in docs if d.strip()]


def _read_text(path: Path, name: str) -> tuple[str, str, int]:
    """(text, sha256, bytes) of a UTF-8 file; a leading byte-order mark is dropped."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{name}: {str(path)!r} is not UTF-8 text (byte {e.start})") from None
    return text, hashlib.sha256(data).hexdigest(), len(data)


def _choose_val(lengths: np.ndarray, val_fraction: float, seed: int) -> np.ndarray:
    """A boolean mask of the documents for validation: a seeded random choice holding about
    `val_fraction` of the characters, at least one document, never all of them."""
    n = lengths.size
    order = np.random.default_rng(seed).permutation(n)
    cumulative = np.cumsum(lengths[order])
    target = val_fraction * float(cumulative[-1])
    count = int(np.searchsorted(cumulative, target, side="left")) + 1  # first prefix reaching it
    count = min(max(count, 1), n - 1)
    mask = np.zeros(n, dtype=bool)
    mask[order[:count]] = True
    return mask


def prepare(tokenizer: Union[Tokenizer, PathLike], inputs: Sequence[PathLike], out: PathLike, *,
            val_fraction: float = 0.05, seed: int = 0, split: str = "paragraph", eos: bool = True,
            force: bool = False, progress: Optional[bool] = None) -> dict[str, Any]:
    """Tokenize `inputs` (UTF-8 text files) into the shard directory `out`; returns the manifest.

    `split` says what a document is (as in llama.data.tokenize_file): "paragraph" (text between
    blank lines), "line" or "file". Each document gets the tokenizer's bos first and, when `eos`,
    its eos last (where the tokenizer has them). `val_fraction` in (0, 1) and `seed` choose the
    validation documents (see the module docstring). `out` must be missing or empty unless
    `force`; then the files written replace theirs and other files there are kept. `progress`:
    a progress bar on stderr (None: only when stderr is a terminal).
    """
    if not isinstance(tokenizer, Tokenizer):
        tokenizer = Tokenizer(_as_path(tokenizer, "tokenizer"))
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    paths = [_as_path(p, f"inputs[{i}]") for i, p in enumerate(inputs)]
    if not paths:
        raise ValueError("inputs: expected at least one text file")
    for i, p in enumerate(paths):
        if not p.is_file():
            raise FileNotFoundError(f"inputs[{i}]: {str(p)!r} is not a file")
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) \
            or not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction: expected a number in (0, 1), got {val_fraction!r}")
    seed = _int(seed, "seed")
    if split not in _DOC_SPLITS:
        raise ValueError(f"split: expected one of {', '.join(_DOC_SPLITS)}, got {split!r}")
    if not isinstance(eos, bool):
        raise TypeError(f"eos: expected bool, got {type(eos).__name__}")
    out = _as_path(out, "out")
    if os.path.lexists(out) and not out.is_dir():
        raise ValueError(f"out: {str(out)!r} exists and is not a directory")
    if out.is_dir() and not force and _non_empty(out):
        raise ValueError(f"out: {str(out)!r} is not empty; pass force=True to write into it anyway")
    dtype_name = dtype_for(tokenizer.vocab_size)
    dtype = DTYPES[dtype_name]
    bos, eos = tokenizer.bos_id is not None, eos and tokenizer.eos_id is not None

    # Pass 1: read each file (one at a time), hash it, count its documents and their characters.
    records, lengths = [], []
    for i, path in enumerate(paths):
        text, sha, size = _read_text(path, f"inputs[{i}]")
        docs = split_documents(text, split)
        del text
        if not docs:
            raise ValueError(f"inputs[{i}]: {str(path)!r} has no text")
        records.append({"name": path.name, "sha256": sha, "bytes": size})
        lengths.append(np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs)))
    lengths = np.concatenate(lengths)
    n_docs = int(lengths.size)
    val_mask = _choose_val(lengths, val_fraction, seed) if n_docs > 1 else None
    tokenizer_sha, _ = _sha256(tokenizer.path)
    counts = {"train": 0, "val": 0}
    documents = {"train": 0, "val": 0}

    def write_tokens(train_path: Path) -> None:
        """Pass 2: tokenize and append each document to train.bin or val.bin (beside it)."""
        val_path = train_path.with_name(SPLIT_FILES["val"])
        bar = tqdm(total=n_docs, desc="tokenize", unit="doc", disable=None if progress is None else not progress)
        with open(train_path, "wb") as train_f, open(val_path, "wb") as val_f, bar:
            files = {"train": train_f, "val": val_f}
            first = 0
            for i, path in enumerate(paths):
                text, sha, _ = _read_text(path, f"inputs[{i}]")
                if sha != records[i]["sha256"]:
                    raise ValueError(f"inputs[{i}]: {str(path)!r} changed while it was being tokenized")
                docs = split_documents(text, split)
                del text
                for start in range(0, len(docs), _ENCODE_CHUNK):
                    part = docs[start:start + _ENCODE_CHUNK]
                    ids = tokenizer.encode_batch(part, bos=bos, eos=eos)
                    pending: dict[str, list[np.ndarray]] = {"train": [], "val": []}
                    for k, doc_ids in enumerate(ids):
                        array = np.asarray(doc_ids, dtype=dtype)
                        if val_mask is None:  # one document: its last val_fraction of tokens
                            n_val = min(max(round(array.size * val_fraction), 1), array.size - 1)
                            pending["train"].append(array[:array.size - n_val])
                            pending["val"].append(array[array.size - n_val:])
                        else:
                            pending["val" if val_mask[first + start + k] else "train"].append(array)
                    for which, arrays in pending.items():
                        if arrays:
                            block = np.concatenate(arrays)
                            block.tofile(files[which])
                            counts[which] += int(block.size)
                            documents[which] += len(arrays)
                    bar.update(len(part))
                first += len(docs)

    def write_val(path: Path) -> None:
        if not path.is_file():  # written by write_tokens
            raise RuntimeError(f"{path.name} was not written")

    manifest: dict[str, Any] = {}

    def write_manifest(path: Path) -> None:
        if counts["train"] < 1 or counts["val"] < 1:
            raise ValueError(f"inputs: too little text to split ({counts['train']} train and "
                             f"{counts['val']} validation tokens)")
        manifest.update({
            "format": FORMAT, "version": VERSION, "dtype": dtype_name, "vocab_size": tokenizer.vocab_size,
            "tokenizer": {"path": tokenizer.path.name, "sha256": tokenizer_sha},
            "inputs": records, "split": split, "val_fraction": val_fraction, "seed": seed,
            "split_at": "documents" if val_mask is not None else "tokens",
            "train_tokens": counts["train"], "val_tokens": counts["val"],
            "train_documents": documents["train"], "val_documents": documents["val"],
            "bos_id": tokenizer.bos_id if bos else None, "eos_id": tokenizer.eos_id if eos else None,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        })
        path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")

    # Written in this order: the manifest last, once the counts are known.
    write_dir(out, {SPLIT_FILES["train"]: write_tokens, SPLIT_FILES["val"]: write_val,
                    MANIFEST: write_manifest})
    return manifest


# ----------------------------------------------------------------------------- reading
def _regular_file(path: Path, missing: str) -> os.stat_result:
    """os.stat of the regular file at `path` (never opened: a FIFO cannot block); a ValueError
    naming it when it is missing (saying `missing`) or of another kind."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ValueError(f"{path}: missing ({missing})") from None
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{path}: not a regular file")
    return st


class TokenShards:
    """A prepared shard directory: ``manifest`` (the checked dict), ``train`` and ``val`` (read-only
    memory-mapped 1-D numpy arrays of token ids), ``vocab_size``, ``dtype``, ``bos_id``, ``eos_id``.

    Opening checks the manifest and that each file's size is its token count times the dtype's
    size, so a forged manifest cannot make it map or allocate more than the files hold; errors
    are ValueError naming the file and field. It does not read the tokens: ``verify()`` does.
    """

    def __init__(self, path: PathLike):
        self.path = _as_path(path, "path")
        if not self.path.is_dir():
            raise FileNotFoundError(f"path: {str(self.path)!r} is not a directory (expected a token "
                                    "shard directory written by llama.data.prepare)")
        self.manifest = _read_manifest(self.path / MANIFEST)
        self.dtype = DTYPES[self.manifest["dtype"]]
        self.vocab_size: int = self.manifest["vocab_size"]
        self.bos_id: Optional[int] = self.manifest["bos_id"]
        self.eos_id: Optional[int] = self.manifest["eos_id"]
        self._splits = {which: self._map(which) for which in SPLIT_FILES}

    def _map(self, which: str) -> np.ndarray:
        path = self.path / SPLIT_FILES[which]
        count = self.manifest[f"{which}_tokens"]
        st = _regular_file(path, f"the manifest counts {count} {which} tokens")
        if st.st_size != count * self.dtype.itemsize:
            raise ValueError(f"{self.path / MANIFEST}: {which}_tokens: {count} {self.manifest['dtype']} tokens "
                             f"need {count * self.dtype.itemsize} bytes, but {path.name} has {st.st_size}")
        if count == 0:
            return np.empty(0, dtype=self.dtype)
        return np.memmap(path, dtype=self.dtype, mode="r", shape=(count,))

    @property
    def train(self) -> np.ndarray:
        return self._splits["train"]

    @property
    def val(self) -> np.ndarray:
        return self._splits["val"]

    def split(self, which: str) -> np.ndarray:
        """``train`` or ``val`` by name."""
        if which not in SPLIT_FILES:
            raise ValueError(f"split: expected 'train' or 'val', got {which!r}")
        return self._splits[which]

    def verify(self, chunk: int = 1 << 24) -> None:
        """Read every token; ValueError naming the file if an id is not below vocab_size."""
        for which, tokens in self._splits.items():
            for start in range(0, tokens.size, chunk):
                top = int(tokens[start:start + chunk].max())
                if top >= self.vocab_size:
                    raise ValueError(f"{self.path / SPLIT_FILES[which]}: token id {top} (near token "
                                     f"{start}) is not below vocab_size {self.vocab_size}")

    def __repr__(self) -> str:
        return (f"TokenShards({str(self.path)!r}, train={self.train.size}, val={self.val.size}, "
                f"dtype={self.manifest['dtype']}, vocab_size={self.vocab_size})")


def _read_manifest(path: Path) -> dict[str, Any]:
    def bad(field: str, expected: str, got: object) -> ValueError:
        shown = repr(got) if isinstance(got, (str, int, float, bool, type(None))) else type(got).__name__
        if isinstance(got, str) and len(shown) > 80:
            shown = shown[:77] + "..."
        return ValueError(f"{path}: {field}: expected {expected}, got {shown}")

    st = _regular_file(path, "not a token shard directory written by llama.data.prepare")
    if st.st_size > MAX_MANIFEST_BYTES:
        raise ValueError(f"{path}: {st.st_size} bytes; a manifest is at most {MAX_MANIFEST_BYTES}")

    def no_constant(name: str) -> None:
        raise ValueError(f"{name} is not JSON")

    try:
        with open(path, "rb") as f:
            data = json.loads(f.read(MAX_MANIFEST_BYTES + 1).decode("utf-8"), parse_constant=no_constant)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, huge ints
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise bad("manifest", "a JSON object", data)

    def field(name: str, check: Callable[[object], bool], expected: str, optional: bool = False) -> Any:
        if name not in data:
            if optional:
                return None
            raise ValueError(f"{path}: {name}: missing")
        value = data[name]
        if not check(value):
            raise bad(name, expected, value)
        return value

    def is_int(v: object) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    field("format", lambda v: v == FORMAT, repr(FORMAT))
    field("version", lambda v: is_int(v) and v == VERSION, f"{VERSION} (files of a later version need a newer "
                                                          "llama-kernels)")
    dtype = field("dtype", lambda v: isinstance(v, str) and v in DTYPES, " or ".join(map(repr, DTYPES)))
    limit = 1 << (8 * DTYPES[dtype].itemsize)
    vocab = field("vocab_size", lambda v: is_int(v) and 1 <= v <= limit, f"an int in [1, {limit}] (for {dtype})")
    for name in ("train_tokens", "val_tokens"):
        field(name, lambda v: is_int(v) and v >= 0, "an int >= 0")
    for name in ("bos_id", "eos_id"):
        field(name, lambda v: v is None or (is_int(v) and 0 <= v < vocab), f"null or an int in [0, {vocab})")
    field("tokenizer", lambda v: isinstance(v, dict), "an object {path, sha256}")
    tok = data["tokenizer"]
    if not isinstance(tok.get("path"), str):
        raise bad("tokenizer.path", "a string", tok.get("path"))
    if not (isinstance(tok.get("sha256"), str) and _SHA256.fullmatch(tok["sha256"])):
        raise bad("tokenizer.sha256", "64 lowercase hex digits", tok.get("sha256"))
    inputs = field("inputs", lambda v: isinstance(v, list), "a list")
    for i, item in enumerate(inputs):
        if not isinstance(item, dict):
            raise bad(f"inputs[{i}]", "an object {name, sha256, bytes}", item)
        if not isinstance(item.get("name"), str):
            raise bad(f"inputs[{i}].name", "a string", item.get("name"))
        if not (isinstance(item.get("sha256"), str) and _SHA256.fullmatch(item["sha256"])):
            raise bad(f"inputs[{i}].sha256", "64 lowercase hex digits", item.get("sha256"))
        if not (is_int(item.get("bytes")) and item["bytes"] >= 0):
            raise bad(f"inputs[{i}].bytes", "an int >= 0", item.get("bytes"))
    field("created", lambda v: isinstance(v, str), "a string", optional=True)
    return data


def _open(source: object, name: str) -> TokenShards:
    if isinstance(source, TokenShards):
        return source
    if isinstance(source, (str, os.PathLike)):
        return TokenShards(source)
    raise TypeError(f"{name}: expected a shard directory (path) or a TokenShards, got {type(source).__name__}")


def _domains(sources: object) -> dict[str, TokenShards]:
    if isinstance(sources, Mapping):
        if not sources:
            raise ValueError("sources: expected at least one domain")
        out = {}
        for key, value in sources.items():
            if not isinstance(key, str) or not key:
                raise TypeError(f"sources: domain names must be non-empty strings, got {key!r}")
            out[key] = _open(value, f"sources[{key!r}]")
        return out
    return {DEFAULT_DOMAIN: _open(sources, "sources")}


def _split_name(split: object) -> str:
    if split not in SPLIT_FILES:
        raise ValueError(f"split: expected 'train' or 'val', got {split!r}")
    return split  # type: ignore[return-value]


def _device(device: object) -> torch.device:
    try:
        return torch.device(device)  # type: ignore[arg-type]
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device: expected a torch device such as 'cpu' or 'cuda:0', got {device!r}") from None


def _windows(tokens: np.ndarray, starts: np.ndarray, length: int) -> np.ndarray:
    """Rows tokens[s:s + length] for each start, as int64."""
    if starts.size == 0:
        return np.empty((0, length), dtype=np.int64)
    return np.stack([tokens[s:s + length] for s in starts.tolist()]).astype(np.int64)


def _to_xy(windows: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.from_numpy(windows)
    x, y = w[:, :-1].contiguous(), w[:, 1:].contiguous()
    if device.type != "cpu":
        x, y = x.to(device), y.to(device)
    return x, y


class WindowLoader:
    """Batches of random contiguous windows from one shard directory or a weighted mix of domains.

    `sources`: a shard directory (or TokenShards), or a dict domain name -> directory. Each row of
    a batch picks its domain by the weights (default: in proportion to the domains' token counts
    in `split`), then a window of ``seq_len + 1`` tokens at a uniformly random start in that
    domain's split; ``x`` is its first seq_len tokens, ``y`` its last (next-token targets),
    int64 of shape (batch_size, seq_len) on `device`. Windows may cross document boundaries.

    The draws come from one numpy PCG64 generator seeded with `seed`; ``state_dict()`` holds its
    state, the batch count and the weights, so a loader given ``load_state_dict`` yields exactly
    the batches the saved one would have. All domains must share a tokenizer.

    ``last_domains`` lists the domain of each row of the last batch (for per-domain losses, which
    dynamic batch loading turns into new weights). Token arrays are memory-mapped: only the
    windows drawn are read.
    """

    def __init__(self, sources: Union[Source, Mapping[str, Source]], seq_len: int, batch_size: int,
                 weights: Union[Mapping[str, float], Sequence[float], None] = None, seed: int = 0,
                 split: str = "train", device: Union[str, torch.device] = "cpu"):
        self.seq_len = _int(seq_len, "seq_len", 1)
        self.batch_size = _int(batch_size, "batch_size", 1)
        self.split = _split_name(split)
        self.device = _device(device)
        self._shards = _domains(sources)
        self._names = list(self._shards)
        self._tokens = [self._shards[n].split(self.split) for n in self._names]
        first = self._shards[self._names[0]]
        for name in self._names:
            shards, tokens = self._shards[name], self._shards[name].split(self.split)
            if tokens.size < self.seq_len + 1:
                raise ValueError(f"sources[{name!r}]: {shards.path}: the {self.split} split has {tokens.size} "
                                 f"tokens, too few for seq_len={self.seq_len} (a window is seq_len + 1 tokens)")
            if shards.manifest["tokenizer"]["sha256"] != first.manifest["tokenizer"]["sha256"] \
                    or shards.vocab_size != first.vocab_size:
                raise ValueError(f"sources[{name!r}]: {shards.path} was tokenized with another tokenizer than "
                                 f"{first.path} (domains must share one)")
        self._seed = _int(seed, "seed")
        self._rng = np.random.Generator(np.random.PCG64(self._seed))
        self._batches = 0
        self.last_domains: list[str] = []  # the domain of each row of the last batch
        self._weights = self._normalise([float(t.size) for t in self._tokens] if weights is None else weights)

    # --- properties ---

    @property
    def domains(self) -> list[str]:
        """Domain names, in order (``["default"]`` for a single source)."""
        return list(self._names)

    @property
    def weights(self) -> dict[str, float]:
        """The current mixture, normalised to sum to 1."""
        return dict(zip(self._names, self._weights.tolist()))

    @property
    def vocab_size(self) -> int:
        return self._shards[self._names[0]].vocab_size

    @property
    def batches_drawn(self) -> int:
        return self._batches

    def shards(self, domain: str = DEFAULT_DOMAIN) -> TokenShards:
        """The TokenShards of a domain."""
        if domain not in self._shards:
            raise KeyError(f"domain: {domain!r} is not one of {self._names}")
        return self._shards[domain]

    # --- weights ---

    def _normalise(self, weights: object) -> np.ndarray:
        names = self._names
        if isinstance(weights, Mapping):
            unknown = [k for k in weights if k not in self._shards]
            if unknown:
                raise ValueError(f"weights: unknown domain(s) {unknown}; the domains are {names}")
            missing = [n for n in names if n not in weights]
            if missing:
                raise ValueError(f"weights: no weight for domain(s) {missing}; give one for each of {names}")
            values = [weights[n] for n in names]
        else:
            if hasattr(weights, "tolist"):  # numpy arrays, tensors
                weights = weights.tolist()
            if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
                raise TypeError(f"weights: expected a dict domain -> weight or a list, got {type(weights).__name__}")
            if len(weights) != len(names):
                raise ValueError(f"weights: expected {len(names)} weights (one per domain {names}), got {len(weights)}")
            values = list(weights)
        out = []
        for name, value in zip(names, values):
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
                raise TypeError(f"weights[{name!r}]: expected a number, got {type(value).__name__}")
            value = float(value)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"weights[{name!r}]: expected a finite number >= 0, got {value}")
            out.append(value)
        total = math.fsum(out)
        if total <= 0:
            raise ValueError(f"weights: all zero; at least one domain of {names} needs a positive weight")
        return np.array([v / total for v in out], dtype=np.float64)

    def set_weights(self, weights: Union[Mapping[str, float], Sequence[float]]) -> None:
        """Change the mixture from the next batch on: a dict with a weight for every domain, or a
        list in ``domains`` order; non-negative, finite, not all zero; normalised to sum 1."""
        self._weights = self._normalise(weights)

    # --- batches ---

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y), int64 of shape (batch_size, seq_len), ``y[:, t] == x[:, t + 1]``."""
        n = self.batch_size
        if len(self._names) == 1:
            rows = np.zeros(n, dtype=np.int64)
        else:
            cdf = np.cumsum(self._weights)
            rows = np.searchsorted(cdf, self._rng.random(n) * cdf[-1], side="right")
            positive = np.flatnonzero(self._weights > 0)
            rows = np.clip(rows, positive[0], positive[-1])  # rounding at the ends: never a zero weight
        windows = np.empty((n, self.seq_len + 1), dtype=np.int64)
        for d, tokens in enumerate(self._tokens):
            picked = np.flatnonzero(rows == d)
            if picked.size:
                starts = self._rng.integers(0, tokens.size - self.seq_len, size=picked.size)
                windows[picked] = _windows(tokens, starts, self.seq_len + 1)
        self._batches += 1
        self.last_domains = [self._names[d] for d in rows.tolist()]
        return _to_xy(windows, self.device)

    def __iter__(self) -> "WindowLoader":
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.next_batch()

    # --- resuming ---

    def state_dict(self) -> dict[str, Any]:
        """What a resumed loader needs (plain Python values: safe for torch.save/load(weights_only=True)
        and for JSON)."""
        return {
            "format": LOADER_FORMAT, "version": 1, "domains": list(self._names),
            "tokens": [int(t.size) for t in self._tokens], "split": self.split,
            "seq_len": self.seq_len, "batch_size": self.batch_size, "seed": self._seed,
            "batches": self._batches, "weights": self._weights.tolist(),
            "rng": self._rng.bit_generator.state,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a ``state_dict()``; ValueError if it is not for the same data and shapes."""
        if not isinstance(state, Mapping):
            raise TypeError(f"state: expected a dict from WindowLoader.state_dict(), got {type(state).__name__}")
        if state.get("format") != LOADER_FORMAT or state.get("version") != 1:
            raise ValueError(f"state: not a WindowLoader state (format {state.get('format')!r}, "
                             f"version {state.get('version')!r})")
        mine = self.state_dict()
        for key in ("domains", "tokens", "split", "seq_len", "batch_size"):
            if state.get(key) != mine[key]:
                raise ValueError(f"state: {key}: saved {state.get(key)!r}, but this loader has {mine[key]!r}; "
                                 "an exact resume needs the same data and shapes")
        weights = self._normalise(state.get("weights"))
        batches = _int(state.get("batches"), "state: batches")
        rng = np.random.Generator(np.random.PCG64())
        try:
            rng.bit_generator.state = state.get("rng")
        except (TypeError, ValueError, KeyError) as e:
            raise ValueError(f"state: rng: not a PCG64 generator state ({e})") from None
        self._rng, self._weights, self._batches = rng, weights, batches
        self._seed = _int(state.get("seed", self._seed), "state: seed")


def val_batches(source: Union[Source, Mapping[str, Source]], seq_len: int, batch_size: int,
                max_batches: Optional[int] = None, *, split: str = "val",
                device: Union[str, torch.device] = "cpu") -> Union[Batches, dict[str, Batches]]:
    """The validation split in order, as (x, y) batches of non-overlapping windows.

    Window i holds tokens ``[i * seq_len, (i + 1) * seq_len]`` (seq_len + 1 of them), so the
    targets ``y`` of all windows together are every token after the first, each once; the last
    ``(n - 1) % seq_len`` tokens, too few for a window, are left out. The last batch may have
    fewer rows. `max_batches` stops early. The same arguments always give the same batches.

    For one source this returns the iterator of its batches; for a dict of domains, a dict of
    domain name -> iterator.
    """
    seq_len = _int(seq_len, "seq_len", 1)
    batch_size = _int(batch_size, "batch_size", 1)
    if max_batches is not None:
        max_batches = _int(max_batches, "max_batches", 1)
    split = _split_name(split)
    dev = _device(device)
    domains = _domains(source)
    iterators = {}
    for name, shards in domains.items():
        tokens = shards.split(split)
        if tokens.size < seq_len + 1:
            where = f"source[{name!r}]" if isinstance(source, Mapping) else "source"
            raise ValueError(f"{where}: {shards.path}: the {split} split has {tokens.size} tokens, too few "
                             f"for seq_len={seq_len} (a window is seq_len + 1 tokens)")
        iterators[name] = _val_iter(tokens, seq_len, batch_size, max_batches, dev)
    return iterators if isinstance(source, Mapping) else iterators[DEFAULT_DOMAIN]


def _val_iter(tokens: np.ndarray, seq_len: int, batch_size: int, max_batches: Optional[int],
              device: torch.device) -> Batches:
    count = max(tokens.size - 1, 0) // seq_len
    starts = np.arange(count, dtype=np.int64) * seq_len
    for b, first in enumerate(range(0, count, batch_size)):
        if max_batches is not None and b >= max_batches:
            return
        yield _to_xy(_windows(tokens, starts[first:first + batch_size], seq_len + 1), device)
