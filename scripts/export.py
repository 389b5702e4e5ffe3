"""Export a trained SqrLLM to C++ and WebAssembly (see sqrllm/export.py).

    python scripts/export.py --ckpt out/small/ckpt.pt --out build/small
    make -C build/small && build/small/sqrllm -n 200 "def main("
    make -C build/small wasm && python -m http.server -d build/small/web    # then open the page

`make` needs a C++17 compiler (Debian: g++), `make wasm` emscripten's em++ (Debian: emscripten).
Greedy text (-t 0) is what `sample.py --step native_bf16 --temperature 0` prints: the export rounds
the weights to bfloat16, which plain sample.py does not, so its text may differ.
"""

import argparse
import os
import shlex
import sys

from sqrllm.checkpoint import CheckpointError
from sqrllm.export import ExportError, export_checkpoint
from sqrllm.tokenizer import TokenizerError


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="checkpoint written by train.py (out_dir/ckpt.pt)")
    ap.add_argument("--out", required=True, help="folder to write model.cpp, the runtime, the Makefile and web/ to")
    args = ap.parse_args(argv)
    try:
        done = export_checkpoint(os.path.expanduser(args.ckpt), os.path.expanduser(args.out))  # --ckpt=~/x
    except (CheckpointError, ExportError, TokenizerError) as e:
        sys.exit(f"error: {e}")
    out = shlex.quote(str(done["out_dir"]))  # the commands below paste as they are, whatever the folder's name
    print(f"wrote {done['model_cpp']} ({done['params']:,} parameters, {done['weight_bytes'] / 1e6:.2f} MB of "
          f"bfloat16 weights) and the runtime to {done['out_dir']}")
    print(f"next: make -C {out}          (native CLI: {done['out_dir']}/sqrllm; needs a C++17 compiler, "
          "Debian: g++)")
    print(f"      make -C {out} wasm     (WebAssembly: {done['out_dir']}/web/ for the page, "
          f"node {shlex.quote(str(done['out_dir'] / 'node_cli.js'))} for the CLI; needs em++, Debian: emscripten)")
    print("greedy text (-t 0) is what `sample.py --step native_bf16 --temperature 0` prints (bfloat16 weights)")


if __name__ == "__main__":
    main()
