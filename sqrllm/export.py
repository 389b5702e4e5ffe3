"""Export a trained SqrLLM to dependency-free C++, for a native command-line program and WebAssembly.

    python scripts/export.py --ckpt out/small/ckpt.pt --out build/small
    make -C build/small          # build/small/sqrllm, the native CLI
    make -C build/small wasm     # build/small/web/: the page, sqrllm.js and sqrllm.wasm; node/: the same
                                 # for node node_cli.js

The output folder is self-contained (the C++ standard library is all it needs):
- model.cpp: the weights as bfloat16 bit patterns (uint16 arrays) and a table of the blocks; it
  includes sqrllm_runtime.h, which computes one recurrent step in float32 and implements the C ABI
  declared in sqrllm.h (reset, feed a token, logits, sampling settings, save/restore state, tokenizer).
- cli.cpp, Makefile, node_cli.js (the wasm CLI under Node.js), web/ (a static page and its Web Worker).

The architecture is read from the module tree, module by module, against what the runtime computes
(see sqrllm_runtime.h). Anything else (a module type, a hook, a stray parameter or buffer, a config
key, a tokenizer kind) is refused with an ExportError that names it.

Weights are rounded to bfloat16, to nearest even: the exported model is the checkpoint with rounded
weights. `round_to_bf16(model)` (sqrllm.model) turns a PyTorch model into exactly that model, and
`sample.py --step native_bf16` runs it: its greedy text is the exported CLI's with `-t 0` (plain
`sample.py`, with the float32 weights, may differ).
"""

import json
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from sqrllm import spm_model, tokenizer
from sqrllm.checkpoint import folder_of, load_model
from sqrllm.model import Block, GatedMLP, SqrLLM, SqrllLayer

RUNTIME = Path(__file__).resolve().parent / "export_runtime"
RUNTIME_FILES = ("sqrllm.h", "sqrllm_runtime.h", "sqrllm_sentencepiece.h", "cli.cpp", "Makefile", "node_cli.js", "web/index.html",
                 "web/worker.js")
TOKENIZERS = ("byte", "char", "sentencepiece")
KNOWN = "SqrLLM, Block, SqrllLayer, GatedMLP, nn.Embedding, nn.Linear, nn.RMSNorm, nn.Dropout, nn.ModuleList"

# Every config key must be here, so that a new key that changes the model is not exported as if it
# did not. Keys that shape the model are read from the module tree instead of the config.
CONFIG_KEYS = {
    "shape (read from the modules)": ("n_layer", "n_embd", "n_mem", "n_ffn", "mlp_every", "tie_weights", "bias"),
    "identity at inference": ("dropout", "drop_path", "zoneout"),
    "the model kind (only model='sqrll' exports; n_head is the GPT's)": ("model", "n_head"),
    "initialization only": ("init", "init_std", "forget_init", "max_timescale"),
    "training and system only": (
        "out_dir", "init_from", "log_interval", "eval_interval", "eval_only", "eval_stream", "eval_streams",
        "eval_max_tokens", "eval_batch_size", "eval_block_size", "always_save_checkpoint", "progress", "dataset",
        "data_dir", "batching", "reset_every", "burn_in", "burn_in_rows", "batch_size", "block_size",
        "gradient_accumulation_steps", "max_iters", "max_time", "learning_rate", "min_lr", "warmup_iters",
        "lr_decay_iters", "weight_decay", "beta1", "beta2", "grad_clip", "device", "dtype", "compile", "cuda_graph",
        "num_threads", "seed", "keep_checkpoints", "max_bad_steps", "allow_batch_change", "deterministic",
        "peak_flops", "ema_decay", "ema_start", "wandb_log", "wandb_project", "wandb_run_name"),
    "memory restarts at end-of-text (the runtime's sq_feed restarts it there too)": ("reset_at_eot",),
}


class ExportError(ValueError):
    """A model, config or tokenizer that the exporter does not support; the message names it."""


def bf16_bits(t):
    """A tensor's values rounded to bfloat16 (to nearest even), as their uint16 bit patterns."""
    return t.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16).ravel()


