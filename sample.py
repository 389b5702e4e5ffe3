"""Sample from a trained SqrLLM.

    python sample.py --ckpt out/small/ckpt.pt
    python sample.py --ckpt out/shakespeare_char_cpu/ckpt.pt --prompt "ROMEO:" --temperature 0.8

The prompt runs through the model in one parallel forward; then each token is one recurrent step.
"""

import argparse
import sys
from pathlib import Path

import torch

from sqrllm.checkpoint import CheckpointError, load_model
from sqrllm.sampling import generate
from sqrllm.tokenizer import StreamDecoder


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="checkpoint written by train.py (out_dir/ckpt.pt)")
    ap.add_argument("--prompt", default="\n", help="text to start from (default: a newline)")
    ap.add_argument("--prompt_file", help="read the prompt from this file instead")
    ap.add_argument("--max_new_tokens", type=int, default=500)
    ap.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    ap.add_argument("--top_k", type=int, default=200, help="sample among the k most likely tokens; 0 = all")
    ap.add_argument("--num_samples", type=int, default=1, help="samples, generated together as one batch")
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    args = ap.parse_args(argv)
    if args.max_new_tokens < 0 or args.num_samples < 1:
        ap.error("--max_new_tokens must be >= 0 and --num_samples >= 1")

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        model, tok, _ = load_model(args.ckpt, device)
    except CheckpointError as e:
        sys.exit(f"error: {e}")
    prompt = Path(args.prompt_file).read_text(encoding="utf-8") if args.prompt_file else args.prompt
    try:
        prompt_ids = tok.encode(prompt)
    except ValueError as e:
        sys.exit(f"error: prompt: {e}")
    if not prompt_ids:
        sys.exit("error: the prompt is empty; pass --prompt with at least one character")

    decoders = [StreamDecoder(tok) for _ in range(args.num_samples)]
    texts = [prompt] * args.num_samples
    stream = args.num_samples == 1
    out = sys.stdout
    if stream:
        out.write(prompt)
        out.flush()
    steps = generate(model, prompt_ids, args.max_new_tokens, args.temperature, args.top_k or None,
                     args.num_samples, args.seed)
    for ids in steps:
        for i, t in enumerate(ids.tolist()):
            piece = decoders[i].feed(t)
            texts[i] += piece
            if stream and piece:
                out.write(piece)
                out.flush()
    tails = [d.flush() for d in decoders]
    if stream:
        out.write(tails[0] + "\n")
    else:
        for text, tail in zip(texts, tails):
            out.write(text + tail + "\n---------------\n")
    out.flush()


if __name__ == "__main__":
    main()
