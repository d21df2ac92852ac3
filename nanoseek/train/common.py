"""Pieces every training loop shares: optimizer, schedule, losses, DeepSeek's balancing, metrics
logging, and checkpoints that resume bit for bit (safetensors + JSON, written atomically)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import uuid
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..checkpoint import SHARDED_DIR, copy_tokenizer, load_model, save_model
from ..errors import CheckpointError, NanoseekError
from ..model import Transformer
from ..runio import LEGACY_STAGING, chmod_like_new, pyplot, read_metrics, remove_stale_staging, save_figure, staged_dir
from .recipe import TrainRecipe
from .sharded import is_sharded_checkpoint, load_sharded, save_sharded

STATE_FILE = "trainer.json"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
CHECKPOINT = r"step-\d+"  # the names of checkpoint folders


# ---- optimizer and schedule --------------------------------------------------------------------
def build_optimizer(model: Transformer, recipe: TrainRecipe) -> torch.optim.AdamW:
    """AdamW; matrices (and stacked experts) decay, norms, biases and embeddings do not."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and "embed_tokens" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": recipe.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel over all tensors, ~7x faster than foreach on CPU (the for-loop default was 43% of
    # a bench-192m step); the Trainer of transformers defaults to it too (adamw_torch_fused)
    return torch.optim.AdamW(groups, lr=recipe.lr, betas=(recipe.beta1, recipe.beta2), eps=recipe.eps,
                             fused=True)


def lr_at(step: int, recipe: TrainRecipe) -> float:
    """Linear warmup, then cosine to lr * min_lr_ratio, WSD (constant, then a linear decay over the last
    wsd_decay_fraction of steps), or constant."""
    peak, floor = recipe.lr, recipe.lr * recipe.min_lr_ratio
    if step < recipe.warmup_steps:
        return peak * (step + 1) / recipe.warmup_steps
    if recipe.schedule == "constant":
        return peak
    total = max(recipe.max_steps - recipe.warmup_steps, 1)
    done = min((step - recipe.warmup_steps) / total, 1.0)
    if recipe.schedule == "cosine":
        return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * done))
    decay_start = 1.0 - recipe.wsd_decay_fraction
    if done <= decay_start:
        return peak
    return peak + (floor - peak) * (done - decay_start) / max(recipe.wsd_decay_fraction, 1e-9)


