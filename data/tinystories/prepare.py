"""Prepare TinyStories (roneneldan/TinyStories on the Hugging Face Hub): 2.1M short stories,
SentencePiece unigram with 4096 pieces trained on the train split, the dataset's validation split as val.

    python data/tinystories/prepare.py            # downloads about 1 GB once; then
    python train.py configs/tinystories.py

Options of data/hf/prepare.py apply (e.g. --max_docs 100000 for a quick subset, --workers 8).
"""

import sys
from pathlib import Path

from sqrllm.hf import main

if __name__ == "__main__":
    main(sys.argv[1:], data_dir=Path(__file__).resolve().parent.parent, preset="tinystories")
