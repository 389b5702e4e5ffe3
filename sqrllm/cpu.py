"""The CPU decode kernel: `kernels/decode_cpu.cpp`, compiled on first use with the system C++
compiler (OpenMP, tuned for this machine; without them where the compiler refuses) and loaded
through ctypes.

The shared library is cached under $SQRLLM_CACHE (default ~/.cache/sqrllm), keyed by the source,
the compiler command and this CPU's feature flags, and written by rename so that concurrent first
uses do not see half a file. `load()` raises ImportError, saying why, when there is no compiler
or the build fails; callers fall back to the pure-PyTorch step.
"""

import ctypes
import hashlib
import os
import platform
import shlex
import subprocess
import tempfile
from pathlib import Path

from sqrllm.kernels import SOURCE_DIR

SOURCE = SOURCE_DIR / "decode_cpu.cpp"
FLAGS = ["-O3", "-shared", "-fPIC", "-std=c++17"]
# tried in order: tuned and threaded, then without OpenMP (one thread), then without -march=native
OPTIONAL = [["-march=native", "-fopenmp"], ["-march=native"], []]


def _cpu_flags():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


_lib = None
_error = None


def load():
    """The compiled kernel as a ctypes library with typed functions; ImportError (the same one on
    every later call, without retrying) if it cannot be built here."""
    global _lib, _error
    if _lib is None and _error is None:
        try:
            _lib = _build_and_load()
        except ImportError as e:
            _error = str(e)
    if _error is not None:
        raise ImportError(_error)
    return _lib


def _build_and_load():
    compiler = shlex.split(os.environ.get("CXX", "c++"))
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join(compiler + FLAGS + sum(OPTIONAL, [])).encode(),
                                     _cpu_flags().encode(), platform.machine().encode()])).hexdigest()[:16]
    cache = Path(os.environ.get("SQRLLM_CACHE", Path.home() / ".cache" / "sqrllm"))
    lib_path = cache / f"decode_cpu-{key}.so"
    if not lib_path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache, suffix=".so.tmp")
        os.close(fd)
        try:
            for extra in OPTIONAL:
                try:
                    run = subprocess.run([*compiler, *FLAGS, *extra, str(SOURCE), "-o", tmp], capture_output=True,
                                         text=True)
                except OSError as e:
                    why = f"no C++ compiler ({compiler[0]}: {e.strerror}); set CXX or install g++"
                    raise ImportError(why) from None
                if run.returncode == 0:
                    break
            else:
                raise ImportError(f"building {SOURCE.name} failed: {run.stderr.strip()[-2000:]}")
            os.replace(tmp, lib_path)
        finally:
            Path(tmp).unlink(missing_ok=True)
    try:
        lib = ctypes.CDLL(str(lib_path))
    except OSError as e:
        raise ImportError(f"loading {lib_path} failed: {e}") from None
    p, f, i, vp = ctypes.c_void_p, ctypes.c_float, ctypes.c_int, ctypes.c_void_p
    lib.sq_plan_new.argtypes, lib.sq_plan_new.restype = [i, i, i, p, p, p, f], vp
    lib.sq_plan_add.argtypes, lib.sq_plan_add.restype = [vp, i, i, f, p, p, p, p, p], None
    lib.sq_plan_free.argtypes, lib.sq_plan_free.restype = [vp], None
    lib.sq_step.argtypes, lib.sq_step.restype = [vp, i, p, p, p, i], i
    return lib


def available():
    """(True, "") if the kernel builds and loads here, else (False, why)."""
    try:
        load()
    except ImportError as e:
        return False, str(e)
    return True, ""
