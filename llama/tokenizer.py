"""SentencePiece tokenizer for LLaMA models, with llama2.c ``tokenizer.bin`` support.

``Tokenizer(path)`` reads either file format, told apart by content:

* a SentencePiece ``.model`` (protobuf); encoding and decoding go through the
  ``sentencepiece`` library;
* a llama2.c ``tokenizer.bin``: an int32 ``max_token_length``, then per token a
  float32 score, an int32 byte length and the UTF-8 bytes (little-endian). The
  export writes ``"▁"`` as ``" "`` and bos/eos as ``"\\n<s>\\n"``/``"\\n</s>\\n"``;
  reading undoes that. Such a file keeps only pieces and scores, so this module
  encodes with its own BPE, the algorithm of SentencePiece's BPE model.

Encoding a ``tokenizer.bin`` gives SentencePiece's ids, and decoding its text, for
a BPE model trained with LLaMA's settings (identity normalization,
``add_dummy_prefix``, no removal of extra whitespace; byte fallback or not): the
tests check every line of botchan.txt, whole files and edge cases. What the file
cannot carry, and so where the ids can differ:

* normalization rules: a model with e.g. ``nmt_nfkc`` or
  ``remove_extra_whitespaces`` (SentencePiece's defaults) encodes text that
  those rules would change (runs of spaces, leading/trailing spaces, NFKC
  characters such as full-width digits, ligatures or a byte-order mark)
  differently; text they leave alone gets the same ids. Decoding differs only
  for ids that start with several whitespace-only pieces;
* piece types: user-defined symbols are merged like ordinary pieces rather than
  matched first, and unused pieces are not re-segmented;
* unigram models: the BPE merge order is not unigram's Viterbi segmentation.

``save_llama2c`` warns when the model is not BPE or normalizes differently.

Command line::

    python -m llama.tokenizer train --input FILE [FILE ...] --vocab-size N --out DIR
    python -m llama.tokenizer export --model tokenizer.model --out tokenizer.bin
"""
from __future__ import annotations

import argparse
import heapq
import io
import math
import operator
import os
import re
import struct
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence, Union

import sentencepiece as spm
from tqdm import tqdm

__all__ = ["Tokenizer", "StreamDecoder", "train", "export_llama2c", "main"]

PathLike = Union[str, "os.PathLike[str]"]

SPACE = "\u2581"  # "▁", SentencePiece's whitespace symbol
BOS_PIECE, EOS_PIECE, UNK_PIECE, PAD_PIECE = "<s>", "</s>", "<unk>", "<pad>"
LLAMA2C_BOS, LLAMA2C_EOS = "\n<s>\n", "\n</s>\n"
DEFAULT_UNK_SURFACE = " \u2047 "  # " ⁇ ", what SentencePiece decodes <unk> to
REPLACEMENT = "\ufffd"
_BYTE_PIECE = re.compile(r"<0x([0-9A-F]{2})>")
_MAX_TOKEN_BYTES = 1 << 16  # sanity bound for a tokenizer.bin's max_token_length

# Piece types, numbered as in sentencepiece_model.proto.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_MERGEABLE = (NORMAL, USER_DEFINED, UNUSED)
_BPE, _MODEL_TYPES = 2, {1: "unigram", 2: "bpe", 3: "word", 4: "char"}


def _as_path(value: object, name: str) -> Path:
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name}: expected a path (str or os.PathLike), got {type(value).__name__}")
    return Path(value)


def _existing_file(value: object, name: str) -> Path:
    path = _as_path(value, name)
    if path.is_dir():
        raise ValueError(f"{name}: {str(path)!r} is a directory, expected a file")
    if not path.is_file():
        raise FileNotFoundError(f"{name}: no such file: {str(path)!r}")
    return path


