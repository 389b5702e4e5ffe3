"""Export a trained SqrLLM to C++ and WebAssembly (see sqrllm/export.py).

    python scripts/export.py --ckpt out/small/ckpt.pt --out build/small
    make -C build/small && build/small/sqrllm -n 200 "def main("
    make -C build/small wasm && python -m http.server -d build/small/web    # then open the page

`make` needs a C++17 compiler (Debian: g++), `make wasm` emscripten's em++ (Debian: emscripten).
Greedy text (-t 0) is what `sample.py --step native_bf16 --temperature 0` prints: the export rounds
the weights to bfloat16, which plain sample.py does not, so its text may differ.
"""

import argparse
import sys

from sqrllm.checkpoint import CheckpointError
from sqrllm.export import ExportError, export_checkpoint


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="checkpoint written by train.py (out_dir/ckpt.pt)")
    ap.add_argument("--out", required=True, help="folder to write model.cpp, the runtime, the Makefile and web/ to")
    args = ap.parse_args(argv)
    try:
        done = export_checkpoint(args.ckpt, args.out)
    except (CheckpointError, ExportError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {done['model_cpp']} ({done['params']:,} parameters, {done['weight_bytes'] / 1e6:.2f} MB of "
          f"bfloat16 weights) and the runtime to {done['out_dir']}")
    print(f"next: make -C {done['out_dir']}          (native CLI: {done['out_dir']}/sqrllm; needs a C++17 compiler, "
          "Debian: g++)")
    print(f"      make -C {done['out_dir']} wasm     (WebAssembly: {done['out_dir']}/web/ for the page, "
          f"node {done['out_dir']}/node_cli.js for the CLI; needs em++, Debian: emscripten)")
    print("greedy text (-t 0) is what `sample.py --step native_bf16 --temperature 0` prints (bfloat16 weights)")


if __name__ == "__main__":
    main()
