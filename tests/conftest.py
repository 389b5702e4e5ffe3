"""Fixtures shared by the test modules."""

import importlib.util
from pathlib import Path

import pytest
import torch


def load_script(name):
    """scripts/<name>.py as a module, for tests of the functions in it."""
    path = Path(__file__).resolve().parent.parent / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors and models run fastest on one intra-op thread: a second only adds contention on a
    shared CPU. A module takes it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fused_core_calls(monkeypatch):
    """Counts the calls that take a sqrll layer's fused core op (sqrllm.core._Core) rather than the
    composition of torch ops: on a CUDA machine without CuPy, a test comparing the two would compare
    the composition with itself."""
    from sqrllm import core

    calls, apply = [], core._Core.apply
    monkeypatch.setattr(core._Core, "apply", lambda *a: calls.append(1) or apply(*a))
    return calls


TEXT = "".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(400))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A data_dir with a tiny corpus (corpus.txt) prepared as datasets 'tiny' (characters) and 'bytes'."""
    from sqrllm.prepare import prepare_text

    root = tmp_path_factory.mktemp("data")
    (root / "corpus.txt").write_text(TEXT)
    prepare_text(root / "tiny", [root / "corpus.txt"], level="char", val_fraction=0.1)
    prepare_text(root / "bytes", [root / "corpus.txt"], level="byte", val_fraction=0.1)
    return root