# ---- losses ------------------------------------------------------------------------------------
def masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                         denominator: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token loss over positions where mask is True. logits (B, T, V), targets/mask (B, T).
    denominator: divide the summed loss by this instead of the local count (data parallel).
    (The trainer fuses this with the head instead: `loss_weights` and Transformer(labels=...).)"""
    losses = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")
    return (losses * loss_weights(mask, denominator).flatten()).sum()


def loss_weights(mask: torch.Tensor, denominator: torch.Tensor | None = None) -> torch.Tensor:
    """Per-target weights (fp32) whose weighted sum of losses is the masked mean: mask / count, or
    mask / denominator (data parallel, see `global_denominators`)."""
    m = mask.float()
    return m / (m.sum().clamp(min=1) if denominator is None else denominator)


def mtp_cross_entropy(mtp_logits: list[torch.Tensor], targets: torch.Tensor, masks: list[torch.Tensor],
                      denominators: list[torch.Tensor | float | None]) -> torch.Tensor:
    """The MTP loss: the mean over depths of the masked CE of depth k, whose logits (B, T - k, V) at
    position i predict targets[:, i + k] (targets (B, T): the next token of each position); masks and
    denominators per depth (see `masked_cross_entropy`)."""
    losses = [masked_cross_entropy(logits, targets[:, k:], masks[k - 1], denominators[k - 1])
              for k, logits in enumerate(mtp_logits, start=1)]
    return torch.stack(losses).mean()


def mtp_depths(model: Transformer, recipe: TrainRecipe) -> int:
    """How many MTP depths the loss uses (0 when the MTP loss is off or the model has none)."""
    return len(model.mtp) if recipe.mtp_loss_weight > 0 else 0


def loss_masks(batch, recipe: TrainRecipe, depths: int) -> list[torch.Tensor]:
    """The targets each loss term counts: the main loss (B, T), then MTP depth k (B, T - k), where
    position i predicts token i + k + 1 (in SFT, only within the same packed example)."""
    masks = [batch.target_mask]
    T = batch.target_mask.shape[1]
    for k in range(1, depths + 1):
        if T - k <= 0:
            break
        mask = batch.target_mask[:, k:]
        if recipe.mode == "sft":
            mask = mask & (batch.segment_ids[:, :T - k] == batch.segment_ids[:, k + 1:])
        masks.append(mask)
    return masks


def global_denominators(masks: list[torch.Tensor], parallel) -> list[torch.Tensor]:
    """Data parallel: each rank divides its summed loss by (targets in the global batch) / W, so the
    mean over ranks that FSDP takes of the gradients is the gradient of the global-batch mean, exactly
    what one process computes, also when ranks hold different numbers of targets (SFT masks)."""
    counts = parallel.all_reduce_sum([torch.stack([m.sum() for m in masks])])[0]
    return list(counts.clamp(min=1).float() / parallel.world_size)


def training_loss(model: Transformer, batch, recipe: TrainRecipe,
                  denominators: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, dict]:
    """CE on the targets + lambda * mean MTP CE + sequence aux loss. Returns (loss, parts as floats).
    denominators: per loss term (main, then MTP depths), see `global_denominators`. The CE terms are
    fused with the head in chunks (model/loss.py) and computed in fp32 whatever the autocast."""
    packed = recipe.mode == "sft"
    masks = loss_masks(batch, recipe, mtp_depths(model, recipe))
    den = denominators or [None] * len(masks)
    labels = [(batch.targets[:, k:], loss_weights(m, d)) for k, (m, d) in enumerate(zip(masks, den))]
    ce, *mtp_losses = model(batch.inputs, positions=batch.input_positions if packed else None,
                            segment_ids=batch.input_segments if packed else None, labels=labels)
    loss, parts = ce, {"loss": ce.item()}
    if mtp_losses:
        mtp_loss = torch.stack(mtp_losses).mean()
        loss = loss + recipe.mtp_loss_weight * mtp_loss
        parts["mtp_loss"] = mtp_loss.item()
    aux = model.aux_loss()
    if aux is not None:
        loss = loss + aux.float()
        parts["aux_loss"] = aux.item()
    return loss, parts


# ---- DeepSeek's auxiliary-loss-free balancing --------------------------------------------------
def expert_loads(model: Transformer) -> list[torch.Tensor]:
    return [m.expert_load.clone() for m in model.moe_layers() if m.expert_load is not None]


@torch.no_grad()
def update_routing_bias(model: Transformer, loads: list[torch.Tensor], gamma: float) -> None:
    """DeepSeek-V3 Sec. 2.1.2: bias -= gamma for overloaded experts, += gamma for underloaded ones."""
    if gamma <= 0:
        return
    for moe, load in zip(model.moe_layers(), loads):
        bias = moe.gate.e_score_correction_bias
        if bias is None:
            continue
        load = load.float()
        bias += gamma * torch.sign(load.mean() - load)


def load_balance(loads: list[torch.Tensor]) -> list[float]:
    """max / mean tokens per expert for each MoE layer (1.0 is perfectly balanced)."""
    return [(l.max() / l.float().mean().clamp(min=1e-9)).item() for l in loads]


# ---- metrics ----------------------------------------------------------------------------------
def plot_losses(run_dir: Path) -> Path | None:
    """loss.png: training (and validation, MTP) loss against step."""
    rows = read_metrics(run_dir)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    if not train:
        return None
    fig, ax = pyplot().subplots(figsize=(7, 4))
    ax.plot(*zip(*train), label="train loss", lw=1)
    mtp = [(r["step"], r["mtp_loss"]) for r in rows if "mtp_loss" in r]
    if mtp:
        ax.plot(*zip(*mtp), label="MTP loss (depth 1)", lw=1, alpha=0.7)
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, run_dir / "loss.png", dpi=120)


# ---- checkpoints -------------------------------------------------------------------------------
def save_checkpoint(run_dir: Path, step: int, model: Transformer, optimizer: torch.optim.Optimizer,
                    state: dict, keep_last: int, tokenizer_dir: str | None = None, *, parallel,
                    sharded: bool = False) -> Path:
    """checkpoints/step-NNNNNNN/{model/, optimizer.safetensors, rng.safetensors, trainer.json}, via a
    temp folder and a rename; then keep only the last `keep_last`.

    parallel (loop.SingleProcess or distributed.Parallel): every rank calls this; the full tensors are
    gathered to rank 0, which writes the same files a single process would; the others wait for it.
    sharded: instead of model/ and optimizer.safetensors, sharded/ where every rank writes its own
    shards through torch.distributed.checkpoint (see sharded.py); nothing is gathered."""
    final = run_dir / "checkpoints" / f"step-{step:07d}"
    state = {**state, "step": step, "param_groups": _optimizer_groups(optimizer)}
    if sharded:
        _save_sharded_checkpoint(run_dir, final, model, optimizer, state, keep_last, tokenizer_dir, parallel)
        return final
    tensors = parallel.gather_optimizer(optimizer, model)
    model = parallel.gather_model(model)  # the model itself, or a plain copy on rank 0 (None elsewhere)
    if not parallel.is_main:
        parallel.barrier()
        return final

    def write_weights(tmp: Path) -> None:
        save_model(model, tmp / "model")
        if tokenizer_dir:
            copy_tokenizer(tokenizer_dir, tmp / "model")
        save_file(tensors, tmp / OPTIMIZER_FILE)
        chmod_like_new(tmp / OPTIMIZER_FILE)  # save_file writes through mkstemp: 0600

    try:
        _write_checkpoint(run_dir, final, write_weights, state, keep_last)
    finally:
        parallel.barrier()
    return final


def _save_sharded_checkpoint(run_dir, final, model, optimizer, state, keep_last, tokenizer_dir, parallel) -> None:
    """Every rank writes its shards into rank 0's staging folder (its name is broadcast), which rank 0
    renames into place once DCP's metadata and the trainer files are written."""
    try:
        if parallel.is_main:
            sent = []

            def write_weights(tmp: Path) -> None:
                sent.append(parallel.broadcast_object(str(tmp)))
                save_sharded(tmp / SHARDED_DIR, model, optimizer, parallel, tokenizer_dir)

            try:
                _write_checkpoint(run_dir, final, write_weights, state, keep_last)
            except BaseException:
                if not sent:  # no staging folder: tell the others, who wait for its name
                    parallel.broadcast_object(None)
                raise
        else:
            tmp = parallel.broadcast_object(None)
            if tmp is None:
                raise CheckpointError(f"{final}: rank 0 could not create the checkpoint's staging folder")
            save_sharded(Path(tmp) / SHARDED_DIR, model, optimizer, parallel)
    finally:
        parallel.barrier()


