"""SentencePiece tokenizer for LLaMA models, with llama2.c ``tokenizer.bin`` support.

``Tokenizer(path)`` reads either file format, told apart by content, and encodes and
decodes through the ``sentencepiece`` library:

* a SentencePiece ``.model`` (protobuf), loaded as is;
* a llama2.c ``tokenizer.bin`` (layout in ``llama.tokenizer.llama2c``), which keeps only
  pieces and scores. Loading rebuilds a SentencePiece BPE model from them: ``<unk>`` is the
  unknown piece, bos/eos (and ``<pad>``) are control pieces, ``<0xNN>`` are byte pieces with
  byte fallback when all 256 are there, every other piece is normal, and the normalizer is
  LLaMA's (identity normalization, ``add_dummy_prefix``, no removal of extra whitespace).

So a ``tokenizer.bin`` of a BPE model trained with LLaMA's settings (byte fallback or not)
encodes to the ``.model``'s ids and decodes to its text: the tests check models trained
here, and LLaMA's own tokenizer where its files are at hand, on every line of botchan.txt,
whole files and edge cases.
What the file cannot carry, and so where the ids or the text can differ:

* normalization rules: a model with e.g. ``nmt_nfkc`` or ``remove_extra_whitespaces``
  (SentencePiece's defaults) encodes text that those rules would change (runs of spaces,
  leading/trailing spaces, NFKC characters such as full-width digits, ligatures or a
  byte-order mark) differently; text they leave alone gets the same ids. Decoding differs
  only for ids that start with several whitespace-only pieces. Likewise a model without
  ``add_dummy_prefix``, with ``treat_whitespace_as_suffix``, or with a denormalizer;
* piece types, rebuilt from names only: user-defined symbols are merged like ordinary
  pieces rather than matched first, unused pieces are not re-segmented, and control
  symbols other than ``<s>``, ``</s>`` and ``<pad>`` are ordinary pieces (they decode to
  their text, not to nothing). ``<0xNN>`` pieces in a file that lacks some of the 256 are
  ordinary pieces too (they decode to their text, not to a byte; such a file has no
  ``<0x00>`` pad id);
* the text ``<unk>`` decodes to: always SentencePiece's default ``" ⁇ "``;
* unigram (and word, char) models: the rebuilt model is BPE, whose merge order is not
  unigram's Viterbi segmentation.

SentencePiece must accept the rebuilt model: a ``tokenizer.bin`` with neither an ``<unk>``
piece nor all 256 byte pieces, or with a piece written twice (among the normal, or among the
special pieces), raises ValueError naming the file. llama2.c's exports of SentencePiece
models always have an ``<unk>`` and never a repeated piece.

``save_llama2c`` warns when the model is not BPE or normalizes differently.

Command line (``llama/tokenizer/__main__.py``)::

    python -m llama.tokenizer train --input FILE [FILE ...] --vocab-size N --out DIR
    python -m llama.tokenizer export --model tokenizer.model --out tokenizer.bin
"""
from __future__ import annotations

import codecs
import io
import operator
import os
import warnings
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence, Union

import sentencepiece as spm
from google.protobuf.message import DecodeError
from tqdm import tqdm

from ..atomic import write_bytes
from .llama2c import (ModelProto, llama2c_bytes, llama2c_model_proto, looks_like_llama2c,
                      model_pb2, parse_llama2c)

__all__ = ["Tokenizer", "StreamDecoder", "train", "export_llama2c"]

PathLike = Union[str, "os.PathLike[str]"]

SPACE = "\u2581"  # "▁", SentencePiece's whitespace symbol
REPLACEMENT = "\ufffd"


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


def _output_file(value: object, name: str) -> Path:
    path = _as_path(value, name)
    if path.is_dir():
        raise ValueError(f"{name}: {str(path)!r} is a directory, expected a file path")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{name}: directory {str(path.parent)!r} does not exist")
    return path


