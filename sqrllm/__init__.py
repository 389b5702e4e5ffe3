"""sqrllm: small recurrent language models built on the sqrll layer.

    y[t] = r[t] * y[t-1] + x[t]      (sqrllm.scan)
"""

from sqrllm.config import Config, ConfigError, load_config
from sqrllm.model import GatedMLP, SqrLLM, SqrllLayer
from sqrllm.qrnn import QRNN, ForgetMult, forget_mult
from sqrllm.sampling import Sampler, SamplingParams, generate
from sqrllm.scan import scan, scan_ref

__all__ = ["Config", "ConfigError", "load_config", "SqrLLM", "SqrllLayer", "GatedMLP", "scan", "scan_ref",
           "QRNN", "ForgetMult", "forget_mult", "Sampler", "SamplingParams", "generate"]
