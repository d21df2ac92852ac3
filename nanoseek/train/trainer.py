"""The training loop for pretraining and SFT (they differ only in packing and loss masks).

One step = grad_accum micro-batches -> clip -> AdamW -> DeepSeek's bias update from the step's expert
loads. Every `save_every` steps and on SIGINT/SIGTERM a checkpoint is written atomically; `resume`
continues from the latest one with bit-identical losses on CPU. The run folder holds:
    model/            the latest weights as an HF folder (+ tokenizer files), usable by every command
    checkpoints/      step-NNNNNNN/{model/, optimizer.safetensors, rng.safetensors, trainer.json}
    metrics.jsonl     one row per logged step; tb/ the same for TensorBoard
    cost.json         tokens, FLOPs, MFU, device-hours, $; loss.png; recipe.json

Under torchrun (WORLD_SIZE > 1) the same loop runs data parallel with FSDP2, plus expert parallelism
when $NANOSEEK_EP > 1 (see distributed.py). `batch_size` stays the global micro-batch: each of the W
processes takes batch_size / W of its rows, so a recipe computes the same steps on any number of
processes and a run resumes on another world size. Only rank 0 prints, logs and writes files; its
checkpoints are the single-process ones (full tensors gathered on save).
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from pathlib import Path

import torch
from tqdm import tqdm

from ..checkpoint import load_model, save_model
from ..config import ModelConfig
from ..cost import CostMeter
from ..data.loader import TokenLoader
from ..errors import CheckpointError, ConfigError, NanoseekError
from ..infer import generate
from ..model import Transformer
from ..runio import MetricsLogger
from .common import (build_optimizer, copy_tokenizer, expert_loads, global_denominators,
                     latest_checkpoint, load_balance, load_checkpoint, loss_masks, lr_at, mtp_depths, plot_losses,
                     run_on_all_ranks, save_checkpoint, training_loss, update_routing_bias)
from .recipe import TrainRecipe


class TrainingError(NanoseekError):
    """The run cannot go on (a non-finite loss, a resume that does not match); names the step."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_model(recipe: TrainRecipe, device) -> Transformer:
    """A new model from preset/config (+ overrides), or the weights of init_from."""
    if recipe.init_from:
        model = load_model(recipe.init_from, device=device, dtype=torch.float32)
        model.train()
    else:
        base = (ModelConfig.preset(recipe.preset) if recipe.preset else ModelConfig.from_hf(recipe.config))
        try:
            cfg = base.replace(**recipe.model)
        except TypeError as e:
            raise ConfigError(f"recipe field 'model': {e}") from None
        cfg.validate("the recipe's model settings")
        torch.manual_seed(recipe.seed)
        model = Transformer(cfg).to(device)
    _apply_balancing_settings(model, recipe)
    return model


def _apply_balancing_settings(model: Transformer, recipe: TrainRecipe) -> None:
    cfg = model.config
    cfg.aux_loss_alpha, cfg.bias_update_speed = recipe.aux_loss_alpha, recipe.bias_update_speed
    cfg.mtp_loss_weight = recipe.mtp_loss_weight
    for moe in model.moe_layers():
        moe.aux_loss_alpha = recipe.aux_loss_alpha


class _StopRequest:
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


def train(recipe: TrainRecipe) -> dict:
    """Run (or resume) a training run; returns a summary dict (also written as summary.json).
    Started by torchrun with WORLD_SIZE > 1, every process calls this and they train together."""
    recipe.validate()
    world = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun
    if recipe.batch_size % world:
        raise ConfigError(f"invalid recipe field 'batch_size': the global batch ({recipe.batch_size} rows) must "
                          f"be divisible by the number of processes ({world})")
    return run_on_all_ranks(lambda parallel: _train(recipe, parallel), recipe.device)


