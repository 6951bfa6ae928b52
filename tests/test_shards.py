"""Token shards: prepare (library and CLI), TokenShards' manifest checks, WindowLoader, val_batches."""
import hashlib
import io
import json
import os
import math
import random

import numpy as np
import pytest
import torch

from llama.data import TokenShards, WindowLoader, prepare, val_batches
from llama.data.__main__ import main
from llama.tokenizer import train

VOCAB = 300


def _paragraphs(rng, count):
    words = ["".join(rng.choice("abcdefghijklmnop") for _ in range(rng.randint(2, 7))) for _ in range(200)]
    return ["\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(3, 10)))
                      for _ in range(rng.randint(1, 3))) for _ in range(count)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two generated text files (paragraphs between blank lines) and a tokenizer trained on them."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    paras = {"a.txt": _paragraphs(rng, 120), "b.txt": _paragraphs(rng, 60)}
    for name, ps in paras.items():
        (root / name).write_text("\n\n".join(ps) + "\n", encoding="utf-8")
    tok = train([root / "a.txt", root / "b.txt"], VOCAB, root / "tok", quiet=True)
    return {"root": root, "paras": paras, "tok": tok, "files": [root / "a.txt", root / "b.txt"]}


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "shards"
    manifest = prepare(corpus["tok"], corpus["files"], out, val_fraction=0.1, seed=3, progress=False)
    return out, manifest


def _write_shards(path, train_ids, val_ids, vocab_size=1 << 16, dtype="uint16", **overrides):
    """A shard directory written by hand (for loader tests and forged manifests)."""
    path.mkdir(parents=True, exist_ok=True)
    np.asarray(train_ids, dtype="<u2" if dtype == "uint16" else "<u4").tofile(path / "train.bin")
    np.asarray(val_ids, dtype="<u2" if dtype == "uint16" else "<u4").tofile(path / "val.bin")
    manifest = {"format": "llama-kernels-tokens", "version": 1, "dtype": dtype, "vocab_size": vocab_size,
                "tokenizer": {"path": "tokenizer.model", "sha256": "0" * 64},
                "inputs": [{"name": "x.txt", "sha256": "1" * 64, "bytes": 10}],
                "train_tokens": len(train_ids), "val_tokens": len(val_ids), "bos_id": 1, "eos_id": 2,
                "created": "2026-01-01T00:00:00+00:00"}
    manifest.update(overrides)
    (path / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def domains(tmp_path_factory):
    """Domains a and b with disjoint token ranges: a's ids are 0..19999, b's 30000..49999, in order."""
    root = tmp_path_factory.mktemp("domains")
    return {"a": _write_shards(root / "a", np.arange(0, 20000), np.arange(0, 1000)),
            "b": _write_shards(root / "b", np.arange(30000, 50000), np.arange(30000, 31000))}


def _split_docs(tokens, bos):
    """Documents of a token stream, each starting at a bos."""
    starts = np.flatnonzero(tokens == bos).tolist() + [tokens.size]
    assert starts[0] == 0
    return [tokens[s:e] for s, e in zip(starts, starts[1:])]


# --- prepare ---

def test_prepare_writes_uint16_shards_and_manifest(corpus, prepared):
    out, manifest = prepared
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "train.bin", "val.bin"]  # no temp files
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == manifest
    assert (manifest["format"], manifest["version"], manifest["dtype"]) == ("llama-kernels-tokens", 1, "uint16")
    assert manifest["vocab_size"] == VOCAB and (manifest["bos_id"], manifest["eos_id"]) == (1, 2)
    assert (out / "train.bin").stat().st_size == 2 * manifest["train_tokens"]
    assert (out / "val.bin").stat().st_size == 2 * manifest["val_tokens"]
    assert manifest["tokenizer"] == {"path": "tokenizer.model", "sha256": hashlib.sha256(
        corpus["tok"].path.read_bytes()).hexdigest()}
    assert [(i["name"], i["bytes"], i["sha256"]) for i in manifest["inputs"]] == [
        (f.name, f.stat().st_size, hashlib.sha256(f.read_bytes()).hexdigest()) for f in corpus["files"]]
    assert manifest["train_documents"] + manifest["val_documents"] == 180 and manifest["split_at"] == "documents"
    shards = TokenShards(out)
    assert shards.train.dtype == np.dtype("<u2") and shards.vocab_size == VOCAB
    assert (shards.train.size, shards.val.size) == (manifest["train_tokens"], manifest["val_tokens"])
    assert 0.04 < shards.val.size / (shards.train.size + shards.val.size) < 0.2
    shards.verify()


