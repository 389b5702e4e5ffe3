"""Read a SentencePiece .model file (a serialized ModelProto) without the protobuf package.

Only what encoding and decoding need: the pieces (text, score, type), the model type, byte
fallback, the unknown surface, and the normalizer (flags and the precompiled character map).
Field numbers are those of sentencepiece_model.proto.
"""

import struct
from dataclasses import dataclass, field

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
UNIGRAM, BPE, WORD, CHAR = 1, 2, 3, 4


@dataclass
class SentencePieceModel:
    pieces: list = field(default_factory=list)  # (text, score, type) per id
    model_type: int = UNIGRAM
    byte_fallback: bool = False
    treat_whitespace_as_suffix: bool = False
    unk_surface: str = " \u2047 "
    normalizer_name: str = ""
    precompiled_charsmap: bytes = b""
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    escape_whitespaces: bool = True
    denormalizer_charsmap: bytes = b""


def _varint(buf, i):
    shift = value = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, i


def _fields(buf):
    """Yield (field number, value) of one message: ints for varints, bytes otherwise."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 1:
            value, i = buf[i:i + 8], i + 8
        elif wire == 2:
            n, i = _varint(buf, i)
            value, i = buf[i:i + n], i + n
        elif wire == 5:
            value, i = buf[i:i + 4], i + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire} (field {number})")
        if i > len(buf):
            raise ValueError("truncated protobuf message")
        yield number, value


def _float(b):
    return struct.unpack("<f", b)[0]


def read_model(data):
    """bytes of a .model file -> SentencePieceModel."""
    m = SentencePieceModel()
    for number, value in _fields(data):
        if number == 1:  # SentencePiece
            text, score, kind = "", 0.0, NORMAL
            for n, v in _fields(value):
                if n == 1:
                    text = v.decode("utf-8")
                elif n == 2:
                    score = _float(v)
                elif n == 3:
                    kind = v
            m.pieces.append((text, score, kind))
        elif number == 2:  # TrainerSpec
            for n, v in _fields(value):
                if n == 3:
                    m.model_type = v
                elif n == 24:
                    m.treat_whitespace_as_suffix = bool(v)
                elif n == 35:
                    m.byte_fallback = bool(v)
                elif n == 44:
                    m.unk_surface = v.decode("utf-8")
        elif number == 3:  # NormalizerSpec
            for n, v in _fields(value):
                if n == 1:
                    m.normalizer_name = v.decode("utf-8")
                elif n == 2:
                    m.precompiled_charsmap = bytes(v)
                elif n == 3:
                    m.add_dummy_prefix = bool(v)
                elif n == 4:
                    m.remove_extra_whitespaces = bool(v)
                elif n == 5:
                    m.escape_whitespaces = bool(v)
        elif number == 5:  # denormalizer NormalizerSpec
            for n, v in _fields(value):
                if n == 2:
                    m.denormalizer_charsmap = bytes(v)
    return m
