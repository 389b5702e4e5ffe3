"""Prepare Tiny Shakespeare at the character level (65 symbols), 90/10 split as nanoGPT.

    python data/shakespeare_char/prepare.py                  # downloads input.txt
    python data/shakespeare_char/prepare.py --input PATH     # or uses a local copy

Without --input, a dataset already prepared here (from a local copy) is left as it is.
"""

import argparse
import sys
from pathlib import Path

from sqrllm.data import DataError
from sqrllm.prepare import prepare_shakespeare_char

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", help="a local copy of tinyshakespeare input.txt (skips the download)")
    args = ap.parse_args()
    try:
        meta = prepare_shakespeare_char(Path(__file__).parent, args.input)
    except DataError as e:
        sys.exit(f"error: {e}")
    s = meta["splits"]
    print(f"shakespeare_char: vocab {meta['vocab_size']}, {s['train']['tokens']:,} train and "
          f"{s['val']['tokens']:,} val tokens -> {Path(__file__).parent}")
