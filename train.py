"""Train a SqrLLM.

    python train.py configs/small.py
    python train.py configs/shakespeare_char_cpu.py --max_iters=500 --out_dir=out/try
    python train.py configs/small.py --init_from=resume    # go on from out_dir's newest intact checkpoint

A Python config file, then --key=value overrides (python train.py --help lists the keys).

Exit status: 0 done; 1 an input is unusable (config, data, checkpoint; nothing was written);
65 the loss or gradients stayed non-finite for max_bad_steps steps (the last good state is saved);
74 a checkpoint could not be written, e.g. a full disk (the previous one is intact);
75 stopped by SIGTERM or SIGINT after saving a checkpoint (relaunch with --init_from=resume).
"""

import sys

from sqrllm.trainer import process_start_time

LAUNCHED = process_start_time()

from sqrllm import distributed  # noqa: E402
from sqrllm.checkpoint import CheckpointError  # noqa: E402
from sqrllm.config import ConfigError, config_help, load_config  # noqa: E402
from sqrllm.data import DataError  # noqa: E402
from sqrllm.faults import ConsoleStream  # noqa: E402
from sqrllm.trainer import EXIT_PREEMPTED, RunStopped, train  # noqa: E402


def main(argv):
    """-> the exit status."""
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        print(config_help())
        return 0
    try:
        train(load_config(argv), launched=LAUNCHED)
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except RunStopped as e:
        print(f"{'stopped' if e.code == EXIT_PREEMPTED else 'error'}: {e}", file=sys.stderr)
        return e.code
    return 0


if __name__ == "__main__":
    sys.stdout, sys.stderr = ConsoleStream(sys.stdout), ConsoleStream(sys.stderr)  # a pipe may close: see faults
    distributed.run_main(main, sys.argv[1:])  # sys.exit(main(...)); see sqrllm/distributed.py
