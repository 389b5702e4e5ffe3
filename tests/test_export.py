"""Export to C++ and WebAssembly: the native CLI (on 1 and on 2 threads), the wasm CLI under Node.js
and the web page in headless Chromium print the same greedy text as `sample.py --step native_bf16`;
logits agree with PyTorch; models the exporter does not support are refused with a message that
names the module. The CLI under Node.js reads stdin and writes files as the native one does.

Which weights are compared. The exporter rounds weights to bfloat16, so the exported model is the
checkpoint with rounded weights. Comparing it with a float32 checkpoint would mix two things: the
rounding, which changes the model (and may change its greedy text), and the C++ runtime's fidelity,
which is what these tests are about. So the tested checkpoint is trained, passed through
`round_to_bf16`, and saved: sample.py and the C++ see the very same weights, and what is left to
differ is float32 arithmetic (summation order, exp). `test_export_is_rounding_then_export` checks
that exporting a float32 model is exactly exporting its rounded twin.

Tolerance: logits agree within LOGIT_RTOL / LOGIT_ATOL (float32 accumulated in another order; about
3e-6 is seen on logits of magnitude ~15). Greedy text is byte-identical because the trained model's
top-1 margins (~0.05 at least, on this corpus) are far above that.

SentencePiece: the C++ tokenizer's ids and text match the sentencepiece package's, for unigram and
BPE models, NFKC and identity normalization, byte fallback and <unk>.

Tools: the native tests need a C++ compiler and make; the wasm tests em++ and node; the page test
em++, node, Chromium and the npm package playwright-core. Each skips, saying why, without them.
"""

import ctypes
import functools
import http.server
import json
import os
import runpy
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from sqrllm import checkpoint
from sqrllm.checkpoint import load_model
from sqrllm.config import load_config
from sqrllm.export import ExportError, bf16_bits, export
from sqrllm.gpt import GPT
from sqrllm.model import SqrLLM, round_to_bf16
from sqrllm.prepare import prepare_text
from sqrllm.qrnn import QRNN
from sqrllm.sampling import generate
from sqrllm.tokenizer import ByteTokenizer, SentencePieceTokenizer, train_sentencepiece
from sqrllm.trainer import train

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "build" / "test-artifacts"
LOGIT_RTOL, LOGIT_ATOL = 1e-4, 1e-4
N_TOKENS = 200
PROMPT = "12 café"  # a multi-byte character in the prompt and (greedy) in the output
TEXT = "".join(f"{i} café №{i % 7}: the quick brown fox jumps over the lazy dog; naïve π ≈ 3.14\n" for i in range(600))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def need(tool, why):
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} not found: {why}")


def trained_checkpoint(root, level, *extra):
    """Train a tiny model on TEXT, round its weights to bfloat16, save; -> checkpoint path."""
    prepare_text(root / level, [root / "corpus.txt"], level=level, val_fraction=0.1, vocab_size=320)
    out = root / f"run_{level}"
    train(load_config([
        f"--data_dir={root}", f"--dataset={level}", f"--out_dir={out}", "--n_layer=2", "--n_embd=48",
        "--batch_size=8", "--block_size=64", "--learning_rate=1e-2", "--min_lr=1e-3", "--warmup_iters=5",
        "--max_iters=200", "--log_interval=50", "--eval_interval=0", "--eval_stream=false", "--progress=false",
        "--num_threads=1", *extra]))
    ckpt = checkpoint.load(out / "ckpt.pt")
    model, _, _ = load_model(out / "ckpt.pt")
    ckpt["model"] = round_to_bf16(model).state_dict()
    checkpoint.save(out / "ckpt.pt", ckpt)
    return out / "ckpt.pt"