def test_prepare_round_trip_and_disjoint_split(corpus, prepared):
    out, manifest = prepared
    tok, shards = corpus["tok"], TokenShards(out)
    docs = {}
    for which in ("train", "val"):
        tokens = np.asarray(shards.split(which))
        pieces = _split_docs(tokens, tok.bos_id)
        assert all(p[-1] == tok.eos_id for p in pieces)
        docs[which] = [tok.decode(p.tolist()) for p in pieces]
    expected = corpus["paras"]["a.txt"] + corpus["paras"]["b.txt"]
    assert len(docs["val"]) == manifest["val_documents"] > 0
    assert sorted(docs["train"] + docs["val"]) == sorted(expected)  # every paragraph once, exactly
    # Train keeps the input order; val documents are not in train.
    assert docs["train"] == [d for d in expected if d in set(docs["train"])]
    assert not set(docs["val"]) & set(docs["train"])
    first = _split_docs(np.asarray(shards.train), tok.bos_id)[0].tolist()
    assert first == tok.encode(docs["train"][0], bos=True, eos=True)


def test_prepare_is_deterministic_by_seed(corpus, prepared, tmp_path):
    out, _ = prepared
    again = tmp_path / "again"
    prepare(corpus["tok"], corpus["files"], again, val_fraction=0.1, seed=3, progress=False)
    for name in ("train.bin", "val.bin"):
        assert (again / name).read_bytes() == (out / name).read_bytes()
    other = tmp_path / "other"
    prepare(corpus["tok"], corpus["files"], other, val_fraction=0.1, seed=4, progress=False)
    assert (other / "val.bin").read_bytes() != (out / "val.bin").read_bytes()


def test_prepare_single_document_splits_tokens(corpus, tmp_path):
    manifest = prepare(corpus["tok"], corpus["files"][1], tmp_path / "s", split="file", eos=False,
                       val_fraction=0.2, progress=False)
    assert manifest["split_at"] == "tokens" and manifest["eos_id"] is None
    shards = TokenShards(tmp_path / "s")
    whole = np.concatenate([shards.train, shards.val]).tolist()
    text = corpus["files"][1].read_text(encoding="utf-8")  # "file": the whole text, as is
    assert corpus["tok"].decode(whole) == text
    assert abs(shards.val.size - 0.2 * len(whole)) <= 1


