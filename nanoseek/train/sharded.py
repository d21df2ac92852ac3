"""Sharded training checkpoints through torch.distributed.checkpoint (DCP): every rank writes its own
shards of the weights and of the Adam state, nobody gathers the model. A checkpoint folder:

    checkpoints/step-NNNNNNN/
      sharded/            .metadata + __{rank}_0.distcp per rank (the layout: checkpoint.SHARDED_DIR),
                          config.json and the tokenizer files
      rng.safetensors     rank 0's RNG state (every rank restores it, as with full checkpoints)
      trainer.json        step, data position, counters, optimizer hyperparameters, the recipe's RESUME_KEYS

The keys name tensors by parameter and experts one by one, so the checkpoint resumes on any world size
and expert-parallel degree (DCP reshards the FSDP pieces as it reads them), also in one process, and
`checkpoint.consolidate` streams it into an HF folder shard by shard.

Atomic like the full format: every rank writes into rank 0's staging folder `.step-N.tmp-{uuid}`, which
becomes step-N only after DCP's metadata (written last, once all ranks are done) and the trainer files
are in place. A save killed half-way leaves only the staging folder, which the next run removes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from ..checkpoint import (DCP_METADATA, SHARDED_DIR, copy_tokenizer, is_expert_stack, load_sharded_tensors,
                          named_tensors, read_sharded_metadata, sharded_key, single_process_quietly)
from ..config import ModelConfig
from ..errors import CheckpointError
from ..model import Transformer, rope_frequencies


def distributed() -> bool:
    """Whether this process is one of a torch.distributed group (else DCP runs without collectives)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def use_sharded(checkpoint_format: str, world_size: int) -> bool:
    """Whether a run writes sharded checkpoints: `auto` does under torchrun (world size > 1)."""
    return checkpoint_format == "sharded" or (checkpoint_format == "auto" and world_size > 1)


def is_sharded_checkpoint(ckpt: Path) -> bool:
    return (ckpt / SHARDED_DIR).is_dir()


# ---- the tensors DCP writes and reads --------------------------------------------------------------
def _pieces(name: str, t: torch.Tensor, prefix: str, first_expert: int) -> dict[str, torch.Tensor]:
    """DCP keys -> this rank's tensors for one parameter (or optimizer state) `t`: the tensor itself
    (DCP handles DTensors' shards), or, for stacked experts, one plain tensor per expert this rank holds
    (views of `t`'s local rows). first_expert: the global index of the module's row 0 (EP)."""
    if not is_expert_stack(name) or t.dim() == 0:
        return {sharded_key(name, prefix=prefix): t}
    local, offset = t, 0
    if isinstance(t, DTensor):  # FSDP's Shard(0): whole experts, rows [offset, offset + n) of the module's
        local = t.to_local()
        offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)[1][0]
    return {sharded_key(name, first_expert + offset + i, prefix): local[i] for i in range(local.shape[0])}


def _expert_offsets(model: Transformer) -> dict[str, int]:
    """Parameter name -> global index of its row 0, for stacked experts (ExpertParallelExperts.first)."""
    return {f"{mod_name}.{p}": getattr(mod, "first", 0) for mod_name, mod in model.named_modules()
            for p in ("gate_up", "down") if is_expert_stack(f"{mod_name}.{p}")}


@torch.no_grad()
def model_tensors(model: Transformer) -> dict[str, torch.Tensor]:
    """DCP keys -> this rank's (detached, shared-memory) parameters and persistent buffers."""
    first = _expert_offsets(model)
    out = {}
    for name, t in named_tensors(model):
        out.update(_pieces(name, t.detach(), "model", first.get(name, 0)))
    return out


def optimizer_tensors(optimizer: torch.optim.Optimizer, model: Transformer) -> dict[str, torch.Tensor]:
    """DCP keys -> this rank's optimizer state tensors (`optim.{param name}[.{expert}].{state}`)."""
    names, first = {id(p): n for n, p in model.named_parameters()}, _expert_offsets(model)
    out = {}
    for p, state in optimizer.state.items():
        for key, value in state.items():
            value = value if torch.is_tensor(value) else torch.tensor(value)
            out.update(_optim_pieces(names[id(p)], key, value, first))
    return out


def _optim_pieces(name: str, key: str, value: torch.Tensor, first: dict[str, int]) -> dict[str, torch.Tensor]:
    """`optim.{name}[.{j}].{key}`: the state `key` of parameter `name` (of expert j)."""
    pieces = _pieces(name, value.detach(), "optim", first.get(name, 0))
    return {f"{k}.{key}": v for k, v in pieces.items()}


