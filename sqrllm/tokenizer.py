"""Tokenizers, described by plain JSON in a dataset's meta.json and in every checkpoint.

- byte: the UTF-8 bytes of the text, vocabulary 256. Any text round-trips.
- char: one id per character seen in the corpus (sorted), as nanoGPT's shakespeare_char.
"""

import codecs


class ByteTokenizer:
    kind = "byte"
    vocab_size = 256

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")

    def token_bytes(self, i):
        """The raw bytes of token i, for decoders that stream (see StreamDecoder)."""
        return bytes([i])

    def to_meta(self):
        return {"kind": "byte"}


class CharTokenizer:
    kind = "char"

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


def from_meta(meta):
    """Build the tokenizer that a meta dict (meta.json's "tokenizer" entry) describes."""
    kind = meta.get("kind")
    if kind == "byte":
        return ByteTokenizer()
    if kind == "char":
        return CharTokenizer(meta["chars"])
    raise ValueError(f"unknown tokenizer kind {kind!r}; this sqrllm knows 'byte' and 'char'")


class StreamDecoder:
    """Turns token ids into text as they arrive, holding back incomplete UTF-8 sequences."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, i):
        return self.decoder.decode(self.tokenizer.token_bytes(i))

    def flush(self):
        return self.decoder.decode(b"", final=True)
