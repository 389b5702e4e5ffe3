"""Tokenizers, described by plain JSON in a dataset's meta.json and in every checkpoint.

- byte: the UTF-8 bytes of the text, vocabulary 256. Any text round-trips.
- char: one id per character seen in the corpus (sorted), as nanoGPT's shakespeare_char.
- sentencepiece: a SentencePiece model file next to meta.json or ckpt.pt, named in the
  description: {"kind": "sentencepiece", "model_file": "tokenizer.model"}. The prepare step trains
  one (`train_sentencepiece`) so that any UTF-8 text round-trips and documents end with an
  end-of-text token (`eot_id`).
"""

import codecs
import hashlib
import io
import os
from pathlib import Path

from sqrllm import spm_model

SPM_FILE = "tokenizer.model"  # the SentencePiece model's name in dataset and checkpoint folders
EOT_PIECE = "<|endoftext|>"  # the end-of-text piece of trained models (SentencePiece's eos)
_SPACE = "\u2581"  # SentencePiece's stand-in for a space in pieces


def utf8(text):
    """text's UTF-8 bytes; TokenizerError naming the first character that has none: a lone surrogate,
    which is how Python holds a byte of a command-line argument that is not UTF-8."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:
        c = text[e.start]
        byte = f" (the byte 0x{ord(c) - 0xdc00:02x} of text that is not UTF-8)" if 0xdc80 <= ord(c) <= 0xdcff else ""
        raise TokenizerError(f"the text is not valid UTF-8: character {e.start} is the lone surrogate {c!r}{byte}; "
                             "pass UTF-8 text") from None


class ByteTokenizer:
    kind = "byte"
    vocab_size = 256
    eot_id = None  # no end-of-text token: every id is a byte

    def encode(self, text):
        return list(utf8(text))

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")

    def token_bytes(self, i):
        """The raw bytes of token i, for decoders that stream (see StreamDecoder)."""
        return bytes([i])

    def to_meta(self):
        return {"kind": "byte"}


class CharTokenizer:
    kind = "char"
    eot_id = None

    def __init__(self, chars):
        self.chars = list(chars)
        self.vocab_size = len(self.chars)
        self.index = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def from_text(cls, text):
        return cls(sorted(set(text)))

    def encode(self, text):
        missing = sorted({c for c in text if c not in self.index})
        if missing:
            shown = ", ".join(repr(c) for c in missing[:10])
            raise ValueError(f"the text has characters outside this char-level vocabulary: {shown}; "
                             "remove them or use a byte-level dataset")
        return [self.index[c] for c in text]

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids)

    def token_bytes(self, i):
        return self.chars[i].encode("utf-8")

    def to_meta(self):
        return {"kind": "char", "chars": "".join(self.chars)}


class SentencePieceTokenizer:
    """A SentencePiece model read from its .model file; ids and text as the sentencepiece package.

    Text holding U+2581 (which SentencePiece cannot tell from an escaped space) is encoded in
    pieces around it, with the character itself as byte tokens, so it round-trips too.
    """

    kind = "sentencepiece"

    def __init__(self, model_file):
        import sentencepiece

        self.path = Path(model_file)
        if not self.path.is_file():
            raise TokenizerError(f"SentencePiece model {self.path} not found; a dataset folder holds it next to "
                                 "meta.json, a checkpoint folder next to ckpt.pt (train.py copies it there)")
        data = self.path.read_bytes()
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_proto=data)
            pieces = spm_model.read_model(data)
        except (RuntimeError, ValueError, IndexError, UnicodeDecodeError) as e:
            raise TokenizerError(f"{self.path} is not a SentencePiece model ({e})") from None
        self.vocab_size = self.sp.get_piece_size()
        if not self.vocab_size:  # sentencepiece reads an empty file as a model without pieces
            raise TokenizerError(f"{self.path} is not a SentencePiece model (it has no pieces)")
        self.eot_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None
        self._bytes = [_piece_bytes(text, kind, pieces.unk_surface) for text, _, kind in pieces.pieces]
        byte_ids = {b[0]: i for i, (b, (_, _, kind)) in enumerate(zip(self._bytes, pieces.pieces))
                    if kind == spm_model.BYTE}
        self._space_ids = [byte_ids[b] for b in _SPACE.encode()] if len(byte_ids) == 256 else None

    def encode(self, text):
        return self.encode_batch([text])[0]

    def encode_batch(self, texts, eot=False, num_threads=1):
        """A list of texts -> a list of id lists; eot=True ends each with the end-of-text token."""
        if eot and self.eot_id is None:
            raise TokenizerError(f"{self.path} has no end-of-text (eos) piece to separate documents")
        try:
            out = self.sp.encode(texts, add_eos=eot, num_threads=num_threads)
        except TypeError:  # sentencepiece's word for a str that is not UTF-8
            for text in texts:
                utf8(text)  # names the character
            raise
        for k, text in enumerate(texts):
            if _SPACE in text:
                out[k] = self._encode_space_char(text) + ([self.eot_id] if eot else [])
        return out

    def _encode_space_char(self, text):
        if self._space_ids is None:
            return self.sp.encode(text)  # without byte fallback U+2581 reads back as a space
        ids = []
        for k, part in enumerate(text.split(_SPACE)):
            ids += (self._space_ids if k else []) + (self.sp.encode(part) if part else [])
        return ids

    def decode(self, ids):
        return b"".join(self._bytes[i] for i in ids).decode("utf-8", errors="replace")

    def token_bytes(self, i):
        return self._bytes[i]

    def to_meta(self):
        return {"kind": "sentencepiece", "model_file": self.path.name}


def _piece_bytes(text, kind, unk_surface):
    """The bytes a piece stands for in decoded text (control pieces such as end-of-text: none)."""
    if kind == spm_model.BYTE:
        return bytes([int(text[3:5], 16)])  # <0xAB>
    if kind == spm_model.CONTROL:
        return b""
    if kind == spm_model.UNKNOWN:
        return unk_surface.encode("utf-8")
    return text.replace(_SPACE, " ").encode("utf-8")


class TokenizerError(ValueError):
    """A tokenizer that cannot be built or trained; the message names the file and the fix."""


def _lines(text):
    """text.split("\n"), one line at a time (a corpus of gigabytes is not copied into a list)."""
    lo = 0
    while (hi := text.find("\n", lo)) >= 0:
        yield text[lo:hi]
        lo = hi + 1
    yield text[lo:]


MAX_LINE = 1 << 14  # characters: at most 4 bytes each, within the trainer's max_sentence_length of 64 KiB


def train_sentencepiece(texts, path, vocab_size, model_type="unigram", max_bytes=1 << 26):
    """Train a SentencePiece model on `texts` (an iterable of str) and write it to `path`.

    Settings that make any UTF-8 text round-trip: byte fallback, full character coverage, no
    normalization, no dummy prefix, whitespace kept as it is; digits are split. The trainer sees
    the texts' lines (a piece never spans a newline; a line longer than MAX_LINE in parts) up to
    max_bytes of them. The end-of-text piece is SentencePiece's eos, id 1; <unk> is 0 and ids
    2-257 are the 256 bytes. A unigram model trained on too little text for vocab_size has fewer
    pieces; a BPE one is an error.
    Returns {"lines": trained lines, "bytes": their UTF-8 size}.
    """
    import sentencepiece

    seen, failed = {"lines": 0, "bytes": 0}, []

    def lines():
        try:
            for text in texts:
                for line in _lines(text):
                    for i in range(0, len(line), MAX_LINE):  # longer lines the trainer would drop unseen
                        piece = line[i:i + MAX_LINE]
                        seen["lines"] += 1
                        seen["bytes"] += len(piece.encode("utf-8"))
                        yield piece
                        if seen["bytes"] >= max_bytes:
                            return
        except Exception as e:  # the texts' own error (an input that cannot be read), raised as it is below
            failed.append(e)
            raise

    model = io.BytesIO()
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=lines(), model_writer=model, vocab_size=vocab_size, model_type=model_type,
            byte_fallback=True, character_coverage=1.0, split_digits=True, normalization_rule_name="identity",
            add_dummy_prefix=False, remove_extra_whitespaces=False, unk_id=0, eos_id=1, bos_id=-1, pad_id=-1,
            eos_piece=EOT_PIECE, max_sentence_length=1 << 16, num_threads=os.cpu_count() or 1,
            minloglevel=2, **({"hard_vocab_limit": False} if model_type == "unigram" else {}))
    except (RuntimeError, ValueError, OverflowError) as e:
        if failed:
            raise failed[0] from None
        why = str(e).strip()
        fix = ("raise vocab_size: byte fallback takes 256 pieces, and every character of the text one more"
               if "required_chars" in why or vocab_size < 258 else "lower vocab_size or give more text")
        raise TokenizerError(f"SentencePiece training failed: {why}; with {seen['bytes']:,} bytes of training "
                             f"text, {fix}") from None
    if not seen["lines"]:
        raise TokenizerError("no text to train SentencePiece on; the training split is empty")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(model.getvalue())
    os.replace(tmp, path)
    return seen


def from_meta(meta, folder=None):
    """Build the tokenizer that a meta dict (meta.json's "tokenizer" entry) describes; files it
    names (a SentencePiece model_file) are looked up in `folder` (the dataset's or checkpoint's)."""
    kind = meta.get("kind")
    if kind == "byte":
        return ByteTokenizer()
    if kind == "char":
        return CharTokenizer(meta["chars"])
    if kind == "sentencepiece":
        return SentencePieceTokenizer(Path(folder or ".") / meta["model_file"])
    raise ValueError(f"unknown tokenizer kind {kind!r}; this sqrllm knows 'byte', 'char' and 'sentencepiece'")


def tokenizer_files(meta):
    """Names of the files a tokenizer description refers to (copied along with checkpoints)."""
    return [meta["model_file"]] if meta.get("kind") == "sentencepiece" else []


def tokenizer_sha256(meta, folder):
    """sha256 (hex) of the files a tokenizer description names, read from `folder`; None if it names
    none (byte and char tokenizers are their description) or one is missing.

    Two SentencePiece models of one vocab_size differ in their pieces: this tells them apart."""
    h = hashlib.sha256()
    for name in tokenizer_files(meta):
        try:
            h.update((Path(folder) / name).read_bytes())
        except FileNotFoundError:
            return None
    return h.hexdigest() if tokenizer_files(meta) else None


class StreamDecoder:
    """Turns token ids into text as they arrive, holding back incomplete UTF-8 sequences."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, i):
        return self.decoder.decode(self.tokenizer.token_bytes(i))

    def flush(self):
        return self.decoder.decode(b"", final=True)
