"""Sample from a trained SqrLLM.

    python sample.py --ckpt out/small/ckpt.pt
    python sample.py --ckpt out/shakespeare_char_cpu/ckpt.pt --prompt "ROMEO:" --temperature 0.8 --top_p 0.95
    python sample.py --ckpt out/small/ckpt.pt --prompt_file doc.txt --save_state doc.state --max_new_tokens 0
    python sample.py --ckpt out/small/ckpt.pt --load_state doc.state --prompt "Summary:" --stop "\\n\\n"
    python sample.py --ckpt out/shakespeare_char_cpu/ckpt.pt --interactive --stop "\\n\\n"

The prompt runs through the model in parallel; then each token is one recurrent step, at the same
cost at any position. --save_state keeps the position after the prompt in a file, so a long prompt
runs once and later generations start from it (--load_state). Speeds go to stderr (--quiet: none).

In --interactive mode each line you type is fed to the model (with its newline) and the model
answers from where the conversation is; an empty line lets it go on. Commands: /help.
"""

import argparse
import os
import re
import sys
from dataclasses import fields
from pathlib import Path

import torch

from sqrllm import cpu
from sqrllm.checkpoint import CheckpointError, load_model
from sqrllm.config import ConfigError, pick_device
from sqrllm.faults import to_devnull
from sqrllm.sampling import Sampler, SamplingParams, StateError
from sqrllm.tokenizer import TokenizerError

COMMANDS = """commands:
  /reset        back to the start (the --prompt / --load_state position, or nothing)
  /retry        drop the last answer and generate another
  /save FILE    save the current position to FILE
  /load FILE    continue from a position saved in FILE
  /set [K V]    show the sampling controls, or set one (e.g. /set temperature 0.5)
  /quit         leave (so does end of input)
an empty line lets the model go on from where it is; start a line with // to feed text beginning with /"""


def unescape(s):
    """\\n, \\t and \\\\ in a command-line string to the characters they name."""
    return re.sub(r"\\([nt\\])", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m.group(1)], s)