def check_config(config):
    if (config or {}).get("model", "sqrll") != "sqrll":
        raise ExportError(f"model={config['model']!r}: the exporter and its C++ runtime support sqrll models only")
    known = {key for keys in CONFIG_KEYS.values() for key in keys}
    for key in config or {}:
        if key not in known:
            raise ExportError(f"config key '{key}' (= {config[key]!r}) is unknown to the exporter, which cannot tell "
                              "whether it changes the model; add it to CONFIG_KEYS in sqrllm/export.py, and teach the "
                              "C++ runtime what it does if it changes the forward pass")


def read_tokenizer(tokenizer_meta, vocab_size, base_dir=None):
    """-> (the bytes of every token id, the end-of-text id or -1, a SentencePieceModel or None), from a
    tokenizer description (a SentencePiece model_file is looked up in base_dir, the checkpoint's folder)."""
    kind = tokenizer_meta.get("kind")
    if kind not in TOKENIZERS:
        raise ExportError(f"tokenizer kind {kind!r} is not supported by the exporter; it supports "
                          f"{', '.join(map(repr, TOKENIZERS))}")
    try:
        tok = tokenizer.from_meta(tokenizer_meta, base_dir)
    except tokenizer.TokenizerError as e:
        raise ExportError(f"tokenizer: {e}") from None
    if tok.vocab_size != vocab_size:
        raise ExportError(f"tokenizer: {tok.vocab_size} tokens but the model's embedding has {vocab_size} rows")
    tokens = [tok.token_bytes(i) for i in range(vocab_size)]
    if kind == "char" and len(set(tokens)) != len(tokens):
        raise ExportError("tokenizer: the char vocabulary lists a character twice")
    eot = getattr(tok, "eot_id", None)
    return tokens, (-1 if eot is None else eot), _sentencepiece(tok.path) if kind == "sentencepiece" else None


def _sentencepiece(path):
    """The tables of a SentencePiece model, refusing what the C++ encoder does not implement."""
    sp = spm_model.read_model(Path(path).read_bytes())
    types = [kind for _, _, kind in sp.pieces]
    refuse = [
        (sp.model_type not in (spm_model.UNIGRAM, spm_model.BPE),
         f"model type {sp.model_type} (the runtime has unigram and BPE)"),
        (sp.treat_whitespace_as_suffix, "treat_whitespace_as_suffix"),
        (spm_model.USER_DEFINED in types, "user-defined symbols"),
        (sp.model_type == spm_model.BPE and spm_model.UNUSED in types, "unused pieces in a BPE model"),
        (bool(sp.denormalizer_charsmap), "a denormalization rule"),
        (types.count(spm_model.UNKNOWN) != 1, "not exactly one <unk> piece"),
        (sp.byte_fallback and types.count(spm_model.BYTE) != 256, "byte fallback without 256 byte pieces"),
    ]
    for bad, what in refuse:
        if bad:
            raise ExportError(f"tokenizer: {path} uses {what}, which the exporter does not support")
    return sp


