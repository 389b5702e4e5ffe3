"""Prepare a FineWeb-Edu sample (HuggingFaceFW/fineweb-edu, sample-10BT: about 10B GPT-2 tokens of
educational web pages), streamed from the Hugging Face Hub; SentencePiece unigram with 8192
pieces trained on the first 64 MiB of documents; one document in 1000 goes to val.

    python data/fineweb_edu/prepare.py                      # all of it: hours, about 20 GB of tokens
    python data/fineweb_edu/prepare.py --max_docs 1000000   # the first million documents
    python train.py configs/fineweb_edu.py

Options of data/hf/prepare.py apply.
"""

import sys
from pathlib import Path

from sqrllm.hf import main

if __name__ == "__main__":
    main(sys.argv[1:], data_dir=Path(__file__).resolve().parent.parent, preset="fineweb_edu")
