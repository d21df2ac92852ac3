"""GRPO with verifiable rewards (DeepSeekMath Eq. 3-4, DeepSeek-R1 Sec. 2.2), with the DAPO and
Dr. GRPO variants as options.

One step:
 1. rollout: `prompts_per_step` train-split problems, `group_size` (G) samples each from
    `nanoseek.generate` (latent cache), seeded by (seed, step) so a resumed run samples the same;
 2. rewards: a weighted sum of rule-based callables (accuracy from the task's strict checker, format);
 3. advantages, per group: A_i = (r_i - mean(r)) / (std(r) + 1e-4), or r_i - mean(r) with
    scale_rewards = false (Dr. GRPO); groups whose rewards are all equal carry no signal and are dropped
    with filter_zero_std (DAPO's dynamic sampling, without resampling); truncated completions (no EOS
    within max_new_tokens) are left out of the loss with mask_truncated (DAPO's overlong filtering);
 4. mu optimizer steps on the same rollouts. Per completion token:
        rho = pi / pi_old,  l = -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A) + beta KL,
        KL (k3) = pi_ref / pi - log(pi_ref / pi) - 1   against the frozen starting model,
    pi_old is the policy that sampled (its log-probs are stored once per step; with mu = 1 the ratio is
    exactly 1 and only its gradient matters). Aggregation (loss_agg):
        sequence  (GRPO):    mean over completions of the mean over their tokens
        token     (DAPO):    sum over all tokens / number of tokens in the batch
        dr_grpo   (Dr.GRPO): sum over all tokens / (completions x max_new_tokens)
    beta = 0 loads no reference model.
 5. a model with MTP modules keeps them trained (mtp_loss_weight, 0: off): their teacher-forced CE on
    the same rows (prompt + completion as context, completion tokens as targets: what drafting
    predicts, as SFT's MTP loss counts the reply only), with the main model's hidden states, embeddings
    and head as constants, so the gradient reaches the MTP modules only and the policy's update is
    exactly the one without it; the MTP gradients are clipped on their own (grad_clip) and stepped after
    the policy's. Otherwise the MTP module drafts for the policy it was trained with, and
    self-speculative decoding (infer) may accept fewer of its drafts after RL (docs/mtp.md).

The run folder is a training run folder (train/loop.py): checkpoints/ with model, optimizer, RNG and
state for an exact resume, model/ (HF format + tokenizer), metrics.jsonl (+ TensorBoard), grpo.png.

Under torchrun (WORLD_SIZE > 1) the same loop runs data parallel, sharded like training (FSDP2, plus
expert parallelism with NANOSEEK_EP): every rank draws the same prompts and takes its contiguous share
of them (whole groups, so advantages stay local), samples them with a full copy of the current policy
gathered from the shards (generation stops at different lengths on each rank, which sharded forwards,
being collectives, cannot), and the update runs on the shards with the loss normalised by the global
token / completion counts. Each group samples from its own generator, seeded by (seed, step, prompt), so
rollouts, and with them the run, do not depend on the number of processes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from .. import infer
from ..checkpoint import load_model
from ..errors import ConfigError
from ..infer import generate_batches
from ..model import Transformer
from ..runio import pyplot, read_metrics, save_figure
from ..tasks import Rewards, Task, default_max_new_tokens, get_task, load_dataset, prompt_ids
from ..tasks.base import make_rng
from ..tasks.dataset import DATASET_OPTIONS
from ..tasks.rewards import absolute_reward_paths, reward_columns
from ..tokenizer import Tokenizer
from .common import build_optimizer, expert_loads, lr_at, mtp_cross_entropy, mtp_depths
from .loop import (Algorithm, RunFolder, SingleProcess, TrainingError, add_loads, check_finite, optimizer_step,
                   resolve_device, run_loop, run_on_all_ranks, set_aux_loss_alpha)
from .recipe import RunRecipe, field_types, load_recipe_as, recipe_defaults

LOSS_AGGREGATIONS = ("sequence", "token", "dr_grpo")
STD_EPS = 1e-4


class GRPOError(TrainingError):
    """The run cannot go on (non-finite loss, a resume that does not match); names the step or field."""


@dataclass
@recipe_defaults(out="runs/grpo", lr=1e-5, min_lr_ratio=1.0, warmup_steps=0, schedule="constant",
                 weight_decay=0.0, beta2=0.99, bias_update_speed=0.0, eval_every=0)
class GRPORecipe(RunRecipe):
    """GRPO from init_from (an HF model folder, e.g. an SFT run's model/); the shared fields (AdamW and
    schedule, bias_update_speed, max_seconds, logging, checkpoints) are RunRecipe's, with RL defaults.
    tokenizer: default the tokenizer files in init_from. eval_every: greedy accuracy on eval_n held-out
    problems every N steps (0: never)."""

    WHAT: ClassVar[str] = "GRPO recipe"
    RESUME_KEYS: ClassVar[tuple[str, ...]] = ("init_from", "task", "difficulty", "seed", "prompts_per_step",
                                              "group_size", "dataset", "test_file", "split_field", "test_fraction")

    init_from: str = ""  # the starting policy
    task: str = ""  # a built-in task (addition3 when neither task nor dataset is set)
    difficulty: int | None = None  # a fixed difficulty level of the task (default: its mix)
    # or problems from a local file (JSONL/JSON/CSV/Parquet; nanoseek/tasks/dataset.py), "" fields: defaults
    dataset: str = ""
    test_file: str = ""  # the dataset's test split from a second file
    prompt_field: str = ""
    answer_field: str = ""
    trace_field: str = ""
    system_field: str = ""
    split_field: str = ""
    test_fraction: float = 0.1  # test share when the split is a hash of the question
    verifier: str = "math"  # math | exact | numeric | choice | regex
    tolerance: float = 1e-6  # the numeric verifier's relative tolerance
    template: str = "default"  # default | plain | a prompt template with {question}
    reply_format: str = "either"  # answer | boxed | either (what may follow </think>)
    rewards: dict = field(default_factory=lambda: {"accuracy": 1.0, "format": 0.1})  # name|module:fn -> weight
    # rollouts
    prompts_per_step: int = 16
    group_size: int = 8
    max_new_tokens: int = 0  # 0: 1.5x the task's longest solver reply (+16)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    # objective
    beta: float = 0.0  # k3 KL weight; 0 loads no reference model
    eps_low: float = 0.2
    eps_high: float = 0.2  # DAPO: 0.28
    mu: int = 1  # optimizer steps per rollout batch
    loss_agg: str = "token"  # sequence (GRPO) | token (DAPO) | dr_grpo
    scale_rewards: bool = True  # divide advantages by the group's std (false: Dr. GRPO)
    mask_truncated: bool = True
    filter_zero_std: bool = True
    micro_batch: int = 64  # completions per forward/backward
    mtp_loss_weight: float = 0.3  # MTP loss on the rollouts (models with MTP modules only; 0: off)
    # evaluation
    eval_n: int = 200
    eval_split: str = "test"  # "train" monitors on train-split problems (a dev set) instead
    threads: int = 0  # torch CPU threads (0: torch's default)

    def validate(self, source: str | None = None) -> "GRPORecipe":
        if not self.init_from:
            self.bad("init_from", "the starting model folder is required", source)
        if self.loss_agg not in LOSS_AGGREGATIONS:
            self.bad("loss_agg", f"must be one of {LOSS_AGGREGATIONS}", source)
        super().validate(source)
        for name in ("prompts_per_step", "group_size", "mu", "micro_batch", "eval_n"):
            if getattr(self, name) < 1:
                self.bad(name, "must be at least 1", source)
        if self.group_size < 2:
            self.bad("group_size", "must be at least 2 (advantages compare samples of one prompt)", source)
        for name in ("max_new_tokens", "top_k", "threads", "temperature", "beta", "eps_low", "eps_high",
                     "mtp_loss_weight"):
            if getattr(self, name) < 0:
                self.bad(name, "must be non-negative", source)
        if not 0 < self.top_p <= 1:
            self.bad("top_p", "must be in (0, 1]", source)
        if self.eps_low >= 1:
            self.bad("eps_low", "must be below 1", source)
        if self.eval_split not in ("train", "test"):
            self.bad("eval_split", "must be 'train' or 'test'", source)
        if self.temperature == 0:
            self.bad("temperature", "must be positive (greedy rollouts give identical samples)", source)
        self._validate_problems(source)
        self._validate_rewards(source)
        return self

    def _validate_problems(self, source: str | None) -> None:
        """task or dataset (not both); a dataset is read here, so a bad file fails before any run folder."""
        if self.task and self.dataset:
            self.bad("dataset", f"set either task ({self.task!r}) or dataset, not both", source)
        if not self.dataset:
            self.task = self.task or "addition3"
            return
        if self.difficulty is not None:
            self.bad("difficulty", "a dataset has no difficulty levels", source)
        task = self.build_task()
        if not self.max_new_tokens and not task.has_traces("train"):
            self.bad("max_new_tokens", f"the dataset {self.dataset} has no reasoning trace for every train problem "
                     "to size replies by: set it", source)
        if self.eval_every and not task.problems[self.eval_split]:
            self.bad("eval_split", f"the dataset {self.dataset} has no {self.eval_split} problems", source)

    def build_task(self) -> Task:
        """The task the recipe trains on: the built-in one, or the dataset (read once, registered)."""
        if not self.dataset:
            return get_task(self.task or "addition3")
        return load_dataset(self.dataset, **{k: getattr(self, k) for k in DATASET_OPTIONS})

    def _validate_rewards(self, source: str | None) -> None:
        """Load every reward now (a missing file, module or function fails before any run folder
        exists); relative `file.py:function` paths become absolute against the recipe file's folder
        (else the working directory), so later validations and resumes find the same file."""
        if not isinstance(self.rewards, dict) or not self.rewards:
            self.bad("rewards", "must map reward names (accuracy, format, think, package.module:function, "
                     "path/to/file.py:function) to weights", source)
        base = Path(source).parent if source else None
        try:
            Rewards(self.rewards, base)
        except ConfigError as e:
            where = f" in {source}" if source else ""
            raise ConfigError(f"invalid GRPO recipe field 'rewards'{where}: {e}") from None
        self.rewards = absolute_reward_paths(self.rewards, base)


def grpo_recipe_fields() -> dict[str, Any]:
    return field_types(GRPORecipe)


def load_grpo_recipe(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> GRPORecipe:
    """A GRPO recipe from a TOML/YAML/JSON file (optional), then `overrides` (field -> value or string).
    Reward files named in the file are relative to its folder, those in `overrides` to the working directory."""
    overrides = dict(overrides or {})
    if "rewards" in overrides:
        overrides["rewards"] = _absolute_override(overrides["rewards"])
    return load_recipe_as(GRPORecipe, path, overrides, what="GRPO recipe")


def _absolute_override(rewards: Any) -> Any:
    """A rewards override (a mapping, or its JSON text) with relative reward files made absolute against
    the working directory; anything else is left for the recipe's own checks to refuse."""
    if isinstance(rewards, str):
        try:
            rewards = json.loads(rewards)
        except json.JSONDecodeError:
            return rewards
    return absolute_reward_paths(rewards, None) if isinstance(rewards, dict) else rewards