def test_prepare_refuses_bad_arguments(corpus, prepared, tmp_path):
    tok, files = corpus["tok"], corpus["files"]
    with pytest.raises(ValueError, match="out: .* is not empty"):
        prepare(tok, files, prepared[0], progress=False)
    with pytest.raises(ValueError, match="val_fraction"):
        prepare(tok, files, tmp_path / "x", val_fraction=1.0, progress=False)
    with pytest.raises(FileNotFoundError, match=r"inputs\[1\]"):
        prepare(tok, [files[0], tmp_path / "missing.txt"], tmp_path / "x", progress=False)
    (tmp_path / "blank.txt").write_text("\n\n  \n")
    with pytest.raises(ValueError, match="has no text"):
        prepare(tok, [tmp_path / "blank.txt"], tmp_path / "x", progress=False)
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9\n")
    with pytest.raises(ValueError, match="not UTF-8"):
        prepare(tok, [tmp_path / "latin1.txt"], tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()  # nothing written by a failed prepare


# --- TokenShards: forged manifests ---

HOSTILE = [
    ("train_tokens", lambda m: m.update(train_tokens=10**15)),
    ("val_tokens", lambda m: m.update(val_tokens=m["val_tokens"] + 1)),
    ("train_tokens", lambda m: m.update(train_tokens="100")),
    ("train_tokens", lambda m: m.update(train_tokens=-1)),
    ("train_tokens", lambda m: m.update(train_tokens=100.0)),
    ("dtype", lambda m: m.update(dtype="float32")),
    ("dtype", lambda m: m.update(dtype=["uint16"])),
    ("train_tokens", lambda m: m.update(dtype="uint32")),  # sizes no longer match the files
    ("format", lambda m: m.update(format="something-else")),
    ("version", lambda m: m.update(version=2)),
    ("version", lambda m: m.update(version=True)),
    ("vocab_size", lambda m: m.update(vocab_size=1 << 20)),  # more than uint16 ids can name
    ("vocab_size", lambda m: m.update(vocab_size=True)),
    ("bos_id", lambda m: m.update(bos_id=1 << 16)),
    ("tokenizer", lambda m: m.update(tokenizer="tokenizer.model")),
    ("tokenizer.sha256", lambda m: m["tokenizer"].update(sha256="xyz")),
    ("inputs", lambda m: m.update(inputs={"name": "x"})),
    (r"inputs\[0\].bytes", lambda m: m["inputs"][0].update(bytes=None)),
    ("eos_id", lambda m: m.pop("eos_id")),
]


@pytest.mark.parametrize("field,forge", HOSTILE, ids=[f"{f}-{i}" for i, (f, _) in enumerate(HOSTILE)])
def test_hostile_manifest(tmp_path, field, forge):
    path = _write_shards(tmp_path / "d", np.arange(100), np.arange(10), vocab_size=1000)
    TokenShards(path)  # as written, it opens
    manifest = json.loads((path / "manifest.json").read_text())
    forge(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=rf"manifest.json: {field}\b"):
        TokenShards(path)


@pytest.mark.parametrize("text,match", [
    ("not json", "not valid JSON"), ("[1, 2]", "manifest: expected a JSON object"),
    ('{"format": NaN}', "not valid JSON"), ("1" * 5000, "not valid JSON"),
])
def test_manifest_not_a_manifest(tmp_path, text, match):
    path = _write_shards(tmp_path / "d", np.arange(100), np.arange(10))
    (path / "manifest.json").write_text(text)
    with pytest.raises(ValueError, match=f"manifest.json: {match}"):
        TokenShards(path)


def test_shard_files_missing_or_bad(tmp_path):
    path = _write_shards(tmp_path / "d", np.arange(100), np.arange(10), vocab_size=50)
    with pytest.raises(ValueError, match="train.bin: token id 99 .* not below vocab_size 50"):
        TokenShards(path).verify()
    (path / "val.bin").unlink()
    with pytest.raises(ValueError, match="val.bin: missing"):
        TokenShards(path)
    (path / "manifest.json").unlink()
    with pytest.raises(ValueError, match="manifest.json: missing"):
        TokenShards(path)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        TokenShards(tmp_path / "nowhere")


# --- WindowLoader ---

def test_windows_are_contiguous_and_shifted(domains):
    loader = WindowLoader(domains["a"], seq_len=16, batch_size=8, seed=1)
    assert loader.domains == ["default"] and loader.weights == {"default": 1.0}
    for _ in range(5):
        x, y = loader.next_batch()
        assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64
        # a's train tokens are 0, 1, 2, ...: a window starting at s is s, s + 1, ...
        assert torch.equal(x, x[:, :1] + torch.arange(16))
        assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y[:, -1], x[:, -1] + 1)
        assert int(y.max()) < 20000
    assert loader.batches_drawn == 5


def test_windows_reach_both_ends(tmp_path):
    path = _write_shards(tmp_path / "d", np.arange(10), np.arange(5))
    x, y = WindowLoader(path, seq_len=8, batch_size=64).next_batch()
    assert set(x[:, 0].tolist()) == {0, 1} and int(y.max()) == 9


def test_mixture_weights(domains):
    loader = WindowLoader(domains, seq_len=8, batch_size=32, weights={"a": 1, "b": 0}, seed=0)
    for _ in range(10):
        x, _ = loader.next_batch()
        assert bool((x < 20000).all()) and set(loader.last_domains) == {"a"}
    loader.set_weights({"a": 0, "b": 1})
    assert loader.weights == {"a": 0.0, "b": 1.0}
    for _ in range(10):
        x, _ = loader.next_batch()
        assert bool((x >= 30000).all()) and set(loader.last_domains) == {"b"}
    loader.set_weights([7, 3])
    assert loader.weights == pytest.approx({"a": 0.7, "b": 0.3})
    rows = from_a = 0
    for _ in range(100):
        x, _ = loader.next_batch()
        rows += x.shape[0]
        from_a += int((x[:, 0] < 20000).sum())
        assert loader.last_domains == ["a" if v < 20000 else "b" for v in x[:, 0].tolist()]
    assert abs(from_a / rows - 0.7) < 0.025  # 3200 rows: the standard deviation is 0.008