def _file_mode() -> int:
    """Permissions of a newly created file under the current umask (mkstemp makes 0o600)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, then rename it over `path`."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _output_file(value: object, name: str) -> Path:
    path = _as_path(value, name)
    if path.is_dir():
        raise ValueError(f"{name}: {str(path)!r} is a directory, expected a file path")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{name}: directory {str(path.parent)!r} does not exist")
    return path


# --- SentencePiece model file: the few fields the library does not expose ---------------------

def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _proto_fields(buf: bytes) -> Iterator[tuple[int, object]]:
    """(field number, value) of each field of one protobuf message."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire in (1, 2, 5):
            size = 8 if wire == 1 else 4 if wire == 5 else None
            if size is None:
                size, pos = _varint(buf, pos)
            if pos + size > len(buf):
                raise ValueError(f"field {field} runs past the end of its message")
            value, pos = buf[pos:pos + size], pos + size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield field, value


@dataclass(frozen=True)
class _Spec:
    """Model settings that decide how text is normalized and decoded."""
    model_type: int = 1
    normalization: str = ""
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    has_denormalizer: bool = False
    unk_surface: str = DEFAULT_UNK_SURFACE


_LLAMA2C_SPEC = _Spec(model_type=_BPE, normalization="identity", remove_extra_whitespaces=False)


def _read_spec(data: bytes) -> _Spec:
    """Settings of a serialized ModelProto; ValueError if it is truncated or malformed."""
    trainer = normalizer = None
    denormalizer = b""
    for field, value in _proto_fields(data):
        if field == 2:
            trainer = value
        elif field == 3:
            normalizer = value
        elif field == 5:
            denormalizer = value
    if trainer is None or normalizer is None:
        raise ValueError("no trainer_spec/normalizer_spec (a truncated model file)")
    kw = {}
    for field, value in _proto_fields(trainer):
        if field == 3:
            kw["model_type"] = value
        elif field == 44:
            kw["unk_surface"] = bytes(value).decode("utf-8")
    for field, value in _proto_fields(normalizer):
        if field == 1:
            kw["normalization"] = bytes(value).decode("utf-8")
        elif field == 3:
            kw["add_dummy_prefix"] = bool(value)
        elif field == 4:
            kw["remove_extra_whitespaces"] = bool(value)
    charsmap = dict(_proto_fields(denormalizer)).get(2, b"")
    return _Spec(has_denormalizer=bool(charsmap), **kw)


# --- llama2.c tokenizer.bin --------------------------------------------------------------------

def _parse_llama2c(data: bytes) -> tuple[list[str], list[float]]:
    """Pieces (as written) and scores of a tokenizer.bin; ValueError says what is wrong."""
    if len(data) < 4:
        raise ValueError(f"{len(data)} bytes, too short for the int32 max_token_length header")
    (max_len,) = struct.unpack_from("<i", data, 0)
    if not 0 < max_len <= _MAX_TOKEN_BYTES:
        raise ValueError(f"max_token_length {max_len} is not in [1, {_MAX_TOKEN_BYTES}]")
    pieces: list[str] = []
    scores: list[float] = []
    pos, end = 4, len(data)
    while pos < end:
        i = len(pieces)
        if pos + 8 > end:
            raise ValueError(f"token {i}: file ends at byte {end} inside its score/length header")
        score, length = struct.unpack_from("<fi", data, pos)
        pos += 8
        if not 0 < length <= max_len:
            raise ValueError(f"token {i}: length {length} is not in [1, max_token_length={max_len}]")
        if pos + length > end:
            raise ValueError(f"token {i}: file ends at byte {end}, {pos + length - end} bytes short")
        if math.isnan(score):
            raise ValueError(f"token {i}: score is NaN")
        try:
            pieces.append(data[pos:pos + length].decode("utf-8"))
        except UnicodeDecodeError:
            raise ValueError(f"token {i}: bytes are not valid UTF-8") from None
        scores.append(score)
        pos += length
    if not pieces:
        raise ValueError("no tokens after the header")
    return pieces, scores


# --- Tokenizer ---------------------------------------------------------------------------------