def _train(recipe: TrainRecipe, parallel) -> dict:
    device = parallel.device if parallel is not None else resolve_device(recipe.device)
    main = parallel is None or parallel.is_main
    rank, world = (parallel.rank, parallel.world_size) if parallel is not None else (0, 1)
    run_dir = Path(recipe.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    _check_run_folder(run_dir, recipe)
    ckpt = latest_checkpoint(run_dir) if recipe.resume else None
    if ckpt is not None:
        model, optimizer, state = load_checkpoint(ckpt, lambda m: build_optimizer(m, recipe), device,
                                                  parallel=parallel)
        _apply_balancing_settings(model, recipe)
        _check_resume(state, recipe, ckpt)
    else:
        model = build_model(recipe, device)
        if parallel is not None:
            from .distributed import parallelize
            model = parallelize(model, parallel.mesh)
        optimizer = build_optimizer(model, recipe)
        state = {"step": 0, "tokens": 0, "wall_seconds": 0.0}
    if recipe.compile:
        model.compile()  # in place: parameter names, checkpoints and the optimizer are unchanged
    cfg = model.config
    loader = TokenLoader(recipe.data, "train", batch_size=recipe.batch_size // world, seq_len=recipe.seq_len,
                         seed=recipe.seed, whole_documents=recipe.mode == "sft", vocab_size=cfg.vocab_size,
                         rank=rank, world_size=world)
    if "loader" in state:
        loader.load_state_dict(state["loader"])
    tokenizer = _load_tokenizer(recipe.tokenizer)
    meter = logger = None
    if main:
        (run_dir / "recipe.json").write_text(json.dumps(recipe.as_dict(), indent=2))
        meter = CostMeter(cfg, run_dir / "cost.json", device=device.type, n_devices=world,
                          usd_per_hour=recipe.usd_per_hour, seq_len=recipe.seq_len,
                          include_mtp=recipe.mtp_loss_weight > 0 and len(model.mtp) > 0)
        logger = MetricsLogger(run_dir, resume_step=state["step"] if ckpt is not None else None)
        if ckpt is None:
            logger.path.write_text("")  # a fresh run starts a fresh log
    tokens_per_step = recipe.batch_size * recipe.seq_len * recipe.grad_accum
    step, tokens, wall = state["step"], state["tokens"], state["wall_seconds"]
    model.train()
    bar = tqdm(total=recipe.max_steps, initial=step, desc=recipe.mode, unit="step", dynamic_ncols=True,
               disable=not (recipe.progress and main))
    last_saved = step if ckpt is not None else -1
    try:
        with _StopRequest() as stop:
            while step < recipe.max_steps and not _stopping(stop, parallel):
                t0 = time.perf_counter()
                row = _train_step(model, optimizer, loader, recipe, step, parallel)
                step += 1
                tokens += tokens_per_step
                wall += time.perf_counter() - t0
                row.update(step=step, tokens=tokens, tokens_per_s=tokens_per_step / max(time.perf_counter() - t0,
                                                                                        1e-9))
                if main:
                    row["mfu"] = meter.update(tokens, wall).mfu
                if recipe.eval_every and (step % recipe.eval_every == 0 or step == recipe.max_steps):
                    row["val_loss"] = evaluate(model, recipe, cfg.vocab_size, parallel)
                if recipe.sample_every and tokenizer is not None and step % recipe.sample_every == 0:
                    row["sample"] = sample_text(model, tokenizer, recipe, parallel)
                if main and (step % recipe.log_every == 0 or "val_loss" in row):
                    logger.log(row)
                bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{row['lr']:.2e}",
                                tok_s=f"{row['tokens_per_s']:.0f}", mfu=f"{100 * row.get('mfu', 0):.1f}%")
                bar.update(1)
                if recipe.save_every and step % recipe.save_every == 0:
                    _save(run_dir, step, model, optimizer, loader, tokens, wall, recipe, parallel)
                    last_saved = step
            if last_saved != step:
                _save(run_dir, step, model, optimizer, loader, tokens, wall, recipe, parallel)
            interrupted = _stopping(stop, parallel)
    finally:
        bar.close()
        if logger is not None:
            logger.close()
    _publish_model(run_dir, model, recipe, parallel)
    summary = {"step": step, "tokens": tokens, "wall_seconds": wall, "interrupted": interrupted,
               "model": str(run_dir / "model"), "cost": str(run_dir / "cost.json")}
    if main:
        plot_losses(run_dir)
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _stopping(stop: _StopRequest, parallel) -> bool:
    """A signal arrived (on any rank: all of them stop after the same step)."""
    return stop.signal is not None if parallel is None else parallel.any(stop.signal is not None)


def _train_step(model, optimizer, loader, recipe: TrainRecipe, step: int, parallel=None) -> dict:
    lr = lr_at(step, recipe)
    for group in optimizer.param_groups:
        group["lr"] = lr
    totals: dict[str, float] = {}
    loads = None
    for _ in range(recipe.grad_accum):
        batch = loader.next_batch().to(model.device)
        if parallel is None:
            loss, parts = training_loss(model, batch, recipe)
            value = loss.item()
        else:  # this rank's share of the global-batch mean; the NaN check must agree on all ranks
            denominators = global_denominators(loss_masks(batch, recipe, mtp_depths(model, recipe)), parallel)
            loss, parts = training_loss(model, batch, recipe, denominators)
            value = parallel.mean_floats({"loss": loss.item()})["loss"]
        if not math.isfinite(value):
            raise TrainingError(f"non-finite loss ({value}) at step {step + 1}; stopping. The last "
                                f"checkpoint is intact: lower the learning rate and resume from it")
        (loss / recipe.grad_accum).backward()
        for key, value in parts.items():
            totals[key] = totals.get(key, 0.0) + value / recipe.grad_accum
        step_loads = expert_loads(model)
        loads = step_loads if loads is None else [a + b for a, b in zip(loads, step_loads)]
    max_norm = recipe.grad_clip or float("inf")
    if parallel is None:
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    else:  # losses averaged and expert loads summed over all ranks: the global batch's figures
        from .distributed import clip_grad_norm_
        totals = parallel.mean_floats(totals)
        loads = parallel.all_reduce_sum(loads or [])
        grad_norm = clip_grad_norm_(model, max_norm, parallel)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    update_routing_bias(model, loads or [], recipe.bias_update_speed)
    row = {**totals, "lr": lr, "grad_norm": grad_norm.item()}
    if loads:
        balance = load_balance(loads)
        row["load_max_over_mean"] = max(balance)
        row["load_balance"] = balance
        row["expert_load"] = [l.tolist() for l in loads]
    return row