# ---- save --------------------------------------------------------------------------------------------
def save_sharded(folder: Path, model: Transformer, optimizer: torch.optim.Optimizer, parallel,
                 tokenizer_dir: str | Path | None = None) -> None:
    """Write this rank's shards of the model and the optimizer state into `folder` (every rank calls
    it with the same folder: a collective); rank 0 adds config.json and the tokenizer files."""
    tensors = {**model_tensors(model), **optimizer_tensors(optimizer, model)}
    with single_process_quietly():
        dcp.save(tensors, storage_writer=dcp.FileSystemWriter(folder), no_dist=not distributed())
    if parallel.is_main:
        hf = model.config.to_hf()
        hf["torch_dtype"] = str(next(model.parameters()).dtype).replace("torch.", "")
        (folder / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        if tokenizer_dir:
            copy_tokenizer(tokenizer_dir, folder)


# ---- load --------------------------------------------------------------------------------------------
def load_sharded(folder: Path, optimizer_for, device, parallel
                 ) -> tuple[Transformer, torch.optim.Optimizer, dict[str, torch.Tensor]]:
    """The model (parallelized, built on the meta device and filled from the shards: no rank ever holds
    the whole model), its optimizer (optimizer_for(model)) and the optimizer state as
    {`state.{param index}.{name}`: this rank's tensor}, ready for the optimizer's load_state_dict.
    Collective under torch.distributed; CheckpointError names the folder and the tensor."""
    for name in (DCP_METADATA, "config.json"):
        if not (folder / name).is_file():
            raise CheckpointError(f"{folder}: incomplete sharded checkpoint, {name} is missing")
    stored = read_sharded_metadata(folder)
    try:
        config = ModelConfig.from_hf(folder / "config.json")
    except (ValueError, TypeError, OSError) as e:
        raise CheckpointError(f"{folder / 'config.json'} does not load: {e}") from None
    model = build_empty_model(config, device, parallel)
    optimizer = optimizer_for(model)
    states = _empty_optimizer_state(optimizer, model, stored)
    first = _expert_offsets(model)
    tensors = model_tensors(model)
    for name, state in states.items():
        for key, value in state.items():
            tensors.update(_optim_pieces(name, key, value, first))
    for key, t in tensors.items():
        if key not in stored:
            raise CheckpointError(f"{folder}: tensor '{key}' is missing from the sharded checkpoint")
        want = tuple(t.shape)
        if tuple(stored[key].size) != want:
            raise CheckpointError(f"{folder}: tensor '{key}' has shape {tuple(stored[key].size)}, expected {want}")
    load_sharded_tensors(folder, tensors, no_dist=not distributed())
    index = {n: i for i, n in enumerate(_optimizer_param_names(optimizer, model))}
    flat = {f"state.{index[name]}.{key}": value for name, state in states.items() for key, value in state.items()}
    return model.train(), optimizer, flat


def build_empty_model(config: ModelConfig, device, parallel) -> Transformer:
    """A parallelized model whose weights are allocated (this rank's shards only) but not initialised:
    built on the meta device, sharded, then given memory, as torchtitan does."""
    with torch.device("meta"):
        model = Transformer(config)
    model = parallel.parallelize(model)
    model.to_empty(device=device)
    model.rotary.inv_freq = rope_frequencies(config)[0].to(device)  # non-persistent: computed, never stored
    if config.tie_word_embeddings and model.lm_head.weight is not model.embed_tokens.weight:
        model.lm_head.weight = model.embed_tokens.weight
    return model


def _optimizer_param_names(optimizer: torch.optim.Optimizer, model: Transformer) -> list[str]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _empty_optimizer_state(optimizer, model: Transformer, stored: dict) -> dict[str, dict[str, torch.Tensor]]:
    """Parameter name -> {state name: a zero tensor to read it into}, for the states the checkpoint
    holds: scalars as stored, the others shaped (and sharded) like the parameter."""
    params = dict(model.named_parameters())
    wanted = set(_optimizer_param_names(optimizer, model))
    states: dict[str, dict[str, torch.Tensor]] = {}
    for key, md in stored.items():
        if not key.startswith("optim."):
            continue
        name, state = _split_optim_key(key[len("optim."):], wanted)
        if name is None or state in states.get(name, {}):
            continue
        p = params[name]
        dtype = md.properties.dtype
        empty = torch.zeros((), dtype=dtype) if len(md.size) == 0 else torch.zeros_like(p, dtype=dtype)
        states.setdefault(name, {})[state] = empty
    return states


def _split_optim_key(rest: str, names: set[str]) -> tuple[str | None, str]:
    """'{name}.{state}' or '{name}.{expert}.{state}' -> (name, state); (None, '') for another model's."""
    head, _, state = rest.rpartition(".")
    if head in names:
        return head, state
    head, _, expert = head.rpartition(".")
    return (head, state) if head in names and expert.isdigit() else (None, "")
