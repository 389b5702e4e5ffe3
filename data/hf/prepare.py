"""Prepare a Hugging Face dataset, or local text/json/jsonl/parquet/csv files, as SentencePiece
token shards (see sqrllm/hf.py; needs pip install 'sqrllm[hf]').

    python data/hf/prepare.py --dataset roneneldan/TinyStories --val_split validation --name stories
    python data/hf/prepare.py --files notes/*.jsonl --text_field body --val_fraction 0.01 --name notes
    python data/hf/prepare.py --preset fineweb_edu --max_docs 200000

writes data/<name>/{train,val}-NNNNN.bin, tokenizer.model and meta.json; train with
--dataset=<name> --reset_at_eot=true.
"""

import sys
from pathlib import Path

from sqrllm.hf import main

if __name__ == "__main__":
    main(sys.argv[1:], data_dir=Path(__file__).resolve().parent.parent)
