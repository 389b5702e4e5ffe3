"""CPU kernels compiled on first use with the system C++ compiler (OpenMP, tuned for this machine;
without them where the compiler refuses) and loaded through ctypes:

- `kernels/decode_cpu.cpp`: one decoding step of a model (sqrllm.decode's NativeStep); `load()`.
- `kernels/scan_cpu.cpp`: the scan, forward and backward (sqrllm.scan's CPU path); `scan_fwd`,
  `scan_bwd`.

Each shared library is cached under $SQRLLM_CACHE (default ~/.cache/sqrllm), keyed by its source,
the compiler command and this CPU's feature flags, and written by rename so that concurrent first
uses do not see half a file. Loading raises ImportError, saying why, when there is no compiler or the
build fails (once; later calls raise it again without retrying); callers fall back to PyTorch code.
"""

import ctypes
import hashlib
import os
import platform
import shlex
import subprocess
import tempfile
from pathlib import Path

import torch

from sqrllm.kernels import SOURCE_DIR

FLAGS = ["-O3", "-shared", "-fPIC", "-std=c++17"]
# tried in order: tuned and threaded, then without OpenMP (one thread), then without -march=native
OPTIONAL = [["-march=native", "-fopenmp"], ["-march=native"], []]


def _cpu_flags():
    """What -march=native builds for, for the cache key: a library built on one CPU may not run on
    another that shares the cache folder (a network home)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    if platform.system() == "Darwin":  # no /proc: the CPU's name and, on Intel, its feature lists
        keys = ["machdep.cpu.brand_string", "machdep.cpu.features", "machdep.cpu.leaf7_features"]
        try:
            return subprocess.run(["sysctl", "-n", *keys], capture_output=True, text=True).stdout
        except OSError:
            pass
    return platform.processor()


def _cache():
    """The kernel cache folder: SQRLLM_CACHE, else ~/.cache/sqrllm."""
    if os.environ.get("SQRLLM_CACHE"):
        return Path(os.environ["SQRLLM_CACHE"])
    try:
        return Path.home() / ".cache" / "sqrllm"
    except RuntimeError:  # no home folder (a user id without a passwd entry, as in some containers)
        raise ImportError("no home folder for the kernel cache; set SQRLLM_CACHE to a writable folder") from None


_libs = {}  # kernel name -> the loaded library, or the ImportError message of its failed build


def _library(name):
    """kernels/<name>.cpp built and loaded, with its functions typed; ImportError if it cannot be."""
    if name not in _libs:
        try:
            _libs[name] = _build_and_load(name)
        except ImportError as e:
            _libs[name] = str(e)
    if isinstance(_libs[name], str):
        raise ImportError(_libs[name])
    return _libs[name]


def load():
    """The decode kernel as a ctypes library with typed functions; ImportError if it cannot be built here."""
    return _library("decode_cpu")


def _build_and_load(name):
    compiler = shlex.split(os.environ.get("CXX", "")) or ["c++"]  # an empty CXX is the default
    path = SOURCE_DIR / f"{name}.cpp"
    source = path.read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join(compiler + FLAGS + sum(OPTIONAL, [])).encode(),
                                     _cpu_flags().encode(), platform.machine().encode()])).hexdigest()[:16]
    lib_path = _cache() / f"{name}-{key}.so"
    cached = lib_path.exists()
    if not cached:
        _build(compiler, path, lib_path)
    try:
        lib = _load(lib_path)
    except ImportError:
        if not cached:
            raise
        _build(compiler, path, lib_path)  # a cached file that does not load (cut short, unreadable): once more
        lib = _load(lib_path)
    SIGNATURES[name](lib)
    return lib


def _load(lib_path):
    try:
        return ctypes.CDLL(str(lib_path))
    except OSError as e:
        raise ImportError(f"loading {lib_path} failed: {e}") from None


def _build(compiler, path, lib_path):
    """Compile `path` into lib_path through a temp file in its folder (renamed: a concurrent build or
    load never sees half a library), readable by all who may read the folder."""
    cache = lib_path.parent
    try:
        cache.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache, suffix=".so.tmp")
    except OSError as e:
        raise ImportError(f"cannot write to the kernel cache {cache} ({e.strerror or e}); set SQRLLM_CACHE "
                          "to a writable folder") from None
    os.close(fd)
    try:
        for extra in OPTIONAL:
            try:
                run = subprocess.run([*compiler, *FLAGS, *extra, str(path), "-o", tmp], capture_output=True,
                                     text=True)
            except OSError as e:
                why = f"no C++ compiler ({compiler[0]}: {e.strerror}); set CXX or install g++"
                raise ImportError(why) from None
            if run.returncode == 0:
                break
        else:
            raise ImportError(f"building {path.name} failed: {run.stderr.strip()[-2000:]}")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o755 & ~umask)  # mkstemp's 0600 would leave the library to its builder alone
        os.replace(tmp, lib_path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _decode_signatures(lib):
    p, f, i, vp = ctypes.c_void_p, ctypes.c_float, ctypes.c_int, ctypes.c_void_p
    lib.sq_plan_new.argtypes, lib.sq_plan_new.restype = [i, i, i, p, p, p, f], vp
    lib.sq_plan_add.argtypes, lib.sq_plan_add.restype = [vp, i, i, f, p, p, p, p, p], None
    lib.sq_plan_free.argtypes, lib.sq_plan_free.restype = [vp], None
    lib.sq_step.argtypes, lib.sq_step.restype = [vp, i, p, p, p, i], i


def _scan_signatures(lib):
    p, n, i = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    for kind in ("f32", "f64"):
        getattr(lib, f"sq_scan_fwd_{kind}").argtypes = [p, p, p, p, n, n, n, i, i]
        getattr(lib, f"sq_scan_bwd_{kind}").argtypes = [p, p, p, p, p, p, p, n, n, n, i, i]
        getattr(lib, f"sq_scan_fwd_{kind}").restype = getattr(lib, f"sq_scan_bwd_{kind}").restype = None


SIGNATURES = {"decode_cpu": _decode_signatures, "scan_cpu": _scan_signatures}


def available(name="decode_cpu"):
    """(True, "") if kernels/<name>.cpp builds and loads here, else (False, why)."""
    try:
        _library(name)
    except ImportError as e:
        return False, str(e)
    return True, ""


def _acc(t):
    """t as the kernel's arithmetic type, contiguous: float64 stays, the rest become float32."""
    return t.to(torch.float64 if t.dtype == torch.float64 else torch.float32).contiguous()