def as_utf8(arg):
    """A command-line argument as the UTF-8 text it was typed as, also where the locale is not UTF-8
    (Python then holds its non-ASCII bytes as surrogates)."""
    try:
        return os.fsencode(arg).decode("utf-8")
    except UnicodeDecodeError:
        return arg


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="checkpoint written by train.py (out_dir/ckpt.pt)")
    ap.add_argument("--prompt", help="text to start from (default: a newline, or nothing after --load_state "
                                     "or with --interactive)")
    ap.add_argument("--prompt_file", help="read the prompt from this file instead")
    ap.add_argument("--max_new_tokens", type=int, default=500, help="per sample (per answer with --interactive)")
    ap.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    ap.add_argument("--top_k", type=int, default=200, help="sample among the k most likely tokens; 0 = all")
    ap.add_argument("--top_p", type=float, default=1.0, help="sample among the most likely tokens holding this "
                                                             "much probability; 1 = all")
    ap.add_argument("--min_p", type=float, default=0.0, help="drop tokens less likely than min_p times the "
                                                             "most likely one; 0 = off")
    ap.add_argument("--repetition_penalty", type=float, default=1.0, help="> 1 discourages recent tokens; 1 = off")
    ap.add_argument("--presence_penalty", type=float, default=0.0, help="subtracted from recent tokens' logits")
    ap.add_argument("--frequency_penalty", type=float, default=0.0, help="subtracted per recent occurrence")
    ap.add_argument("--penalty_window", type=int, default=64, help="recent tokens the penalties look at")
    ap.add_argument("--stop", nargs="+", action="extend", default=[], metavar="STR",
                    help="end a sample at any of these strings (not printed); \\n and \\t are understood")
    ap.add_argument("--num_samples", type=int, default=1, help="samples, generated together as one batch")
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--interactive", action="store_true", help="a conversation with the model; /help inside")
    ap.add_argument("--save_state", metavar="FILE", help="save the position after the prompt to FILE")
    ap.add_argument("--load_state", metavar="FILE", help="start from a position saved with --save_state")
    ap.add_argument("--quiet", action="store_true", help="no speeds or notes on stderr")
    ap.add_argument("--step", default="auto", choices=["auto", "native", "native_bf16", "fast", "graph", "plain"],
                    help="decode step: auto = a CUDA graph on a GPU, the C++ step (native) on a CPU; native_bf16 = "
                         "the C++ step with the weights rounded to bfloat16, as the exported C++ has them (about "
                         "1.6x faster, logits within the rounding); fast = PyTorch ops; plain = the model's own "
                         "forward")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads; 0 = torch's default (all cores). "
                                                           "1 is steadier on a machine busy with other work")
    args = ap.parse_args(argv)
    if args.max_new_tokens < 0 or args.num_samples < 1 or args.threads < 0:
        ap.error("--max_new_tokens must be >= 0, --num_samples >= 1 and --threads >= 0")
    if not -2**63 <= args.seed < 2**64:
        ap.error(f"--seed must be in [-2**63, 2**64), got {args.seed}")
    if args.interactive and args.num_samples != 1:
        ap.error("--interactive generates one sample; leave out --num_samples")
    args.stop = [unescape(as_utf8(s)) for s in args.stop]
    args.prompt = None if args.prompt is None else as_utf8(args.prompt)
    for name in ("ckpt", "prompt_file", "save_state", "load_state"):  # --key=~/x reaches us unexpanded
        if getattr(args, name):
            setattr(args, name, os.path.expanduser(getattr(args, name)))
    args.params = SamplingParams(**{f.name: getattr(args, f.name) for f in fields(SamplingParams)})
    try:
        args.params.check()
    except ValueError as e:
        ap.error(f"--{e}")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = pick_device(args.device)
        model, tok, _ = load_model(args.ckpt, device)
    except (ConfigError, CheckpointError, TokenizerError) as e:
        sys.exit(f"error: {e}")
    if args.step == "graph" and not device.startswith("cuda"):
        sys.exit("error: --step graph needs a CUDA device")
    if args.step.startswith("native"):
        ok, why = cpu.available()
        if not ok or device != "cpu":
            sys.exit(f"error: --step {args.step} runs on the CPU only{'' if ok else f'; here: {why}'}")
    try:
        sampler = Sampler(model, tok, step=args.step)
    except ValueError as e:
        sys.exit(f"error: {args.ckpt}: {e}")
    if args.load_state:
        try:
            sampler.load_state(args.load_state)
        except StateError as e:
            sys.exit(f"error: {e}")
    if args.prompt_file:
        try:
            prompt = Path(args.prompt_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            why = e.strerror if isinstance(e, OSError) else f"not UTF-8 text: {e.reason} at byte {e.start}"
            sys.exit(f"error: --prompt_file {args.prompt_file}: {why}")
    elif args.prompt is not None:
        prompt = args.prompt
    else:
        prompt = "" if args.load_state or args.interactive else "\n"
    try:
        sampler.feed(prompt)
    except ValueError as e:
        sys.exit(f"error: prompt: {e}")
    if sampler.logits is None and not args.interactive:
        sys.exit("error: the prompt is empty; pass --prompt with at least one character")
    if args.save_state:
        try:
            sampler.save_state(args.save_state)
        except (ValueError, OSError) as e:
            sys.exit(f"error: --save_state {args.save_state}: {e.strerror if isinstance(e, OSError) else e}")
        note(args, f"saved the position after the prompt to {args.save_state}")
    generator = torch.Generator(device=sampler.device).manual_seed(args.seed)

    if args.interactive:
        interact(sampler, args, generator)
    elif args.num_samples == 1:
        write(prompt)
        for pieces in sampler.stream(args.max_new_tokens, args.params, args.stop, 1, generator):
            write(pieces[0])
        write("\n")
    else:
        texts = [prompt] * args.num_samples
        for pieces in sampler.stream(args.max_new_tokens, args.params, args.stop, args.num_samples, generator):
            texts = [t + p for t, p in zip(texts, pieces)]
        write("".join(t + "\n---------------\n" for t in texts))
    note(args, sampler.stats.report())


def write(text):
    sys.stdout.write(text)
    sys.stdout.flush()


def note(args, text):
    if not args.quiet:
        print(text, file=sys.stderr, flush=True)


def interact(sampler, args, generator):
    """Read lines from stdin: commands, or text to feed before the model answers."""
    start = sampler.snapshot()
    before_answer = None
    tty = sys.stdin.isatty()
    if tty:
        note(args, "type text for the model; /help for commands")

    def answer():
        if sampler.logits is None:
            note(args, "nothing to continue from yet: type some text")
            return
        text = ""
        try:
            for pieces in sampler.stream(args.max_new_tokens, args.params, args.stop, None, generator):
                text += pieces[0]
                write(pieces[0])
        except KeyboardInterrupt:
            sampler.restore(before_answer)
            note(args, "\n(stopped; the answer was dropped; /retry for another)")
        if not text.endswith("\n"):
            write("\n")

    while True:
        if tty:
            sys.stderr.write("> ")
            sys.stderr.flush()
        try:
            line = sys.stdin.readline()
        except KeyboardInterrupt:
            break
        if not line:
            break
        line = line.rstrip("\n")
        cmd, _, arg = line.partition(" ")
        arg = arg.strip()
        if cmd in ("/quit", "/exit"):
            break
        elif cmd == "/help":
            note(args, COMMANDS)
        elif cmd == "/reset":
            sampler.restore(start)
            before_answer = None
        elif cmd == "/retry":
            if before_answer is None:
                note(args, "no answer to retry yet")
            else:
                sampler.restore(before_answer)
                answer()
        elif cmd in ("/save", "/load"):
            if not arg:
                note(args, f"usage: {cmd} FILE")
                continue
            arg = os.path.expanduser(arg)  # no shell here to expand ~
            try:
                if cmd == "/save":
                    sampler.save_state(arg)
                else:
                    sampler.load_state(arg)
                    before_answer = None
                note(args, f"{'saved the position to' if cmd == '/save' else 'loaded the position from'} {arg}")
            except (StateError, ValueError, OSError) as e:
                note(args, f"error: {e}")
        elif cmd == "/set":
            set_control(args, arg)
        elif line.startswith("/") and not line.startswith("//"):
            note(args, f"unknown command {cmd}; {COMMANDS}")
        else:
            try:
                sampler.feed(line[1:] + "\n" if line.startswith("//") else line + "\n" if line else "")
            except ValueError as e:
                note(args, f"error: {e}")
                continue
            before_answer = sampler.snapshot()
            answer()


def set_control(args, arg):
    """/set: show the sampling controls, or set one of them (or max_new_tokens)."""
    controls = {f.name: f.type for f in fields(SamplingParams)}
    if not arg:
        shown = [f"{k} = {getattr(args.params, k)}" for k in controls]
        note(args, "\n".join(shown + [f"max_new_tokens = {args.max_new_tokens}"]))
        return
    key, _, value = arg.partition(" ")
    kind = int if key == "max_new_tokens" else controls.get(key)
    if kind is None:
        note(args, f"unknown control {key!r}; one of: {', '.join([*controls, 'max_new_tokens'])}")
        return
    try:
        value = kind(value)
        if key == "max_new_tokens":
            if value < 0:
                raise ValueError("max_new_tokens must be >= 0")
            args.max_new_tokens = value
        else:
            old = getattr(args.params, key)
            setattr(args.params, key, value)
            try:
                args.params.check()
            except ValueError:
                setattr(args.params, key, old)
                raise
    except ValueError as e:
        note(args, f"error: {e}")
        return
    note(args, f"{key} = {value}")


if __name__ == "__main__":
    if (sys.stdout.encoding or "").lower().replace("-", "") != "utf8":  # the text is UTF-8 whatever the locale
        sys.stdout.reconfigure(encoding="utf-8")
    try:
        main()
    except BrokenPipeError:  # the reader left (`sample.py ... | head`): stop writing, as other tools do
        to_devnull(sys.stdout)
        sys.exit(1)
