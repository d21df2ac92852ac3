"""Scale-out on torch.distributed: data parallel with FSDP2 and expert parallelism (EP).

The model code knows nothing of this: `parallelize(model, mesh)` rewrites a built `Transformer` from
outside, as torchtitan does. Under torchrun: `parallel = Parallel.init(ep=...)`, then
`parallelize(model, parallel.mesh)`; `Parallel` also carries the helpers the training loops need (the
interface of loop.SingleProcess, which stands in for it in a single process).

Mesh: 2-D ("dp", "ep") of shape (W / ep, ep) over W processes. Every process is a data-parallel rank
(it reads its own rows of the batch). Routed experts are split over the "ep" dimension: EP rank c owns
experts [c E/ep, (c + 1) E/ep) of every MoE layer and receives, by all-to-all, the tokens that the
other ranks of its EP group route to them (DeepSeek-V3 Sec. 3.2.2). What is sharded by FSDP2:
  attention, dense MLPs, gates, shared experts, embedding, head  over all W ranks ("dp" x "ep")
  the routed experts an EP rank owns                             over the W / ep ranks that own them
so each process stores 1/W of every parameter, gradient and Adam state either way; EP shrinks what a
layer all-gathers for its forward (E/ep experts instead of E) and sends tokens instead of weights.

Gradients: each rank's loss is its share of the global mean (see `global_denominators`), FSDP averages
the non-expert gradients over W. An expert's owner already sums the contributions of its whole EP group
(the all-to-all's backward brings them home), so its FSDP reduction over W / ep ranks divides by W.
The aux-loss-free bias update uses expert loads summed over all W ranks (`all_reduce_sum`), so every
rank applies the same bias change a single process would.

Checkpoints: sharded by default under torchrun (sharded.py: every rank writes its own shards through
torch.distributed.checkpoint, nothing is gathered), or, with checkpoint_format = "full", the
single-process format (HF model folder + optimizer.safetensors with full tensors): `gather_model` /
`gather_optimizer` assemble full tensors on rank 0, `shard_optimizer_state` cuts them back into this
rank's pieces. Either resumes on any world size, or on one process.
"""

from __future__ import annotations

import copy
import datetime
import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from ..errors import ConfigError
from ..model import MoE, RoutedExperts, Transformer, rope_frequencies
from ..precision import Precision

EP_ENV = "NANOSEEK_EP"  # expert-parallel degree for `torchrun ... -m nanoseek train` (default 1)


