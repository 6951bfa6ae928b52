"""Sample data for tests and demos, and token-stream helpers for training scripts.

The sample is an English novel (``botchan.txt``) and a real SentencePiece BPE model
(``botchan_en_bpe_1000.model``), both from the ``test/`` folder of the sentencepiece
0.2.3 source distribution on PyPI. They are fetched with pip, checked against SHA-256
sums kept here, and cached outside the repository::

    python -m llama.data fetch-sample [--cache-dir DIR]        # see __main__.py

The cache is ``--cache-dir``, else ``$LLAMA_KERNELS_CACHE``, else
``$XDG_CACHE_HOME/llama-kernels``, else ``~/.cache/llama-kernels``.

Token shards for training (``llama.data.shards``, re-exported here): ``prepare`` tokenizes text
files into memory-mapped train/val files with a manifest, ``TokenShards`` opens them,
``WindowLoader`` samples random windows from one or a weighted mix of domains (weights that can
change while training, exact resume), ``val_batches`` walks the validation split in order::

    python -m llama.data prepare --tokenizer T --input FILE [FILE ...] --out DIR

The SST-5 and CFIMDB sentiment files (llama.data.sentiment) are downloaded on request, never at
run time: ``python -m llama.data fetch-sentiment --out DIR``.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import itertools
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Union

import torch

from ..atomic import atomic_file
from ..tokenizer import Tokenizer
from .shards import TokenShards, WindowLoader, prepare, split_documents, val_batches

__all__ = [
    "ChecksumError", "SampleFiles", "SampleUnavailable", "batches", "default_cache_dir",
    "download_sdist", "fetch_sample", "sample_files", "tokenize_file", "train_val_split",
    "TokenShards", "WindowLoader", "prepare", "val_batches",
]

PathLike = Union[str, "os.PathLike[str]"]

SDIST_REQUIREMENT = "sentencepiece==0.2.3"
SDIST_FILENAME = "sentencepiece-0.2.3.tar.gz"
SDIST_SHA256 = "21618ad31f0453a1ebf5ec58defed99758d54af0b670546ecac639ddd8b86fbd"
SAMPLE_SUBDIR = "sentencepiece-0.2.3"
# SampleFiles field -> (member of the sdist, SHA-256 of its content).
SAMPLE_MEMBERS = {
    "text": ("sentencepiece-0.2.3/test/botchan.txt",
             "464bd5300c24fce16fcc4555d4231a57632caae4d0090ad6aa92854a3b227ba7"),
    "tokenizer_model": ("sentencepiece-0.2.3/test/botchan_en_bpe_1000.model",
                        "c8636a43e913dad9d5eb5d2eee2077706a55589fd2d6caf1e7ee4a7d03e4360a"),
}
CACHE_ENV = "LLAMA_KERNELS_CACHE"
PIP_TIMEOUT_S = 600


class SampleUnavailable(RuntimeError):
    """The sample could not be had (registry unreachable, pip missing, ...); the message says why."""


class ChecksumError(ValueError):
    """A downloaded or extracted file does not have the SHA-256 this module expects."""


@dataclass(frozen=True)
class SampleFiles:
    """Paths of the cached sample."""
    text: Path
    tokenizer_model: Path


def default_cache_dir() -> Path:
    """``$LLAMA_KERNELS_CACHE``, else ``$XDG_CACHE_HOME/llama-kernels``, else ``~/.cache/llama-kernels``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "llama-kernels"


def _cache_root(cache_dir: Optional[PathLike]) -> Path:
    if cache_dir is None:
        return default_cache_dir()
    if not isinstance(cache_dir, (str, os.PathLike)):
        raise TypeError(f"cache_dir: expected a path or None, got {type(cache_dir).__name__}")
    path = Path(cache_dir).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"cache_dir: {str(path)!r} exists and is not a directory")
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _cached(root: Path) -> Optional[SampleFiles]:
    """The sample in `root` if every file is there with the expected content."""
    folder = root / SAMPLE_SUBDIR
    paths = {}
    for field, (member, sha256) in SAMPLE_MEMBERS.items():
        path = folder / Path(member).name
        if not path.is_file() or _sha256(path) != sha256:
            return None
        paths[field] = path
    return SampleFiles(**paths)