class Tokenizer:
    """A LLaMA tokenizer loaded from a SentencePiece ``.model`` or a llama2.c ``tokenizer.bin``.

    Attributes: ``path`` (the file) and ``format`` ("sentencepiece" or "llama2c").
    Special ids are ``None`` when the vocabulary has no such token. ``pad_id`` is the
    model's pad token if it has one, else the id of the byte piece ``<0x00>`` (the
    minllama convention; LLaMA has no pad token), else ``None``.
    """

    def __init__(self, path: PathLike):
        path = _existing_file(path, "path")
        data = path.read_bytes()
        self.path = path
        try:
            pieces, scores = _parse_llama2c(data)
        except ValueError as bin_error:
            try:
                self._init_sentencepiece(data)
            except ValueError as sp_error:
                looks_bin = len(data) >= 4 and 0 < struct.unpack_from("<i", data)[0] <= _MAX_TOKEN_BYTES
                if looks_bin:
                    raise ValueError(f"path: {str(path)!r} is a corrupt or truncated llama2.c "
                                     f"tokenizer.bin: {bin_error}") from None
                raise ValueError(f"path: {str(path)!r} is neither a SentencePiece model "
                                 f"({sp_error}) nor a llama2.c tokenizer.bin ({bin_error})") from None
        else:
            self._init_llama2c(pieces, scores)

    @classmethod
    def load(cls, path: PathLike) -> "Tokenizer":
        """Same as ``Tokenizer(path)``."""
        return cls(path)

    def _init_sentencepiece(self, data: bytes) -> None:
        try:
            spec = _read_spec(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"bad protobuf: {e}") from None
        sp = spm.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(data)
        except (RuntimeError, OSError) as e:
            raise ValueError(str(e).strip() or type(e).__name__) from None
        self.format = "sentencepiece"
        self._sp: Optional[spm.SentencePieceProcessor] = sp
        self._spec = spec
        n = sp.get_piece_size()
        self._pieces = [sp.id_to_piece(i) for i in range(n)]
        self._scores = [sp.get_score(i) for i in range(n)]
        self._kinds = [CONTROL if sp.is_control(i) else UNKNOWN if sp.is_unknown(i)
                       else BYTE if sp.is_byte(i) else UNUSED if sp.is_unused(i) else NORMAL
                       for i in range(n)]
        ids = [sp.bos_id(), sp.eos_id(), sp.unk_id(), sp.pad_id()]
        self._bos, self._eos, self._unk, pad = (i if i >= 0 else None for i in ids)
        self._finish_init(pad)

    def _init_llama2c(self, pieces: list[str], scores: list[float]) -> None:
        self.format = "llama2c"
        self._sp = None
        self._spec = _LLAMA2C_SPEC
        newline_specials = LLAMA2C_BOS in pieces or LLAMA2C_EOS in pieces
        bos_text, eos_text = (LLAMA2C_BOS, LLAMA2C_EOS) if newline_specials else (BOS_PIECE, EOS_PIECE)
        self._bos = self._eos = self._unk = pad = None
        self._pieces, self._kinds = [], []
        for i, raw in enumerate(pieces):
            kind = NORMAL
            if raw == bos_text and self._bos is None:
                self._bos, piece, kind = i, BOS_PIECE, CONTROL
            elif raw == eos_text and self._eos is None:
                self._eos, piece, kind = i, EOS_PIECE, CONTROL
            else:
                piece = raw.replace(" ", SPACE)
                if piece == UNK_PIECE and self._unk is None:
                    self._unk, kind = i, UNKNOWN
                elif piece == PAD_PIECE and pad is None:
                    pad, kind = i, CONTROL
                elif _BYTE_PIECE.fullmatch(piece):
                    kind = BYTE
            self._pieces.append(piece)
            self._kinds.append(kind)
        self._scores = list(scores)
        self._finish_init(pad)

    def _finish_init(self, pad: Optional[int]) -> None:
        self._piece_ids: dict[str, int] = {}
        self._merge_ids: dict[str, int] = {}
        self._byte_value: dict[int, int] = {}
        byte_ids: dict[int, int] = {}
        for i, (piece, kind) in enumerate(zip(self._pieces, self._kinds)):
            self._piece_ids.setdefault(piece, i)
            if kind in _MERGEABLE:
                self._merge_ids.setdefault(piece, i)
            elif kind == BYTE:
                value = int(piece[3:5], 16)
                self._byte_value[i] = value
                byte_ids.setdefault(value, i)
        self._byte_ids = [byte_ids[b] for b in range(256)] if len(byte_ids) == 256 else None
        if pad is None and 0 in byte_ids:
            pad = byte_ids[0]
        self._pad = pad

    # --- properties ---

    @property
    def vocab_size(self) -> int:
        """Number of tokens."""
        return len(self._pieces)

    def __len__(self) -> int:
        return len(self._pieces)

    @property
    def bos_id(self) -> Optional[int]:
        """Beginning-of-sequence id (1 in LLaMA)."""
        return self._bos

    @property
    def eos_id(self) -> Optional[int]:
        """End-of-sequence id (2 in LLaMA)."""
        return self._eos

    @property
    def unk_id(self) -> Optional[int]:
        """Unknown-token id (0 in LLaMA)."""
        return self._unk

    @property
    def pad_id(self) -> Optional[int]:
        """The model's pad id, else the id of ``<0x00>``, else None."""
        return self._pad

    @property
    def byte_fallback(self) -> bool:
        """Whether characters outside the vocabulary become ``<0xXX>`` byte tokens."""
        return self._byte_ids is not None

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, format={self.format!r}, vocab_size={self.vocab_size})"

    def id_to_piece(self, token_id: int) -> str:
        """The piece of a token id (with ``"▁"`` for spaces, bos as ``"<s>"``)."""
        return self._pieces[self._check_id(token_id, "token_id")]

    def piece_to_id(self, piece: str) -> int:
        """The id of a piece; ValueError if it is not in the vocabulary."""
        if not isinstance(piece, str):
            raise TypeError(f"piece: expected str, got {type(piece).__name__}")
        try:
            return self._piece_ids[piece]
        except KeyError:
            raise ValueError(f"piece: {piece!r} is not in the vocabulary") from None

    def _check_id(self, token_id: object, name: str) -> int:
        if not isinstance(token_id, int) or isinstance(token_id, bool):
            try:  # numpy integers and 0-d integer tensors convert; bools and floats do not
                if isinstance(token_id, bool) or type(token_id).__name__ == "bool_":
                    raise TypeError
                token_id = operator.index(token_id)
            except TypeError:
                raise TypeError(f"{name}: expected an int token id, got {type(token_id).__name__}") from None
        if not 0 <= token_id < len(self._pieces):
            raise ValueError(f"{name}: token id {token_id} is out of range [0, {len(self._pieces)})")
        return token_id

    # --- encoding ---

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids of `text`, with bos first and eos last when asked for."""
        if not isinstance(text, str):
            raise TypeError(f"text: expected str, got {type(text).__name__}")
        self._specials([], bos, eos)
        return self._specials(self._encode_batch([text], "text")[0], bos, eos)

    def encode_batch(self, texts: Sequence[str], bos: bool = True, eos: bool = False,
                     progress: bool = False) -> list[list[int]]:
        """``encode`` of each text (in parallel for a SentencePiece model)."""
        if isinstance(texts, (str, bytes)) or not isinstance(texts, Iterable):
            raise TypeError(f"texts: expected a sequence of str, got {type(texts).__name__}")
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"texts[{i}]: expected str, got {type(t).__name__}")
        self._specials([], bos, eos)  # argument checks before any work
        chunk = 4096 if self._sp is not None else 256
        out: list[list[int]] = []
        with tqdm(total=len(texts), desc="encode", unit="text", disable=not progress) as bar:
            for start in range(0, len(texts), chunk):
                part = texts[start:start + chunk]
                for offset, ids in enumerate(self._encode_batch(part, "texts", start)):
                    out.append(self._specials(ids, bos, eos))
                bar.update(len(part))
        return out

    def _encode_batch(self, texts: list[str], name: str, start: int = 0) -> list[list[int]]:
        for i, t in enumerate(texts):
            if not t.isascii():
                try:
                    t.encode("utf-8")
                except UnicodeEncodeError as e:
                    where = name if name == "text" else f"{name}[{start + i}]"
                    raise ValueError(f"{where}: not encodable as UTF-8 ({e.reason} at {e.start})") from None
        if self._sp is None:
            return [self._bpe_encode(t) for t in texts]
        if len(texts) == 1:  # the batch call starts threads: slower for one text
            return [self._sp.encode(texts[0])]
        return self._sp.encode(texts)

    def _specials(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
        for name, flag, token in (("bos", bos, self._bos), ("eos", eos, self._eos)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name}: expected bool, got {type(flag).__name__}")
            if flag and token is None:
                raise ValueError(f"{name}: this tokenizer has no {name} token; pass {name}=False")
        return ([self._bos] if bos else []) + ids + ([self._eos] if eos else [])

    def _bpe_encode(self, text: str) -> list[int]:
        """SentencePiece's BPE on LLaMA-normalized text: merge the best-scoring adjacent pair,
        leftmost first on ties, until no adjacent pair forms a piece of the vocabulary."""
        if not text:
            return []
        symbols = list(SPACE + text.replace(" ", SPACE))
        n = len(symbols)
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        prv = list(range(-1, n - 1))
        merges, scores = self._merge_ids, self._scores
        heap = []
        for i in range(n - 1):
            merged = symbols[i] + symbols[i + 1]
            pid = merges.get(merged)
            if pid is not None:
                heap.append((-scores[pid], i, i + 1, merged))
        heapq.heapify(heap)

        def push(left: int, right: int) -> None:
            merged = symbols[left] + symbols[right]
            pid = merges.get(merged)
            if pid is not None:
                heapq.heappush(heap, (-scores[pid], left, right, merged))

        while heap:
            _, left, right, merged = heapq.heappop(heap)
            if nxt[left] != right or symbols[left] + symbols[right] != merged:
                continue  # stale: one side was merged since this pair was queued
            symbols[left], symbols[right] = merged, ""
            after = nxt[right]
            nxt[left] = after
            if after != -1:
                prv[after] = left
                push(left, after)
            if prv[left] != -1:
                push(prv[left], left)

        ids: list[int] = []
        prev_unknown = False
        i = 0
        while i != -1:
            piece = symbols[i]
            pid = merges.get(piece)
            if pid is not None:
                ids.append(pid)
                prev_unknown = False
            elif self._byte_ids is not None:
                ids.extend(self._byte_ids[b] for b in piece.encode("utf-8"))
            elif self._unk is None:
                raise ValueError(f"text: {piece!r} is not in the vocabulary, which has neither "
                                 "byte tokens nor <unk>")
            elif not prev_unknown:  # a run of unknown characters is one <unk>, as in SentencePiece
                ids.append(self._unk)
                prev_unknown = True
            i = nxt[i]
        return ids

    # --- decoding ---

    def decode(self, ids: Iterable[int]) -> str:
        """Text of token ids; control tokens (bos/eos) decode to nothing."""
        ids = self._check_ids(ids, "ids")
        if self._sp is not None:
            return self._sp.decode(ids)
        stream = StreamDecoder(self)
        return "".join([stream.push(i) for i in ids]) + stream.flush()

    def _check_ids(self, ids: object, name: str) -> list[int]:
        if isinstance(ids, (str, bytes)):
            raise TypeError(f"{name}: expected a sequence of int token ids, got {type(ids).__name__}")
        if hasattr(ids, "tolist"):  # torch tensors, numpy arrays
            ids = ids.tolist()
        if isinstance(ids, int):
            raise TypeError(f"{name}: expected a sequence of int token ids, got a single int")
        if not isinstance(ids, Iterable):
            raise TypeError(f"{name}: expected a sequence of int token ids, got {type(ids).__name__}")
        return [self._check_id(i, f"{name}[{k}]") for k, i in enumerate(ids)]

    def stream(self) -> "StreamDecoder":
        """A decoder fed one id at a time, for printing text while it is generated."""
        return StreamDecoder(self)

    # --- saving ---

    def save(self, path: PathLike) -> Path:
        """Write the tokenizer in its own format (atomically): the SentencePiece model as is, or a
        tokenizer.bin for a tokenizer loaded from one. Returns the path."""
        path = _output_file(path, "path")
        if self._sp is None:
            return self.save_llama2c(path)
        _atomic_write_bytes(path, self._sp.serialized_model_proto())
        return path

    def save_llama2c(self, path: PathLike) -> Path:
        """Write the vocabulary as a llama2.c ``tokenizer.bin`` (atomically); returns the path."""
        path = _output_file(path, "path")
        spec = self._spec
        lossy = []
        if spec.model_type != _BPE:
            lossy.append(f"model type {_MODEL_TYPES.get(spec.model_type, spec.model_type)}")
        if spec.normalization not in ("identity", ""):
            lossy.append(f"normalization {spec.normalization!r}")
        if spec.remove_extra_whitespaces:
            lossy.append("remove_extra_whitespaces")
        if not spec.add_dummy_prefix:
            lossy.append("no add_dummy_prefix")
        if lossy:
            warnings.warn(f"{self.path}: a tokenizer.bin keeps only pieces and scores, so its encoder "
                          f"assumes a BPE model with LLaMA's normalization; this model has "
                          f"{', '.join(lossy)}, and some text will encode differently",
                          UserWarning, stacklevel=2)
        tokens = []
        for i, piece in enumerate(self._pieces):
            if i == self._bos:
                piece = LLAMA2C_BOS
            elif i == self._eos:
                piece = LLAMA2C_EOS
            else:
                piece = piece.replace(SPACE, " ")
            tokens.append(piece.encode("utf-8"))
        out = io.BytesIO()
        out.write(struct.pack("<i", max(len(t) for t in tokens)))
        for token, score in zip(tokens, self._scores):
            out.write(struct.pack("<fi", score, len(token)))
            out.write(token)
        _atomic_write_bytes(path, out.getvalue())
        return path


class StreamDecoder:
    """Incremental ``Tokenizer.decode``: ``push`` one id, get the text it completes.

    Byte-fallback tokens are held until they form a whole UTF-8 character (bytes that
    cannot become one decode to U+FFFD, as in SentencePiece), and the first piece's
    ``"▁"`` is dropped like ``decode`` drops it. The pushed results followed by
    ``flush()`` concatenate to ``decode(all ids)``.
    """

    def __init__(self, tokenizer: Tokenizer):
        if not isinstance(tokenizer, Tokenizer):
            raise TypeError(f"tokenizer: expected a Tokenizer, got {type(tokenizer).__name__}")
        if tokenizer._spec.has_denormalizer:
            raise ValueError(f"tokenizer: {tokenizer.path} has a denormalizer, which streaming "
                             "decode does not support")
        self._tok = tokenizer
        spec = tokenizer._spec
        self._strip_first_space = spec.add_dummy_prefix or spec.remove_extra_whitespaces
        self._remove_extra = spec.remove_extra_whitespaces
        self.reset()

    def reset(self) -> None:
        """Start a new sequence."""
        self._pending = bytearray()
        self._at_start = True  # no visible text yet: a leading "▁" may still be dropped
        self._space_dropped = False
        self._has_text = False

    def push(self, token_id: int) -> str:
        """Add one id; returns the text completed by it (often one piece, maybe "")."""
        tok = self._tok
        token_id = tok._check_id(token_id, "token_id")
        kind = tok._kinds[token_id]
        if kind == BYTE:
            self._pending.append(tok._byte_value[token_id])
            return self._drain(final=False)
        out = self._drain(final=True)
        if self._space_dropped or self._has_text:
            self._at_start = False
        self._space_dropped = False
        if kind == CONTROL:
            piece = ""
        elif kind == UNKNOWN:
            piece = tok._spec.unk_surface
        else:
            piece = tok._pieces[token_id]
            if self._at_start and self._strip_first_space and piece.startswith(SPACE):
                piece = piece[1:]
                # With remove_extra_whitespaces every leading "▁" goes, not only the first.
                self._space_dropped = not self._remove_extra
            piece = piece.replace(SPACE, " ")
        out += piece
        self._has_text = self._has_text or bool(out)
        return out

    def flush(self) -> str:
        """End of the sequence: the text of bytes still held (U+FFFD for an incomplete one)."""
        return self._drain(final=True)

    def _drain(self, final: bool) -> str:
        buf = self._pending
        out = []
        i, n = 0, len(buf)
        while i < n:
            lead = buf[i]
            size = 1 if lead < 0x80 else 2 if lead & 0xE0 == 0xC0 else 3 if lead & 0xF0 == 0xE0 \
                else 4 if lead & 0xF8 == 0xF0 else 0
            trail_ok = all(b & 0xC0 == 0x80 for b in buf[i + 1:i + size])
            if size == 0 or not trail_ok:
                out.append(REPLACEMENT)
                i += 1
                continue
            if i + size > n and not final:
                break  # wait for the rest of the character
            char = _utf8_char(buf[i:i + size]) if i + size <= n else None
            if char is None:
                out.append(REPLACEMENT)
                i += 1
            else:
                out.append(char)
                i += size
        del buf[:i]
        text = "".join(out)
        self._has_text = self._has_text or bool(text)
        return text


def _utf8_char(seq: bytes) -> Optional[str]:
    """The character of one complete UTF-8 sequence, or None if it is overlong/out of range."""
    if len(seq) == 1:
        return chr(seq[0])
    cp = seq[0] & (0x7F >> len(seq))
    for b in seq[1:]:
        cp = (cp << 6) | (b & 0x3F)
    minimum = (0, 0, 0x80, 0x800, 0x10000)[len(seq)]
    if cp < minimum or cp > 0x10FFFF or 0xD800 <= cp <= 0xDFFF:
        return None
    return chr(cp)


# --- training and export ---------------------------------------------------------------------

def _read_lines(paths: list[Path]) -> Iterator[str]:
    """Non-empty lines of UTF-8 text files, with a progress bar over their bytes."""
    total = sum(p.stat().st_size for p in paths)
    with tqdm(total=total, desc="reading", unit="B", unit_scale=True, leave=False) as bar:
        for path in paths:
            with open(path, "rb") as f:
                for number, raw in enumerate(f, 1):
                    bar.update(len(raw))
                    try:
                        line = raw.decode("utf-8").rstrip("\r\n")
                    except UnicodeDecodeError:
                        raise ValueError(f"inputs: {str(path)!r} line {number} is not valid UTF-8") from None
                    if line:
                        yield line


def train(inputs: Sequence[PathLike], vocab_size: int, out_dir: PathLike, *, model_type: str = "bpe",
          character_coverage: float = 0.99995, input_sentence_size: int = 0,
          num_threads: Optional[int] = None, quiet: bool = False) -> Tokenizer:
    """Train a LLaMA-style SentencePiece BPE model on text files (one sentence a line).

    Settings as LLaMA's: byte fallback, unk/bos/eos = 0/1/2 and no pad, split digits,
    identity normalization, a dummy "▁" prefix, whitespace kept as is.
    Writes ``out_dir/tokenizer.model`` and ``out_dir/tokenizer.bin`` (llama2.c).
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    if not isinstance(inputs, Iterable):
        raise TypeError(f"inputs: expected a list of paths, got {type(inputs).__name__}")
    paths = [_existing_file(p, "inputs") for p in inputs]
    if not paths:
        raise ValueError("inputs: expected at least one text file")
    minimum = 3 + 256 + 1
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise TypeError(f"vocab_size: expected int, got {type(vocab_size).__name__}")
    if vocab_size < minimum:
        raise ValueError(f"vocab_size: expected at least {minimum} (3 special and 256 byte tokens "
                         f"plus the characters), got {vocab_size}")
    if model_type != "bpe":
        raise ValueError(f"model_type: only 'bpe' is supported (LLaMA's), got {model_type!r}")
    if not isinstance(character_coverage, (int, float)) or not 0 < character_coverage <= 1:
        raise ValueError(f"character_coverage: expected a number in (0, 1], got {character_coverage!r}")
    if isinstance(input_sentence_size, bool) or not isinstance(input_sentence_size, int) \
            or input_sentence_size < 0:
        raise ValueError(f"input_sentence_size: expected an int >= 0 (0: all), got {input_sentence_size!r}")
    if num_threads is None:
        num_threads = os.cpu_count() or 1
    if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
        raise ValueError(f"num_threads: expected an int >= 1, got {num_threads!r}")
    out = _as_path(out_dir, "out_dir")
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir: {str(out)!r} exists and is not a directory")

    lines = _read_lines(paths)
    first = next(lines, None)
    if first is None:
        raise ValueError(f"inputs: no text in {', '.join(map(str, paths))}")

    read_errors: list[ValueError] = []

    def sentences() -> Iterator[str]:
        try:
            yield first
            yield from lines
        except ValueError as e:  # raised below: SentencePiece would wrap it in its own error
            read_errors.append(e)

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(), model_writer=model,
            model_type="bpe", vocab_size=vocab_size, character_coverage=character_coverage,
            input_sentence_size=input_sentence_size, shuffle_input_sentence=True,
            byte_fallback=True, split_digits=True, split_by_unicode_script=True,
            split_by_number=True, split_by_whitespace=True, max_sentencepiece_length=16,
            allow_whitespace_only_pieces=True, normalization_rule_name="identity",
            add_dummy_prefix=True, remove_extra_whitespaces=False,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=num_threads,
            minloglevel=2 if quiet else 0)
    except RuntimeError as e:
        if read_errors:
            raise read_errors[0] from None
        raise ValueError(f"training failed (vocab_size={vocab_size}): {str(e).strip()}") from None
    if read_errors:
        raise read_errors[0]
    out.mkdir(parents=True, exist_ok=True)
    model_path = out / "tokenizer.model"
    _atomic_write_bytes(model_path, model.getvalue())
    tokenizer = Tokenizer(model_path)
    tokenizer.save_llama2c(out / "tokenizer.bin")
    return tokenizer


