"""The one training loop and the run folder it works in; pretraining/SFT (trainer.py) and GRPO (grpo.py)
are `Algorithm`s: a step function and a few hooks.

A run folder holds:
    recipe.json       the recipe; summary.json when the run ends
    checkpoints/      step-NNNNNNN/{model/, optimizer.safetensors, rng.safetensors, trainer.json}
    model/            the latest weights as an HF folder with the tokenizer, usable by every command
    metrics.jsonl     one row per logged step; tb/ the same for TensorBoard

The loop: SIGINT/SIGTERM and max_seconds (CPU time) stop it after the current step, with a checkpoint;
every `save_every` steps a checkpoint; a non-finite loss stops it before the step changes anything.
`resume` continues from the latest checkpoint, bit for bit on CPU, in the precision it ran in. checkpoint_format: "full" (the above),
"sharded" (checkpoints/step-N/sharded/ instead of model/ and optimizer.safetensors: every rank writes its
own shards, see sharded.py), or "auto" (sharded under torchrun, full in one process); a run resumes from
either, on any number of processes.

Under torchrun the algorithms hold a `distributed.Parallel`; in a single process a `SingleProcess`, the
same interface with one rank (collectives are the identity), so no code branches on which it is.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
import traceback
from pathlib import Path

import torch
from tqdm import tqdm

from ..checkpoint import SHARDED_DIR, consolidate, save_model
from ..errors import CheckpointError, NanoseekError
from ..precision import Precision, resolve_precision
from ..runio import MetricsLogger
from .allocator import keep_freed_memory
from .common import (STATE_FILE, copy_tokenizer, flatten_optimizer, latest_checkpoint, load_latest_checkpoint,
                     remove_stale_checkpoint_staging, save_checkpoint, update_routing_bias)
from .sharded import use_sharded


class TrainingError(NanoseekError):
    """The run cannot go on (a non-finite loss, a resume that does not match); names the step."""


class NonFiniteLoss(Exception):
    """Raised by a step function before it changes anything; the loop turns it into the run's error."""

    def __init__(self, value: float):
        super().__init__(value)
        self.value = value


def check_finite(value: float, parallel) -> None:
    """Raise NonFiniteLoss when a loss is not finite on this rank or any other (all stop together)."""
    if parallel.any(not math.isfinite(value)):
        raise NonFiniteLoss(value)