class _Walk:
    """Checks the module tree against what the runtime computes and collects the tensors it needs."""

    def __init__(self, model):
        self.used = set()
        if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
            raise ExportError("global module forward hooks are registered; they would change the forward pass "
                              "in ways the export cannot follow")
        self.expect(model, "model", SqrLLM, {"wte", "drop", "blocks", "norm_f", "lm_head"})
        wte = self.expect(model.wte, "wte", nn.Embedding)
        if wte.max_norm is not None:
            raise ExportError("wte (Embedding) has max_norm set, which renormalizes rows at lookup; not supported")
        self.C = wte.embedding_dim
        self.expect(model.drop, "drop", nn.Dropout)
        self.expect(model.blocks, "blocks", nn.ModuleList)
        self.blocks = [self.block(b, f"blocks.{i}") for i, b in enumerate(model.blocks)]
        self.norm_f = self.norm(model.norm_f, "norm_f")
        head = self.expect(model.lm_head, "lm_head", nn.Linear)
        if head.bias is not None or head.in_features != self.C or head.out_features != wte.num_embeddings:
            raise ExportError(f"lm_head (Linear {head.in_features} -> {head.out_features}, bias "
                              f"{head.bias is not None}) must map {self.C} -> {wte.num_embeddings} without bias")
        self.wte = self.param(wte.weight)
        self.lm_head = self.param(head.weight)
        self.vocab_size = wte.num_embeddings
        for name, p in model.named_parameters():
            if id(p) not in self.used:
                raise ExportError(f"parameter {name} {tuple(p.shape)} is not part of the forward pass the exporter "
                                  "knows; the model has been changed in a way the export cannot follow")
        for name, b in model.named_buffers():
            raise ExportError(f"buffer {name} {tuple(b.shape)} is not part of the forward pass the exporter knows")

    def expect(self, module, name, cls, children=()):
        if type(module) is not cls:
            raise ExportError(f"{name} is a {type(module).__name__}, where the exporter expects {cls.__name__}; "
                              f"it can export {KNOWN}")
        if module._forward_hooks or module._forward_pre_hooks:
            raise ExportError(f"{name} ({cls.__name__}) has forward hooks; they would change the forward pass in "
                              "ways the export cannot follow")
        if cls is not nn.ModuleList:
            extra = sorted(set(dict(module.named_children())) - set(children))
            if extra:
                child = getattr(module, extra[0])
                raise ExportError(f"{name}.{extra[0]} ({type(child).__name__}) is a module the exporter does not "
                                  f"know inside {cls.__name__}")
        return module

    def param(self, p):
        if p is None:
            return None
        self.used.add(id(p))
        return p

    def norm(self, module, name):
        self.expect(module, name, nn.RMSNorm)
        if tuple(module.normalized_shape) != (self.C,):
            raise ExportError(f"{name} (RMSNorm) normalizes over {tuple(module.normalized_shape)}, not ({self.C},)")
        eps = module.eps if module.eps is not None else torch.finfo(torch.float32).eps
        return {"weight": self.param(module.weight), "eps": float(eps)}

    def linear(self, module, name, n_in, n_out=None):
        self.expect(module, name, nn.Linear)
        if module.in_features != n_in or (n_out is not None and module.out_features != n_out):
            want = f"{n_in} -> {n_out}" if n_out is not None else f"{n_in} -> any"
            raise ExportError(f"{name} (Linear {module.in_features} -> {module.out_features}) should map {want}")
        return {"weight": self.param(module.weight), "bias": self.param(module.bias),
                "n_in": module.in_features, "n_out": module.out_features}

    def block(self, block, name):
        self.expect(block, name, Block, {"norm", "inner", "drop"})
        self.expect(block.drop, f"{name}.drop", nn.Dropout)
        norm = self.norm(block.norm, f"{name}.norm")
        inner = block.inner
        if type(inner) is SqrllLayer:
            self.expect(inner, f"{name}.inner", SqrllLayer, {"proj", "out"})
            n = inner.out.in_features
            proj = self.linear(inner.proj, f"{name}.inner.proj", self.C, 4 * n)
            out = self.linear(inner.out, f"{name}.inner.out", n, self.C)
            return {"kind": "SQRLL", "name": name, "norm": norm, "proj": proj, "out": out}
        if type(inner) is GatedMLP:
            self.expect(inner, f"{name}.inner", GatedMLP, {"proj", "out"})
            n = inner.out.in_features
            proj = self.linear(inner.proj, f"{name}.inner.proj", self.C, 2 * n)
            out = self.linear(inner.out, f"{name}.inner.out", n, self.C)
            return {"kind": "MLP", "name": name, "norm": norm, "proj": proj, "out": out}
        raise ExportError(f"{name}.inner is a {type(inner).__name__}, where the exporter expects SqrllLayer or "
                          f"GatedMLP; it can export {KNOWN}")


_HEX = np.array([f"0x{i:04x}" for i in range(1 << 16)])


def _c_array(name, bits, per_line=16):
    lines = [",".join(_HEX[bits[i:i + per_line]]) for i in range(0, bits.size, per_line)]
    return f"const uint16_t {name}[{bits.size}] = {{\n" + ",\n".join(lines) + "\n};\n"


_C_ESCAPES = {ord('"'): '\\"', ord("\\"): "\\\\", ord("?"): "\\?", ord("\n"): "\\n", ord("\t"): "\\t"}


def _c_string(data):
    """bytes -> a C string literal: printable ASCII as is, the rest as 3-digit octal escapes."""
    out = []
    for b in data:
        out.append(_C_ESCAPES.get(b) or (chr(b) if 32 <= b < 127 else f"\\{b:03o}"))
    return '"' + "".join(out) + '"'


