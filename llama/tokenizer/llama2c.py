"""The llama2.c ``tokenizer.bin`` format, and the SentencePiece model rebuilt from one.

Layout (little-endian): an int32 ``max_token_length``, then per token a float32 score, an
int32 byte length and the piece's UTF-8 bytes. llama2.c's export writes ``"▁"`` as ``" "``
and bos/eos as ``"\\n<s>\\n"``/``"\\n</s>\\n"``; reading undoes that.
"""
from __future__ import annotations

import io
import math
import re
import struct
from typing import Optional, Sequence

from sentencepiece import sentencepiece_model_pb2 as model_pb2

ModelProto = model_pb2.ModelProto
Piece = ModelProto.SentencePiece

SPACE = "\u2581"  # "▁", SentencePiece's whitespace symbol
BOS_PIECE, EOS_PIECE, UNK_PIECE, PAD_PIECE = "<s>", "</s>", "<unk>", "<pad>"
LLAMA2C_BOS, LLAMA2C_EOS = "\n<s>\n", "\n</s>\n"
BYTE_PIECE = re.compile(r"<0x([0-9A-F]{2})>")
MAX_TOKEN_BYTES = 1 << 16  # sanity bound for a tokenizer.bin's max_token_length


def looks_like_llama2c(data: bytes) -> bool:
    """Whether `data` starts with a plausible max_token_length header."""
    return len(data) >= 4 and 0 < struct.unpack_from("<i", data)[0] <= MAX_TOKEN_BYTES


def parse_llama2c(data: bytes) -> tuple[list[str], list[float]]:
    """Pieces (as written) and scores of a tokenizer.bin; ValueError says what is wrong."""
    if len(data) < 4:
        raise ValueError(f"{len(data)} bytes, too short for the int32 max_token_length header")
    (max_len,) = struct.unpack_from("<i", data, 0)
    if not 0 < max_len <= MAX_TOKEN_BYTES:
        raise ValueError(f"max_token_length {max_len} is not in [1, {MAX_TOKEN_BYTES}]")
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


def llama2c_model_proto(pieces: Sequence[str], scores: Sequence[float]) -> ModelProto:
    """A SentencePiece BPE model of a tokenizer.bin's pieces (as written) and scores.

    Piece types come from the names: bos/eos (the first ``"\\n<s>\\n"``/``"\\n</s>\\n"``, or
    ``"<s>"``/``"</s>"`` in a file without the newline forms) and the first ``<pad>`` are
    control pieces, the first ``<unk>`` is the unknown piece, ``<0xNN>`` are byte pieces when
    all 256 are there (byte fallback), and every other piece is normal. The normalizer is
    LLaMA's: identity, a dummy ``"▁"`` prefix, whitespace kept as is.
    """
    newline_specials = LLAMA2C_BOS in pieces or LLAMA2C_EOS in pieces
    bos_text, eos_text = (LLAMA2C_BOS, LLAMA2C_EOS) if newline_specials else (BOS_PIECE, EOS_PIECE)
    texts = [p if p in (bos_text, eos_text) else p.replace(" ", SPACE) for p in pieces]
    byte_fallback = len({t for t in texts if BYTE_PIECE.fullmatch(t)}) == 256
    special: dict[str, Optional[int]] = {"bos": None, "eos": None, "unk": None, "pad": None}
    proto = ModelProto()
    for i, (text, score) in enumerate(zip(texts, scores)):
        kind = Piece.NORMAL
        if text == bos_text and special["bos"] is None:
            special["bos"], text, kind = i, BOS_PIECE, Piece.CONTROL
        elif text == eos_text and special["eos"] is None:
            special["eos"], text, kind = i, EOS_PIECE, Piece.CONTROL
        elif text == UNK_PIECE and special["unk"] is None:
            special["unk"], kind = i, Piece.UNKNOWN
        elif text == PAD_PIECE and special["pad"] is None:
            special["pad"], kind = i, Piece.CONTROL
        elif byte_fallback and BYTE_PIECE.fullmatch(text):
            kind = Piece.BYTE
        proto.pieces.add(piece=text, score=score, type=kind)
    trainer = proto.trainer_spec
    trainer.model_type = model_pb2.TrainerSpec.BPE
    trainer.vocab_size = len(texts)
    trainer.byte_fallback = byte_fallback
    for name, token_id in special.items():
        setattr(trainer, f"{name}_id", -1 if token_id is None else token_id)
    normalizer = proto.normalizer_spec
    normalizer.name = "identity"
    normalizer.add_dummy_prefix = True
    normalizer.remove_extra_whitespaces = False
    normalizer.escape_whitespaces = True
    return proto


def llama2c_bytes(pieces: Sequence[str], scores: Sequence[float], bos: Optional[int],
                  eos: Optional[int]) -> bytes:
    """A tokenizer.bin of SentencePiece pieces (with ``"▁"``) and scores."""
    tokens = []
    for i, piece in enumerate(pieces):
        if i == bos:
            piece = LLAMA2C_BOS
        elif i == eos:
            piece = LLAMA2C_EOS
        else:
            piece = piece.replace(SPACE, " ")
        tokens.append(piece.encode("utf-8"))
    out = io.BytesIO()
    out.write(struct.pack("<i", max(len(t) for t in tokens)))
    for token, score in zip(tokens, scores):
        out.write(struct.pack("<fi", score, len(token)))
        out.write(token)
    return out.getvalue()
