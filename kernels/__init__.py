"""CUDA sources for sqrllm, shipped inside the package as `sqrllm.kernels` and compiled at run time."""
from pathlib import Path

SOURCE_DIR = Path(__file__).resolve().parent
