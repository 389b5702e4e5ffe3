"""Train a SqrLLM.

    python train.py configs/small.py
    python train.py configs/shakespeare_char_cpu.py --max_iters=500 --out_dir=out/try

A Python config file, then --key=value overrides (python train.py --help lists the keys).
"""

import sys

from sqrllm.trainer import process_start_time

LAUNCHED = process_start_time()

from sqrllm.checkpoint import CheckpointError  # noqa: E402
from sqrllm.config import ConfigError, config_help, load_config  # noqa: E402
from sqrllm.data import DataError  # noqa: E402
from sqrllm.trainer import train  # noqa: E402

if __name__ == "__main__":
    if any(a in ("-h", "--help") for a in sys.argv[1:]):
        print(__doc__)
        print(config_help())
        sys.exit(0)
    try:
        train(load_config(sys.argv[1:]), launched=LAUNCHED)
    except (ConfigError, DataError, CheckpointError) as e:
        sys.exit(f"error: {e}")