def _load_processor(serialized: bytes) -> spm.SentencePieceProcessor:
    sp = spm.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(serialized)
    except (RuntimeError, OSError) as e:
        raise ValueError(str(e).strip() or type(e).__name__) from None
    return sp


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
            pieces, scores = parse_llama2c(data)
        except ValueError as bin_error:
            try:
                proto = self._parse_model(data)
                sp = _load_processor(data)
            except ValueError as sp_error:
                if looks_like_llama2c(data):
                    raise ValueError(f"path: {str(path)!r} is a corrupt or truncated llama2.c "
                                     f"tokenizer.bin: {bin_error}") from None
                raise ValueError(f"path: {str(path)!r} is neither a SentencePiece model "
                                 f"({sp_error}) nor a llama2.c tokenizer.bin ({bin_error})") from None
            self.format = "sentencepiece"
        else:
            proto = llama2c_model_proto(pieces, scores)
            try:
                sp = _load_processor(proto.SerializeToString())
            except ValueError as e:
                raise ValueError(f"path: {str(path)!r} is a llama2.c tokenizer.bin whose pieces "
                                 f"do not form a SentencePiece model: {e}") from None
            self.format = "llama2c"
        self._sp = sp
        self._proto = proto
        self._size = sp.get_piece_size()
        ids = [sp.bos_id(), sp.eos_id(), sp.unk_id(), sp.pad_id()]
        self._bos, self._eos, self._unk, pad = (i if i >= 0 else None for i in ids)
        if pad is None:
            zero = sp.piece_to_id("<0x00>")
            pad = zero if sp.is_byte(zero) else None
        self._pad = pad

    @staticmethod
    def _parse_model(data: bytes) -> ModelProto:
        proto = ModelProto()
        try:
            proto.ParseFromString(data)
        except (DecodeError, ValueError) as e:
            raise ValueError(f"bad protobuf: {e}") from None
        if not (proto.HasField("trainer_spec") and proto.HasField("normalizer_spec")):
            raise ValueError("no trainer_spec/normalizer_spec (a truncated model file)")
        return proto

    @classmethod
    def load(cls, path: PathLike) -> "Tokenizer":
        """Same as ``Tokenizer(path)``."""
        return cls(path)

    # --- properties ---

    @property
    def vocab_size(self) -> int:
        """Number of tokens."""
        return self._size

    def __len__(self) -> int:
        return self._size

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
        return self._proto.trainer_spec.byte_fallback

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, format={self.format!r}, vocab_size={self.vocab_size})"

    def id_to_piece(self, token_id: int) -> str:
        """The piece of a token id (with ``"▁"`` for spaces, bos as ``"<s>"``)."""
        return self._sp.id_to_piece(self._check_id(token_id, "token_id"))

    def piece_to_id(self, piece: str) -> int:
        """The id of a piece; ValueError if it is not in the vocabulary."""
        if not isinstance(piece, str):
            raise TypeError(f"piece: expected str, got {type(piece).__name__}")
        token_id = self._sp.piece_to_id(piece)  # the unknown id for a piece it lacks
        if self._sp.id_to_piece(token_id) != piece:
            raise ValueError(f"piece: {piece!r} is not in the vocabulary")
        return token_id

    def _check_id(self, token_id: object, name: str) -> int:
        if not isinstance(token_id, int) or isinstance(token_id, bool):
            try:  # numpy integers and 0-d integer tensors convert; bools and floats do not
                if isinstance(token_id, bool) or type(token_id).__name__ == "bool_":
                    raise TypeError
                token_id = operator.index(token_id)
            except TypeError:
                raise TypeError(f"{name}: expected an int token id, got {type(token_id).__name__}") from None
        if not 0 <= token_id < self._size:
            raise ValueError(f"{name}: token id {token_id} is out of range [0, {self._size})")
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
        """``encode`` of each text (in parallel)."""
        if isinstance(texts, (str, bytes)) or not isinstance(texts, Iterable):
            raise TypeError(f"texts: expected a sequence of str, got {type(texts).__name__}")
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"texts[{i}]: expected str, got {type(t).__name__}")
        self._specials([], bos, eos)  # argument checks before any work
        chunk = 4096
        out: list[list[int]] = []
        with tqdm(total=len(texts), desc="encode", unit="text", disable=not progress) as bar:
            for start in range(0, len(texts), chunk):
                part = texts[start:start + chunk]
                for ids in self._encode_batch(part, "texts", start):
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

    # --- decoding ---

    def decode(self, ids: Iterable[int]) -> str:
        """Text of token ids; control tokens (bos/eos) decode to nothing."""
        return self._sp.decode(self._check_ids(ids, "ids"))

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
        if self.format == "llama2c":
            return self.save_llama2c(path)
        write_bytes(path, self._sp.serialized_model_proto())
        return path

    def save_llama2c(self, path: PathLike) -> Path:
        """Write the vocabulary as a llama2.c ``tokenizer.bin`` (atomically); returns the path."""
        path = _output_file(path, "path")
        trainer, normalizer = self._proto.trainer_spec, self._proto.normalizer_spec
        lossy = []
        if trainer.model_type != model_pb2.TrainerSpec.BPE:
            try:
                model_type = model_pb2.TrainerSpec.ModelType.Name(trainer.model_type).lower()
            except ValueError:
                model_type = trainer.model_type
            lossy.append(f"model type {model_type}")
        if normalizer.name not in ("identity", ""):
            lossy.append(f"normalization {normalizer.name!r}")
        if normalizer.remove_extra_whitespaces:
            lossy.append("remove_extra_whitespaces")
        if not normalizer.add_dummy_prefix:
            lossy.append("no add_dummy_prefix")
        if lossy:
            warnings.warn(f"{self.path}: a tokenizer.bin keeps only pieces and scores, so its encoder "
                          f"assumes a BPE model with LLaMA's normalization; this model has "
                          f"{', '.join(lossy)}, and some text will encode differently",
                          UserWarning, stacklevel=2)
        sp, n = self._sp, self._size
        data = llama2c_bytes([sp.id_to_piece(i) for i in range(n)], [sp.get_score(i) for i in range(n)],
                             self._bos, self._eos)
        write_bytes(path, data)
        return path