def test_default_weights_follow_token_counts(domains, tmp_path):
    small = _write_shards(tmp_path / "c", np.arange(60000, 65000), np.arange(10))
    loader = WindowLoader({"a": domains["a"], "c": small}, seq_len=8, batch_size=4)
    assert loader.weights == pytest.approx({"a": 0.8, "c": 0.2})


@pytest.mark.parametrize("weights,error,match", [
    ({"a": -1, "b": 1}, ValueError, r"weights\['a'\]: expected a finite number >= 0"),
    ({"a": math.nan, "b": 1}, ValueError, r"weights\['a'\]"),
    ({"a": 1, "b": math.inf}, ValueError, r"weights\['b'\]"),
    ({"a": 0, "b": 0}, ValueError, "all zero"),
    ({"a": 1, "b": 1, "c": 1}, ValueError, "unknown domain"),
    ({"a": 1}, ValueError, r"no weight for domain\(s\) \['b'\]"),
    ([1, 2, 3], ValueError, "expected 2 weights"),
    ({"a": True, "b": 1}, TypeError, "expected a number"),
    ("ab", TypeError, "weights"),
])
def test_bad_weights(domains, weights, error, match):
    loader = WindowLoader(domains, seq_len=8, batch_size=4)
    before = loader.weights
    with pytest.raises(error, match=match):
        loader.set_weights(weights)
    assert loader.weights == before
    with pytest.raises(error, match=match):
        WindowLoader(domains, seq_len=8, batch_size=4, weights=weights)


def test_exact_resume(domains):
    first = WindowLoader(domains, seq_len=12, batch_size=6, weights={"a": 0.5, "b": 0.5}, seed=7)
    for _ in range(3):
        first.next_batch()
    first.set_weights({"a": 0.2, "b": 0.8})
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)  # as a training checkpoint would keep it
    json.dumps(first.state_dict())  # plain values
    expected = [first.next_batch() for _ in range(4)]
    buffer.seek(0)
    resumed = WindowLoader(domains, seq_len=12, batch_size=6, seed=99)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.weights == pytest.approx({"a": 0.2, "b": 0.8}) and resumed.batches_drawn == 3
    for x, y in expected:
        rx, ry = resumed.next_batch()
        assert torch.equal(rx, x) and torch.equal(ry, y)
    assert resumed.state_dict() == first.state_dict()


def test_resume_refuses_other_data(domains):
    state = WindowLoader(domains, seq_len=12, batch_size=6).state_dict()
    with pytest.raises(ValueError, match="state: seq_len"):
        WindowLoader(domains, seq_len=16, batch_size=6).load_state_dict(state)
    with pytest.raises(ValueError, match="state: domains"):
        WindowLoader(domains["a"], seq_len=12, batch_size=6).load_state_dict(state)
    with pytest.raises(ValueError, match="state: rng"):
        WindowLoader(domains, seq_len=12, batch_size=6).load_state_dict({**state, "rng": {"x": 1}})


def test_loader_argument_errors(domains, tmp_path):
    with pytest.raises(ValueError, match=r"sources\['a'\]: .* 20000 tokens, too few for seq_len=20000"):
        WindowLoader(domains, seq_len=20000, batch_size=1)
    with pytest.raises(ValueError, match="split"):
        WindowLoader(domains, seq_len=8, batch_size=1, split="test")
    with pytest.raises(ValueError, match="seq_len"):
        WindowLoader(domains, seq_len=0, batch_size=1)
    with pytest.raises(TypeError, match="sources"):
        WindowLoader(3, seq_len=8, batch_size=1)
    other = _write_shards(tmp_path / "o", np.arange(100), np.arange(10),
                          tokenizer={"path": "t.model", "sha256": "f" * 64})
    with pytest.raises(ValueError, match="another tokenizer"):
        WindowLoader({"a": domains["a"], "o": other}, seq_len=8, batch_size=1)


