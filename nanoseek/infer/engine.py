"""The generation engine: continuous batching over one shared MLA latent cache, streaming text, and
self-speculative decoding with the model's MTP head.

A step admits waiting requests within a prefill budget (`batching`), prefills them in a scratch cache
and joins their cache rows to the running batch (`slots`: one shared cache, compacted when slots run
out), advances every running row by one token, or by a verified MTP draft and one more (`decode`), and
reports what each request produced (`outputs`: streaming text, stop strings, finish reasons).
"""

from __future__ import annotations

import itertools
import math

import torch

from ..errors import ConfigError
from ..model import Transformer
from ..precision import Precision
from .batching import Admission
from .compute import ComputeModels, InferencePrecision, compute_models
from .decode import Decoder
from .outputs import StepOutputs
from .request import Request, RequestOutput, new_request_id
from .sampling import SamplingParams
from .slots import Slots
from .text import IncrementalDetokenizer, StopStrings

__all__ = ["Engine", "Request", "RequestOutput"]


class Engine:
    """Continuous-batching generator for one model. Not thread-safe: drive it from one thread
    (`nanoseek.infer.Scheduler` does, for servers).

    add(prompt_ids, params) queues a request; each step() admits waiting requests (prefill within a
    token budget), advances every running row by one token (two or one with speculation) and returns
    a RequestOutput per request that produced something.

    precision (auto | fp32 | bf16, a resolved Precision or InferencePrecision, or ComputeModels built by
    `compute_models`): how the model computes (see `nanoseek.infer.compute`); cast copies are made as
    needed and `model` itself is never changed. None: in the model's own dtype, as it is.
    `precision_plan` says what was chosen.

    prefix_reuse: identical prompts admitted in one step are prefilled once and their cache rows
    copied to each request (`stats["reused_prompts"]` counts the prefills saved); False prefills
    every request's prompt (the reference path).

    compile: decode steps as one torch.compile graph per batch bucket (`nanoseek.infer.compiled`): True,
    False, or None for NANOSEEK_COMPILE (1 / 0 / auto: where a cached probe measured it faster), else off.
    fp32 on a CPU, without speculation; the first step of each bucket pays the compile.
    """

    def __init__(self, model: Transformer, tokenizer=None, *, max_batch: int = 16, max_model_len: int | None = None,
                 speculative: bool = False, prefill_chunk: int = 512, eos_ids=None,
                 precision: str | Precision | InferencePrecision | ComputeModels | None = None,
                 prefix_reuse: bool = True, compile: bool | None = None):
        cfg = model.config
        if speculative and (cfg.num_nextn_predict_layers < 1 or not len(model.mtp)):
            raise ConfigError("speculative decoding needs a model with MTP weights (num_nextn_predict_layers >= 1); "
                              "this one has none")
        if max_batch < 1 or prefill_chunk < 1:
            raise ValueError("max_batch and prefill_chunk must be positive")
        self.compute = compute_models(model, precision)
        self.precision_plan = self.compute.plan
        self.model = self.compute.main
        self.config = cfg
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_model_len = int(max_model_len or cfg.max_position_embeddings)
        self.speculative = speculative
        self.prefix_reuse = prefix_reuse
        self.prefill_chunk = prefill_chunk
        self.eos_ids = tuple(tokenizer.eos_ids if eos_ids is None and tokenizer is not None else eos_ids or ())
        self.n_layers = cfg.num_hidden_layers + (1 if speculative else 0)
        self.max_slots = self.max_model_len + max(16, self.max_model_len // 8)
        self.device, self.dtype = self.model.device, self.model.dtype  # the latent cache's dtype
        self.stats = {"steps": 0, "generated_tokens": 0, "prompt_tokens": 0, "drafted": 0, "accepted": 0,
                      "compactions": 0, "reused_prompts": 0}
        self.admission = Admission(max_batch, prefill_chunk)
        self.slots = Slots(cfg, self.n_layers, max_batch, self.max_slots, self.device, self.dtype, self.stats)
        self.decoder = Decoder(self.compute, speculative, self.stats, compile=compile)

    # ---- requests -------------------------------------------------------------------------------
    def add(self, prompt: list[int], params: SamplingParams | None = None, request_id: str | None = None,
            generator: torch.Generator | None = None) -> Request:
        """Queue a request; raises ValueError on a bad prompt or one that fills the context.
        `generator` overrides the one seeded from params.seed (requests may share one)."""
        params = params or SamplingParams()
        if not isinstance(prompt, (list, tuple)) or not prompt:
            raise ValueError("the prompt must be a non-empty list of token ids")
        V = self.config.vocab_size
        if any(not isinstance(t, int) or not 0 <= t < V for t in prompt):
            bad = next(t for t in prompt if not isinstance(t, int) or not 0 <= t < V)
            raise ValueError(f"prompt token id {bad!r} is outside the vocabulary [0, {V})")
        if len(prompt) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(prompt)} tokens; this engine's context length is "
                             f"{self.max_model_len}, which leaves no room to generate")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need an engine with a tokenizer")
        if params.grammar is not None and params.grammar.tokenizer.vocab_size != V:
            raise ValueError(f"the grammar was built for a vocabulary of {params.grammar.tokenizer.vocab_size} "
                             f"tokens; this model has {V}")
        req = Request(request_id or new_request_id(), list(prompt), params)
        if params.grammar is not None:
            req.constraint = params.grammar.constraint()
        if params.logprobs is not None:
            req.pending_logprobs = []
        req.special = req.constraint is not None or req.pending_logprobs is not None
        req.limit = min(params.max_tokens or self.max_model_len, self.max_model_len - len(prompt))
        req.generator = generator if generator is not None else params.generator(self.device)
        if self.tokenizer is not None:
            req.detok = IncrementalDetokenizer(self.tokenizer.decode)
            req.stops = StopStrings(params.stop) if params.stop else None
        self.admission.waiting.append(req)
        return req

    def cancel(self, request_id: str) -> bool:
        """Mark a request cancelled; it leaves (and frees its row) at the next step."""
        for req in itertools.chain(self.admission.queued(), self.slots.rows):
            if req.request_id == request_id:
                req.cancelled = True
                return True
        return False

    @property
    def has_work(self) -> bool:
        return bool(self.admission.has_work or self.slots.rows)

    @property
    def num_running(self) -> int:
        return len(self.slots.rows)

    def abort_all(self, reason: str = "error", error: str | None = None) -> list[RequestOutput]:
        """Finish every request (after a failed step the cache cannot be trusted) and reset."""
        outs, seen = [], set()
        for req in itertools.chain(self.admission.pending(), self.slots.rows):
            if id(req) in seen:
                continue
            seen.add(id(req))
            req.finish_reason, req.error, req.scratch = reason, error, None
            outs.append(RequestOutput.of(req))
        self.admission.clear()
        self.slots.clear()
        return outs

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
                 generator: torch.Generator | list[torch.Generator] | None = None) -> list[Request]:
        """Run prompts to completion (a static batch through the same machinery); returns the requests.
        With `generator`, all requests sample from it (reproducible for the same batch); with a list,
        one per prompt (prompts may share one: they then draw together, whatever else is batched)."""
        params = params if isinstance(params, list) else [params] * len(prompts)
        generators = generator if isinstance(generator, list) else [generator] * len(prompts)
        if len(params) != len(prompts) or len(generators) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} params and {len(generators)} generators")
        reqs = [self.add(p, sp, generator=g) for p, sp, g in zip(prompts, params, generators)]
        while any(not r.finished for r in reqs):
            self.step()
        return reqs

    def acceptance_rate(self) -> float:
        return self.stats["accepted"] / self.stats["drafted"] if self.stats["drafted"] else math.nan

    # ---- one step -------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Admit and prefill what the token budget allows, then advance every running row."""
        outputs = StepOutputs(self.eos_ids, self.stats)
        self._drop_cancelled(outputs)
        self.admission.admit(lambda: len(self.slots.rows),
                             lambda req, budget: self._prefill_chunk(req, budget, outputs),
                             lambda reqs: self._prefill_batch(reqs, outputs))
        if self.slots.rows:
            decode = self.decoder.decode_speculative if self.speculative else self.decoder.decode
            self.slots.remove(decode(self.slots, outputs))
            self.stats["steps"] += 1
        return outputs.list()

    def _drop_cancelled(self, outputs: StepOutputs):
        for req in self.admission.drop_cancelled():
            outputs.finish(req, "cancelled")
        gone = [i for i, r in enumerate(self.slots.rows) if r.cancelled]
        for i in gone:
            outputs.finish(self.slots.rows[i], "cancelled")
        self.slots.remove(gone)

    # ---- prefill --------------------------------------------------------------------------------
    def _prefill_batch(self, reqs: list[Request], outputs: StepOutputs):
        """Left-padded prefill of whole prompts in a scratch cache, then each joins the batch.

        Prefix reuse: identical prompts in the batch (a GRPO group, eval's k samples) are prefilled
        once; each request samples its first token from its prompt's last logits and joins with a copy
        of its prompt's cache rows. Not with speculation (the MTP cache's last slot depends on each
        request's first token)."""
        prompts, source = self._distinct(reqs)
        B, P = len(prompts), max(len(p) for p in prompts)
        ids = torch.zeros(B, P, dtype=torch.long)
        mask = torch.zeros(B, P, dtype=torch.long)
        for i, prompt in enumerate(prompts):
            ids[i, P - len(prompt):] = torch.tensor(prompt)
            mask[i, P - len(prompt):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        padded = not bool(mask.all())
        scratch = self.decoder.scratch(B, P)
        shared = source if len(prompts) < len(reqs) else None
        firsts = self.decoder.prefill(reqs, ids, positions, scratch, 0, mask if padded else None, source=shared)
        for req, row, first in zip(reqs, source, firsts):
            self._started(req, first, scratch.kv[: self.n_layers, row, P - len(req.prompt):P], outputs)
        self.stats["reused_prompts"] += len(reqs) - len(prompts)

    def _distinct(self, reqs: list[Request]) -> tuple[list[list[int]], list[int]]:
        """The prompts to prefill (each distinct one once, in order of first use) and the prefilled row
        of each request."""
        if self.speculative or not self.prefix_reuse:
            return [r.prompt for r in reqs], list(range(len(reqs)))
        rows: dict[tuple[int, ...], int] = {}
        source = [rows.setdefault(tuple(r.prompt), len(rows)) for r in reqs]
        return [list(p) for p in rows], source

    def _prefill_chunk(self, req: Request, budget: int, outputs: StepOutputs) -> int:
        """Prefill the next `budget` prompt tokens of a long prompt in its own cache; returns tokens used."""
        P, a = len(req.prompt), req.prefilled
        b = min(P, a + budget)
        if req.scratch is None:
            req.scratch = self.decoder.scratch(1, P)
        ids = torch.tensor([req.prompt[a:b]], device=self.device)
        positions = torch.arange(a, b, device=self.device)[None]
        last = b == P
        firsts = self.decoder.prefill([req], ids, positions, req.scratch, a,
                                      following=None if last else [req.prompt[b]])
        req.prefilled = b
        if last:
            self.admission.prefilled(req)
            self._started(req, firsts[0], req.scratch.kv[: self.n_layers, 0, :P], outputs)
            req.scratch = None
        return b - a

    def _started(self, req: Request, first: int, kv_rows, outputs: StepOutputs):
        """A prompt is prefilled and `first` sampled: the request finishes with it or joins the batch
        with its cache rows kv_rows (layers, P, width)."""
        self.stats["prompt_tokens"] += len(req.prompt)
        req.pos, req.last = len(req.prompt), first
        if not outputs.accept(req, first):
            self.slots.join(req, kv_rows)
