"""The SST-5 and CFIMDB movie-review sentiment files, as the CMU 11-711 minllama assignment
distributes them (public repository neubig/minllama-assignment, folder data/), pinned to one
commit and checked against SHA-256 sums kept here.

    python -m llama.data fetch-sentiment --out DIR [--force]

Where no network reaches GitHub, the error says which files to download, from where, and into
which folder; a user who has the files elsewhere passes their paths to llama.classify instead.
"""
from __future__ import annotations

import hashlib
import http.client
import urllib.error
import urllib.request
from pathlib import Path
from typing import Union

from ..atomic import write_bytes
from . import ChecksumError, SampleUnavailable

__all__ = ["SENTIMENT_FILES", "SENTIMENT_URL", "fetch_sentiment", "sentiment_url"]

SENTIMENT_REPO = "neubig/minllama-assignment"
SENTIMENT_COMMIT = "2951cddba218b7ddfe69295b77ad51a05107d384"
SENTIMENT_URL = f"https://raw.githubusercontent.com/{SENTIMENT_REPO}/{SENTIMENT_COMMIT}/data/"
# file -> (SHA-256, bytes)
SENTIMENT_FILES = {
    "sst-train.txt": ("7aeac81f2a387f2ce7fab98ed8f40ef85cc9c8ad11bcbb63b122e95665cb1f35", 936994),
    "sst-dev.txt": ("11963c76cd073e68006da0390620aadf5a4b8f775e2f900e92a50b3002e39b9b", 121643),
    "sst-test.txt": ("bdcc8352d37bdc82113e4a4dd887b824144201539d5a1e49be566232d306a4ba", 242474),
    "cfimdb-train.txt": ("278e200499d1d68a1a9d80e3947a2203cc97130632d8a53f2b9c11de9cb6c699", 1629241),
    "cfimdb-dev.txt": ("b38f0c095c4624e85927116728140e96d0221969b34146f65eae5b5bb24752b8", 239671),
    "cfimdb-test.txt": ("8ad2f6da7bfb0e8fc36cf89eda47c574cc9c35d6347e665f31bc904d9ecfe0a7", 465946),
    "sst-label-mapping.json": ("831e6914e25d9b9eb56ff9095b3f035bdaf1b9568d385a70ef481c82af0382b3", 49),
    "cfimdb-label-mapping.json": ("afeac43f5a5fe8758469078418519df4c8503c2e30e2fcf6c61464fce3d44a36", 16),
}
TIMEOUT_S = 30


def sentiment_url(name: str) -> str:
    return SENTIMENT_URL + name


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _matches(path: Path, name: str) -> bool:
    digest, size = SENTIMENT_FILES[name]
    try:
        return path.stat().st_size == size and _sha256(path.read_bytes()) == digest
    except OSError:
        return False


def fetch_sentiment(out: Union[str, Path], force: bool = False) -> list[Path]:
    """Download the sentiment files into the folder `out` (files already there with the right
    checksum are kept unless `force`); returns their paths.

    Raises SampleUnavailable (saying what to download and from where) when GitHub cannot be
    reached, ChecksumError when a download is not the pinned file."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, (digest, size) in SENTIMENT_FILES.items():
        path = out / name
        paths.append(path)
        if not force and _matches(path, name):
            continue
        try:
            with urllib.request.urlopen(sentiment_url(name), timeout=TIMEOUT_S) as response:
                data = response.read(size + 1)
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
            reason = getattr(e, "reason", None) or e
            raise SampleUnavailable(
                f"cannot download {sentiment_url(name)} ({reason}). Without a network, download the files "
                f"{', '.join(SENTIMENT_FILES)} from the folder data/ of https://github.com/{SENTIMENT_REPO} "
                f"(commit {SENTIMENT_COMMIT[:12]}) into {out}, or pass their paths to python -m llama.classify"
            ) from None
        if len(data) != size or _sha256(data) != digest:
            raise ChecksumError(f"{name}: {len(data)} bytes with SHA-256 {_sha256(data)}, expected {size} bytes "
                                f"with {digest}")
        write_bytes(path, data)
    return paths