# ---- processes ------------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class SingleProcess:
    """A run's only process: the interface of distributed.Parallel over one rank. Collectives return
    their input (a sum or mean over one rank), the model is never sharded, and 'gathering' it gives the
    model itself."""

    rank = 0
    world_size = 1
    is_main = True
    precision = None  # set by RunFolder.resolve_precision; one process has no FSDP policy to apply

    def __init__(self, device: torch.device):
        self.device = device

    def all_reduce_sum(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        return list(tensors)

    def mean_floats(self, values: dict[str, float]) -> dict[str, float]:
        return dict(values)

    def all_reduce_max(self, value: float) -> float:
        return float(value)

    def all_gather_rows(self, table: torch.Tensor) -> torch.Tensor:
        return table

    def any(self, flag: bool) -> bool:
        return bool(flag)

    def barrier(self) -> None:
        pass

    def broadcast_object(self, obj):
        return obj

    def parallelize(self, model):
        return model

    def gather_model(self, model, device=None, everywhere: bool = False):
        return model

    def gather_optimizer(self, optimizer: torch.optim.Optimizer, model) -> dict[str, torch.Tensor]:
        return flatten_optimizer(optimizer)

    def shard_optimizer_state(self, optimizer, model, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return tensors

    def clip_grad_norm_(self, model, max_norm: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)

    def close(self) -> None:
        pass


def run_on_all_ranks(run, device: str = "auto"):
    """`run(parallel)` once per process: a SingleProcess on `device` in a single process; under torchrun
    (WORLD_SIZE > 1) a distributed.Parallel that joins the process group first and always leaves it."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return run(SingleProcess(resolve_device(device)))
    from .distributed import Parallel
    parallel = Parallel.init(device=device)
    try:
        return run(parallel)
    except BaseException as e:
        traceback.clear_frames(e.__traceback__)  # let close() free the model: the traceback's frames hold it
        raise
    finally:
        parallel.close()


# ---- the optimizer step ---------------------------------------------------------------------------
def optimizer_step(model, optimizer: torch.optim.Optimizer, loads: list[torch.Tensor], lr: float, recipe,
                   parallel) -> tuple[float, list[torch.Tensor]]:
    """Clip the gradients to recipe.grad_clip, AdamW at `lr`, clear the gradients, then DeepSeek's bias
    update (recipe.bias_update_speed) from `loads`, the expert loads of this rank's forwards, summed over
    the ranks first. Returns (the gradient norm before clipping, the summed loads)."""
    loads = parallel.all_reduce_sum(loads)
    grad_norm = parallel.clip_grad_norm_(model, recipe.grad_clip or float("inf"))
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    update_routing_bias(model, loads, recipe.bias_update_speed)
    return grad_norm.item(), loads


def add_loads(total: list[torch.Tensor] | None, loads: list[torch.Tensor]) -> list[torch.Tensor]:
    """Expert loads summed over a step's forwards."""
    return loads if total is None else [a + b for a, b in zip(total, loads)]


def set_aux_loss_alpha(model, alpha: float) -> None:
    """The weight of the sequence-wise balance loss, a training setting of the MoE layers (the model's
    config is left as it was read)."""
    for moe in model.moe_layers():
        moe.aux_loss_alpha = alpha


# ---- the run folder -------------------------------------------------------------------------------
class RunFolder:
    """recipe.out: refuses to start a fresh run over another run's checkpoints, finds the checkpoint to
    resume from and checks that the recipe still matches it, writes checkpoints (with the recipe's
    RESUME_KEYS), the recipe, the model with its tokenizer, and the summary. Errors are `error`s.

    A run folder has one writer: one run (rank 0 of it under torchrun) at a time. On opening, rank 0
    removes the staging folders a writer killed in the middle of a save left (they can be gigabytes)
    before any rank looks at the checkpoints; a second run writing the same folder at the same time
    would lose its staging folders, as it would its checkpoints."""

    def __init__(self, recipe, parallel, tokenizer_dir: str | Path | None, error=TrainingError):
        self.recipe, self.parallel, self.error = recipe, parallel, error
        self.dir = Path(recipe.out)
        self.tokenizer_dir = tokenizer_dir
        if parallel.is_main:
            remove_stale_checkpoint_staging(self.dir)
        parallel.barrier()
        latest = latest_checkpoint(self.dir)
        if latest is not None and not recipe.resume:
            raise CheckpointError(f"{self.dir} already holds checkpoints: pass resume=true to continue that run, "
                                  "or choose another out folder")
        self.resumed_from = latest if recipe.resume else None
        self.precision: Precision | None = None  # set by resolve_precision
        self.dir.mkdir(parents=True, exist_ok=True)
        self.sharded = use_sharded(recipe.checkpoint_format, parallel.world_size)
        self.saved: tuple[int, Path] | None = None  # (step, folder) of this run's last checkpoint

    def resolve_precision(self) -> Precision:
        """The precision the run computes in (printed by rank 0, recorded in recipe.json, the summary
        and every checkpoint): recipe.precision resolved on the device (docs/precision.md), the same on
        every rank (fp32 unless all ranks choose bf16). A resumed run keeps the precision its checkpoint
        ran in: `auto` takes it, an explicit other one is refused (the resumed losses would no longer
        continue the run's). Call it before the model is built or loaded: it sets parallel.precision,
        which parallelize reads (bf16: FSDP2 mixed precision, see distributed.parallelize)."""
        asked, before = self.recipe.precision, self._resumed_precision()
        if before is not None and asked == "auto":
            prec = Precision(before, f"resumed: {self.resumed_from.name} ran in {before}", auto=True)
        elif before is not None and asked != before:
            raise self.error(f"cannot resume from {self.resumed_from}: recipe field 'precision' was {before!r} "
                             f"there and is {asked!r} now (use {before!r} or 'auto', or start a new run)")
        else:
            prec = resolve_precision(asked, self.parallel.device)
            if self.parallel.any(not prec.is_bf16) and prec.is_bf16:
                prec = Precision("fp32", "another rank chose fp32", auto=prec.auto)
        self.precision = self.parallel.precision = prec
        if self.parallel.is_main:
            print(f"precision: {prec.describe()}", flush=True)
        return prec

    def _resumed_precision(self) -> str | None:
        """The precision recorded in the trainer state of the checkpoint to resume from (None for a new
        run, or a checkpoint that does not say or does not read: load then names what is wrong). A run
        records one precision in all its checkpoints, so also the one load may fall back to has it."""
        if self.resumed_from is None:
            return None
        try:
            return json.loads((self.resumed_from / STATE_FILE).read_text()).get("precision")
        except (OSError, ValueError, AttributeError):
            return None

    def load(self, optimizer_for, device) -> tuple:
        """Model, optimizer and state of the checkpoint to resume from (the newest that loads: see
        load_latest_checkpoint), after checking the recipe."""
        self.resumed_from, model, optimizer, state = load_latest_checkpoint(self.dir, optimizer_for, device,
                                                                            parallel=self.parallel)
        self.check_resume(state)
        if self.precision is not None and state.get("precision", self.precision.name) != self.precision.name:
            raise self.error(f"cannot resume from {self.resumed_from}: it ran in {state['precision']}, "
                             f"the run resolved {self.precision.name} from the newest checkpoint")
        return model, optimizer, state

    def check_resume(self, state: dict) -> None:
        saved, recipe, ckpt = state.get("recipe", {}), self.recipe, self.resumed_from
        for key in recipe.RESUME_KEYS:
            if key in saved and saved[key] != getattr(recipe, key):
                raise self.error(f"cannot resume from {ckpt}: recipe field '{key}' was {saved[key]!r} "
                                 f"there and is {getattr(recipe, key)!r} now")
        if state["step"] >= recipe.max_steps:
            raise self.error(f"{ckpt} is already at step {state['step']} >= max_steps {recipe.max_steps}; "
                             "raise max_steps to continue")

    def save(self, step: int, model, optimizer, state: dict) -> None:
        state = {**state, "recipe": {k: getattr(self.recipe, k) for k in self.recipe.RESUME_KEYS}}
        if self.precision is not None:
            state["precision"] = self.precision.name
        path = save_checkpoint(self.dir, step, model, optimizer, state, self.recipe.keep_last, self.tokenizer_dir,
                               parallel=self.parallel, sharded=self.sharded)
        self.saved = (step, path)

    def publish(self, model, step: int | None = None) -> None:
        """model/: the HF-format model and the tokenizer, written by rank 0. With sharded checkpoints, the
        one just saved at `step` is consolidated shard by shard (the model is never gathered); else the
        model is gathered from the shards."""
        if self.sharded and self.saved is not None and self.saved[0] == step:
            try:
                if self.parallel.is_main:
                    consolidate(self.saved[1] / SHARDED_DIR, self.dir / "model")
            finally:  # the other ranks wait for rank 0, also when it fails
                self.parallel.barrier()
            return
        model = self.parallel.gather_model(model)
        if self.parallel.is_main:
            save_model(model, self.dir / "model")
            if self.tokenizer_dir:
                copy_tokenizer(self.tokenizer_dir, self.dir / "model")
        self.parallel.barrier()

    def open_metrics(self, step: int) -> MetricsLogger:
        """Write recipe.json; the metrics log (rank 0), continued after `step` on resume, a fresh one for
        a fresh run."""
        recorded = self.recipe.as_dict()
        if self.precision is not None:
            recorded["resolved_precision"] = self.precision.as_dict()
        (self.dir / "recipe.json").write_text(json.dumps(recorded, indent=2))
        resumed = self.resumed_from is not None
        logger = MetricsLogger(self.dir, resume_step=step if resumed else None)
        if not resumed:
            logger.path.write_text("")
        return logger


# ---- the loop ------------------------------------------------------------------------------------
class Algorithm:
    """What run_loop runs. `state` holds step, wall_seconds and cpu_seconds (the loop counts them) and
    the algorithm's own counters; all of it goes into checkpoints. Subclasses set model, optimizer,
    folder (a RunFolder), parallel and implement `step`."""

    name = "train"  # the progress bar's label
    eval_key = ""  # a row with this key is logged whatever log_every says
    state: dict
    folder: RunFolder
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer

    def step(self, step: int) -> dict:
        """One training step (step is the number of steps done before it); returns its metrics row.
        Raises NonFiniteLoss (see check_finite) before any weight changes."""
        raise NotImplementedError

    def first_row(self) -> dict:
        """Metrics to log before the first step of a fresh run (e.g. a baseline evaluation)."""
        return {}

    def finish_row(self, row: dict, seconds: float) -> None:
        """Add counters, throughput and periodic evaluations to a step's row (step and the loop's time
        counters are already updated); `seconds`: the step's time."""

    def postfix(self, row: dict) -> dict:
        """What the progress bar shows after a step."""
        return {}

    def checkpoint_state(self) -> dict:
        """What a checkpoint stores besides the weights and the optimizer (default: state)."""
        return dict(self.state)

    def summary(self, stopped_by: str | None) -> dict:
        return {"step": self.state["step"], "stopped_by": stopped_by, "model": str(self.folder.dir / "model")}

    def plot(self) -> None:
        """Curves of the finished run (rank 0)."""


def run_loop(algo: Algorithm) -> dict:
    """Run `algo` from its state's step to recipe.max_steps (or a stop), with checkpoints, metrics and
    the progress bar; then publish the model and write the summary. Returns the summary."""
    folder = algo.folder
    recipe, parallel, state = folder.recipe, folder.parallel, algo.state
    main = parallel.is_main
    if torch.device(parallel.device).type == "cpu":
        keep_freed_memory()  # each step's large tensors reuse warm pages (allocator.py)
    step = state["step"]
    logger = folder.open_metrics(step) if main else None
    bar = tqdm(total=recipe.max_steps, initial=step, desc=algo.name, unit="step", dynamic_ncols=True,
               disable=not (recipe.progress and main))
    last_saved = step if folder.resumed_from is not None else -1
    stopped_by = None
    try:
        with StopRequest() as stop:
            if step == 0 and (row := algo.first_row()) and main:
                logger.log({"step": 0, **row})
            while step < recipe.max_steps:
                stopped_by = _stop_reason(stop, state, recipe, parallel)
                if stopped_by is not None:
                    break
                t0, c0 = time.perf_counter(), time.process_time()
                try:
                    row = algo.step(step)
                except NonFiniteLoss as e:
                    raise folder.error(f"non-finite loss ({e.value}) at step {step + 1}; stopping. The last "
                                       "checkpoint is intact: lower the learning rate and resume from it") from None
                step += 1
                seconds = time.perf_counter() - t0
                state["step"] = step
                state["wall_seconds"] += seconds
                state["cpu_seconds"] += time.process_time() - c0
                row["step"] = step
                algo.finish_row(row, seconds)
                if main and (step % recipe.log_every == 0 or algo.eval_key in row):
                    logger.log(row)
                bar.set_postfix(**algo.postfix(row))
                bar.update(1)
                if recipe.save_every and step % recipe.save_every == 0:
                    folder.save(step, algo.model, algo.optimizer, algo.checkpoint_state())
                    last_saved = step
            if last_saved != step:
                folder.save(step, algo.model, algo.optimizer, algo.checkpoint_state())
    finally:
        bar.close()
        if logger is not None:
            logger.close()
    folder.publish(algo.model, step)
    summary = algo.summary(stopped_by)
    if folder.precision is not None:
        summary["precision"] = folder.precision.name
    if main:
        algo.plot()
        (folder.dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _stop_reason(stop: "StopRequest", state: dict, recipe, parallel) -> str | None:
    """Why to stop before the next step (the same answer on every rank), or None."""
    signalled = parallel.any(stop.signal is not None)
    out_of_time = parallel.any(bool(recipe.max_seconds) and state["cpu_seconds"] >= recipe.max_seconds)
    return "signal" if signalled else "max_seconds" if out_of_time else None


class StopRequest:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint after the current step and stops."""

    def __init__(self):
        self.signal = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no signal handling
                pass
        return self

    def _handle(self, signum, frame):
        self.signal = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