def _write_checkpoint(run_dir: Path, final: Path, write_weights, state: dict, keep_last: int) -> None:
    """Rank 0: the checkpoint folder, staged: write_weights(staging folder), then the RNG state and
    trainer.json; then the oldest checkpoints beyond keep_last go."""
    with staged_dir(final) as tmp:
        write_weights(tmp)
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        save_file({f"rng.{k}": v for k, v in rng.items()}, tmp / RNG_FILE)
        chmod_like_new(tmp / RNG_FILE)
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
    for old in checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoint folders, oldest first."""
    root = run_dir / "checkpoints"
    return sorted(root.glob("step-*")) if root.exists() else []


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = checkpoints(run_dir)
    return found[-1] if found else None


def remove_stale_checkpoint_staging(run_dir: Path) -> list[Path]:
    """What a writer killed in the middle of a save left in checkpoints/ (staging folders, also the
    `.tmp-step-*` of earlier versions) and beside model/. Only for the run folder's one writer, before
    it reads or writes checkpoints (see runio.remove_stale_staging)."""
    return (remove_stale_staging(run_dir / "checkpoints", CHECKPOINT, legacy=LEGACY_STAGING)
            + remove_stale_staging(run_dir, r"model|metrics\.jsonl"))


def load_latest_checkpoint(run_dir: Path, optimizer_for, device, *, parallel
                           ) -> tuple[Path, Transformer, torch.optim.Optimizer, dict]:
    """`load_checkpoint` of the newest checkpoint that loads. One that does not (a truncated or corrupt
    file, e.g. from a kill or a full disk) is skipped with a warning naming it, falling back to the one
    before (keep_last keeps them); when none loads, one CheckpointError names each and why.
    Returns (the checkpoint loaded, model, optimizer, state)."""
    found, failures = checkpoints(run_dir), []
    if not found:
        raise CheckpointError(f"{run_dir / 'checkpoints'}: no checkpoint to resume from")
    for i in range(len(found) - 1, -1, -1):
        try:
            loaded = load_checkpoint(found[i], optimizer_for, device, parallel=parallel)
        except CheckpointError as e:
            failures.append(str(e))
            if i > 0:
                warnings.warn(f"checkpoint {found[i]} does not load ({e}); falling back to {found[i - 1]}",
                              stacklevel=2)
            continue
        if parallel.is_main:  # keep the bad ones for inspection, out of keep_last's count and the resume order
            for bad in found[i + 1:]:
                aside = bad.with_name(f".corrupt-{bad.name}-{uuid.uuid4().hex[:8]}")
                os.replace(bad, aside)
                warnings.warn(f"checkpoint {bad} moved aside to {aside.name}", stacklevel=2)
        return (found[i], *loaded)
    raise CheckpointError(f"no checkpoint in {run_dir / 'checkpoints'} loads: " + "; ".join(reversed(failures)))


@contextlib.contextmanager
def _reading(path: Path):
    """Turn any failure to read `path` (truncated or corrupt safetensors, bad JSON, wrong contents) into
    a CheckpointError that names it."""
    try:
        yield
    except CheckpointError:
        raise
    except (NanoseekError, SafetensorError, OSError, ValueError, KeyError, TypeError, IndexError,
            RuntimeError) as e:
        raise CheckpointError(f"{path} does not load: {type(e).__name__}: {e}") from e


def _read_state(path: Path) -> dict:
    with _reading(path):
        state = json.loads(path.read_text())
        if not isinstance(state, dict) or not isinstance(state.get("step"), int) \
                or not isinstance(state.get("param_groups"), list):
            raise ValueError("not a trainer state (an object with an integer step and param_groups)")
    return state


def load_checkpoint(ckpt: Path, optimizer_for, device, *, parallel
                    ) -> tuple[Transformer, torch.optim.Optimizer, dict]:
    """Model, optimizer (built by optimizer_for(model), then filled) and trainer state of a checkpoint,
    full or sharded. Every file is read (and checked) before anything changes, so a bad checkpoint
    leaves the process as it was: CheckpointError names the file. The RNG state is restored last.

    parallel: a full checkpoint is read whole by every rank, then the model is parallelized and each
    rank keeps its shards of weights and optimizer state; a sharded one is read shard by shard into the
    parallelized model. Either way the world size may differ from the saving run's."""
    sharded = is_sharded_checkpoint(ckpt)
    for name in (SHARDED_DIR,) if sharded else ("model", OPTIMIZER_FILE):
        if not (ckpt / name).exists():
            raise CheckpointError(f"{ckpt}: incomplete checkpoint, {name} is missing")
    for name in (STATE_FILE, RNG_FILE):
        if not (ckpt / name).exists():
            raise CheckpointError(f"{ckpt}: incomplete checkpoint, {name} is missing")
    state = _read_state(ckpt / STATE_FILE)
    with _reading(ckpt / RNG_FILE):
        rng = load_file(ckpt / RNG_FILE)
        if "rng.torch" not in rng:
            raise KeyError("rng.torch")
    if sharded:
        with _reading(ckpt / SHARDED_DIR):
            model, optimizer, tensors = load_sharded(ckpt / SHARDED_DIR, optimizer_for, device, parallel)
    else:
        model, optimizer, tensors = _load_full(ckpt, optimizer_for, device, parallel)
    with _reading(ckpt / (SHARDED_DIR if sharded else OPTIMIZER_FILE)):
        _restore_optimizer(optimizer, tensors, state["param_groups"])
    torch.set_rng_state(rng["rng.torch"])
    if "rng.cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["rng.cuda"])
    return model, optimizer, state


