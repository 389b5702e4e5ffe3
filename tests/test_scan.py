"""The scan op's CPU paths (the C++ kernel, and the PyTorch loop it falls back to) held to the float64
reference and to each other."""

import importlib
import os
import subprocess
import sys

import pytest
import torch

from sqrllm import cpu
from sqrllm.scan import scan, scan_doubling, scan_ref

scan_mod = importlib.import_module("sqrllm.scan")  # the module; `sqrllm.scan` the package exports is the op
KERNEL, WHY = cpu.available("scan_cpu")

# max |fast - ref| / (max |ref| + 1), per storage dtype (accumulation is float32 throughout)
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}
LENGTHS = [1, 2, 7, 64, 131]


def inputs(B, T, C, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, C, generator=g, dtype=torch.float64)
    r = torch.rand(B, T, C, generator=g, dtype=torch.float64) * 0.3 + 0.7  # long memory: errors compound
    h0 = torch.randn(B, C, generator=g, dtype=torch.float64)
    return x.to(dtype), r.to(dtype), h0.to(dtype)


def rel_err(a, ref):
    return ((a.double() - ref).abs().max() / (ref.abs().max() + 1)).item()


@pytest.fixture(params=["kernel", "loop"])
def path(request, monkeypatch):
    """Runs a test on the C++ kernel (skipped, saying why, where it cannot be built) and on the loop."""
    if request.param == "kernel" and not KERNEL:
        pytest.skip(f"the C++ scan kernel cannot be built here: {WHY}")
    monkeypatch.setattr(scan_mod, "_cpu_backend", cpu if request.param == "kernel" else False)
    return request.param


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("T", LENGTHS)
@pytest.mark.parametrize("reverse", [False, True])
def test_forward_and_gradients_match_reference(dtype, T, reverse, path):
    x, r, h0 = inputs(3, T, 5, dtype, seed=T)
    leaves = [t.clone().requires_grad_() for t in (x, r, h0)]
    y = scan(*leaves, reverse=reverse)
    assert y.dtype == dtype and y.shape == x.shape
    dy = torch.randn(y.shape, dtype=torch.float64).to(dtype)
    grads = torch.autograd.grad(y, leaves, dy)

    ref_leaves = [t.double().requires_grad_() for t in (x, r, h0)]
    y_ref = scan_ref(*ref_leaves, reverse=reverse)
    ref_grads = torch.autograd.grad(y_ref, ref_leaves, dy.double())
    assert rel_err(y, y_ref) < TOL[dtype]
    for name, g, g_ref in zip(("dx", "dr", "dh0"), grads, ref_grads):
        assert g.dtype == dtype
        assert rel_err(g, g_ref) < TOL[dtype], name


@pytest.mark.parametrize("T", [1, 2, 3, 5, 64, 100, 1000])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("with_h0", [True, False])
def test_doubling_oracle_equals_the_loop(T, reverse, with_h0):
    # the long-sequence oracle of the GPU tests, values and gradients, against the readable loop
    x, r, h0 = inputs(2, T, 3, torch.float64, seed=T)
    h0 = h0 if with_h0 else None
    dy = torch.randn(2, T, 3, dtype=torch.float64)
    results = []
    for fn in (scan_ref, scan_doubling):
        leaves = [t.clone().requires_grad_() for t in (x, r) + ((h0,) if with_h0 else ())]
        y = fn(*leaves, reverse=reverse)
        results.append((y, *torch.autograd.grad(y, leaves, dy)))
    for got, want in zip(results[1], results[0]):
        assert rel_err(got, want) < 1e-13


def test_gradcheck_float64(path):
    x, r, h0 = (t.requires_grad_() for t in inputs(2, 5, 3, torch.float64))
    assert torch.autograd.gradcheck(lambda a, b, c: scan(a, b, c), (x, r, h0))
    assert torch.autograd.gradcheck(lambda a, b, c: scan(a, b, c, reverse=True), (x, r, h0))
    assert torch.autograd.gradcheck(lambda a, b: scan(a, b), (x, r))


