"""Pretraining and SFT (they differ only in packing and loss masks): a step function on the loop of
train/loop.py.

One step = grad_accum micro-batches, each forward under the run's precision (bf16 autocast or fp32, see
docs/precision.md; the backward and AdamW on the fp32 master weights) -> loop.optimizer_step (clip, AdamW, DeepSeek's bias update from the
step's expert loads). Besides what loop.py writes, the run folder holds cost.json (tokens, FLOPs, MFU,
device-hours, $) and loss.png; `resume` continues with bit-identical losses on CPU.

Under torchrun (WORLD_SIZE > 1) the same loop runs data parallel with FSDP2, plus expert parallelism
when $NANOSEEK_EP > 1 (see distributed.py). `batch_size` stays the global micro-batch: each of the W
processes takes batch_size / W of its rows, so a recipe computes the same steps on any number of
processes and a run resumes on another world size. Only rank 0 prints and logs; checkpoints are
sharded there by default (every rank writes its own shards through torch.distributed.checkpoint,
`checkpoint_format`; see train/sharded.py), or the single-process ones with `checkpoint_format = "full"`.
"""

from __future__ import annotations

import os
from dataclasses import replace

import torch

from ..checkpoint import load_model
from ..config import ModelConfig
from ..cost import CostMeter
from ..data.loader import TokenLoader
from ..errors import ConfigError, NanoseekError
from ..infer import generate
from ..model import Transformer
from ..tokenizer import Tokenizer
from .common import (build_optimizer, expert_loads, global_denominators, load_balance, loss_masks, lr_at,
                     mtp_depths, plot_losses, training_loss)
from .loop import (Algorithm, RunFolder, TrainingError, add_loads, check_finite, optimizer_step,
                   resolve_device, run_loop, run_on_all_ranks, set_aux_loss_alpha)
from .recipe import TrainRecipe

__all__ = ["train", "Pretrainer", "TrainingError", "build_model", "evaluate", "sample_text", "resolve_device"]


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
    return model


def train(recipe: TrainRecipe) -> dict:
    """Run (or resume) a training run; returns a summary dict (also written as summary.json).
    Started by torchrun with WORLD_SIZE > 1, every process calls this and they train together."""
    recipe.validate()
    world = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun
    if recipe.batch_size % world:
        raise ConfigError(f"invalid recipe field 'batch_size': the global batch ({recipe.batch_size} rows) must "
                          f"be divisible by the number of processes ({world})")
    return run_on_all_ranks(lambda parallel: run_loop(Pretrainer(recipe, parallel)), recipe.device)