def _load_full(ckpt: Path, optimizer_for, device, parallel):
    """model/ and optimizer.safetensors, read whole, then cut into this rank's shards."""
    with _reading(ckpt / OPTIMIZER_FILE):
        tensors = load_file(ckpt / OPTIMIZER_FILE, device=str(device))
    with _reading(ckpt / "model"):
        model = load_model(ckpt / "model", device=device, dtype=torch.float32).train()
    model = parallel.parallelize(model)
    optimizer = optimizer_for(model)
    with _reading(ckpt / OPTIMIZER_FILE):
        tensors = parallel.shard_optimizer_state(optimizer, model, tensors)
    return model, optimizer, tensors


def flatten_optimizer(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Optimizer state as tensors keyed `state.{param index}.{name}` (optimizer.safetensors)."""
    sd = optimizer.state_dict()
    tensors = {}
    for idx, pstate in sd["state"].items():
        for key, value in pstate.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"state.{idx}.{key}"] = t.detach().cpu().contiguous()
    return tensors


def _optimizer_groups(optimizer: torch.optim.Optimizer) -> list[dict]:
    """Hyperparameters of each group, parameters as indices (JSON-able)."""
    return [{k: v for k, v in g.items()} for g in optimizer.state_dict()["param_groups"]]


def _restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict, groups: list) -> None:
    state: dict = {}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    for g in groups:  # JSON turned tuples into lists
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})
