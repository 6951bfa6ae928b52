"""Tokenizer: training, encode/decode, streaming, the llama2.c tokenizer.bin, errors."""
import os
import random
import shutil
import struct
import subprocess
import sys
import unicodedata
import warnings
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch

from llama.tokenizer import StreamDecoder, Tokenizer, export_llama2c, train
from llama.tokenizer.__main__ import main

REPO = Path(__file__).resolve().parents[1]
EDGE_TEXTS = [
    "", " ", "a", "  two leading", "trailing  ", "many     spaces", "tab\tand\nnewline\n",
    "digits 1234567890 and 3.14", "naïve 日本語 🙂", "\ufeffbom", "<s> </s> <unk> <0x41>",
    "Ünïcödé ﬁ １２３", "x" * 300, "▁literal▁lower▁block",
]


@pytest.fixture(scope="session")
def lines(sample):
    return sample.text.read_text(encoding="utf-8").splitlines()


@pytest.fixture(scope="session")
def trained(sample, tmp_path_factory):
    """A 512-token LLaMA-style BPE model trained on botchan.txt through the CLI entry point."""
    out = tmp_path_factory.mktemp("tokenizer")
    assert main(["train", "--input", str(sample.text), "--vocab-size", "512", "--out", str(out), "--quiet"]) == 0
    return out


@pytest.fixture(scope="session")
def tok(trained):
    return Tokenizer(trained / "tokenizer.model")


@pytest.fixture(scope="session")
def tok_bin(trained):
    return Tokenizer.load(trained / "tokenizer.bin")


@pytest.fixture(scope="session")
def sp(trained):
    return spm.SentencePieceProcessor(model_file=str(trained / "tokenizer.model"))


def stream_decode(tokenizer, ids):
    stream = tokenizer.stream()
    return "".join(stream.push(i) for i in ids) + stream.flush()


# --- training ---

