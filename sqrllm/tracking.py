"""Weights & Biases logging for train.py (config wandb_log=True; pip install 'sqrllm[wandb]').

A run logs the resolved config once, then every metrics row (train loss, lr, tokens/s, ...; val
loss and bits per byte) at its step, and at each evaluation a text sample drawn from the model.
The run id goes into the checkpoint, so a resumed training continues the same wandb run.
WANDB_MODE=offline works: the run is written under out_dir/wandb/ for a later `wandb sync`.
"""

import html
import sys
from pathlib import Path

import torch

from sqrllm.config import ConfigError
from sqrllm.faults import RunStopped, StopSignals
from sqrllm.model import SqrLLM
from sqrllm.sampling import SamplingParams, Sampler
from sqrllm.tokenizer import from_meta

SAMPLE_TOKENS = 200  # tokens per eval-time sample
SAMPLE_PARAMS = SamplingParams(temperature=0.8, top_k=200)


class WandbRun:
    """A wandb run, or nothing at all (wandb_log=False, or a rank other than 0): every method is a no-op.

    Made before anything is written (it checks that wandb is installed and, unless offline, logged in);
    `start` opens the run.
    """

    def __init__(self, cfg, enabled=True):
        self.cfg, self.run, self.id, self.samples, self.wandb = cfg, None, None, [], None
        if not (cfg.wandb_log and enabled):
            return
        try:
            import wandb
        except ImportError:
            raise ConfigError("wandb_log=True needs the wandb package: pip install 'sqrllm[wandb]' "
                              "(or set wandb_log=False)") from None
        if wandb.setup().settings.mode not in ("offline", "dryrun", "disabled"):
            try:  # as wandb.init would, but before out_dir is written (in a terminal: asks for the key)
                wandb.login(verify=False)
            except wandb.errors.UsageError as e:
                raise ConfigError(f"wandb_log=True but wandb cannot log in ({e}); run `wandb login` or set "
                                  "WANDB_API_KEY, or log offline with WANDB_MODE=offline (or set wandb_log=False)"
                                  ) from None
        self.wandb = wandb

    def start(self, out_dir, run_id=None, meta=None, data_folder=None, samples=None):
        """Open the run in out_dir/wandb; run_id and samples ([step, text] rows), from a checkpoint,
        continue that run and its table of samples."""
        self.id, self.meta, self.data_folder = run_id, meta, data_folder
        self.samples = [[int(step), text] for step, text in samples or []]
        if self.wandb is None:
            return
        cfg = self.cfg
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        try:
            self.run = self.wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name or None, id=run_id,
                                       resume="allow", dir=str(out_dir), config=cfg.to_dict())
        except self.wandb.errors.Error as e:  # online: its server unreachable, the project not writable, ...
            raise ConfigError(f"wandb could not start the run ({type(e).__name__}: {e}); nothing was trained. "
                              "Check the network and the project's permissions, or log offline with "
                              "WANDB_MODE=offline (`wandb sync` uploads it later), or set wandb_log=False") from None
        self.id = self.run.id

    def log(self, row):
        """One metrics row (a dict with "step")."""
        if self.run is not None:
            self.run.log({k: v for k, v in row.items() if k != "step" and v is not None}, step=int(row["step"]))

    def log_sample(self, model, step):
        """Draw a sample from `model` (a SqrLLM) and log it with the ones before, as a table."""
        if self.run is None or not isinstance(model, SqrLLM):
            return
        text = draw_sample(model, from_meta(self.meta["tokenizer"], self.data_folder), self.meta.get("eot_id"),
                           self.cfg.seed + step)
        self.samples.append([step, text])
        table = self.wandb.Table(columns=["step", "sample"], data=[list(r) for r in self.samples])
        self.run.log({"samples": table, "sample": self.wandb.Html(f"<pre>{html.escape(text)}</pre>")}, step=step)

    def close(self, exc_type=None, exc=None, traceback=None):
        """Finish the run (an exit callback): with exit code 0, or a stopped run's status (1 for any
        other error), so the run is marked failed without waiting for the process's exit hooks.

        A stop signal while it uploads is held back (under torchrun, the launcher signals rank 0 as
        soon as another rank has exited). On a failed run, a failure to finish is reported and the
        run's own error goes on."""
        if self.run is None:
            return
        run, self.run = self.run, None
        code = 0 if exc is None else exc.code if isinstance(exc, RunStopped) else 1
        with StopSignals():
            try:
                run.finish(exit_code=code)
            except Exception as e:
                if exc is None:
                    raise
                print(f"warning: could not finish the wandb run ({type(e).__name__}: {e})", file=sys.stderr)


def draw_sample(model, tokenizer, eot_id=None, seed=0, max_new_tokens=SAMPLE_TOKENS):
    """Text the model writes from the start of a document (after an end-of-text token, or a newline)."""
    was_training = model.training
    model.eval()
    try:
        # eager and through the model's own forward: the compiled training graphs are for other shapes
        with torch.compiler.set_stance("force_eager"):
            sampler = Sampler(model, tokenizer, step="plain")
            sampler.feed([eot_id] if eot_id is not None else _start_ids(tokenizer))
            generator = torch.Generator(device=sampler.device).manual_seed(seed)
            return "".join(p[0] for p in sampler.stream(max_new_tokens, SAMPLE_PARAMS, (), 1, generator))
    finally:
        model.train(was_training)


def _start_ids(tokenizer):
    """A newline, or token 0 for a vocabulary without one (a char corpus of a single line)."""
    try:
        return tokenizer.encode("\n") or [0]
    except ValueError:
        return [0]
