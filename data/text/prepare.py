"""Prepare any local text files or folders, byte-, char- or SentencePiece-level.

    python data/text/prepare.py --input notes/ more.txt --level byte --name mytext
    python data/text/prepare.py --input notes/ --level sentencepiece --vocab_size 4096 --name mytext

writes data/<name>/{train,val}.bin and meta.json; train with --dataset=<name>.
"""

import argparse
import sys
from pathlib import Path

from sqrllm.data import DataError
from sqrllm.prepare import dataset_name, prepare_text, vocab_note

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", nargs="+", required=True, help="text files and/or folders (walked, sorted)")
    ap.add_argument("--level", choices=("byte", "char", "sentencepiece"), default="byte",
                    help="tokenizer (default: byte)")
    ap.add_argument("--vocab_size", type=int, default=8192, help="SentencePiece pieces to train (default: 8192)")
    ap.add_argument("--model_type", choices=("bpe", "unigram"), default="unigram", help="SentencePiece algorithm")
    ap.add_argument("--tokenizer_model", help="an existing SentencePiece .model to use instead of training one")
    ap.add_argument("--name", default="text", help="dataset folder name under data/ (default: text)")
    ap.add_argument("--val_fraction", type=float, default=0.1, help="share of the text, from the end, for val")
    ap.add_argument("--errors", choices=("strict", "replace"), default="strict",
                    help="invalid UTF-8: strict stops with the file and offset; replace substitutes U+FFFD")
    args = ap.parse_args()
    try:
        out = Path(__file__).resolve().parent.parent / dataset_name(args.name)
        meta, replaced = prepare_text(out, args.input, args.level, args.val_fraction, args.errors, args.name,
                                      args.vocab_size, args.model_type, args.tokenizer_model)
    except DataError as e:
        sys.exit(f"error: {e}")
    if replaced:
        print(f"warning: replaced {replaced} invalid UTF-8 sequence(s) with U+FFFD")
    s = meta["splits"]
    print(f"{args.name}: {args.level}-level, vocab {meta['vocab_size']}, {s['train']['tokens']:,} train and "
          f"{s['val']['tokens']:,} val tokens -> {out}")
    if note := vocab_note(meta):
        print(note)