def test_train_writes_llama_conventions(trained, tok):
    assert sorted(p.name for p in trained.iterdir()) == ["tokenizer.bin", "tokenizer.model"]  # no temp files
    assert (tok.vocab_size, len(tok), tok.format) == (512, 512, "sentencepiece")
    assert (tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert [tok.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert [tok.id_to_piece(3 + b) for b in (0, 0x41, 0xFF)] == ["<0x00>", "<0x41>", "<0xFF>"]
    assert tok.byte_fallback
    # No pad in the model: the minllama convention, the id of <0x00>.
    assert tok.pad_id == tok.piece_to_id("<0x00>") == 3
    # split_digits and identity normalization (whitespace kept).
    pieces = [tok.id_to_piece(i) for i in tok.encode("in 1919, 2024 and 1999", bos=False)]
    assert all(sum(c.isdigit() for c in p) <= 1 for p in pieces)
    assert tok.decode(tok.encode("a  b   c ")) == "a  b   c "


def test_train_cli_subprocess(sample, tmp_path, tok, lines):
    result = subprocess.run(
        [sys.executable, "-m", "llama.tokenizer", "train", "--input", str(sample.text),
         "--vocab-size", "512", "--out", str(tmp_path), "--quiet"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "tokenizer.model" in result.stdout
    other = Tokenizer(tmp_path / "tokenizer.model")
    assert other.vocab_size == 512
    for line in lines[::40]:
        assert other.encode(line) == tok.encode(line)


def test_train_errors(sample, tmp_path, capsys):
    with pytest.raises(ValueError, match="vocab_size"):
        train([sample.text], 100, tmp_path)
    with pytest.raises(TypeError, match="vocab_size"):
        train([sample.text], "512", tmp_path)
    with pytest.raises(FileNotFoundError, match="inputs.*missing.txt"):
        train([tmp_path / "missing.txt"], 512, tmp_path)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="inputs: no text"):
        train([empty], 512, tmp_path / "out")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(b"hello world\n" * 50 + "caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match="inputs: .*latin1.txt' line 51 is not valid UTF-8"):
        train([latin1], 300, tmp_path / "out", quiet=True)
    with pytest.raises(ValueError, match="model_type"):
        train([sample.text], 512, tmp_path, model_type="unigram")
    # 600 tokens need more distinct pieces than a tiny text has: SentencePiece's error, as ValueError.
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("abc abd\n" * 10)
    with pytest.raises(ValueError, match="training failed"):
        train([tiny], 600, tmp_path / "out", quiet=True)
    assert not (tmp_path / "out" / "tokenizer.model").exists()
    # The CLI reports a bad argument on stderr with exit status 2, as argparse's own errors do.
    assert main(["train", "--input", str(tmp_path / "missing.txt"), "--vocab-size", "512",
                 "--out", str(tmp_path)]) == 2
    assert "missing.txt" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["train", "--input", str(sample.text), "--vocab-size", "many", "--out", str(tmp_path)])
    assert exc.value.code == 2


# --- encode / decode ---

def test_roundtrip_botchan(tok, sp, lines):
    assert len(lines) > 4000
    ids = tok.encode_batch(lines, bos=False)
    assert ids == sp.encode(lines)
    for line, line_ids in zip(lines, ids):
        assert tok.decode(line_ids) == line
    assert [tok.encode(line, bos=False) for line in lines[:200]] == ids[:200]


def test_bos_eos(tok):
    body = tok.encode("Hello world", bos=False)
    assert body and tok.bos_id not in body and tok.eos_id not in body
    assert tok.encode("Hello world") == [1] + body
    assert tok.encode("Hello world", eos=True) == [1] + body + [2]
    assert tok.encode("Hello world", bos=False, eos=True) == body + [2]
    assert tok.encode("") == [1] and tok.encode("", bos=False) == []
    assert tok.encode_batch(["a", "b"], eos=True) == [tok.encode("a", eos=True), tok.encode("b", eos=True)]
    assert tok.decode([1] + body + [2]) == "Hello world"


def test_byte_fallback(tok, tok_bin):
    text = "naïve 日本語 🙂"
    ids = tok.encode(text, bos=False)
    byte_ids = [i for i in ids if 3 <= i <= 258]
    assert len(byte_ids) >= len("日本語🙂".encode("utf-8"))  # absent from botchan: bytes
    assert tok.decode(ids) == text
    assert tok_bin.encode(text, bos=False) == ids and tok_bin.decode(ids) == text
    assert tok.decode([tok.piece_to_id("<0xE6>")]) == "\ufffd"  # a lone lead byte


def test_edge_texts_match_sentencepiece(tok, tok_bin, sp):
    for text in EDGE_TEXTS:
        ids = sp.encode(text)
        assert tok.encode(text, bos=False) == ids, text
        assert tok_bin.encode(text, bos=False) == ids, text
        assert tok.decode(ids) == tok_bin.decode(ids) == sp.decode(ids), text
        if "▁" not in text:  # SentencePiece itself decodes a literal "▁" as a space
            assert tok.decode(ids) == text


def test_decode_accepts_tensors_and_arrays(tok):
    ids = tok.encode("Hello there")
    assert tok.decode(torch.tensor(ids)) == tok.decode(np.array(ids)) == tok.decode(tuple(ids)) == "Hello there"
    assert tok.decode([np.int64(i) for i in ids]) == "Hello there"


# --- streaming ---

def test_stream_matches_decode_on_text(tok, tok_bin, lines):
    for tokenizer in (tok, tok_bin):
        for text in lines[:300] + EDGE_TEXTS:
            ids = tokenizer.encode(text, eos=True)
            assert stream_decode(tokenizer, ids) == tokenizer.decode(ids), text


def test_stream_emits_characters_when_complete(tok):
    stream = tok.stream()
    ids = tok.encode("日", bos=False)
    assert [tok.id_to_piece(i) for i in ids] == ["▁", "<0xE6>", "<0x97>", "<0xA5>"]
    assert [stream.push(i) for i in ids] == ["", "", "", "日"]
    assert stream.flush() == ""
    stream.reset()
    assert stream.push(tok.piece_to_id("▁the")) == "the"  # first piece: no leading space
    assert stream.push(tok.piece_to_id("▁the")) == " the"
    stream.reset()
    assert stream.push(tok.piece_to_id("<0xE6>")) == ""
    assert stream.flush() == "\ufffd"  # an incomplete character at the end


def test_stream_matches_sentencepiece_on_random_ids(tok, tok_bin, sp):
    """Random sequences mixing control, unknown, space-only, normal and byte tokens (also
    invalid and incomplete UTF-8) decode exactly as SentencePiece decodes them."""
    rng = random.Random(0)
    space_ids = [i for i in range(tok.vocab_size) if tok.id_to_piece(i).startswith("▁")]
    utf8 = [3 + b for b in "é日🙂".encode("utf-8")]
    pools = [list(range(tok.vocab_size)), list(range(3, 259)), [0, 1, 2], space_ids, utf8]
    for _ in range(400):
        ids = [rng.choice(rng.choice(pools)) for _ in range(rng.randint(0, 12))]
        expected = sp.decode(ids)
        assert tok.decode(ids) == expected, ids
        assert tok_bin.decode(ids) == expected, ids
        assert stream_decode(tok, ids) == expected, ids
        assert stream_decode(tok_bin, ids) == expected, ids


# --- llama2.c tokenizer.bin ---

def test_llama2c_file_layout(trained, tok):
    data = (trained / "tokenizer.bin").read_bytes()
    (max_len,) = struct.unpack_from("<i", data)
    pos, pieces, scores = 4, [], []
    while pos < len(data):
        score, length = struct.unpack_from("<fi", data, pos)
        pieces.append(data[pos + 8:pos + 8 + length].decode("utf-8"))
        scores.append(score)
        pos += 8 + length
    assert len(pieces) == tok.vocab_size
    assert max_len == max(len(p.encode("utf-8")) for p in pieces)
    assert pieces[:4] == ["<unk>", "\n<s>\n", "\n</s>\n", "<0x00>"]
    assert all("▁" not in p for p in pieces)
    the = tok.piece_to_id("▁the")
    assert pieces[the] == " the" and scores[the] == pytest.approx(tok._sp.get_score(the))


def test_llama2c_roundtrip(trained, tok, tok_bin, sp, lines, tmp_path):
    assert tok_bin.format == "llama2c" and tok_bin.vocab_size == tok.vocab_size
    assert (tok_bin.bos_id, tok_bin.eos_id, tok_bin.unk_id, tok_bin.pad_id) == (1, 2, 0, 3)
    assert [tok_bin.id_to_piece(i) for i in range(tok.vocab_size)] == \
        [tok.id_to_piece(i) for i in range(tok.vocab_size)]
    expected = sp.encode(lines)
    assert tok_bin.encode_batch(lines, bos=False) == expected
    for line, ids in zip(lines[::7], expected[::7]):
        assert tok_bin.decode(ids) == line
    # Writing a loaded tokenizer.bin reproduces it byte for byte; the CLI export gives the same.
    assert tok_bin.save_llama2c(tmp_path / "again.bin") == tmp_path / "again.bin"
    assert (tmp_path / "again.bin").read_bytes() == (trained / "tokenizer.bin").read_bytes()
    assert main(["export", "--model", str(trained / "tokenizer.model"), "--out", str(tmp_path / "cli.bin")]) == 0
    assert (tmp_path / "cli.bin").read_bytes() == (trained / "tokenizer.bin").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.bin", "cli.bin"]  # no temp files


def test_save_in_own_format(trained, tok, tok_bin, tmp_path):
    assert tok.save(tmp_path / "a.model").read_bytes() == (trained / "tokenizer.model").read_bytes()
    assert tok_bin.save(tmp_path / "a.bin").read_bytes() == (trained / "tokenizer.bin").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "a.model"]


def test_format_detected_by_content(trained, tmp_path):
    shutil.copy(trained / "tokenizer.bin", tmp_path / "looks.model")
    shutil.copy(trained / "tokenizer.model", tmp_path / "looks.bin")
    assert Tokenizer(tmp_path / "looks.model").format == "llama2c"
    assert Tokenizer(str(tmp_path / "looks.bin")).format == "sentencepiece"


# --- the real BPE model of the sentencepiece sdist ---

def test_sdist_bpe_model(sample, lines, tmp_path):
    real = Tokenizer(sample.tokenizer_model)
    ref = spm.SentencePieceProcessor(model_file=str(sample.tokenizer_model))
    assert (real.vocab_size, real.bos_id, real.eos_id, real.unk_id) == (1000, 1, 2, 0)
    assert real.pad_id is None and not real.byte_fallback  # no pad token, no <0x00>
    assert real.encode_batch(lines, bos=False) == ref.encode(lines)

    # It normalizes (nmt_nfkc, extra whitespace removed): lines those rules leave alone and
    # whose characters are all in its vocabulary (it lacks "9", for one) round-trip.
    def plain(line):
        return " ".join(line.split()) == line and unicodedata.normalize("NFKC", line) == line \
            and "\ufeff" not in line
    plain_lines = [line for line in lines if plain(line)]
    assert len(plain_lines) > 4000
    known = [line for line in plain_lines if real.unk_id not in real.encode(line)]
    assert len(known) > 4000
    for line in known[::5]:
        assert real.decode(real.encode(line)) == line
    # No byte fallback: a run of unknown characters is one <unk>.
    assert real.encode("日本語", bos=False) == ref.encode("日本語") == [ref.piece_to_id("▁"), 0]
    assert real.decode(real.encode("a 日本語")) == "a  ⁇ "

    # Its tokenizer.bin: a warning names what the file cannot carry; plain lines still match.
    with pytest.warns(UserWarning, match="nmt_nfkc"):
        real.save_llama2c(tmp_path / "real.bin")
    real_bin = Tokenizer(tmp_path / "real.bin")
    assert real_bin.encode_batch(plain_lines, bos=False) == ref.encode(plain_lines)
    assert real_bin.encode("日本語", bos=False) == [ref.piece_to_id("▁"), 0]
    for line in known[::5]:
        assert real_bin.decode(real.encode(line)) == line
    # Streaming follows its whitespace rule too (every leading "▁" dropped until text appears).
    rng = random.Random(1)
    space_ids = [i for i in range(real.vocab_size) if real.id_to_piece(i).startswith("▁")]
    for _ in range(300):
        pool = rng.choice([range(real.vocab_size), [0, 1, 2], space_ids, [real.piece_to_id("▁")]])
        ids = [rng.choice(pool) for _ in range(rng.randint(0, 8))]
        assert stream_decode(real, ids) == real.decode(ids) == ref.decode(ids), ids


# --- errors ---

def test_load_errors(trained, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.model"):
        Tokenizer(tmp_path / "missing.model")
    with pytest.raises(ValueError, match="is a directory"):
        Tokenizer(tmp_path)
    with pytest.raises(TypeError, match="path"):
        Tokenizer(123)
    bin_data = (trained / "tokenizer.bin").read_bytes()
    model_data = (trained / "tokenizer.model").read_bytes()
    cases = {
        "truncated.bin": (bin_data[:-3], "corrupt or truncated llama2.c tokenizer.bin"),
        "header-only.bin": (bin_data[:4], "no tokens"),
        "half-record.bin": (bin_data[:9], "truncated"),
        "bad-length.bin": (bin_data[:8] + struct.pack("<i", -5) + bin_data[12:], "length -5"),
        "truncated.model": (model_data[: len(model_data) // 2], "neither a SentencePiece model"),
        "cut-at-piece.model": (model_data[:-200], "neither a SentencePiece model"),
        "empty.model": (b"", "neither"),
        "garbage.model": (b"\xff" * 100, "neither"),
    }
    for name, (data, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(ValueError, match=message) as exc:
            Tokenizer(path)
        assert str(path) in str(exc.value), name


def test_llama2c_pieces_sentencepiece_cannot_load(trained, tmp_path):
    """A tokenizer.bin becomes a SentencePiece model: one with neither <unk> nor all 256 byte
    pieces, or with a piece twice, is refused by name; byte fallback needs no <unk>."""
    data = (trained / "tokenizer.bin").read_bytes()
    max_len, pos, records = data[:4], 4, []
    while pos < len(data):
        _, length = struct.unpack_from("<fi", data, pos)
        records.append(data[pos:pos + 8 + length])
        pos += 8 + length
    assert records[0][8:] == b"<unk>" and records[3][8:] == b"<0x00>"
    no_unk = tmp_path / "no-unk.bin"
    no_unk.write_bytes(max_len + b"".join(records[1:]))
    assert Tokenizer(no_unk).unk_id is None and Tokenizer(no_unk).byte_fallback
    cases = {"no-unk-no-0x00.bin": (records[1:3] + records[4:], "unk is not defined"),
             "twice.bin": (records + [records[-1]], "already defined")}
    for name, (kept, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(max_len + b"".join(kept))
        with pytest.raises(ValueError, match=message) as exc:
            Tokenizer(path)
        assert str(path) in str(exc.value) and "llama2.c tokenizer.bin" in str(exc.value), name


def test_argument_errors(tok, tok_bin, tmp_path):
    for t in (tok, tok_bin):
        with pytest.raises(TypeError, match="text"):
            t.encode(b"bytes")
        with pytest.raises(TypeError, match="bos"):
            t.encode("x", bos=1)
        with pytest.raises(ValueError, match="text"):
            t.encode("lone \ud800 surrogate")
        with pytest.raises(TypeError, match="texts"):
            t.encode_batch("not a list")
        with pytest.raises(TypeError, match=r"texts\[1\]"):
            t.encode_batch(["ok", 3])
        with pytest.raises(ValueError, match=r"texts\[1\]"):
            t.encode_batch(["ok", "\udfff"])
        with pytest.raises(ValueError, match=r"ids\[1\].*out of range"):
            t.decode([5, t.vocab_size])
        with pytest.raises(ValueError, match=r"ids\[0\]"):
            t.decode([-1])
        with pytest.raises(TypeError, match="ids"):
            t.decode("abc")
        with pytest.raises(TypeError, match=r"ids\[0\]"):
            t.decode([1.0])
        with pytest.raises(TypeError, match=r"ids\[0\]"):
            t.decode([True])
        with pytest.raises(ValueError, match="piece"):
            t.piece_to_id("not a piece")
        with pytest.raises(ValueError, match="token_id"):
            t.id_to_piece(t.vocab_size)
        with pytest.raises(ValueError, match="token_id"):
            t.stream().push(-1)
        with pytest.raises(FileNotFoundError, match="path"):
            t.save_llama2c(tmp_path / "no-such-dir" / "tokenizer.bin")
        with pytest.raises(ValueError, match="path.*directory"):
            t.save(tmp_path)
    with pytest.raises(TypeError, match="tokenizer"):
        StreamDecoder("tokenizer.model")
    with pytest.raises(FileNotFoundError, match="model"):
        export_llama2c(tmp_path / "missing.model", tmp_path / "out.bin")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an exact export warns about nothing
        tok.save_llama2c(tmp_path / "quiet.bin")


# --- the real LLaMA tokenizer: tokenizer.model and llama2.c's tokenizer.bin export of it ---

def _llama_tokenizer_dir() -> Path:
    """Folder with LLaMA's tokenizer.model and tokenizer.bin: ``$LLAMA_KERNELS_TEST_DATA/llama-tokenizer``,
    by default the shared data folder beside the repository."""
    root = os.environ.get("LLAMA_KERNELS_TEST_DATA")
    return (Path(root) if root else REPO.parent / "shared" / "data") / "llama-tokenizer"


LLAMA_TRICKY_TEXTS = [
    "", " ", "  ", "\n", " \n ", "  two leading", "   three leading", "trailing ", "trailing   ",
    "many     spaces  between", "line one\nline two\n\n\nthree blank\n", "\ttab\t and \r\n crlf",
    "emoji 🙂😀👍🏽 and 🇯🇵 flags", "🙂", "👨‍👩‍👧‍👦 family", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math letters", "\x00\x01\x7f controls",
    "日本語のテキストです。", "中文分词测试", "한국어 문장", "混合 mixed 文字 text",
    "digits 0123456789 3.14159 1,000,000 and 2024-12-06", "007 x 42", "naïve café résumé",
    "e\u0301 combining", "\ufeffbom first", "Ünïcödé ﬁ ligature １２３ full-width", "<s> </s> <unk> <0x41>",
    "x" * 500, "ab " * 200, "Hello, world! How are you?",
]


@pytest.fixture(scope="module")
def llama_files():
    folder = _llama_tokenizer_dir()
    model, binary = folder / "tokenizer.model", folder / "tokenizer.bin"
    if not (model.is_file() and binary.is_file()):
        pytest.skip(f"LLaMA tokenizer files not found in {folder} (set LLAMA_KERNELS_TEST_DATA)")
    return model, binary


def test_llama_tokenizer_bin_matches_model(llama_files, lines, tmp_path):
    model_path, bin_path = llama_files
    model, binary = Tokenizer(model_path), Tokenizer(bin_path)
    ref = spm.SentencePieceProcessor(model_file=str(model_path))
    assert (model.format, binary.format) == ("sentencepiece", "llama2c")
    for t in (model, binary):
        assert (t.vocab_size, t.bos_id, t.eos_id, t.unk_id, t.pad_id) == (32000, 1, 2, 0, 3)
        assert t.byte_fallback
    assert [binary.id_to_piece(i) for i in range(32000)] == [model.id_to_piece(i) for i in range(32000)]

    # Every line of botchan.txt: the same ids as SentencePiece itself, the same text back.
    expected = ref.encode(lines)
    assert model.encode_batch(lines, bos=False) == expected
    assert binary.encode_batch(lines, bos=False) == expected
    for line, ids in zip(lines, expected):
        assert binary.decode(ids) == model.decode(ids) == line
    for text in LLAMA_TRICKY_TEXTS:
        ids = ref.encode(text)
        assert model.encode(text, bos=False) == ids, text
        assert binary.encode(text, bos=False) == ids, text
        assert binary.encode(text, eos=True) == model.encode(text, eos=True) == [1] + ids + [2], text
        assert binary.decode(ids) == model.decode(ids) == ref.decode(ids) == text, text
        assert stream_decode(binary, [1] + ids + [2]) == stream_decode(model, [1] + ids + [2]) == text, text
    # Random ids (bytes that form no character included) decode alike.
    rng = random.Random(2)
    for _ in range(300):
        ids = [rng.choice(rng.choice([range(32000), range(3, 259), [0, 1, 2, 29871]]))
               for _ in range(rng.randint(0, 10))]
        assert binary.decode(ids) == model.decode(ids) == ref.decode(ids), ids

    # Exporting the .model reproduces llama2.c's export byte for byte, and the .bin rewrites itself.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.save_llama2c(tmp_path / "from-model.bin")
        binary.save(tmp_path / "from-bin.bin")
    assert (tmp_path / "from-model.bin").read_bytes() == bin_path.read_bytes()
    assert (tmp_path / "from-bin.bin").read_bytes() == bin_path.read_bytes()