def make(build, *targets):
    need("make", "builds the exported C++")
    run = subprocess.run(["make", "-s", "-C", str(build), *targets], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def export_script(argv):
    """Run scripts/export.py's main in this process (the script is thin; this saves a torch import)."""
    return runpy.run_path(str(ROOT / "scripts" / "export.py"))["main"](argv)


def sample_py(ckpt_path, prompt, n):
    """What `sample.py --step native_bf16 --temperature 0` prints (bytes): the text the CLI's header,
    the README and scripts/export.py say `-t 0` prints."""
    run = subprocess.run([sys.executable, "sample.py", f"--ckpt={ckpt_path}", f"--prompt={prompt}", "--temperature=0",
                          f"--max_new_tokens={n}", "--device=cpu", "--step=native_bf16"], cwd=ROOT, env=ENV,
                         capture_output=True)
    assert run.returncode == 0, run.stderr
    return run.stdout


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    (root / "corpus.txt").write_text(TEXT)
    return root


@pytest.fixture(scope="module")
def byte_ckpt(corpus):
    return trained_checkpoint(corpus, "byte")


@pytest.fixture(scope="module")
def byte_build(byte_ckpt, corpus):
    need("c++", "compiles the exported model")
    build = corpus / "build_byte"
    export_script([f"--ckpt={byte_ckpt}", f"--out={build}"])
    make(build, "sqrllm", "lib")
    return build


@pytest.fixture(scope="module")
def sample_py_text(byte_ckpt):
    return sample_py(byte_ckpt, PROMPT, N_TOKENS)


@pytest.fixture(scope="module")
def wasm_build(byte_build):
    need("em++", "builds the WebAssembly target (Debian package emscripten)")
    need("node", "runs the WebAssembly build")
    make(byte_build, "wasm")
    return byte_build


@pytest.fixture(scope="module")
def lib(byte_build):
    so = ctypes.CDLL(str(byte_build / "libsqrllm.so"))
    so.sq_feed.restype = so.sq_logits.restype = ctypes.POINTER(ctypes.c_float)
    so.sq_decode.restype = so.sq_model_info.restype = ctypes.c_void_p
    so.sq_set_temperature.argtypes = so.sq_set_top_p.argtypes = [ctypes.c_float]
    so.sq_set_seed.argtypes = [ctypes.c_uint32]
    return so


def test_native_greedy_text_is_byte_identical_to_sample_py(byte_build, sample_py_text):
    run = subprocess.run([str(byte_build / "sqrllm"), "-n", str(N_TOKENS), "-t", "0", PROMPT], capture_output=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout == sample_py_text
    assert "café №" in sample_py_text[len(PROMPT.encode()):].decode()  # the model learned the corpus
    assert b"tokens/s" in run.stderr and b"tokens/s" not in run.stdout


def test_two_threads_give_the_same_text_and_logits_as_one(byte_build, lib, sample_py_text):
    """Native builds split each matrix's rows between two threads; every row is still summed by one
    thread in one order, so the text (sample.py's) and the logits are the same bits on 1 and 2 threads."""
    for n in (1, 2):
        run = subprocess.run([str(byte_build / "sqrllm"), "--threads", str(n), "-n", str(N_TOKENS), "-t", "0", PROMPT],
                             capture_output=True)
        assert run.returncode == 0, run.stderr
        assert run.stdout == sample_py_text
        assert f"tokens/s) on {n} thread".encode() in run.stderr
    ids = list(PROMPT.encode() + b" the quick brown fox")
    logits = {}
    for n in (1, 2):
        lib.sq_set_threads(n)
        lib.sq_reset()
        logits[n] = [np.array(lib.sq_feed(t)[:256], dtype=np.float32) for t in ids]
        assert lib.sq_threads_used() == n
    lib.sq_set_threads(0)
    assert all(np.array_equal(a, b) for a, b in zip(logits[1], logits[2]))
    bad = subprocess.run([str(byte_build / "sqrllm"), "--threads", "3", PROMPT], capture_output=True)
    assert bad.returncode == 2 and b"--threads needs an integer in [1, 2], got '3'" in bad.stderr


def test_cli_takes_a_prompt_after_double_dash_and_refuses_fractional_counts(byte_build):
    cli = [str(byte_build / "sqrllm"), "-q", "-t", "0"]
    for argv, prompt in [(["-n", "3", "--", "- item"], b"- item"), (["--", "-n"], b"-n"), (["--", "--"], b"--")]:
        run = subprocess.run(cli + argv, capture_output=True)
        assert run.returncode == 0 and run.stdout.startswith(prompt), (argv, run.stderr)
    bad = subprocess.run(cli + ["- item"], capture_output=True)
    assert bad.returncode == 2
    assert b"unknown option '- item' (a prompt that starts with '-' goes after --)" in bad.stderr
    for flag, value in [("-n", "1.5"), ("--tokens", "1e3"), ("-k", "-1"), ("-s", "4294967296")]:
        bad = subprocess.run(cli + [flag, value, "abc"], capture_output=True)
        assert bad.returncode == 2 and f"sqrllm: {flag} needs an integer in [".encode() in bad.stderr, bad.stderr
        assert bad.stdout == b""


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full, a device that is always full")
def test_cli_that_cannot_write_its_output_fails(byte_build, tmp_path):
    """A full disk under the text or the logits dump is exit status 1 and a message, not a silent 0."""
    cli = [str(byte_build / "sqrllm"), "-q", "-t", "0", "-n", "50"]
    with open("/dev/full", "wb") as full:
        run = subprocess.run(cli + ["abc"], stdout=full, stderr=subprocess.PIPE)
    assert run.returncode == 1 and b"sqrllm: cannot write the text to standard output" in run.stderr
    run = subprocess.run(cli + ["--dump-logits", "/dev/full", "abc"], capture_output=True)
    assert run.returncode == 1 and b"sqrllm: cannot write /dev/full" in run.stderr
    run = subprocess.run(cli + ["--dump-logits", str(tmp_path / "ok.bin"), "abc"], capture_output=True)
    assert run.returncode == 0 and (tmp_path / "ok.bin").stat().st_size == 50 * 256 * 4


def test_missing_compiler_says_what_to_install(tmp_path):
    need("make", "runs the exported Makefile")
    export(SqrLLM(256, n_layer=1, n_embd=8), {"kind": "byte"}, tmp_path)
    for target, tool, install in [("CXX", "no-such-c++", "Debian: apt install g++"),
                                  ("EMXX", "no-such-em++", "Debian: apt install emscripten")]:
        run = subprocess.run(["make", "-s", "-C", str(tmp_path), "wasm" if target == "EMXX" else "all",
                              f"{target}={tool}"], capture_output=True, text=True)
        assert run.returncode != 0, run.stderr
        assert f"sqrllm: '{tool}' not found;" in run.stderr and install in run.stderr, run.stderr
        assert "No such file" not in run.stderr  # stopped before make tried to run it


def test_logits_agree_with_pytorch_step_by_step(byte_build, byte_ckpt, tmp_path):
    dump = tmp_path / "logits.bin"
    out = subprocess.run([str(byte_build / "sqrllm"), "-n", "32", "-t", "0", "--dump-logits", str(dump), PROMPT],
                         capture_output=True, check=True).stdout
    got = np.fromfile(dump, dtype=np.float32).reshape(32, 256)
    model, tok, _ = load_model(byte_ckpt)
    ids = tok.encode(PROMPT) + list(out[len(PROMPT.encode()):-1][:31])
    want, state = [], None
    with torch.no_grad():  # one token at a time, as the C++ runs; the first row is after the whole prompt
        for i, t in enumerate(ids):
            logits, _, state = model(torch.tensor([[t]]), state=state)
            if i >= len(tok.encode(PROMPT)) - 1:
                want.append(logits[0, -1].numpy())
    np.testing.assert_allclose(got, np.stack(want), rtol=LOGIT_RTOL, atol=LOGIT_ATOL)


def test_c_abi_state_save_restore_and_sampling(lib):
    V = lib.sq_vocab_size()
    assert V == 256 and json.loads(ctypes.string_at(lib.sq_model_info()))["tokenizer"] == "byte"
    lib.sq_reset()
    for t in PROMPT.encode():
        lib.sq_feed(t)
    saved = (ctypes.c_float * lib.sq_state_size())()
    lib.sq_save_state(saved)
    first = [lib.sq_feed(t)[:V] for t in b"abc"]
    lib.sq_restore_state(saved)
    assert [lib.sq_feed(t)[:V] for t in b"abc"] == first
    assert not lib.sq_feed(V)  # an id outside the vocabulary is refused, not clamped

    def draws(seed, **settings):  # 200 tokens sampled from the saved logits; hot, so that many are likely
        lib.sq_restore_state(saved)
        lib.sq_set_temperature(settings.get("temperature", 3.0))
        lib.sq_set_top_k(settings.get("top_k", 0))
        lib.sq_set_top_p(settings.get("top_p", 1.0))
        lib.sq_set_seed(seed)
        return [lib.sq_sample() for _ in range(200)]

    assert draws(1) == draws(1) and draws(1) != draws(2) and len(set(draws(1))) > 2
    assert len(set(draws(3, top_k=2))) <= 2 and len(set(draws(3, top_k=1))) == 1
    logits = np.ctypeslib.as_array(lib.sq_logits(), shape=(V,))
    p = np.exp((logits - logits.max()) / 3.0)
    p /= p.sum()
    nucleus = set(np.argsort(-p)[:np.searchsorted(np.cumsum(np.sort(p)[::-1]), 0.5) + 1])
    assert set(draws(4, top_p=0.5)) <= nucleus
    assert set(draws(5, temperature=0.0)) == {int(np.argmax(logits))}


def test_vector_hot_loops_are_bit_identical_to_the_plain_loop(byte_build, lib, tmp_path):
    """The SIMD versions of the matrix-vector loop (the library as built: AVX2 where the CPU has it;
    the baseline x86-64 version alone) against the plain C++ loop they stand for."""
    flags = {"plain": ["-DSQ_PLAIN"], "baseline": ["-DSQ_HOT="]}
    builds = {name: subprocess.Popen(["c++", "-O1", *extra, "-std=c++17", "-ffp-contract=off", "-fno-trapping-math",
                                      "-pthread", "-shared", "-fPIC", "-o", str(tmp_path / f"lib{name}.so"),
                                      str(byte_build / "model.cpp")]) for name, extra in flags.items()}
    assert all(b.wait() == 0 for b in builds.values())
    libs = [lib] + [ctypes.CDLL(str(tmp_path / f"lib{name}.so")) for name in flags]
    for so in libs:
        so.sq_feed.restype = ctypes.POINTER(ctypes.c_float)
        so.sq_reset()
    for t in PROMPT.encode() + b" the quick brown fox":
        got, plain, baseline = (np.array(so.sq_feed(t)[:256], dtype=np.float32) for so in libs)
        assert np.array_equal(got, plain) and np.array_equal(baseline, plain)


def test_stream_decoder_replaces_invalid_utf8_as_python_does(lib):
    """A byte-level model can emit any bytes; the text must come out as sample.py's would."""
    rng = np.random.default_rng(0)
    pieces = [b"\xe2\x82\xac", b"\xf0\x9f\x98\x80", b"\xed\xa0\x80", b"\xc0\xaf", b"\xe0\x80", b"\xf4\x90", b"\xff"]
    for trial in range(200):
        data = b"".join(bytes(rng.integers(0, 256, rng.integers(0, 4)).tolist()) + pieces[rng.integers(len(pieces))]
                        for _ in range(rng.integers(1, 6)))
        n = ctypes.c_int()
        lib.sq_reset()
        got = b"".join(ctypes.string_at(lib.sq_decode(b, ctypes.byref(n)), n.value) for b in [*data, -1])
        assert got == data.decode("utf-8", errors="replace").encode(), data


@pytest.mark.parametrize("level, options", [
    ("char", ["--tie_weights=false", "--bias=false", "--n_mem=24", "--n_ffn=80", "--mlp_every=2"]),
    ("sentencepiece", []),  # the project's SentencePiece setup: identity normalization, byte fallback
], ids=["char-untied-no-bias", "sentencepiece"])
def test_other_vocabularies_and_shapes_print_sample_py_text(level, options, corpus):
    need("c++", "compiles the exported model")
    ckpt = trained_checkpoint(corpus, level, "--n_embd=32", "--max_iters=100", *options)
    build = corpus / f"build_{level}"
    export_script([f"--ckpt={ckpt.parent}", f"--out={build}"])  # the run's folder, as sample.py takes it
    make(build, "sqrllm")
    run = subprocess.run([str(build / "sqrllm"), "-n", str(N_TOKENS), "-t", "0", PROMPT], capture_output=True)
    assert run.stdout == sample_py(ckpt, PROMPT, N_TOKENS)
    if level == "char":
        bad = subprocess.run([str(build / "sqrllm"), "-n", "5", "Zebra"], capture_output=True)
        assert bad.returncode != 0 and b"outside this model's vocabulary at byte 0" in bad.stderr
    if level == "sentencepiece":
        assert_text_ends_at_end_of_text(ckpt, corpus / "eot")


def assert_text_ends_at_end_of_text(ckpt, folder):
    """A model rigged so that its greedy choice is always end-of-text: the CLI prints just the prompt and
    stops, as sample.py does (its text ends at the tokenizer's eot_id)."""
    model, tok, saved = load_model(ckpt)
    with torch.no_grad():  # blocks add nothing; logits = wte[:, 0] * (a positive number), largest at eot
        for block in model.blocks:
            block.inner.out.weight.zero_()
            block.inner.out.bias.zero_()
        model.norm_f.weight.zero_()[0] = 1.0
        model.wte.weight[:, 0] = 0.01
        model.wte.weight[tok.eot_id, 0] = 1.0
    export(model, saved["tokenizer"], folder, config=saved["config"], base_dir=Path(ckpt).parent)
    make(folder, "sqrllm", "CXXFLAGS=-O1")
    run = subprocess.run([str(folder / "sqrllm"), "-n", "50", "-t", "0", PROMPT], capture_output=True)
    assert run.stdout == (PROMPT + "\n").encode()
    assert b"generated 0 tokens" in run.stderr  # stopped there (end-of-text itself has no text)


def test_wasm_under_node_prints_the_same_text(wasm_build, sample_py_text):
    run = subprocess.run(["node", str(wasm_build / "node_cli.js"), "-n", str(N_TOKENS), "-t", "0", PROMPT],
                         capture_output=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout == sample_py_text


def test_wasm_under_node_reads_stdin_and_writes_files_as_native(wasm_build, sample_py_text, tmp_path):
    node_cli = ["node", str(wasm_build / "node_cli.js"), "-q", "-t", "0"]
    run = subprocess.run(node_cli + ["-n", str(N_TOKENS)], input=PROMPT.encode(), capture_output=True)
    assert run.returncode == 0 and run.stdout == sample_py_text, run.stderr
    # a relative path is the working directory's; the rows are native's, bit for bit
    run = subprocess.run(node_cli + ["-n", "8", "--dump-logits", "wasm.bin", "--", "-x"], cwd=tmp_path,
                         capture_output=True)
    assert run.returncode == 0 and run.stdout.startswith(b"-x"), run.stderr
    subprocess.run([str(wasm_build / "sqrllm"), "-q", "-t", "0", "-n", "8", "--dump-logits", str(tmp_path / "native.bin"),
                    "--", "-x"], capture_output=True, check=True)
    assert (tmp_path / "wasm.bin").stat().st_size == 8 * 256 * 4
    assert (tmp_path / "wasm.bin").read_bytes() == (tmp_path / "native.bin").read_bytes()
    bad = subprocess.run(node_cli + ["--dump-logits", str(tmp_path / "no" / "dir.bin"), "abc"], capture_output=True)
    assert bad.returncode == 1 and b"cannot write" in bad.stderr


def test_wasm_links_a_model_larger_than_emscriptens_default_memory(tmp_path):
    """The weights are static data: 6.5M parameters (13 MB of bfloat16) outgrow the 16 MiB that
    emscripten starts a module with, which failed to link before the Makefile sized it."""
    need("em++", "builds the WebAssembly target (Debian package emscripten)")
    need("node", "runs the WebAssembly build")
    torch.manual_seed(0)
    model = SqrLLM(256, n_layer=4, n_embd=384, n_mem=384)
    with torch.no_grad():  # weights larger than at init, so that greedy text does not repeat one byte
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 2 / p.shape[1] ** 0.5)
    model = round_to_bf16(model).eval()
    assert sum(p.numel() for p in model.parameters()) > 6_000_000
    export(model, {"kind": "byte"}, tmp_path)
    make(tmp_path, "node/sqrllm.js")
    run = subprocess.run(["node", str(tmp_path / "node_cli.js"), "-q", "-n", "24", "-t", "0", "abc"],
                         capture_output=True)
    assert run.returncode == 0, run.stderr
    want = generate(model, ByteTokenizer(), "abc", 24, step="native_bf16", temperature=0)[0]
    assert len(set(want)) > 5 and run.stdout.decode("utf-8", errors="replace") == "abc" + want + "\n"


WASM_LOGITS_JS = """
const fs = require("fs"), path = require("path"), [dir, ids] = process.argv.slice(1);
require(path.join(dir, "web", "sqrllm.js"))({noInitialRun: true,
    wasmBinary: fs.readFileSync(path.join(dir, "web", "sqrllm.wasm"))}).then((M) => {
  let p = 0;
  for (const t of JSON.parse(ids)) p = M._sq_feed(t);
  console.log(JSON.stringify(Array.from(M.HEAPF32.subarray(p >> 2, (p >> 2) + M._sq_vocab_size()))));
});
"""


def test_wasm_logits_are_bit_identical_to_native(wasm_build, lib):
    """Same float32 operations in the same order (SIMD lanes included): the same bits."""
    ids = list(PROMPT.encode() + b" the quick brown fox")
    run = subprocess.run(["node", "-e", WASM_LOGITS_JS, str(wasm_build), json.dumps(ids)], capture_output=True,
                         text=True, check=True)
    lib.sq_reset()
    for t in ids:
        native = lib.sq_feed(t)
    assert np.array_equal(np.array(json.loads(run.stdout), dtype=np.float32), np.array(native[:256], dtype=np.float32))


@pytest.fixture
def page_server(wasm_build):
    handler = functools.partial(_QuietHandler, directory=str(wasm_build / "web"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/index.html"
    server.shutdown()
    server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def _node_path_with_playwright():
    for root in [os.environ.get("NODE_PATH", ""), *_npm_global_root()]:
        for folder in filter(None, root.split(os.pathsep)):
            if (Path(folder) / "playwright-core" / "package.json").is_file():
                return folder
    return None


def _npm_global_root():
    if shutil.which("npm") is None:
        return []
    run = subprocess.run(["npm", "root", "-g"], capture_output=True, text=True)
    return [run.stdout.strip()] if run.returncode == 0 else []


def test_web_page_in_headless_chromium_shows_the_same_text(page_server, sample_py_text, tmp_path):
    chromium = os.environ.get("CHROMIUM") or shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium not found: drives the web page (Debian package chromium)")
    node_path = _node_path_with_playwright()
    if node_path is None:
        pytest.skip("the npm package playwright-core is not installed (npm install -g playwright-core)")
    shot = tmp_path / "export_page.png"
    run = subprocess.run(["node", str(ROOT / "tests" / "drive_page.js"), page_server, PROMPT, str(N_TOKENS), str(shot)],
                         capture_output=True, text=True, timeout=120,
                         env={**ENV, "NODE_PATH": node_path, "CHROMIUM": chromium})
    assert run.returncode == 0, run.stderr
    page = json.loads(run.stdout)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shot, ARTIFACTS / shot.name)
    assert page["errors"] == [] and page["status"].startswith(f"done: {N_TOKENS} tokens"), page
    assert (page["text"] + "\n").encode() == sample_py_text


def test_export_is_rounding_then_export(tmp_path):
    torch.manual_seed(0)
    model = SqrLLM(256, n_layer=2, n_embd=16, mlp_every=1)
    export(model, {"kind": "byte"}, tmp_path / "a")
    export(round_to_bf16(model), {"kind": "byte"}, tmp_path / "b")
    assert (tmp_path / "a" / "model.cpp").read_text() == (tmp_path / "b" / "model.cpp").read_text()
    # round to nearest, ties to even: 1 + 2^-8 lies halfway between 1 and 1 + 2^-7
    x = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-8 + 2**-16, -2.0, 0.0])
    assert bf16_bits(x).tolist() == [0x3F80, 0x3F82, 0x3F81, 0xC000, 0x0000]


def test_a_checkpoint_path_that_is_not_utf8_is_named_in_one_comment_line(tmp_path):
    # a byte that is not UTF-8 in a path reaches Python as a lone surrogate, which UTF-8 cannot write
    export(SqrLLM(256, n_layer=1, n_embd=8), {"kind": "byte"}, tmp_path, source="runs/caf\udce9\nx/ckpt.pt")
    first = (tmp_path / "model.cpp").read_text(encoding="utf-8").splitlines()[0]
    assert first == "// Generated by sqrllm.export from runs/caf\\udce9 x/ckpt.pt; re-export rather than edit."


def test_memory_restarts_at_end_of_text_as_in_training(tmp_path):
    # a model trained with reset_at_eot forgets all before each end-of-text token; sq_feed does the same
    need("c++", "compiles the exported model")
    torch.manual_seed(0)
    model = round_to_bf16(SqrLLM(256, n_layer=2, n_embd=16, mlp_every=1, init_std=0.3)).eval()
    model.reset_token = eot = ord("|")  # as load_model sets it for a reset_at_eot checkpoint
    export(model, {"kind": "byte"}, tmp_path, config={"reset_at_eot": True, "n_layer": 2})
    make(tmp_path, "lib")
    so = ctypes.CDLL(str(tmp_path / "libsqrllm.so"))
    so.sq_feed.restype = ctypes.POINTER(ctypes.c_float)
    text = b"first doc|second doc|x"
    so.sq_reset()
    got = np.stack([np.array(so.sq_feed(t)[:256], dtype=np.float32) for t in text])

    def pytorch(reset_token):
        model.reset_token, rows, state = reset_token, [], None
        with torch.no_grad():
            for t in text:
                logits, _, state = model(torch.tensor([[t]]), state=state)
                rows.append(logits[0, -1].numpy())
        return np.stack(rows)

    np.testing.assert_allclose(got, pytorch(eot), rtol=LOGIT_RTOL, atol=LOGIT_ATOL)
    after = text.index(b"|") + 1  # past the first reset the memory mattered: without it, other logits
    assert not np.allclose(got[after:], pytorch(None)[after:], rtol=1e-2, atol=1e-2)


SP_ALPHABET = list("abcdefghij klmnop  XYZ0123456789.,;:!?\n\t-_()[]") + list("éüπ≈—中文😀👍🏽ﬁＡ①㍿\u00a0\u3000\x00\u2581")


@pytest.mark.parametrize("options", [
    {"model_type": "unigram", "vocab_size": 320, "byte_fallback": True},  # NFKC normalization (the default)
    {"model_type": "bpe", "vocab_size": 120, "normalization_rule_name": "identity", "add_dummy_prefix": False,
     "remove_extra_whitespaces": False, "character_coverage": 0.99},  # runs of unknown characters are one <unk>
], ids=["unigram-nfkc-byte-fallback", "bpe-identity-unk"])
def test_sentencepiece_ids_and_text_match_the_sentencepiece_package(options, corpus, tmp_path):
    """The C++ tokenizer, on an exported model with a SentencePiece vocabulary (untrained weights), against
    sqrllm's SentencePieceTokenizer (the sentencepiece package's ids, with U+2581 set apart) and, for
    malformed UTF-8, which only the C ABI can be given, against the package itself."""
    spm = pytest.importorskip("sentencepiece")
    need("c++", "compiles the exported model")
    spm.SentencePieceTrainer.train(input=str(corpus / "corpus.txt"), model_prefix=str(tmp_path / "tok"),
                                   minloglevel=2, **options)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tok.model"))
    tok = SentencePieceTokenizer(tmp_path / "tok.model")
    export(SqrLLM(sp.vocab_size(), n_layer=1, n_embd=8), {"kind": "sentencepiece", "model_file": "tok.model"},
           tmp_path / "build", base_dir=tmp_path)
    make(tmp_path / "build", "lib", "CXXFLAGS=-O1")  # speed is not the point here
    lib = ctypes.CDLL(str(tmp_path / "build" / "libsqrllm.so"))
    lib.sq_decode.restype = ctypes.c_void_p
    rng = np.random.default_rng(0)
    texts = [b"", b"   ", b"  two  spaces  ", b"<s> </s> <unk> <0x41>", b"bad \xff utf-8 \xe2\x82", TEXT[:300].encode()]
    texts += ["".join(rng.choice(SP_ALPHABET, rng.integers(1, 40))).encode() for _ in range(200)]
    for text in texts:
        ids = (ctypes.c_int * (4 * len(text) + 8))()
        n = lib.sq_encode(text, len(text), ids, len(ids))
        try:
            want = tok.encode(text.decode("utf-8"))
        except UnicodeDecodeError:
            want = sp.encode(text)
        assert list(ids[:n]) == want, text
        lib.sq_reset()
        size = ctypes.c_int()
        decoded = b"".join(ctypes.string_at(lib.sq_decode(i, ctypes.byref(size)), size.value) for i in [*ids[:n], -1])
        # token by token, the dummy prefix's space stays: it separates a continuation from the prompt
        assert decoded.decode() in (sp.decode(list(ids[:n])), " " + sp.decode(list(ids[:n]))), text


def test_sentencepiece_features_the_runtime_lacks_are_refused(corpus, tmp_path):
    spm = pytest.importorskip("sentencepiece")
    spm.SentencePieceTrainer.train(input=str(corpus / "corpus.txt"), model_prefix=str(tmp_path / "tok"),
                                   vocab_size=100, user_defined_symbols=["<sep>"], minloglevel=2)
    with pytest.raises(ExportError, match="tok.model uses user-defined symbols"):
        export(SqrLLM(100, n_layer=1, n_embd=8), {"kind": "sentencepiece", "model_file": "tok.model"}, tmp_path / "b",
               base_dir=tmp_path)


def _with_qrnn(m):
    m.blocks[1].inner = QRNN(16, 16)


def _with_extra_norm(m):
    m.blocks[0].extra = nn.LayerNorm(16)


def _with_hook(m):
    m.blocks[2].norm.register_forward_hook(lambda mod, args, out: out * 2)


def _with_max_norm(m):
    m.wte.max_norm = 1.0


@pytest.mark.parametrize("change, message", [
    (_with_qrnn, "blocks.1.inner is a QRNN"),
    (_with_extra_norm, "blocks.0.extra (LayerNorm)"),
    (_with_hook, "blocks.2.norm (RMSNorm) has forward hooks"),
    (_with_max_norm, "wte (Embedding) has max_norm"),
])
def test_unsupported_model_is_refused_naming_the_module(change, message, tmp_path):
    model = SqrLLM(256, n_layer=2, n_embd=16, mlp_every=1)
    change(model)
    with pytest.raises(ExportError, match=message.replace("(", r"\(").replace(")", r"\)")):
        export(model, {"kind": "byte"}, tmp_path)
    assert not (tmp_path / "model.cpp").exists()


def test_unsupported_config_or_tokenizer_is_refused(tmp_path):
    model = SqrLLM(256, n_layer=1, n_embd=16)
    with pytest.raises(ExportError, match="config key 'attention'"):
        export(model, {"kind": "byte"}, tmp_path, config={"n_layer": 1, "attention": "full"})
    with pytest.raises(ExportError, match="tokenizer kind 'wordpiece' is not supported"):
        export(model, {"kind": "wordpiece"}, tmp_path)


def test_every_training_config_key_is_known_to_the_exporter(tmp_path):
    # A checkpoint's config holds every Config field; a field the exporter does not know makes it
    # refuse every checkpoint, so a new training option must be classified in CONFIG_KEYS.
    model = SqrLLM(256, n_layer=1, n_embd=16, n_mem=16, n_ffn=32)
    export(model, {"kind": "byte"}, tmp_path, config=load_config(["--n_layer=1"]).to_dict())
    assert (tmp_path / "model.cpp").exists()


def test_export_script_reports_errors_in_one_line(tmp_path):
    with pytest.raises(SystemExit, match="^error: checkpoint .*nope.pt not found"):
        export_script([f"--ckpt={tmp_path}/nope.pt", f"--out={tmp_path}/b"])
    ckpt = tmp_path / "run" / "ckpt.pt"
    ckpt.parent.mkdir()
    cfg = load_config(["--n_layer=1", "--n_embd=16"])
    model = SqrLLM.from_config(cfg, 256)
    checkpoint.save(ckpt, {"format": checkpoint.FORMAT, "model": model.state_dict(), "config": cfg.to_dict(),
                           "vocab_size": 256, "tokenizer": {"kind": "byte"}})
    taken = tmp_path / "notes.txt"
    taken.write_text("a file where the export's folder would go")
    with pytest.raises(SystemExit, match=f"^error: cannot write the export to {taken} \\(Not a directory"):
        export_script([f"--ckpt={ckpt}", f"--out={taken}"])
    assert taken.read_text() == "a file where the export's folder would go"


def test_a_sentencepiece_checkpoint_is_read_through_a_link_and_named_without_its_model(tmp_path):
    train_sentencepiece([TEXT], tmp_path / "run" / "tokenizer.model", 400)
    tok = SentencePieceTokenizer(tmp_path / "run" / "tokenizer.model")
    cfg = load_config(["--n_layer=1", "--n_embd=16"])
    ckpt = tmp_path / "run" / "ckpt.pt"
    checkpoint.save(ckpt, {"format": checkpoint.FORMAT, "model": SqrLLM.from_config(cfg, tok.vocab_size).state_dict(),
                           "config": cfg.to_dict(), "vocab_size": tok.vocab_size, "tokenizer": tok.to_meta()})
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "link.pt").symlink_to(ckpt)  # its tokenizer.model lies beside the target
    export_script([f"--ckpt={tmp_path / 'elsewhere' / 'link.pt'}", f"--out={tmp_path / 'build'}"])
    assert (tmp_path / "build" / "model.cpp").is_file()
    shutil.copy(ckpt, tmp_path / "elsewhere" / "copy.pt")  # copied without it
    with pytest.raises(SystemExit, match=f"^error: SentencePiece model {tmp_path / 'elsewhere' / 'tokenizer.model'} "
                                         "not found"):
        export_script([f"--ckpt={tmp_path / 'elsewhere' / 'copy.pt'}", f"--out={tmp_path / 'build2'}"])


def test_the_gpt_baseline_is_refused_by_export_and_sample_py(tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    cfg = load_config(["--model=gpt", "--n_layer=1", "--n_embd=16", "--n_head=2"])
    model = GPT.from_config(cfg, 256)
    checkpoint.save(ckpt, {"format": checkpoint.FORMAT, "model": model.state_dict(), "config": cfg.to_dict(),
                           "vocab_size": 256, "tokenizer": {"kind": "byte"}})
    loaded, _, _ = load_model(ckpt)  # the class that trained, with its weights
    assert isinstance(loaded, GPT) and torch.equal(loaded.wpe.weight, model.wpe.weight)
    with pytest.raises(SystemExit, match="^error: model='gpt': the exporter and its C\\+\\+ runtime support sqrll"):
        export_script([f"--ckpt={ckpt}", f"--out={tmp_path / 'build'}"])
    sample = runpy.run_path(str(ROOT / "sample.py"))["main"]
    with pytest.raises(SystemExit, match="^error: .*sampling runs SqrLLM models .*not a GPT"):
        sample([f"--ckpt={ckpt}", "--device=cpu"])
    assert not (tmp_path / "build").exists()