@torch.no_grad()
def evaluate(model: Transformer, recipe: TrainRecipe, vocab_size: int, parallel=None) -> float | None:
    """Mean loss over the first eval_batches of the 'val' split (the same batches every time).
    Data parallel: each rank takes its rows of every batch; only whole global batches are used."""
    world, rank = (parallel.world_size, parallel.rank) if parallel is not None else (1, 0)
    try:
        val = TokenLoader(recipe.data, "val", batch_size=recipe.batch_size // world, seq_len=recipe.seq_len,
                          shuffle=False, whole_documents=recipe.mode == "sft", vocab_size=vocab_size,
                          rank=rank, world_size=world)
    except NanoseekError:
        return None  # no (or too small a) validation split
    n_batches = recipe.eval_batches
    if parallel is not None:  # every rank runs the same number of (collective) forwards
        n_batches = min(n_batches, val.rows_per_epoch // recipe.batch_size)
    was_training = model.training
    model.eval()
    plain = _no_extras(recipe)
    losses = []
    for b in val.epoch_batches(n_batches):
        b = b.to(model.device)
        if parallel is None:
            losses.append(training_loss(model, b, plain)[1]["loss"])
        else:
            den = global_denominators(loss_masks(b, plain, 0), parallel)
            losses.append(parallel.mean_floats(training_loss(model, b, plain, den)[1])["loss"])
    model.train(was_training)
    return sum(losses) / len(losses) if losses else None


def _no_extras(recipe: TrainRecipe) -> TrainRecipe:
    from dataclasses import replace
    return replace(recipe, mtp_loss_weight=0.0)


def sample_text(model: Transformer, tokenizer, recipe: TrainRecipe, parallel=None) -> str | None:
    """A sample from the prompt. Data parallel: rank 0 generates with a gathered copy (None elsewhere)."""
    if parallel is not None:
        from .distributed import gather_model
        model = gather_model(model, parallel, device=parallel.device)
        if model is None:
            return None
    ids = tokenizer.encode(recipe.sample_prompt, bos=True) or [tokenizer.bos_id]
    out = generate(model, [ids], max_new_tokens=recipe.sample_tokens, eos_token_id=tokenizer.eos_id)[0]
    model.train()
    return recipe.sample_prompt + tokenizer.decode(out, skip_special_tokens=True)


def _load_tokenizer(path: str | None):
    if not path:
        return None
    from ..tokenizer import Tokenizer
    return Tokenizer.load(path)


def _save(run_dir, step, model, optimizer, loader, tokens, wall, recipe, parallel=None):
    state = {"tokens": tokens, "wall_seconds": wall, "loader": loader.state_dict(),
             "recipe": {k: v for k, v in recipe.as_dict().items() if k in RESUME_KEYS}}
    save_checkpoint(run_dir, step, model, optimizer, state, recipe.keep_last, recipe.tokenizer, parallel=parallel)


def _publish_model(run_dir: Path, model: Transformer, recipe: TrainRecipe, parallel=None) -> None:
    if parallel is not None:
        from .distributed import gather_model
        model = gather_model(model, parallel)
        if model is None:
            parallel.barrier()
            return
    save_model(model, run_dir / "model")
    if recipe.tokenizer:
        copy_tokenizer(recipe.tokenizer, run_dir / "model")
    if parallel is not None:
        parallel.barrier()


# fields that must not change between a run and its resumption (the data order and the math depend on them)
RESUME_KEYS = ("data", "mode", "seed", "batch_size", "seq_len", "grad_accum")


def _check_resume(state: dict, recipe: TrainRecipe, ckpt: Path) -> None:
    saved = state.get("recipe", {})
    for key in RESUME_KEYS:
        if key in saved and saved[key] != getattr(recipe, key):
            raise TrainingError(f"cannot resume from {ckpt}: recipe field '{key}' was {saved[key]!r} "
                                f"there and is {getattr(recipe, key)!r} now")
    if state["step"] >= recipe.max_steps:
        raise TrainingError(f"{ckpt} is already at step {state['step']} >= max_steps {recipe.max_steps}; "
                            "raise max_steps to continue")


def _check_run_folder(run_dir: Path, recipe: TrainRecipe) -> None:
    """A fresh run never overwrites another run's checkpoints."""
    if not recipe.resume and latest_checkpoint(run_dir) is not None:
        raise CheckpointError(f"{run_dir} already holds checkpoints: pass resume=true to continue that run, "
                              "or choose another out folder")