def export_llama2c(model: PathLike, out: PathLike) -> Path:
    """Write a tokenizer (``.model`` or ``.bin``) as a llama2.c ``tokenizer.bin``."""
    return Tokenizer(_existing_file(model, "model")).save_llama2c(_output_file(out, "out"))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line: ``train`` and ``export`` (see the module docstring)."""
    parser = argparse.ArgumentParser(
        prog="python -m llama.tokenizer",
        description="Train a LLaMA-style SentencePiece tokenizer, or export one as a llama2.c tokenizer.bin.")
    commands = parser.add_subparsers(dest="command", required=True)
    t = commands.add_parser("train", help="train a LLaMA-style BPE SentencePiece model")
    t.add_argument("--input", nargs="+", required=True, metavar="FILE", help="UTF-8 text, a sentence a line")
    t.add_argument("--vocab-size", type=int, required=True, metavar="N", help="tokens, at least 260")
    t.add_argument("--out", required=True, metavar="DIR", help="gets tokenizer.model and tokenizer.bin")
    t.add_argument("--model-type", choices=["bpe"], default="bpe")
    t.add_argument("--character-coverage", type=float, default=0.99995, metavar="F",
                   help="share of characters given their own token; rarer ones become bytes (default: 0.99995)")
    t.add_argument("--input-sentence-size", type=int, default=0, metavar="N",
                   help="train on a random sample of N lines (0: all)")
    t.add_argument("--num-threads", type=int, default=None, metavar="N", help="default: all cores")
    t.add_argument("--quiet", action="store_true", help="no SentencePiece log")
    e = commands.add_parser("export", help="write a llama2.c tokenizer.bin")
    e.add_argument("--model", required=True, metavar="FILE", help="tokenizer.model (or .bin)")
    e.add_argument("--out", required=True, metavar="FILE")
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if args.command == "train":
                tok = train(args.input, args.vocab_size, args.out, model_type=args.model_type,
                            character_coverage=args.character_coverage,
                            input_sentence_size=args.input_sentence_size,
                            num_threads=args.num_threads, quiet=args.quiet)
                print(f"wrote {tok.path} and {tok.path.with_name('tokenizer.bin')} "
                      f"({tok.vocab_size} tokens)")
            else:
                path = export_llama2c(args.model, args.out)
                print(f"wrote {path}")
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        for w in caught:
            print(f"warning: {w.message}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