class Pretrainer(Algorithm):
    """Pretraining / SFT on a prepared data folder: the model, the optimizer, the data loader (its
    position is part of the checkpoint) and the cost meter."""

    eval_key = "val_loss"

    def __init__(self, recipe: TrainRecipe, parallel):
        self.recipe, self.parallel, self.name = recipe, parallel, recipe.mode
        self.folder = RunFolder(recipe, parallel, recipe.tokenizer)
        self.state = {"step": 0, "tokens": 0, "wall_seconds": 0.0, "cpu_seconds": 0.0}
        saved = {}
        self.precision = self.folder.resolve_precision()  # before the model: parallelize reads it
        if self.folder.resumed_from is not None:
            self.model, self.optimizer, saved = self.folder.load(lambda m: build_optimizer(m, recipe),
                                                                 parallel.device)
            self.state.update({k: saved[k] for k in self.state if k in saved})
        else:
            self.model = parallel.parallelize(build_model(recipe, parallel.device))
            self.optimizer = build_optimizer(self.model, recipe)
        set_aux_loss_alpha(self.model, recipe.aux_loss_alpha)
        self.model.activation_checkpointing = recipe.activation_checkpointing
        if recipe.compile:
            self.model.compile()  # in place: parameter names, checkpoints and the optimizer are unchanged
        cfg = self.model.config
        self.loader = TokenLoader(recipe.data, "train", batch_size=recipe.batch_size // parallel.world_size,
                                  seq_len=recipe.seq_len, seed=recipe.seed, whole_documents=recipe.mode == "sft",
                                  vocab_size=cfg.vocab_size, rank=parallel.rank, world_size=parallel.world_size)
        if "loader" in saved:
            self.loader.load_state_dict(saved["loader"])
        self.tokenizer = _load_tokenizer(recipe.tokenizer)
        self.meter = None
        if parallel.is_main:
            self.meter = CostMeter(cfg, self.folder.dir / "cost.json", device=str(parallel.device),
                                   n_devices=parallel.world_size, usd_per_hour=recipe.usd_per_hour,
                                   seq_len=recipe.seq_len, include_mtp=mtp_depths(self.model, recipe) > 0,
                                   peak_flops=recipe.peak_flops, probe_dtype=self.precision.dtype)
        self.tokens_per_step = recipe.batch_size * recipe.seq_len * recipe.grad_accum
        self.model.train()

    def step(self, step: int) -> dict:
        """grad_accum micro-batches, each rank's loss its share of the global-batch mean, then one
        optimizer step. The row: the losses, lr, gradient norm and the expert loads."""
        r, model, parallel = self.recipe, self.model, self.parallel
        totals: dict[str, float] = {}
        loads = None
        for _ in range(r.grad_accum):
            batch = self.loader.next_batch().to(model.device)
            denominators = global_denominators(loss_masks(batch, r, mtp_depths(model, r)), parallel)
            with self.precision.autocast(parallel.device):
                loss, parts = training_loss(model, batch, r, denominators)
            check_finite(loss.item(), parallel)
            (loss / r.grad_accum).backward()
            for key, value in parts.items():
                totals[key] = totals.get(key, 0.0) + value / r.grad_accum
            loads = add_loads(loads, expert_loads(model))
        totals = parallel.mean_floats(totals)  # the global batch's losses
        lr = lr_at(step, r)
        grad_norm, loads = optimizer_step(model, self.optimizer, loads or [], lr, r, parallel)
        row = {**totals, "lr": lr, "grad_norm": grad_norm}
        if loads:
            balance = load_balance(loads)
            row["load_max_over_mean"] = max(balance)
            row["load_balance"] = balance
            row["expert_load"] = [l.tolist() for l in loads]
        return row

    def finish_row(self, row: dict, seconds: float) -> None:
        r, step = self.recipe, row["step"]
        self.state["tokens"] += self.tokens_per_step
        row.update(tokens=self.state["tokens"], tokens_per_s=self.tokens_per_step / max(seconds, 1e-9))
        if self.meter is not None:
            row["mfu"] = self.meter.update(self.state["tokens"], self.state["wall_seconds"]).mfu
        if r.eval_every and (step % r.eval_every == 0 or step == r.max_steps):
            with self.precision.autocast(self.parallel.device):
                row["val_loss"] = evaluate(self.model, r, self.model.config.vocab_size, self.parallel)
        if r.sample_every and self.tokenizer is not None and step % r.sample_every == 0:
            row["sample"] = sample_text(self.model, self.tokenizer, r, self.parallel)

    def postfix(self, row: dict) -> dict:
        return dict(loss=f"{row['loss']:.3f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_s']:.0f}",
                    mfu=f"{100 * row.get('mfu', 0):.1f}%")

    def checkpoint_state(self) -> dict:
        return {**self.state, "loader": self.loader.state_dict()}

    def summary(self, stopped_by: str | None) -> dict:
        st, run_dir = self.state, self.folder.dir
        return {"step": st["step"], "tokens": st["tokens"], "wall_seconds": st["wall_seconds"],
                "interrupted": stopped_by is not None, "model": str(run_dir / "model"),
                "cost": str(run_dir / "cost.json"), "stopped_by": stopped_by}

    def plot(self) -> None:
        plot_losses(self.folder.dir)


@torch.no_grad()
def evaluate(model: Transformer, recipe: TrainRecipe, vocab_size: int, parallel) -> float | None:
    """Mean loss over the first eval_batches of the 'val' split (the same batches every time).
    Data parallel: each rank takes its rows of every batch; only whole global batches are used."""
    world = parallel.world_size
    try:
        val = TokenLoader(recipe.data, "val", batch_size=recipe.batch_size // world, seq_len=recipe.seq_len,
                          shuffle=False, whole_documents=recipe.mode == "sft", vocab_size=vocab_size,
                          rank=parallel.rank, world_size=world)
    except NanoseekError:
        return None  # no (or too small a) validation split
    n_batches = recipe.eval_batches
    if world > 1:  # every rank runs the same number of (collective) forwards: whole global batches only
        n_batches = min(n_batches, val.rows_per_epoch // recipe.batch_size)
    was_training = model.training
    model.eval()
    plain = replace(recipe, mtp_loss_weight=0.0)
    losses = []
    for b in val.epoch_batches(n_batches):
        b = b.to(model.device)
        den = global_denominators(loss_masks(b, plain, 0), parallel)
        losses.append(parallel.mean_floats(training_loss(model, b, plain, den)[1])["loss"])
    model.train(was_training)
    return sum(losses) / len(losses) if losses else None


def sample_text(model: Transformer, tokenizer, recipe: TrainRecipe, parallel) -> str | None:
    """A sample from the prompt. Data parallel: rank 0 generates with a gathered copy (None elsewhere)."""
    model = parallel.gather_model(model, device=parallel.device)
    if model is None:
        return None
    ids = tokenizer.encode(recipe.sample_prompt, bos=True) or [tokenizer.bos_id]
    out = generate(model, [ids], max_new_tokens=recipe.sample_tokens, eos_token_id=tokenizer.eos_id)[0]
    model.train()
    return recipe.sample_prompt + tokenizer.decode(out, skip_special_tokens=True)


def _load_tokenizer(path: str | None):
    if not path:
        return None
    return Tokenizer.load(path)