def _ptr(t):
    return None if t is None else t.data_ptr()


def scan_fwd(x, r, h0, reverse):
    """sqrllm.scan's forward for CPU tensors that `scan` has validated: y (B, T, C) in x's dtype,
    computed in float32 (float64 for float64). ImportError where the kernel cannot be built."""
    lib = _library("scan_cpu")
    xa, ra, ha = _acc(x), _acc(r), None if h0 is None else _acc(h0)
    y = torch.empty_like(xa)
    fn = lib.sq_scan_fwd_f64 if xa.dtype == torch.float64 else lib.sq_scan_fwd_f32
    fn(_ptr(xa), _ptr(ra), _ptr(ha), _ptr(y), *x.shape, int(reverse), torch.get_num_threads())
    return y.to(x.dtype)


def scan_bwd(dy, r, y, h0, reverse):
    """(dx, dr, dh0) for scan_fwd's inputs, in dy's dtype; dh0 (B, C) whether or not there was an h0."""
    lib = _library("scan_cpu")
    dya, ra, ya, ha = _acc(dy), _acc(r), _acc(y), None if h0 is None else _acc(h0)
    dx, dr, dh0 = torch.empty_like(dya), torch.empty_like(dya), dya.new_empty(dy.shape[0], dy.shape[2])
    fn = lib.sq_scan_bwd_f64 if dya.dtype == torch.float64 else lib.sq_scan_bwd_f32
    fn(_ptr(dya), _ptr(ra), _ptr(ya), _ptr(ha), _ptr(dx), _ptr(dr), _ptr(dh0), *dy.shape, int(reverse),
       torch.get_num_threads())
    return dx.to(dy.dtype), dr.to(dy.dtype), dh0.to(dy.dtype)