# ---- process group and mesh ----------------------------------------------------------------------
def make_mesh(ep: int = 1, device_type: str | None = None) -> DeviceMesh:
    """The 2-D ("dp", "ep") mesh over the initialised process group: shape (W / ep, ep)."""
    world = dist.get_world_size()
    if ep < 1 or world % ep:
        raise ConfigError(f"expert-parallel degree {ep} must divide the number of processes {world}")
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    return init_device_mesh(device_type, (world // ep, ep), mesh_dim_names=("dp", "ep"))


@dataclass
class Parallel:
    """Where this process sits: the mesh, its groups, and the device it computes on."""

    mesh: DeviceMesh  # ("dp", "ep"), see make_mesh
    device: torch.device
    owns_process_group: bool = False  # init() created it, close() destroys it
    precision: Precision | None = None  # the run's (RunFolder.resolve_precision sets it): bf16 -> FSDP2 mixed precision

    @classmethod
    def init(cls, ep: int | None = None, device: str = "auto", timeout_s: float = 1800) -> "Parallel":
        """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT):
        NCCL with GPU LOCAL_RANK when device is "cuda" (or "auto" and CUDA is available), else gloo on
        CPU. ep: the expert-parallel degree (default: $NANOSEEK_EP, else 1)."""
        ep = int(os.environ.get(EP_ENV, "1")) if ep is None else ep
        owns = not dist.is_initialized()
        if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()):
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
            backend = "nccl"
        else:
            device, backend = torch.device("cpu"), "gloo"
        if owns:  # device_id: NCCL connects eagerly and DeviceMesh splits its groups from the world's
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s),
                                    device_id=device if backend == "nccl" else None)
        return cls(make_mesh(ep, device.type), device, owns)

    def close(self) -> None:
        """Leave the process group. Call it once the parallelized model is gone: a DeviceMesh (which
        the model's DTensors share) keeps the default process group alive, and one that is still alive
        when the interpreter shuts down can abort the process at exit (torch 2.13 with gloo: "terminate
        called without an active exception", in up to 1 run in 5 here)."""
        self.mesh = None
        gc.collect()  # FSDP modules sit in reference cycles: free them, and with them the mesh, now
        if self.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()

    # -- coordinates ----------------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return dist.get_rank()

    @property
    def world_size(self) -> int:
        return self.mesh.size()

    @property
    def ep(self) -> int:
        return self.mesh["ep"].size()

    @property
    def ep_rank(self) -> int:
        return self.mesh.get_local_rank("ep")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- small collectives ----------------------------------------------------------------------------
    def all_reduce_sum(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Sum over all ranks, one collective for the whole list (integer loads stay exact)."""
        if not tensors:
            return []
        flat = torch.cat([t.reshape(-1).to(self.device, torch.float64) for t in tensors])
        dist.all_reduce(flat)
        out, i = [], 0
        for t in tensors:
            out.append(flat[i:i + t.numel()].view(t.shape).to(t.dtype).to(t.device))
            i += t.numel()
        return out

    def mean_floats(self, values: dict[str, float]) -> dict[str, float]:
        """Average a dict of floats over ranks (the same keys on every rank)."""
        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return {k: v / self.world_size for k, v in zip(keys, t.tolist())}

    def all_reduce_max(self, value: float) -> float:
        """The largest of a number over ranks."""
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.item()

    def all_gather_rows(self, table: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's (n, k) table, rank 0's rows first (n must be equal on all ranks)."""
        local = table.to(self.device)
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(parts, local)
        return torch.cat(parts).to(table.device)

    def any(self, flag: bool) -> bool:
        """True on every rank when it is True on some rank (e.g. a stop signal seen by one)."""
        t = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def barrier(self) -> None:
        dist.barrier()

    def broadcast_object(self, obj):
        """Rank 0's `obj` (any picklable value) on every rank."""
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    # -- the model and the optimizer (loop.SingleProcess has the same methods for one process) ---------
    def parallelize(self, model: Transformer) -> Transformer:
        return parallelize(model, self.mesh, bf16=self.precision is not None and self.precision.is_bf16)

    def gather_model(self, model: Transformer, device: str | torch.device = "cpu",
                     everywhere: bool = False) -> Transformer | None:
        return gather_model(model, self, device, everywhere)

    def gather_optimizer(self, optimizer: torch.optim.Optimizer, model: Transformer
                         ) -> dict[str, torch.Tensor] | None:
        return gather_optimizer(optimizer, model, self)

    def shard_optimizer_state(self, optimizer: torch.optim.Optimizer, model: Transformer,
                              tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return shard_optimizer_state(optimizer, model, self, tensors)

    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        return clip_grad_norm_(model, max_norm, self)


# ---- expert parallelism --------------------------------------------------------------------------
class ExpertParallelExperts(RoutedExperts):
    """The routed experts of one EP rank: gate_up (E/ep, 2I, D), down (E/ep, D, I) = experts
    [first, first + E/ep) of the layer. Forward takes this rank's tokens with their global expert
    choices, sends each (token, expert) pair to the expert's owner with an all-to-all of uneven splits,
    runs the local experts on what arrives from every rank, and sends the results back in order.
    """

    def __init__(self, n_experts: int, hidden_size: int, intermediate_size: int, group, ep_rank: int, ep: int):
        if n_experts % ep:
            raise ConfigError(f"n_routed_experts {n_experts} must be divisible by the expert-parallel degree {ep}")
        super().__init__(n_experts // ep, hidden_size, intermediate_size)
        self.n_global, self.ep, self.group = n_experts, ep, group
        self.first = ep_rank * self.n_experts

    @classmethod
    def from_experts(cls, experts: RoutedExperts, group, ep_rank: int, ep: int) -> "ExpertParallelExperts":
        """Keep only this rank's slice of a full RoutedExperts (same values, no copy kept of the rest)."""
        E, two_i, D = experts.gate_up.shape
        local = cls(E, D, two_i // 2, group, ep_rank, ep)
        keep = slice(local.first, local.first + local.n_experts)
        local.gate_up = nn.Parameter(experts.gate_up.data[keep].clone(), experts.gate_up.requires_grad)
        local.down = nn.Parameter(experts.down.data[keep].clone(), experts.down.requires_grad)
        return local

    @torch.compiler.disable  # all-to-all with data-dependent splits: eager under torch.compile
    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x: (N, D), indices/weights: (N, k) with global expert ids -> (N, D)."""
        N, k = indices.shape
        flat = indices.flatten()
        order = flat.argsort(stable=True)  # (N*k,) pairs grouped by expert, hence by owner rank
        x_sorted = x.index_select(0, order // k)
        send_counts = torch.bincount(flat, minlength=self.n_global)  # (E,) pairs for each global expert
        recv_counts = torch.empty_like(send_counts)  # (ep * E_local,): [source rank, my expert]
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        recv_counts = recv_counts.view(self.ep, self.n_experts)
        send_splits = send_counts.view(self.ep, self.n_experts).sum(dim=1).tolist()
        recv_splits = recv_counts.sum(dim=1).tolist()
        received = all_to_all(x_sorted, recv_splits, send_splits, self.group)  # (R, D)
        by_expert = _source_major_to_expert_major(recv_counts)
        out = self._local_experts(received.index_select(0, by_expert), recv_counts.sum(dim=0))
        out = out.index_select(0, by_expert.argsort())  # back to [source rank, expert] order
        back = all_to_all(out, send_splits, recv_splits, self.group)  # (N*k, D), x_sorted order
        back = back.index_select(0, order.argsort()).view(N, k, -1)
        return (back * weights.to(back.dtype).unsqueeze(-1)).sum(dim=1)

    def _local_experts(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x: (R, D) grouped by local expert, counts[e] rows each -> (R, D).

        Every expert runs, also on an empty block: the graph (and so the backward all-to-all, a
        collective) is then the same on every rank, and every local expert gets a gradient (zeros
        when no token reached it), which FSDP's reduce-scatter needs on all ranks alike."""
        return self.grouped_experts(x, counts, run_empty=True)


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with uneven splits whose backward is the reverse exchange. (A plain c10d call:
    torch's functional version leaves gloo work behind that can abort the process at exit.)"""

    @staticmethod
    def forward(ctx, x, output_splits, input_splits, group):
        ctx.splits, ctx.group = (output_splits, input_splits), group
        out = x.new_empty((sum(output_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        output_splits, input_splits = ctx.splits
        grad_in = grad.new_empty((sum(input_splits), *grad.shape[1:]))
        dist.all_to_all_single(grad_in, grad.contiguous(), input_splits, output_splits, group=ctx.group)
        return grad_in, None, None, None


def all_to_all(x: torch.Tensor, output_splits: list[int], input_splits: list[int], group) -> torch.Tensor:
    """x: (sum(input_splits), ...) -> (sum(output_splits), ...): rows input_splits[j] go to rank j of
    the group, output_splits[j] rows come from it, in rank order. Differentiable."""
    return _AllToAll.apply(x, output_splits, input_splits, group)


def _source_major_to_expert_major(counts: torch.Tensor) -> torch.Tensor:
    """counts (S, E): rows arrive as S x E chunks in [source, expert] order; returns the (R,) index that
    reorders them to [expert, source] order, so each expert's rows are contiguous."""
    flat = counts.flatten()
    starts = (flat.cumsum(0) - flat).view(counts.shape).t().flatten()  # chunk starts, [expert, source]
    sizes = counts.t().flatten()
    new_starts = sizes.cumsum(0) - sizes
    total = int(flat.sum())
    return torch.arange(total, device=counts.device) + torch.repeat_interleave(starts - new_starts, sizes)


# ---- parallelize ---------------------------------------------------------------------------------
# bf16 runs (docs/precision.md): blocks and routed experts are all-gathered in bf16 and their gradients
# reduced in fp32; the sharded parameters FSDP2 keeps (the master weights AdamW updates) stay fp32.
# cast_forward_inputs=False: a block's input is the residual stream, which stays fp32 as in one process
# (autocast casts what each matmul reads; FSDP2 would round the whole stream to bf16 at every block).
BF16_POLICY = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                   cast_forward_inputs=False)
# the router's gate: its own unit, gathered and reduced in fp32 (selection is a discrete choice)
FP32_POLICY = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32,
                                   cast_forward_inputs=False)


def parallelize(model: Transformer, mesh: DeviceMesh, *, reshard_after_forward: bool = True,
                bf16: bool = False) -> Transformer:
    """Apply EP (when the mesh's "ep" dimension is > 1) and FSDP2 to a built model, in place.

    mesh: ("dp", "ep") as `make_mesh` builds it, or any 1-D mesh (FSDP only). Every rank must pass the
    same weights (same seed, or the same checkpoint). Units of FSDP: each routed-experts module (over
    "dp", when EP), each block (MTP blocks too), then the root (embedding, final norm, head, MTP
    projections and norms) over all ranks. Returns the model, now holding this rank's shards.

    bf16 (the run's precision is bf16): FSDP2 mixed precision, BF16_POLICY for the blocks and the
    routed experts, and each MoE gate a unit of its own with FP32_POLICY. The root unit stays fp32
    (no policy): the embedding's output starts the residual stream, which stays fp32, and a tied
    head shares its weight. Without bf16, no policy anywhere: fp32 runs are what they were.
    """
    if mesh.mesh_dim_names == ("dp", "ep"):
        ep, fsdp_mesh = mesh["ep"].size(), mesh._flatten("dp_ep")  # all W ranks as one dimension
    elif mesh.ndim == 1:
        ep, fsdp_mesh = 1, mesh
    else:
        raise ConfigError(f"parallelize needs a 1-D mesh or a ('dp', 'ep') mesh, got {mesh}")
    if ep > 1:
        group, ep_rank = mesh.get_group("ep"), mesh.get_local_rank("ep")
        for moe in model.moe_layers():
            moe.experts = ExpertParallelExperts.from_experts(moe.experts, group, ep_rank, ep)
    block_policy = {"mp_policy": BF16_POLICY} if bf16 else {}
    # an MTP module's own norms and projection are used outside its block (the head norm is applied by
    # Transformer.mtp_logits): they stay in the root unit, only the block is a unit of its own
    for block in [*model.layers, *(m.block for m in model.mtp)]:
        if bf16 and isinstance(block.mlp, MoE):
            fully_shard(block.mlp.gate, mesh=fsdp_mesh, reshard_after_forward=reshard_after_forward,
                        mp_policy=FP32_POLICY)
        if ep > 1 and isinstance(block.mlp, MoE):
            experts = block.mlp.experts
            fully_shard(experts, mesh=mesh["dp"], reshard_after_forward=reshard_after_forward, **block_policy)
            experts.set_gradient_divide_factor(float(mesh.size()))
            if mesh["dp"].size() > 1 and mesh.device_type == "cpu":
                # gloo has no pre-multiplied sum: a plain sum, then a division. (Not with one rank per
                # expert group: torch 2.13 would then divide twice.)
                experts.set_force_sum_reduction_for_comms(True)
        fully_shard(block, mesh=fsdp_mesh, reshard_after_forward=reshard_after_forward, **block_policy)
    fully_shard(model, mesh=fsdp_mesh, reshard_after_forward=reshard_after_forward)
    return model


def expert_parameter_names(model: Transformer) -> set[str]:
    """Names of the parameters that hold only this EP rank's experts."""
    return {f"{name}.{p}" for name, m in model.named_modules() if isinstance(m, ExpertParallelExperts)
            for p in ("gate_up", "down")}


# ---- gradients -----------------------------------------------------------------------------------
@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float, parallel: Parallel) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ over a parallelized model: the squared norms of the local shards
    summed over all ranks (each piece of every gradient lives on exactly one rank of the world)."""
    grads = [_local(p.grad) for p in model.parameters() if p.grad is not None]
    sq = torch.zeros((), dtype=torch.float32, device=parallel.device)
    if grads:
        sq = torch.stack([g.float().pow(2).sum() for g in grads]).sum()
    dist.all_reduce(sq)
    norm = sq.sqrt()
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.to(g.dtype))
    return norm


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


# ---- full tensors for checkpoints ----------------------------------------------------------------
def _full(t: torch.Tensor, is_expert: bool, parallel: Parallel) -> torch.Tensor:
    """The whole logical tensor from its shards (a collective: every rank calls it, in the same order)."""
    if isinstance(t, DTensor):
        t = t.full_tensor()
    if is_expert:  # (E/ep, ...) on each EP rank -> (E, ...)
        parts = [torch.empty_like(t) for _ in range(parallel.ep)]
        dist.all_gather(parts, t.contiguous(), group=parallel.mesh.get_group("ep"))
        t = torch.cat(parts)
    return t


def gather_state_dict(model: Transformer, parallel: Parallel, everywhere: bool = False
                      ) -> dict[str, torch.Tensor] | None:
    """The single-process state_dict (full tensors, on CPU) on rank 0, or on every rank; None elsewhere."""
    experts = expert_parameter_names(model)
    keep = everywhere or parallel.is_main
    out = {}
    for name, t in model.state_dict().items():
        full = _full(t.detach(), name in experts, parallel)
        if keep:
            out[name] = full.cpu()
    return out if keep else None


def gather_model(model: Transformer, parallel: Parallel, device: str | torch.device = "cpu",
                 everywhere: bool = False) -> Transformer | None:
    """A plain single-process copy of a parallelized model on rank 0 (None elsewhere), or on every
    rank: what checkpoints save, what samples (and data-parallel rollouts, which stop at different
    lengths on each rank) generate with, free of collectives. Holds the full model in memory."""
    state = gather_state_dict(model, parallel, everywhere)
    if state is None:
        return None
    config = copy.deepcopy(model.config)
    with torch.device("meta"):
        plain = Transformer(config)
    plain.load_state_dict(state, assign=True)
    plain.rotary.inv_freq = rope_frequencies(config)[0]  # non-persistent: computed, never stored
    if config.tie_word_embeddings:
        plain.lm_head.weight = plain.embed_tokens.weight
    return plain.to(device).train(model.training)


def gather_optimizer(optimizer: torch.optim.Optimizer, model: Transformer, parallel: Parallel
                     ) -> dict[str, torch.Tensor] | None:
    """Optimizer state as full tensors keyed `state.{param index}.{name}` (the single-process
    optimizer.safetensors layout), on rank 0; None elsewhere."""
    experts = {id(p) for n, p in model.named_parameters() if n in expert_parameter_names(model)}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    sd = optimizer.state_dict()["state"]
    out = {}
    for idx in sorted(sd):
        for key, value in sd[idx].items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            full = _full(t.detach(), id(params[idx]) in experts and t.dim() > 0, parallel)
            if parallel.is_main:
                out[f"state.{idx}.{key}"] = full.cpu().contiguous()
    return out if parallel.is_main else None


def shard_optimizer_state(optimizer: torch.optim.Optimizer, model: Transformer, parallel: Parallel,
                          tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Cut full optimizer tensors (`state.{index}.{name}`) into the pieces this rank's parameters hold."""
    names = {id(p): n for n, p in model.named_parameters()}
    experts = expert_parameter_names(model)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    out = {}
    for key, full in tensors.items():
        _, idx, _ = key.split(".", 2)
        p = params[int(idx)]
        out[key] = full if full.dim() == 0 else local_piece(p, full, names[id(p)] in experts, parallel)
    return out


def local_piece(param: torch.Tensor, full: torch.Tensor, is_expert: bool, parallel: Parallel) -> torch.Tensor:
    """The part of a full tensor shaped like `param` that this rank holds (a DTensor like param's)."""
    if is_expert:
        n = full.shape[0] // parallel.ep
        full = full[parallel.ep_rank * n:(parallel.ep_rank + 1) * n]
    full = full.to(param.device)
    if isinstance(param, DTensor):  # every rank has the full tensor: no communication
        return distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
    return full