def sample_files(cache_dir: Optional[PathLike] = None, fetch: bool = True) -> SampleFiles:
    """The cached sample, fetched first when missing and `fetch` is true.

    Raises SampleUnavailable (with the reason) when it is missing and cannot be fetched.
    """
    root = _cache_root(cache_dir)
    files = _cached(root)
    if files is not None:
        return files
    if not fetch:
        raise SampleUnavailable(f"the sample is not in {root} and fetch=False")
    return fetch_sample(root)


def fetch_sample(cache_dir: Optional[PathLike] = None, force: bool = False) -> SampleFiles:
    """Download the sentencepiece sdist, check it, extract the sample into the cache.

    Does nothing when the cache already holds the sample (unless `force`).
    """
    root = _cache_root(cache_dir)
    if not force:
        files = _cached(root)
        if files is not None:
            return files
    folder = root / SAMPLE_SUBDIR
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SampleUnavailable(f"cannot create the cache directory {folder}: {e}") from None
    with tempfile.TemporaryDirectory(dir=root, prefix=".download-") as tmp:
        archive = download_sdist(Path(tmp))
        actual = _sha256(archive)
        if actual != SDIST_SHA256:
            raise ChecksumError(f"{archive.name}: SHA-256 {actual}, expected {SDIST_SHA256}")
        _extract(archive, folder)
    files = _cached(root)
    if files is None:  # extraction verified each file, so only a concurrent change gets here
        raise SampleUnavailable(f"the sample in {folder} changed while it was being written")
    return files


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def download_sdist(dest: Path) -> Path:
    """Download the sdist into the folder `dest` with pip; returns the archive's path.

    pip checks the SHA-256 before it runs anything from the archive (its metadata step).
    Raises ChecksumError on a mismatch, SampleUnavailable when pip cannot get it.
    """
    # Installed distributions are read from metadata, not found through the import system:
    # probing for pip trips setuptools' distutils shim for the rest of the process.
    if not _installed("pip"):
        raise SampleUnavailable("pip is not installed in this Python environment")
    requirements = dest / "requirements.txt"
    requirements.write_text(f"{SDIST_REQUIREMENT} --hash=sha256:{SDIST_SHA256}\n", encoding="utf-8")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "sentencepiece",
               "--require-hashes", "-r", str(requirements), "-d", str(dest),
               "--disable-pip-version-check", "--retries", "2", "--timeout", "30"]
    # pip prepares the sdist's metadata; with setuptools here that needs no extra downloads.
    if _installed("setuptools"):
        command.append("--no-build-isolation")
    try:
        result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, timeout=PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise SampleUnavailable(f"pip download of {SDIST_REQUIREMENT} took over {PIP_TIMEOUT_S} s") from None
    output = result.stdout or ""
    if "DO NOT MATCH THE HASHES" in output:
        got = re.search(r"Got\s+([0-9a-f]{64})", output)
        raise ChecksumError(f"{SDIST_FILENAME}: SHA-256 {got.group(1) if got else '(unknown)'}, "
                            f"expected {SDIST_SHA256}")
    archive = dest / SDIST_FILENAME
    if result.returncode != 0 or not archive.is_file():
        lines = output.strip().splitlines()
        reason = " ".join([line for line in lines if line.startswith("ERROR")][-2:]) or " ".join(lines[-3:])
        raise SampleUnavailable(f"pip could not download {SDIST_REQUIREMENT} "
                                f"(exit {result.returncode}): {reason}")
    return archive


def _extract(archive: Path, folder: Path) -> None:
    """Copy the sample members out of the archive, each checked, then renamed into place."""
    try:
        tar = tarfile.open(archive, "r:gz")
    except (tarfile.TarError, OSError) as e:
        raise ChecksumError(f"{archive.name}: not a readable .tar.gz ({e})") from None
    with tar:
        for member_name, sha256 in SAMPLE_MEMBERS.values():
            try:
                member = tar.getmember(member_name)
            except KeyError:
                raise ChecksumError(f"{archive.name}: no {member_name}") from None
            source = tar.extractfile(member) if member.isfile() else None
            if source is None:
                raise ChecksumError(f"{archive.name}: {member_name} is not a regular file")
            target = folder / Path(member_name).name
            with atomic_file(target) as tmp, open(tmp, "wb") as out:
                digest = hashlib.sha256()
                for block in iter(lambda: source.read(1 << 20), b""):
                    digest.update(block)
                    out.write(block)
                if digest.hexdigest() != sha256:
                    raise ChecksumError(f"{member_name}: SHA-256 {digest.hexdigest()}, expected {sha256}")