def _c_float(x):
    text = f"{float(np.float32(x)):.9g}"  # 9 digits: the same float32 back
    return text + ("f" if any(c in text for c in ".e") else ".0f")


class _Arrays:
    """Emits each weight tensor once (a tied head shares wte's array) and names it by module path."""

    def __init__(self):
        self.names = {}
        self.parts = []
        self.n_bytes = 0

    def ref(self, tensor, name):
        if tensor is None:
            return "nullptr"
        key = id(tensor)
        if key not in self.names:
            c_name = name.replace(".", "_")
            bits = bf16_bits(tensor)
            self.parts.append(_c_array(c_name, bits))
            self.n_bytes += 2 * bits.size
            self.names[key] = c_name
        return self.names[key]


def _linear_c(arrays, lin, name):
    return (f"{{{arrays.ref(lin['weight'], name + '.weight')}, {arrays.ref(lin['bias'], name + '.bias')}, "
            f"{lin['n_out']}, {lin['n_in']}}}")


def _sentencepiece_c(sp):
    """C++ lines defining SP_SPEC, the SentencePieceSpec of sqrllm_sentencepiece.h."""
    pieces = [text.encode("utf-8") for text, _, _ in sp.pieces]
    offsets = np.cumsum([0] + [len(p) for p in pieces])
    scores = ",".join(_c_float(score) for _, score, _ in sp.pieces)
    types = ",".join(str(t) for _, _, t in sp.pieces)
    unk = next(i for i, (_, _, t) in enumerate(sp.pieces) if t == spm_model.UNKNOWN)
    lines = ["const char SP_PIECES[] =",
             *(f"    {_c_string(b''.join(pieces[i:i + 16]))}" for i in range(0, len(pieces), 16)),
             "    ;",
             f"const int SP_PIECE_OFFSETS[{len(offsets)}] = {{{','.join(map(str, offsets))}}};",
             f"const float SP_SCORES[{len(pieces)}] = {{{scores}}};",
             f"const unsigned char SP_TYPES[{len(pieces)}] = {{{types}}};"]
    charsmap = "nullptr, 0"
    if sp.precompiled_charsmap:
        data = np.frombuffer(sp.precompiled_charsmap, dtype=np.uint8)
        rows = [",".join(map(str, data[i:i + 32].tolist())) for i in range(0, data.size, 32)]
        lines += [f"// character normalization '{sp.normalizer_name}': sentencepiece's precompiled_charsmap",
                  f"const unsigned char SP_CHARSMAP[{data.size}] = {{", ",\n".join(rows), "};"]
        charsmap = f"SP_CHARSMAP, {data.size}"
    flag = lambda b: "true" if b else "false"  # noqa: E731
    lines.append(f"const sq::SentencePieceSpec SP_SPEC = {{{sp.model_type}, SP_PIECES, SP_PIECE_OFFSETS, "
                 f"SP_SCORES, SP_TYPES, {unk}, {flag(sp.byte_fallback)}, {flag(sp.add_dummy_prefix)}, "
                 f"{flag(sp.remove_extra_whitespaces)}, {flag(sp.escape_whitespaces)}, {charsmap}}};")
    return lines