def _replace_each_byte(error: UnicodeError) -> tuple[str, int]:
    """Decoding error handler: one U+FFFD for the first byte that forms no character, then
    go on with the next byte (as SentencePiece decodes byte pieces)."""
    if not isinstance(error, UnicodeDecodeError):
        raise error
    return REPLACEMENT, error.start + 1


_BYTEWISE_REPLACE = "llama.tokenizer.replace-each-byte"
codecs.register_error(_BYTEWISE_REPLACE, _replace_each_byte)
_Utf8Decoder = codecs.getincrementaldecoder("utf-8")


class StreamDecoder:
    """Incremental ``Tokenizer.decode``: ``push`` one id, get the text it completes.

    Byte-fallback tokens are held until they form a whole UTF-8 character (each byte that
    cannot become one decodes to U+FFFD, as in SentencePiece), and the first piece's
    ``"▁"`` is dropped like ``decode`` drops it. The pushed results followed by
    ``flush()`` concatenate to ``decode(all ids)``.
    """

    def __init__(self, tokenizer: Tokenizer):
        if not isinstance(tokenizer, Tokenizer):
            raise TypeError(f"tokenizer: expected a Tokenizer, got {type(tokenizer).__name__}")
        proto = tokenizer._proto
        if proto.denormalizer_spec.precompiled_charsmap:
            raise ValueError(f"tokenizer: {tokenizer.path} has a denormalizer, which streaming "
                             "decode does not support")
        self._tok = tokenizer
        normalizer = proto.normalizer_spec
        self._strip_first_space = normalizer.add_dummy_prefix or normalizer.remove_extra_whitespaces
        self._remove_extra = normalizer.remove_extra_whitespaces
        self._unk_surface = proto.trainer_spec.unk_surface
        self._bytes = _Utf8Decoder(errors=_BYTEWISE_REPLACE)
        self.reset()

    def reset(self) -> None:
        """Start a new sequence."""
        self._bytes.reset()
        self._at_start = True  # no visible text yet: a leading "▁" may still be dropped
        self._space_dropped = False
        self._has_text = False

    def push(self, token_id: int) -> str:
        """Add one id; returns the text completed by it (often one piece, maybe "")."""
        tok = self._tok
        token_id = tok._check_id(token_id, "token_id")
        sp = tok._sp
        if sp.is_byte(token_id):
            return self._decode_bytes(bytes([int(sp.id_to_piece(token_id)[3:5], 16)]), final=False)
        out = self._decode_bytes(b"", final=True)
        if self._space_dropped or self._has_text:
            self._at_start = False
        self._space_dropped = False
        if sp.is_control(token_id):
            piece = ""
        elif sp.is_unknown(token_id):
            piece = self._unk_surface
        else:
            piece = sp.id_to_piece(token_id)
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
        return self._decode_bytes(b"", final=True)

    def _decode_bytes(self, data: bytes, final: bool) -> str:
        text = self._bytes.decode(data, final)
        if final:
            self._bytes.reset()
        self._has_text = self._has_text or bool(text)
        return text


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
    write_bytes(model_path, model.getvalue())
    tokenizer = Tokenizer(model_path)
    tokenizer.save_llama2c(out / "tokenizer.bin")
    return tokenizer


def export_llama2c(model: PathLike, out: PathLike) -> Path:
    """Write a tokenizer (``.model`` or ``.bin``) as a llama2.c ``tokenizer.bin``."""
    return Tokenizer(_existing_file(model, "model")).save_llama2c(_output_file(out, "out"))