def test_gradients_of_gradients_are_exact(path):
    """create_graph=True (gradient penalties, Hessian-vector products): second derivatives agree
    with numerical ones, and the Hessian-vector product with the autograd loop's."""
    x, r, h0 = (t.requires_grad_() for t in inputs(2, 5, 3, torch.float64))
    for reverse in (False, True):
        assert torch.autograd.gradgradcheck(lambda a, b, c: scan(a, b, c, reverse=reverse), (x, r, h0))
        assert torch.autograd.gradgradcheck(lambda a, b: scan(a, b, reverse=reverse), (x, r))
        v = torch.randn_like(r)
        got = torch.autograd.functional.hvp(lambda b: scan(x, b, h0, reverse).square().sum(), r, v)[1]
        want = torch.autograd.functional.hvp(lambda b: scan_ref(x, b, h0, reverse).square().sum(), r, v)[1]
        assert want.abs().max() > 1 and rel_err(got, want) < 1e-12


def test_r_one_is_cumulative_sum_and_r_zero_is_identity(path):
    x = torch.randn(2, 33, 4, dtype=torch.float64)
    torch.testing.assert_close(scan(x, torch.ones_like(x)), x.cumsum(1))
    torch.testing.assert_close(scan(x, torch.ones_like(x), reverse=True), x.flip(1).cumsum(1).flip(1))
    torch.testing.assert_close(scan(x, torch.zeros_like(x), torch.randn(2, 4, dtype=torch.float64)), x)


@pytest.mark.parametrize("reverse", [False, True])
def test_chunks_with_carried_state_equal_one_call(reverse, path):
    x, r, h0 = inputs(2, 50, 6, torch.float32)
    whole = scan(x, r, h0, reverse=reverse)
    cuts = [0, 1, 18, 19, 50]
    pieces, h = [], h0
    spans = list(zip(cuts[:-1], cuts[1:]))
    for lo, hi in (reversed(spans) if reverse else spans):
        y = scan(x[:, lo:hi], r[:, lo:hi], h, reverse=reverse)
        h = y[:, 0] if reverse else y[:, -1]
        pieces.append(y)
    chunked = torch.cat(pieces[::-1] if reverse else pieces, dim=1)
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-6)


def test_non_contiguous_inputs(path):
    x, r, _ = inputs(4, 9, 6, torch.float32)
    xt, rt = x.transpose(0, 2).contiguous().transpose(0, 2), r.transpose(0, 2).contiguous().transpose(0, 2)
    assert not xt.is_contiguous()
    torch.testing.assert_close(scan(xt, rt), scan(x, r))
    torch.testing.assert_close(scan(x[:, ::2], r[:, ::2]), scan(x[:, ::2].contiguous(), r[:, ::2].contiguous()))


@pytest.mark.parametrize("bad, message", [
    (lambda x, r: (x[0], r[0], None), "must be \\(B, T, C\\)"),
    (lambda x, r: (x, r[:, :3], None), "must have the shape of x"),
    (lambda x, r: (x, r.double(), None), "cast both to one dtype"),
    (lambda x, r: (x.int(), r.int(), None), "supported: float32"),
    (lambda x, r: (x, r, torch.zeros(2, 5)), "h0 must be \\(B, C\\)"),
    (lambda x, r: (x[:, :0], r[:, :0], None), "T must be at least 1"),
])
def test_bad_arguments_are_named(bad, message):
    x, r, _ = inputs(2, 4, 3, torch.float32)
    with pytest.raises((ValueError, TypeError), match=message):
        scan(*bad(x, r))


def test_torch_compile_matches_eager():
    x, r, h0 = inputs(2, 16, 8, torch.float32)
    f = lambda a, b, c: scan(a, b, c) * 2  # noqa: E731
    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(x, r, h0), f(x, r, h0))


