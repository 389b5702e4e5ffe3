# Sourced by the scripts/gpu_*.sh scripts before their work: logs under $OUT (default: out/),
# unbuffered Python output, and this checkout installed in place (no dependencies: the device machine
# has torch and CuPy already); checkout_package DIR makes another checkout's package importable from DIR.
set -o pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }

checkout_package() {  # DIR's sqrllm imports with its own kernels, as pyproject.toml maps them (for PYTHONPATH=DIR)
    [ -e "$1/sqrllm/kernels" ] || cp -r "$1/kernels" "$1/sqrllm/kernels"
}
