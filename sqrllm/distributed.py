"""Data-parallel training across the processes that `torchrun` starts.

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE in each process; `setup` joins the group (NCCL for
CUDA devices, gloo for the CPU) and gives each process its GPU. Without those variables, or with
WORLD_SIZE=1, everything here is a no-op and training runs in one process as before.

Each rank reads its own contiguous streams (`StreamBatches(rank=, world_size=)`), so the memory
it carries belongs to its rows alone; DistributedDataParallel averages the gradients, and rank 0
writes the logs and checkpoints.
"""

import os
import signal
import sys
import traceback
from dataclasses import dataclass

import torch
import torch.distributed as dist

from sqrllm.config import ConfigError


@dataclass(frozen=True)
class Dist:
    rank: int = 0  # this process's index among all processes
    local_rank: int = 0  # its index on this machine: its GPU
    world_size: int = 1  # processes in all

    @property
    def enabled(self):
        return self.world_size > 1

    @property
    def is_main(self):
        return self.rank == 0


def from_env():
    """The process's place in the group, read from torchrun's environment variables."""
    return Dist(int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
                int(os.environ.get("WORLD_SIZE", 1)))


def setup(device):
    """Join the process group when started by torchrun; -> (Dist, the device this rank uses).

    device: "cuda" or "cpu" as resolved from the config; "cuda" becomes cuda:LOCAL_RANK. ConfigError for
    one named GPU, or more processes on this machine than it has GPUs.
    """
    d = from_env()
    if not d.enabled:
        return d, device
    if device.startswith("cuda"):
        if device != "cuda":
            raise ConfigError(f"device={device!r} names one GPU, but torchrun started {d.world_size} processes; "
                              "use --device=cuda (each process takes the GPU of its LOCAL_RANK)")
        if d.local_rank >= (count := torch.cuda.device_count()):
            raise ConfigError(f"torchrun started process LOCAL_RANK={d.local_rank} on a machine with {count} "
                              f"CUDA device(s); pass --nproc_per_node={count} (one process per GPU)")
        device = f"cuda:{d.local_rank}"
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=torch.device(device))
    else:
        dist.init_process_group("gloo")
    return d, device


# Process groups that were left, held until the process ends (see teardown).
_left = []


def teardown():
    """Leave the process group; every rank calls it as training ends, however it ends.

    The group object itself is held until the process ends: its destructor joins gloo's worker
    threads while holding the GIL, and a worker still letting go of the tensors of the collective
    just finished waits for the GIL. Destroyed at that moment, it hangs the rank for good (seen with
    torch 2.13: both CPU ranks stuck in ~ProcessGroupGloo after a stop on non-finite steps). A
    process torchrun started therefore ends through `run_main`, which runs no destructors; a script
    of your own that calls `train` under torchrun should end through it too."""
    if dist.is_available() and dist.is_initialized():
        _left.append(dist.group.WORLD)
        dist.destroy_process_group()


def run_main(main, argv):
    """sys.exit(main(argv)), except that a process that was in a process group ends without Python's
    shutdown (os._exit, after flushing stdout and stderr): nothing of the run is left unwritten by
    then, and the group's destructor cannot hang it (see teardown). An exception is printed as
    Python would and ends it with status 1 (Ctrl-C: by SIGINT), SystemExit with its own status."""
    interrupted = False
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    except BaseException as e:
        if not _left:
            raise
        traceback.print_exc()
        code, interrupted = 1, isinstance(e, KeyboardInterrupt)
    if not _left:
        sys.exit(code)
    if not isinstance(code, int):  # as sys.exit takes it: None is success, anything else is printed
        if code is not None:
            print(code, file=sys.stderr)
        code = 0 if code is None else 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can reach it
            pass
    if interrupted:  # end as Python does on Ctrl-C: by SIGINT, which the launcher reports as such
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(code)


def mean(tensor):
    """The mean of `tensor` over all ranks (a new tensor; `tensor` itself when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return tensor
    out = tensor.detach().clone()
    dist.all_reduce(out)  # SUM: gloo has no AVG
    return out / dist.get_world_size()


def gather_rows(tensor):
    """Concatenate every rank's `tensor` along dim 0, in rank order (all ranks get the result)."""
    if not (dist.is_available() and dist.is_initialized()):
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def gather_objects(obj):
    """A list with every rank's `obj` (picklable), in rank order."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def any_rank(flag, device):
    """True on every rank when `flag` is true on any (for decisions all ranks must take together)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t)
    return t.item() > 0