@pytest.mark.skipif(not KERNEL, reason=f"the C++ scan kernel cannot be built here: {WHY}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("B,T,C,h0,reverse", [(1, 1, 1, False, False), (3, 131, 300, True, False),
                                              (3, 131, 300, True, True), (2, 64, 513, False, True)])
def test_kernel_equals_the_loop(dtype, B, T, C, h0, reverse):
    """The kernel does the loop's arithmetic in the loop's order: the same numbers, whatever the
    feature blocks (C = 300 and 513 cross the kernel's blocks of 256) and threads."""
    x, r, h = inputs(B, T, C, dtype, seed=C)
    h = h if h0 else None
    y = cpu.scan_fwd(x, r, h, reverse)
    torch.testing.assert_close(y, scan_mod._loop_fwd(x, r, h, reverse), rtol=1e-6, atol=1e-6)
    dy = torch.randn(x.shape, dtype=torch.float64).to(dtype)
    for a, b in zip(cpu.scan_bwd(dy, r, y, h, reverse), scan_mod._loop_bwd(dy, r, y, h, reverse)):
        assert a.dtype == dtype
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def scan_in_a_process(env):
    """In a fresh process with `env`: (whether the C++ scan loaded, why not, the last y of a 3-step scan)."""
    code = ("import torch; from sqrllm import cpu; from sqrllm.scan import scan; ok, why = cpu.available('scan_cpu'); "
            "x = torch.ones(1, 3, 2); print(ok, why, scan(x, x * 0.5)[0, -1].tolist(), sep='|')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    return out.strip().split("|")


def test_without_a_compiler_the_loop_serves_and_says_why(tmp_path):
    """CXX naming no compiler: the kernel reports why it is unavailable, and scan still works."""
    env = {"CXX": str(tmp_path / "no-such-compiler"), "SQRLLM_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"}
    ok, why, last = scan_in_a_process(env)
    assert ok == "False" and "no C++ compiler" in why and "set CXX" in why
    assert last == "[1.75, 1.75]"


@pytest.mark.skipif(not KERNEL, reason=f"the C++ scan kernel cannot be built here: {WHY}")
def test_an_empty_cxx_is_the_default_compiler_and_a_bad_cached_library_is_rebuilt(tmp_path):
    """CXX set but empty (an unset variable in a script) means c++; a cached library that does not load
    (cut short by a full disk, say) is built again; the library is readable by others than its builder."""
    env = {**os.environ, "CXX": " ", "SQRLLM_CACHE": str(tmp_path / "cache")}
    assert scan_in_a_process(env) == ["True", "", "[1.75, 1.75]"]
    (lib,) = (tmp_path / "cache").glob("scan_cpu-*.so")
    umask = os.umask(0)
    os.umask(umask)
    assert lib.stat().st_mode & 0o777 == 0o755 & ~umask  # not mkstemp's 0600
    lib.write_bytes(b"not a library")
    assert scan_in_a_process(env) == ["True", "", "[1.75, 1.75]"]
    assert lib.stat().st_size > 1000


def test_without_a_home_folder_sqrllm_cache_is_enough(monkeypatch, tmp_path):
    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(cpu.Path, "home", no_home)
    monkeypatch.delenv("SQRLLM_CACHE", raising=False)
    with pytest.raises(ImportError, match="no home folder for the kernel cache; set SQRLLM_CACHE"):
        cpu._cache()
    monkeypatch.setenv("SQRLLM_CACHE", str(tmp_path))
    assert cpu._cache() == tmp_path


def test_an_unwritable_kernel_cache_is_named_and_the_loop_serves(tmp_path):
    """SQRLLM_CACHE under a regular file: the kernel says where it could not write and what to set, and
    scan still works (on the loop)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    ok, why, last = scan_in_a_process({**os.environ, "SQRLLM_CACHE": str(blocker / "cache")})
    assert ok == "False" and str(blocker / "cache") in why and "SQRLLM_CACHE" in why
    assert last == "[1.75, 1.75]"