# --- val_batches ---

def test_val_batches_cover_in_order(domains):
    val = np.asarray(TokenShards(domains["a"]).val)  # 1000 tokens: 0..999
    batches = list(val_batches(domains["a"], seq_len=16, batch_size=10))
    count = (val.size - 1) // 16  # 62 windows: 7 batches, the last of 2
    assert [x.shape[0] for x, _ in batches] == [10] * 6 + [2]
    xs = torch.cat([x for x, _ in batches]).flatten()
    ys = torch.cat([y for _, y in batches]).flatten()
    assert torch.equal(xs, torch.from_numpy(val[:count * 16].astype(np.int64)))
    assert torch.equal(ys, torch.from_numpy(val[1:count * 16 + 1].astype(np.int64)))
    again = list(val_batches(domains["a"], seq_len=16, batch_size=10))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again))
    assert len(list(val_batches(domains["a"], seq_len=16, batch_size=10, max_batches=3))) == 3


def test_val_batches_per_domain(domains):
    per = val_batches(domains, seq_len=100, batch_size=4)
    assert sorted(per) == ["a", "b"]
    firsts = {name: next(it)[0][:, 0].tolist() for name, it in per.items()}
    assert firsts == {"a": [0, 100, 200, 300], "b": [30000, 30100, 30200, 30300]}
    with pytest.raises(ValueError, match="too few for seq_len=1000"):
        val_batches(domains, seq_len=1000, batch_size=4)


# --- command line ---

def _cli(corpus, out, *extra):
    return main(["prepare", "--tokenizer", str(corpus["tok"].path), "--input", *map(str, corpus["files"]),
                 "--out", str(out), "--quiet", *extra])


def test_cli_prepare(corpus, tmp_path, capsys):
    out = tmp_path / "cli"
    assert _cli(corpus, out, "--val-fraction", "0.2", "--seed", "5") == 0
    line = capsys.readouterr().out.strip()
    manifest = json.loads((out / "manifest.json").read_text())
    assert line.startswith(f"{manifest['train_tokens'] + manifest['val_tokens']} tokens (")
    assert "uint16" in line and str(out) in line and manifest["seed"] == 5
    assert _cli(corpus, out) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --out:") and "not empty" in err and "--force" in err and err.count("\n") == 1
    assert _cli(corpus, out, "--force", "--seed", "6") == 0
    assert json.loads((out / "manifest.json").read_text())["seed"] == 6


def test_cli_errors(corpus, tmp_path, capsys):
    tok, text = str(corpus["tok"].path), str(corpus["files"][0])
    cases = [
        (["--tokenizer", tok, "--input", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o")], "--input"),
        (["--tokenizer", text, "--input", text, "--out", str(tmp_path / "o")], "--tokenizer"),
        (["--tokenizer", tok, "--input", text, "--out", f"{text}/o"], "--out"),
        (["--tokenizer", tok, "--input", text, "--out", text], "--out"),
        (["--tokenizer", tok, "--input", str(tmp_path), "--out", str(tmp_path / "o")], "--input"),
        (["--tokenizer", tok, "--input", text, str(tmp_path / "fifo"), "--out", str(tmp_path / "o")], "--input"),
    ]
    os.mkfifo(tmp_path / "fifo")
    for argv, option in cases:
        assert main(["prepare", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {option}:") and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


def test_uint32_shards(tmp_path):
    from llama.data.shards import dtype_for

    assert [dtype_for(n) for n in (300, 65536, 65537, 128256)] == ["uint16", "uint16", "uint32", "uint32"]
    path = _write_shards(tmp_path / "big", np.arange(100000, 100100), np.arange(100000, 100050),
                         vocab_size=128256, dtype="uint32")
    shards = TokenShards(path)
    assert shards.train.dtype == np.dtype("<u4") and (path / "train.bin").stat().st_size == 400
    x, y = WindowLoader(shards, seq_len=10, batch_size=3).next_batch()
    assert int(x.min()) >= 100000 and torch.equal(y[:, :-1], x[:, 1:])