# ---- the math (pure functions, unit-tested by hand) -------------------------------------------
def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """rewards (N*G,) grouped by prompt -> (advantages (N*G,), zero_std (N,) bool).
    A = (r - mean) / (std + 1e-4) with the unbiased std of the group (as TRL), or r - mean."""
    r = rewards.float().view(-1, group_size)
    mean = r.mean(dim=1, keepdim=True)
    std = r.std(dim=1, keepdim=True)
    adv = r - mean
    if scale:
        adv = adv / (std + STD_EPS)
    zero_std = (r.max(dim=1).values - r.min(dim=1).values) == 0
    return adv.flatten(), zero_std


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(pi || pi_ref): pi_ref/pi - log(pi_ref/pi) - 1 (>= 0)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
              ref_logp: torch.Tensor | None = None, beta: float = 0.0, eps_low: float = 0.2,
              eps_high: float = 0.2, loss_agg: str = "token", max_len: int | None = None,
              num_seqs: float | None = None, num_tokens: float | None = None) -> tuple[torch.Tensor, dict]:
    """The clipped GRPO objective as a loss to minimise.

    logp, old_logp, ref_logp, mask: (B, T) per completion token (mask 1 where the token counts);
    advantages: (B,). num_seqs / num_tokens: the denominators of the whole batch when this is one
    micro-batch of it (default: this batch's own). Returns (loss, statistics as tensors without grad).
    """
    if loss_agg not in LOSS_AGGREGATIONS:
        raise ValueError(f"loss_agg must be one of {LOSS_AGGREGATIONS}, got {loss_agg!r}")
    mask = mask.to(logp.dtype)
    adv = advantages.to(logp.dtype)[:, None]
    ratio = torch.exp(logp - old_logp)
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - eps_low, 1 + eps_high) * adv)
    per_token = -surrogate
    kl = None
    if ref_logp is not None:
        kl = k3_kl(logp, ref_logp)
        if beta:
            per_token = per_token + beta * kl
    seq_tokens = mask.sum(dim=1)
    num_seqs = num_seqs if num_seqs is not None else int((seq_tokens > 0).sum())
    num_tokens = num_tokens if num_tokens is not None else int(mask.sum())
    if loss_agg == "sequence":
        loss = ((per_token * mask).sum(dim=1) / seq_tokens.clamp(min=1)).sum() / _positive(num_seqs)
    elif loss_agg == "token":
        loss = (per_token * mask).sum() / _positive(num_tokens)
    else:
        if max_len is None:
            raise ValueError("loss_agg 'dr_grpo' needs max_len (max_new_tokens)")
        loss = (per_token * mask).sum() / _positive(num_seqs * max_len)
    with torch.no_grad():
        clipped = ((ratio < 1 - eps_low) & (adv < 0)) | ((ratio > 1 + eps_high) & (adv > 0))
        stats = {"clipped_tokens": (clipped.to(mask.dtype) * mask).sum(), "tokens": mask.sum(),
                 "ratio_sum": (ratio * mask).sum()}
        if kl is not None:
            stats["kl_sum"] = (kl * mask).sum()
    return loss, stats