# --- token streams for training ---------------------------------------------------------------

_SPLITS = ("paragraph", "line", "file")


def tokenize_file(tokenizer: Tokenizer, path: PathLike, *, split: str = "paragraph", bos: bool = True,
                  eos: bool = False, dtype: torch.dtype = torch.long, progress: bool = True) -> torch.Tensor:
    """Token ids of a UTF-8 text file as one 1-D tensor, every document starting with bos.

    `split` says what a document is: "paragraph" (text between blank lines, its lines
    joined by newlines), "line" (each non-blank line) or "file" (all of it). A leading
    byte-order mark is dropped.
    """
    if not isinstance(tokenizer, Tokenizer):
        raise TypeError(f"tokenizer: expected a llama.tokenizer.Tokenizer, got {type(tokenizer).__name__}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a path, got {type(path).__name__}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: no such file: {str(path)!r}")
    if split not in _SPLITS:
        raise ValueError(f"split: expected one of {', '.join(_SPLITS)}, got {split!r}")
    if not isinstance(dtype, torch.dtype) or dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
        raise TypeError(f"dtype: expected a torch integer dtype, got {dtype!r}")
    if tokenizer.vocab_size - 1 > torch.iinfo(dtype).max:
        raise ValueError(f"dtype: {dtype} cannot hold token ids up to {tokenizer.vocab_size - 1}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"path: {str(path)!r} is not UTF-8 text (byte {e.start})") from None
    docs = split_documents(text, split)
    if not docs:
        raise ValueError(f"path: {str(path)!r} has no text")
    ids = tokenizer.encode_batch(docs, bos=bos, eos=eos, progress=progress)
    return torch.tensor(list(itertools.chain.from_iterable(ids)), dtype=dtype)


def _check_tokens(tokens: object, name: str = "tokens") -> torch.Tensor:
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(tokens).__name__}")
    if tokens.dim() != 1:
        raise ValueError(f"{name}: expected a 1-D tensor, got shape {tuple(tokens.shape)}")
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise TypeError(f"{name}: expected integer token ids, got dtype {tokens.dtype}")
    return tokens


def _positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value}")
    return value


def train_val_split(tokens: torch.Tensor, val_fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Contiguous (train, val) views of a token stream; val is the last `val_fraction` of it."""
    tokens = _check_tokens(tokens)
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) \
            or not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction: expected a number in (0, 1), got {val_fraction!r}")
    n = tokens.numel()
    n_val = round(n * val_fraction)
    if n_val < 1 or n_val >= n:
        raise ValueError(f"tokens: {n} tokens are too few to split with val_fraction={val_fraction}")
    return tokens[:n - n_val], tokens[n - n_val:]


def batches(tokens: torch.Tensor, batch_size: int, seq_len: int,
            generator: Optional[torch.Generator] = None, *, num_batches: Optional[int] = None,
            device: Union[str, torch.device, None] = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Random windows of a token stream: (x, y) of shape (batch_size, seq_len), int64, with
    ``y[:, t] == x[:, t + 1]`` (next-token targets). Endless unless `num_batches` is given."""
    tokens = _check_tokens(tokens)
    batch_size = _positive_int(batch_size, "batch_size")
    seq_len = _positive_int(seq_len, "seq_len")
    if num_batches is not None:
        num_batches = _positive_int(num_batches, "num_batches")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
    if tokens.numel() < seq_len + 1:
        raise ValueError(f"tokens: {tokens.numel()} tokens are too few for seq_len={seq_len} "
                         f"(need seq_len + 1)")
    return _batches(tokens, batch_size, seq_len, generator, num_batches, device)


def _batches(tokens, batch_size, seq_len, generator, num_batches, device):
    offsets = torch.arange(seq_len + 1)
    count = itertools.count() if num_batches is None else range(num_batches)
    for _ in count:
        starts = torch.randint(0, tokens.numel() - seq_len, (batch_size,), generator=generator)
        window = tokens[starts[:, None] + offsets].long()
        x, y = window[:, :-1].contiguous(), window[:, 1:].contiguous()
        if device is not None:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        yield x, y

