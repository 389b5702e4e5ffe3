"""Prepare the built-in corpus: the source of Python's standard library (tests excluded), byte-level.

    python data/builtin/prepare.py

Needs no network. train.py runs this by itself when the files are missing.
"""

import argparse
from pathlib import Path

from sqrllm.prepare import prepare_builtin

if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()  # --help; no options
    meta = prepare_builtin(Path(__file__).parent)
    s = meta["splits"]
    print(f"builtin: {s['train']['tokens']:,} train and {s['val']['tokens']:,} val byte tokens "
          f"from {meta['source']['files']} files -> {Path(__file__).parent}")