def _positive(denominator: float) -> float:
    """A loss denominator, 1 when there is nothing to divide (data parallel passes count / W, which
    may be below 1)."""
    return denominator if denominator > 0 else 1


def completion_logprobs(model: Transformer, ids: torch.Tensor, temperature: float = 1.0,
                        with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """ids (B, T) -> log-probabilities of ids[:, 1:] (B, T-1) under logits / temperature (the
    distribution that was sampled), and the per-position entropy (no grad) when asked."""
    return token_logprobs(model(ids), ids, temperature, with_entropy)


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0,
                   with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`completion_logprobs` from the model's logits (B, T, V) of ids (B, T)."""
    logits = logits[:, :-1].float()
    if temperature != 1.0:
        logits = logits / temperature
    logp_all = F.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, ids[:, 1:, None]).squeeze(-1)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = -(logp_all.exp() * logp_all).sum(dim=-1)
    return logp, entropy


# ---- rollouts -----------------------------------------------------------------------------------
@dataclass
class Rollouts:
    """One step's samples: G consecutive completions per prompt."""

    problems: list  # Problem per completion
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    texts: list[str]
    truncated: list[bool]
    rewards: torch.Tensor  # (N*G,)
    parts: dict[str, list[float]]
    seconds: float


def pack_sequences(prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_id: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded prompt+completion rows (B, T) and the mask (B, T-1) of target positions that are
    completion tokens (position t predicts token t+1)."""
    rows = [p + c for p, c in zip(prompt_ids, completion_ids)]
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), T - 1, dtype=torch.bool)
    for i, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        ids[i, : len(p) + len(c)] = torch.tensor(p + c)
        mask[i, len(p) - 1: len(p) - 1 + len(c)] = True
    return ids, mask


# ---- the trainer --------------------------------------------------------------------------------
@dataclass
class UpdateBatch:
    """The completions one update learns from, packed for the forwards of this rank.

    ids (B, T) prompt + completion rows, mask (B, T-1) completion targets, advantages (B,); chunks: one
    slice of rows per micro-batch, None for a dead one (a rank with fewer micro-batches repeats row 0
    with nothing counted, so that every rank runs the same collective forwards); num_seqs / num_tokens:
    the loss denominators (of the global batch / W under data parallelism); mtp_targets: the MTP loss's
    per depth (its targets in the batch, counted as num_tokens)."""

    ids: torch.Tensor
    mask: torch.Tensor
    advantages: torch.Tensor
    chunks: list[slice | None]
    num_seqs: float
    num_tokens: float
    mtp_targets: list[float] = field(default_factory=list)

    def micro_batch(self, j: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids, mask, advantages) of micro-batch j; a dead one counts nothing."""
        sl = self.chunks[j]
        if sl is None:
            return self.ids[:1], torch.zeros_like(self.mask[:1]), torch.zeros_like(self.advantages[:1])
        return self.ids[sl], self.mask[sl], self.advantages[sl]

    def mtp_masks(self, j: int, depths: int) -> list[torch.Tensor]:
        """The MTP targets of micro-batch j per depth k, (b, T-1-k): position i predicts token i+k+1,
        counted where that is a completion token that counts (the completion mask shifted by k)."""
        mask = self.micro_batch(j)[1]
        return [mask[:, k:] for k in range(1, depths + 1)]


class GRPOTrainer(Algorithm):
    """Holds the policy, the optional reference, the optimizer and the task; `run()` trains.
    parallel (loop.SingleProcess or distributed.Parallel): this process's place in the run (see above)."""

    name = "grpo"
    eval_key = "eval_accuracy"
    # the MTP loss's gradient stops at the MTP modules (True: it also trains the trunk, embeddings and
    # head, as in pretraining, and shares the policy's gradient clip; bench/mtp_grpo.py compares)
    mtp_trunk_gradient: ClassVar[bool] = False

    def __init__(self, recipe: GRPORecipe, parallel=None):
        self.recipe = recipe.validate()
        if recipe.threads:
            torch.set_num_threads(recipe.threads)
        parallel = parallel or SingleProcess(resolve_device(recipe.device))
        self.parallel, self.rank, self.world = parallel, parallel.rank, parallel.world_size
        if recipe.prompts_per_step % self.world:
            raise ConfigError(f"invalid GRPO recipe field 'prompts_per_step': {recipe.prompts_per_step} prompts "
                              f"cannot be split evenly over {self.world} processes")
        self.device = parallel.device
        self.task = recipe.build_task()
        self.rewards = Rewards(dict(recipe.rewards))
        self.tokenizer_dir = recipe.tokenizer or recipe.init_from
        self.tokenizer = Tokenizer.load(self.tokenizer_dir)
        self.folder = RunFolder(recipe, parallel, self.tokenizer_dir, error=GRPOError)
        self.run_dir = self.folder.dir
        self.state = {"step": 0, "wall_seconds": 0.0, "cpu_seconds": 0.0, "rollout_tokens": 0, "update_tokens": 0}
        saved = {}
        self.precision = self.folder.resolve_precision()  # the forwards' autocast; before parallelize, which reads it
        if self.folder.resumed_from is not None:
            self.model, self.optimizer, saved = self.folder.load(lambda m: build_optimizer(m, recipe), self.device)
            self.state.update({k: saved[k] for k in self.state if k in saved})
        else:
            self.model = parallel.parallelize(load_model(recipe.init_from, device=self.device,
                                                         dtype=torch.float32).train())
            self.optimizer = build_optimizer(self.model, recipe)
        set_aux_loss_alpha(self.model, 0.0)  # no balance loss in RL; the bias update is optional
        self.model.activation_checkpointing = recipe.activation_checkpointing
        self.reference = None
        if recipe.beta > 0:  # a full copy on every rank: it only runs forwards, free of collectives
            self.reference = load_model(recipe.init_from, device=self.device, dtype=torch.float32).eval()
            self.reference.requires_grad_(False)
        if self.model.config.vocab_size < self.tokenizer.vocab_size:
            raise ConfigError(f"the model's vocab_size {self.model.config.vocab_size} is below the tokenizer's "
                              f"{self.tokenizer.vocab_size} ({self.tokenizer_dir})")
        self.max_new_tokens = recipe.max_new_tokens or self._default_max_new_tokens()
        self.mtp_depths = mtp_depths(self.model, recipe)  # 0: no MTP loss
        self.eval_problems = None

    def _default_max_new_tokens(self) -> int:
        rng = make_rng("max_new_tokens", self.task.name)
        problems = [self.task.sample(rng, "train", self.recipe.difficulty) for _ in range(64)]
        return default_max_new_tokens(self.task, self.tokenizer, problems)

    def _policy(self) -> Transformer:
        """The model to sample from: the policy itself, or under data parallelism a full copy gathered
        from the shards (a collective)."""
        return self.parallel.gather_model(self.model, device=self.device, everywhere=True)

    # -- one step -----------------------------------------------------------------------------
    def run(self) -> dict:
        """Train from the current step to max_steps (or a stop); returns the summary."""
        return run_loop(self)

    def step(self, step: int) -> dict:
        """Rollouts, then the update on them."""
        ro = self.rollout(step)
        row = self.step_metrics(ro)
        row.update(self.update(ro, step))
        return row

    def rollout(self, step: int) -> Rollouts:
        """This rank's share of the step's prompts, G samples each (all of them in one process)."""
        r = self.recipe
        rng = make_rng("grpo", r.seed, step)
        problems = [self.task.sample(rng, "train", r.difficulty) for _ in range(r.prompts_per_step)]
        share = r.prompts_per_step // self.world
        first = self.rank * share
        problems = problems[first:first + share]
        prompts = prompt_ids(self.tokenizer, problems)
        policy = self._policy()
        t0 = time.perf_counter()
        rows = [p for p in prompts for _ in range(r.group_size)]
        generators = [torch.Generator(device=self.device).manual_seed(group_seed(r.seed, step, first + i))
                      for i in range(len(prompts))]
        outs = infer.generate(policy, rows, max_new_tokens=self.max_new_tokens, temperature=r.temperature,
                              top_p=r.top_p, top_k=r.top_k, eos_token_id=self.tokenizer.eos_id,
                              generator=[g for g in generators for _ in range(r.group_size)])
        seconds = time.perf_counter() - t0
        eos = self.tokenizer.eos_id
        texts = [self.tokenizer.decode(o) for o in outs]
        truncated = [not o or o[-1] != eos for o in outs]
        probs = [p for p in problems for _ in range(r.group_size)]
        total, parts = self.rewards([p.prompt for p in probs], texts, **reward_columns(probs, truncated))
        return Rollouts(probs, rows, outs, texts, truncated, torch.tensor(total, dtype=torch.float32), parts,
                        seconds)

    def update(self, ro: Rollouts, step: int) -> dict:
        """mu optimizer steps on the kept completions of the rollouts; returns the update's statistics."""
        advantages, zero_std, kept = self._select(ro)
        batch = self._pack(ro, kept, advantages)
        stats = {"zero_std_frac": zero_std.float().mean().item(), "kept_seqs": len(kept)}
        batch, stats = self._global_denominators(batch, stats)
        if stats["kept_seqs"] == 0:
            return stats | {"skipped_update": 1}
        old, ref = self._fixed_logprobs(batch)
        t0 = time.perf_counter()
        lr = lr_at(step, self.recipe)
        loss_sum, norms, totals = self._optimize(batch, old, ref, lr)
        seconds = time.perf_counter() - t0
        forwarded = int(batch.mask.shape[0] * batch.ids.shape[1]) * self.recipe.mu if kept else 0
        return stats | self._update_statistics(loss_sum, norms, lr, totals, forwarded, seconds)

    def _select(self, ro: Rollouts) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Group advantages (N*G,), the zero-std groups (N,) and the indices of the completions that
        count: not in a zero-std group (filter_zero_std), not truncated (mask_truncated), not empty."""
        r = self.recipe
        adv, zero_std = group_advantages(ro.rewards, r.group_size, r.scale_rewards)
        keep = torch.ones(len(adv), dtype=torch.bool)
        if r.filter_zero_std:
            keep &= ~zero_std.repeat_interleave(r.group_size)
        if r.mask_truncated:
            keep &= ~torch.tensor(ro.truncated)
        keep &= torch.tensor([len(c) > 0 for c in ro.completion_ids])
        return adv, zero_std, keep.nonzero().flatten().tolist()

    def _pack(self, ro: Rollouts, kept: list[int], advantages: torch.Tensor) -> UpdateBatch:
        """The kept completions as padded rows in micro-batches of micro_batch, with this rank's own
        denominators. None kept: one row that counts for nothing (keeps the ranks in step)."""
        rows = kept or [0]
        ids, mask = pack_sequences([ro.prompt_ids[i] for i in rows], [ro.completion_ids[i] for i in rows],
                                   self.tokenizer.pad_id)
        if not kept:
            mask.zero_()
        adv = advantages[kept].to(self.device) if kept else torch.zeros(1, device=self.device)
        n = self.recipe.micro_batch
        chunks = [slice(s, s + n) for s in range(0, ids.shape[0], n)]
        mtp_targets = [float(mask[:, k:].sum()) for k in range(1, self.mtp_depths + 1)]
        return UpdateBatch(ids.to(self.device), mask.to(self.device), adv, chunks, float(len(kept)),
                           float(mask.sum()), mtp_targets)

    def _global_denominators(self, batch: UpdateBatch, stats: dict) -> tuple[UpdateBatch, dict]:
        """Counts over all ranks: the denominators become global count / W (FSDP averages the gradients
        over the W ranks), kept_seqs the global count; every rank gets as many micro-batches as the
        busiest one (dead ones pad the others)."""
        parallel = self.parallel
        counts = parallel.all_reduce_sum([torch.tensor([batch.num_seqs, batch.num_tokens, len(batch.chunks),
                                                        *batch.mtp_targets], dtype=torch.float64)])[0]
        stats = stats | {"kept_seqs": int(counts[0]),
                         "zero_std_frac": parallel.mean_floats({"z": stats["zero_std_frac"]})["z"]}  # equal groups
        most = int(parallel.all_reduce_max(len(batch.chunks)))
        batch = dataclasses.replace(batch, num_seqs=float(counts[0]) / self.world,
                                    num_tokens=float(counts[1]) / self.world,
                                    mtp_targets=[_positive(float(c) / self.world) for c in counts[3:]],
                                    chunks=batch.chunks + [None] * (most - len(batch.chunks)))
        return batch, stats

    def _optimize(self, batch: UpdateBatch, old: list | None, ref: list | None, lr: float
                  ) -> tuple[float, dict[str, float], dict[str, float]]:
        """The mu loop: mu optimizer steps on the same batch, each over all its micro-batches (old, ref:
        see _fixed_logprobs). Returns the first iteration's loss, gradient norms and summed statistics."""
        r = self.recipe
        totals = {"clipped_tokens": 0.0, "tokens": 0.0, "ratio_sum": 0.0, "kl_sum": 0.0, "entropy_sum": 0.0}
        if self.mtp_depths:
            totals["mtp_loss"] = 0.0
        loss_sum, norms = 0.0, {}
        for it in range(r.mu):
            loads = None
            for j, live in enumerate(sl is not None for sl in batch.chunks):
                _, mask, adv = batch.micro_batch(j)
                with self.precision.autocast(self.device):
                    logp, entropy, mtp_loss = self._forward(batch, j, with_entropy=it == 0)
                loss, s = grpo_loss(logp, old[j] if old is not None else logp.detach(), adv, mask,
                                    ref_logp=ref[j] if ref is not None else None, beta=r.beta, eps_low=r.eps_low,
                                    eps_high=r.eps_high, loss_agg=r.loss_agg, max_len=self.max_new_tokens,
                                    num_seqs=batch.num_seqs, num_tokens=batch.num_tokens)
                total = loss if mtp_loss is None else loss + r.mtp_loss_weight * mtp_loss
                check_finite(total.item(), self.parallel)
                total.backward()
                if it == 0:
                    loss_sum += loss.item()
                    for key in ("clipped_tokens", "tokens", "ratio_sum", "kl_sum"):
                        totals[key] += float(s.get(key, 0.0))
                    totals["entropy_sum"] += float((entropy * mask).sum())
                    if mtp_loss is not None:
                        totals["mtp_loss"] += mtp_loss.item()
                step_loads = expert_loads(self.model)
                loads = add_loads(loads, step_loads if live else [torch.zeros_like(x) for x in step_loads])
            step_norms = self._optimizer_steps(loads or [], lr)
            norms = step_norms if it == 0 else norms
        return loss_sum, norms, totals

    def _forward(self, batch: UpdateBatch, j: int, with_entropy: bool
                 ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Micro-batch j through the policy: completion log-probs (B, T-1), entropy, and the MTP loss
        (None when off) from the same forward, its gradient stopping at the MTP modules."""
        ids = batch.micro_batch(j)[0]
        if not self.mtp_depths:
            return *completion_logprobs(self.model, ids, self.recipe.temperature, with_entropy), None
        logits, mtp = self.model(ids, return_mtp=True, mtp_detach_trunk=not self.mtp_trunk_gradient)
        logp, entropy = token_logprobs(logits, ids, self.recipe.temperature, with_entropy)
        # depth k's logits (B, T-k) at i predict ids[i+k+1]: the last has no target
        mtp_loss = mtp_cross_entropy([m[:, :-1] for m in mtp], ids[:, 1:], batch.mtp_masks(j, len(mtp)),
                                     batch.mtp_targets)
        return logp, entropy, mtp_loss

    def _optimizer_steps(self, loads: list[torch.Tensor], lr: float) -> dict[str, float]:
        """The policy's optimizer step (its gradient norm and clip as without MTP), then, with the MTP
        loss on, the MTP modules' own: their gradients are held back from the first, clipped on their
        own and stepped by the same AdamW (its state is per parameter). Returns the gradient norms."""
        r = self.recipe
        held = {}
        if self.mtp_depths and not self.mtp_trunk_gradient:
            for p in self.model.mtp.parameters():
                held[p], p.grad = p.grad, None
        norm, _ = optimizer_step(self.model, self.optimizer, loads, lr, r, self.parallel)
        if not held:
            return {"grad_norm": norm}
        for p, grad in held.items():
            p.grad = grad
        mtp_norm = self.parallel.clip_grad_norm_(self.model, r.grad_clip or float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"grad_norm": norm, "mtp_grad_norm": mtp_norm.item()}

    def _update_statistics(self, loss_sum: float, norms: dict[str, float], lr: float, totals: dict[str, float],
                           forwarded: int, seconds: float) -> dict:
        """The update's row: loss, gradient norms, lr and per-token means over all ranks."""
        parallel = self.parallel
        summed = parallel.all_reduce_sum([torch.tensor([totals[k] for k in sorted(totals)] + [forwarded],
                                                       dtype=torch.float64)])[0].tolist()
        totals, forwarded = dict(zip(sorted(totals), summed[:-1])), int(summed[-1])
        loss_sum = parallel.mean_floats({"loss": loss_sum})["loss"]  # each rank divided by count / W
        tokens = max(totals["tokens"], 1.0)
        stats = dict(loss=loss_sum, **norms, lr=lr, clip_frac=totals["clipped_tokens"] / tokens,
                     ratio=totals["ratio_sum"] / tokens, entropy=totals["entropy_sum"] / tokens,
                     update_tokens=forwarded, update_tokens_per_s=forwarded / max(seconds, 1e-9),
                     update_seconds=seconds)
        if "mtp_loss" in totals:  # each rank's sum divided by the global count / W, summed: W x the mean
            stats["mtp_loss"] = totals["mtp_loss"] / self.world
        if self.reference is not None:
            stats["kl"] = totals["kl_sum"] / tokens
        return stats

    @torch.no_grad()
    def _fixed_logprobs(self, batch: UpdateBatch) -> tuple[list | None, list | None]:
        """Log-probs, per micro-batch, of the sampling policy (needed when mu > 1) and of the
        reference (beta > 0). A dead micro-batch is row 0 again."""
        r = self.recipe
        rows = [batch.micro_batch(j)[0] for j in range(len(batch.chunks))]
        with self.precision.autocast(self.device):
            old = [completion_logprobs(self.model, ids, r.temperature)[0] for ids in rows] if r.mu > 1 else None
            ref = [completion_logprobs(self.reference, ids, r.temperature)[0] for ids in rows] \
                if self.reference is not None else None
        return old, ref

    def step_metrics(self, ro: Rollouts) -> dict:
        """Rollout statistics; under data parallelism, over every rank's rollouts."""
        lengths = torch.tensor([len(c) for c in ro.completion_ids], dtype=torch.float64)
        truncated = torch.tensor(ro.truncated, dtype=torch.float64)
        names = sorted(ro.parts)
        columns = [ro.rewards.double(), lengths, truncated] + [torch.tensor(ro.parts[n], dtype=torch.float64)
                                                                for n in names]
        table = self.parallel.all_gather_rows(torch.stack(columns, dim=1))
        seconds = self.parallel.all_reduce_max(ro.seconds)  # the step waits for the slowest rank
        rewards, lengths, truncated = table[:, 0], table[:, 1], table[:, 2]
        G = self.recipe.group_size
        row = {"reward_mean": rewards.mean().item(), "reward_std": rewards.std().item(),
               "reward_group_std": rewards.view(-1, G).std(dim=1).mean().item(),
               "completion_len": lengths.mean().item(), "completion_len_max": int(lengths.max()),
               "truncated_frac": truncated.mean().item(),
               "rollout_tokens": int(lengths.sum()), "rollout_tokens_per_s": lengths.sum().item() / max(seconds, 1e-9),
               "rollout_seconds": seconds}
        for k, name in enumerate(names):  # NaN where a reward returned None (did not apply)
            if not table[:, 3 + k].isnan().all():
                row[f"reward_{name}"] = table[:, 3 + k].nanmean().item()
        if "reward_accuracy" in row:
            row["accuracy"] = row["reward_accuracy"]
        return row

    def evaluate(self) -> float:
        """Greedy accuracy on eval_n problems (under data parallelism each rank takes every W-th)."""
        if self.eval_problems is None:
            self.eval_problems = self.task.generate(self.recipe.eval_n, seed=1234, split=self.recipe.eval_split,
                                                    difficulty=self.recipe.difficulty)
        policy = self._policy()
        mine = self.eval_problems[self.rank::self.world]
        correct = 0.0
        if mine:
            outs = generate_batches(policy, prompt_ids(self.tokenizer, mine), max_new_tokens=self.max_new_tokens,
                                    temperature=0.0, top_p=1.0, seed=0, eos_id=self.tokenizer.eos_id, batch_size=128)
            correct = float(sum(self.task.check(self.tokenizer.decode(o), p) for o, p in zip(outs, mine)))
        correct = self.parallel.all_reduce_sum([torch.tensor([correct], dtype=torch.float64)])[0].item()
        self.model.train()
        return correct / len(self.eval_problems)

    # -- the loop's hooks -----------------------------------------------------------------------
    def _eval_due(self, step: int) -> bool:
        r = self.recipe
        return bool(r.eval_every) and (step % r.eval_every == 0 or step == r.max_steps)

    def first_row(self) -> dict:
        return {"eval_accuracy": self.evaluate()} if self._eval_due(0) else {}

    def finish_row(self, row: dict, seconds: float) -> None:
        st = self.state
        st["rollout_tokens"] += row["rollout_tokens"]
        st["update_tokens"] += row.get("update_tokens", 0)
        row.update(step_seconds=seconds, wall_seconds=st["wall_seconds"], cpu_seconds=st["cpu_seconds"])
        if self._eval_due(row["step"]):
            row["eval_accuracy"] = self.evaluate()

    def postfix(self, row: dict) -> dict:
        return dict(reward=f"{row['reward_mean']:.2f}", acc=f"{row.get('accuracy', 0):.2f}",
                    len=f"{row['completion_len']:.0f}")

    def summary(self, stopped_by: str | None) -> dict:
        st = self.state
        return {"step": st["step"], "stopped_by": stopped_by, "model": str(self.run_dir / "model"),
                **{k: st[k] for k in ("wall_seconds", "cpu_seconds", "rollout_tokens", "update_tokens")}}

    def plot(self) -> None:
        plot_grpo(self.run_dir)


def group_seed(seed: int, step: int, prompt: int) -> int:
    """The sampling seed of one group: prompt `prompt` (its index in the step's global prompt list)."""
    return (seed * 1_000_003 + step) * 1_000_033 + prompt & 0x7FFF_FFFF_FFFF_FFFF


def grpo(recipe: GRPORecipe) -> dict:
    """Run (or resume) GRPO; returns the summary (also written as summary.json). Started by torchrun
    with WORLD_SIZE > 1, every process calls this and they train together."""
    recipe.validate()
    world = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun
    if recipe.prompts_per_step % world:
        raise ConfigError(f"invalid GRPO recipe field 'prompts_per_step': {recipe.prompts_per_step} prompts "
                          f"cannot be split evenly over {world} processes")
    return run_on_all_ranks(lambda parallel: GRPOTrainer(recipe, parallel).run(), recipe.device)


# ---- curves -------------------------------------------------------------------------------------
PLOT_PANELS = (("reward", ("reward_mean", "accuracy", "eval_accuracy")), ("completion length (tokens)",
               ("completion_len",)), ("KL to reference", ("kl",)), ("nats/token", ("entropy", "mtp_loss")),
               ("fractions", ("clip_frac", "zero_std_frac", "truncated_frac")),
               ("tokens/s", ("rollout_tokens_per_s", "update_tokens_per_s")))


def plot_grpo(run_dir: str | Path) -> Path | None:
    """grpo.png: reward and accuracy, completion length, KL, entropy and MTP loss, clip / zero-std /
    truncated fractions and throughput against step."""
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    if not any("reward_mean" in r for r in rows):
        return None
    fig, axes = pyplot().subplots(2, 3, figsize=(13, 6.5))
    for ax, (title, keys) in zip(axes.flat, PLOT_PANELS):
        for key in keys:
            pts = [(r["step"], r[key]) for r in rows if key in r and isinstance(r[key], (int, float))]
            if pts:
                ax.plot(*zip(*pts), "o-" if key == "eval_accuracy" else "-", lw=1, ms=3, label=key)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
        elif keys == ("kl",):
            ax.text(0.5, 0.5, "not logged: beta = 0\n(no reference model)", ha="center", va="center",
                    transform=ax.transAxes, color="gray")
    return save_figure(fig, run_dir / "grpo.png")