def model_cpp(walk, tokens, eot, sp, info, source, reset=-1):
    """The text of model.cpp; returns (text, bytes of weight constants)."""
    arrays = _Arrays()
    wte = arrays.ref(walk.wte, "wte.weight")
    blocks = []
    for b in walk.blocks:
        n = b["name"]
        blocks.append(f"    {{sq::{b['kind']}, {arrays.ref(b['norm']['weight'], n + '.norm.weight')}, "
                      f"{_c_float(b['norm']['eps'])},\n     {_linear_c(arrays, b['proj'], n + '.inner.proj')},\n"
                      f"     {_linear_c(arrays, b['out'], n + '.inner.out')}}},  // {n}")
    norm_f = arrays.ref(walk.norm_f["weight"], "norm_f.weight")
    head = arrays.ref(walk.lm_head, "lm_head.weight")
    offsets = np.cumsum([0] + [len(t) for t in tokens])
    kind = info["tokenizer"].upper()
    n_sqrll = sum(b["kind"] == "SQRLL" for b in walk.blocks)
    text = "\n".join([
        f"// Generated by sqrllm.export from {source}; re-export rather than edit.",
        f"// SqrLLM: vocabulary {walk.vocab_size} ({info['tokenizer']}), width {walk.C}, {n_sqrll} sqrll layers and "
        f"{len(walk.blocks) - n_sqrll} gated MLPs, {info['params']:,} parameters.",
        "// Weights: bfloat16 bit patterns, rounded to nearest even from the checkpoint's float32.",
        '#include "sqrllm_runtime.h"',
        "",
        "namespace {",
        "",
        *arrays.parts,
        "const sq::Block BLOCKS[] = {",
        *blocks,
        "};",
        "",
        "// What each token stands for in decoded text",
        "const char TOKEN_BYTES[] =",
        *(f"    {_c_string(b''.join(tokens[i:i + 32]))}" for i in range(0, len(tokens), 32)),
        "    ;",
        f"const int TOKEN_OFFSETS[{len(offsets)}] = {{{','.join(map(str, offsets))}}};",
        *(_sentencepiece_c(sp) if sp else []),
        "",
        "}  // namespace",
        "",
        "const sq::Model sq::MODEL = {",
        f"    {walk.vocab_size}, {walk.C}, {wte},",
        f"    BLOCKS, {len(walk.blocks)},",
        f"    {norm_f}, {_c_float(walk.norm_f['eps'])},",
        f"    {{{head}, nullptr, {walk.vocab_size}, {walk.C}}},",
        f"    {{sq::{kind}, TOKEN_BYTES, TOKEN_OFFSETS, {'&SP_SPEC' if sp else 'nullptr'}, {eot}}},",
        f"    {_c_string(json.dumps(info).encode())},",
        f"    {reset},",
        "};",
        "",
    ])
    return text, arrays.n_bytes


def export(model, tokenizer_meta, out_dir, config=None, source="a SqrLLM", base_dir=None):
    """Write model.cpp and the runtime into out_dir; returns a summary dict (paths, weight bytes).

    base_dir: where a tokenizer's files (a SentencePiece model_file) are, usually the checkpoint's folder.
    """
    check_config(config)
    walk = _Walk(model)
    tokens, eot, sp = read_tokenizer(tokenizer_meta, walk.vocab_size, base_dir)
    info = {"vocab_size": walk.vocab_size, "n_embd": walk.C, "tokenizer": tokenizer_meta["kind"],
            "blocks": [b["kind"].lower() for b in walk.blocks], "params": sum(p.numel() for p in model.parameters()),
            "source": str(source)}
    reset = getattr(model, "reset_token", None)  # reset_at_eot: the memory restarts at end-of-text
    if reset is None and (config or {}).get("reset_at_eot"):
        if eot < 0:
            raise ExportError("reset_at_eot=True but the tokenizer has no end-of-text token to restart the memory at")
        reset = eot
    # one line of UTF-8: a path's bytes that are not UTF-8 (lone surrogates in Python) written as escapes
    named = " ".join(str(source).encode("utf-8", "backslashreplace").decode("utf-8").splitlines())
    text, weight_bytes = model_cpp(walk, tokens, eot, sp, info, named,
                                   -1 if reset is None else reset)
    out_dir = Path(out_dir)
    try:
        (out_dir / "web").mkdir(parents=True, exist_ok=True)
        (out_dir / "model.cpp").write_text(text, encoding="utf-8")
        for name in RUNTIME_FILES:
            shutil.copyfile(RUNTIME / name, out_dir / name)
    except OSError as e:
        raise ExportError(f"cannot write the export to {out_dir} ({e.strerror}: {e.filename}); pass an out folder "
                          "that can be created or written (a new folder, or an earlier export's)") from None
    return {"out_dir": out_dir, "model_cpp": out_dir / "model.cpp", "weight_bytes": weight_bytes, **info}


def export_checkpoint(ckpt_path, out_dir):
    """Export the model a train.py checkpoint holds (see `export`)."""
    model, _, ckpt = load_model(ckpt_path, "cpu")
    return export(model, ckpt["tokenizer"], out_dir, config=ckpt["config"], source=Path(ckpt_path).as_posix(),
                  base_dir=folder_of(ckpt_path))
