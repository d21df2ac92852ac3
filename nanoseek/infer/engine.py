"""The generation engine: continuous batching over one shared MLA latent cache, streaming text, and
self-speculative decoding with the model's MTP head.

Cache layout. Running sequences are the rows 0..n-1 of one preallocated cache
`kv: (layers, max_batch, slots, kv_lora_rank + qk_rope)`. All rows write their next token into the
same slot (`length`), so one decode step is one forward of (n, 1) tokens; each row keeps its own
rotary positions, and `valid` (max_batch, slots) masks the slots a row does not own: the left part
before it joined, and drafts it rejected. A request joins between steps: its prompt is prefilled in a
scratch cache (batched with other newcomers, or in chunks for a long prompt so running rows keep
decoding) and its cache rows are copied right-aligned to `length`. A finished or cancelled row is
replaced by the last row, so the running rows stay a prefix. When slots run out, `_compact` packs
each row's valid slots to the right and drops the holes; the cache grows (doubling) up to
max_model_len plus a margin.

Speculative decoding (DeepSeek-V3 Sec. 2.2: MTP can draft for self-speculation). The MTP module k=1
maps the main model's last hidden state h_i and the embedding of token t_{i+1} to a distribution over
t_{i+2}. After prefill each row holds its next token t and a draft d for the token after it. One step
feeds [t, d] (2 tokens) through the main model: the logits at t give the true next token; d is
accepted when it equals it (greedy) or with probability min(1, p(d)/q(d)) (sampling, with the
residual max(p - q, 0) on rejection: the output distribution is exactly the model's). On acceptance
the logits at d give one more token for free. The MTP module then runs on the 1 or 2 new positions
(its own cache layer, `num_hidden_layers`) to draft the next d. A rejected draft's slot is simply
marked invalid.
"""

from __future__ import annotations

import itertools
import math
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from ..errors import ConfigError
from ..model import LatentCache, Transformer
from ..model.attention import attention_mask as causal_mask
from .sampling import SamplingParams, probabilities, sample, uniform
from .text import IncrementalDetokenizer, StopStrings

_ids = itertools.count()


@dataclass
class RequestOutput:
    """What one step produced for one request: new token ids and new text (complete characters)."""

    request_id: str
    token_ids: list[int]
    text: str
    finished: bool
    finish_reason: str | None  # "stop", "length", "cancelled", "error"
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None


@dataclass
class Request:
    """One prompt being generated. `output_ids` / `text` accumulate; read them when `finished`."""

    request_id: str
    prompt: list[int]
    params: SamplingParams
    arrival: float = field(default_factory=time.monotonic)
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    error: str | None = None
    cancelled: bool = False
    drafted: int = 0
    accepted: int = 0
    # decode state (engine-internal)
    generator: torch.Generator | None = None
    limit: int = 0  # max completion tokens (params and context length)
    pos: int = 0  # next rotary position = tokens fed so far
    last: int = -1  # sampled, not yet fed
    draft: int = -1
    draft_q: torch.Tensor | None = None  # draft distribution (sampling only)
    prefilled: int = 0  # chunked prefill progress
    scratch: LatentCache | None = None
    detok: IncrementalDetokenizer | None = None
    stops: StopStrings | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class _CacheView(LatentCache):
    """The first n rows of the engine's cache storage, seen by the model as a LatentCache."""

    def __init__(self, kv: torch.Tensor, valid: torch.Tensor, length: int, kv_lora_rank: int):
        self.kv, self.valid, self.length, self.kv_lora_rank = kv, valid, length, kv_lora_rank
        self.padded = True  # always build the (B, T, S) mask from `valid`
        self.max_len = kv.shape[2]


class Engine:
    """Continuous-batching generator for one model. Not thread-safe: drive it from one thread
    (`nanoseek.infer.Scheduler` does, for servers).

    add(prompt_ids, params) queues a request; each step() admits waiting requests (prefill within a
    token budget), advances every running row by one token (two or one with speculation) and returns
    a RequestOutput per request that produced something.
    """

    def __init__(self, model: Transformer, tokenizer=None, *, max_batch: int = 16, max_model_len: int | None = None,
                 speculative: bool = False, prefill_chunk: int = 512, eos_ids=None):
        cfg = model.config
        if speculative and (cfg.num_nextn_predict_layers < 1 or not len(model.mtp)):
            raise ConfigError("speculative decoding needs a model with MTP weights (num_nextn_predict_layers >= 1); "
                              "this one has none")
        if max_batch < 1 or prefill_chunk < 1:
            raise ValueError("max_batch and prefill_chunk must be positive")
        self.model = model
        self.config = cfg
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_model_len = int(max_model_len or cfg.max_position_embeddings)
        self.speculative = speculative
        self.prefill_chunk = prefill_chunk
        self.eos_ids = tuple(tokenizer.eos_ids if eos_ids is None and tokenizer is not None else eos_ids or ())
        self.n_layers = cfg.num_hidden_layers + (1 if speculative else 0)
        self.width = cfg.kv_lora_rank + cfg.qk_rope_head_dim
        self.max_slots = self.max_model_len + max(16, self.max_model_len // 8)
        self.device, self.dtype = model.device, model.dtype
        self.waiting: deque[Request] = deque()
        self.prefilling: list[Request] = []
        self.admitting: list[Request] = []  # the batch being prefilled inside a step
        self.rows: list[Request] = []  # running; index = cache row
        self.kv: torch.Tensor | None = None
        self.valid: torch.Tensor | None = None
        self.length = 0
        self.stats = {"steps": 0, "generated_tokens": 0, "prompt_tokens": 0, "drafted": 0, "accepted": 0,
                      "compactions": 0}

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
        req = Request(request_id or f"req-{next(_ids)}", list(prompt), params)
        req.limit = min(params.max_tokens or self.max_model_len, self.max_model_len - len(prompt))
        req.generator = generator if generator is not None else params.generator(self.device)
        if self.tokenizer is not None:
            req.detok = IncrementalDetokenizer(self.tokenizer.decode)
            req.stops = StopStrings(params.stop) if params.stop else None
        self.waiting.append(req)
        return req

    def cancel(self, request_id: str) -> bool:
        """Mark a request cancelled; it leaves (and frees its row) at the next step."""
        for req in itertools.chain(self.waiting, self.prefilling, self.rows):
            if req.request_id == request_id:
                req.cancelled = True
                return True
        return False

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.rows)

    @property
    def num_running(self) -> int:
        return len(self.rows)

    def abort_all(self, reason: str = "error", error: str | None = None) -> list[RequestOutput]:
        """Finish every request (after a failed step the cache cannot be trusted) and reset."""
        outs, seen = [], set()
        for req in itertools.chain(self.waiting, self.prefilling, self.admitting, self.rows):
            if id(req) in seen:
                continue
            seen.add(id(req))
            req.finish_reason, req.error, req.scratch = reason, error, None
            outs.append(self._output(req, [], ""))
        self.waiting.clear()
        self.prefilling.clear()
        self.admitting = []
        self.rows.clear()
        self.length = 0
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

    # ---- one step -------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Admit and prefill what the token budget allows, then advance every running row."""
        outputs: dict[str, RequestOutput] = {}
        self._drop_cancelled(outputs)
        self._prefill(outputs)
        if self.rows:
            if self.speculative:
                self._decode_speculative(outputs)
            else:
                self._decode(outputs)
            self.stats["steps"] += 1
        return list(outputs.values())

    def _drop_cancelled(self, outputs):
        for req in [r for r in self.waiting if r.cancelled]:
            self.waiting.remove(req)
            self._finish(req, "cancelled", outputs)
        for req in [r for r in self.prefilling if r.cancelled]:
            self.prefilling.remove(req)
            req.scratch = None
            self._finish(req, "cancelled", outputs)
        gone = [i for i, r in enumerate(self.rows) if r.cancelled]
        for i in gone:
            self._finish(self.rows[i], "cancelled", outputs)
        self._remove_rows(gone)

    # ---- prefill --------------------------------------------------------------------------------
    def _prefill(self, outputs):
        """Within `prefill_chunk` tokens: continue chunked prefills, then admit waiting requests in
        arrival order, whole prompts together in one left-padded forward, a long one in chunks."""
        budget = self.prefill_chunk
        for req in list(self.prefilling):
            if budget <= 0:
                return
            budget -= self._prefill_chunk(req, budget, outputs)
        batch: list[Request] = []
        while self.waiting and budget > 0 and len(self.rows) + len(self.prefilling) + len(batch) < self.max_batch:
            req = self.waiting[0]
            if len(req.prompt) <= budget:
                batch.append(self.waiting.popleft())
                budget -= len(req.prompt)
            elif not batch:
                self.prefilling.append(self.waiting.popleft())
                budget -= self._prefill_chunk(req, budget, outputs)
            else:
                break
        if batch:
            self.admitting = batch  # neither waiting nor running: abort_all must still find them
            self._prefill_batch(batch, outputs)
            self.admitting = []

    def _prefill_batch(self, reqs: list[Request], outputs):
        """Left-padded prefill of whole prompts in a scratch cache, then each joins the batch."""
        B, P = len(reqs), max(len(r.prompt) for r in reqs)
        ids = torch.zeros(B, P, dtype=torch.long)
        mask = torch.zeros(B, P, dtype=torch.long)
        for i, r in enumerate(reqs):
            ids[i, P - len(r.prompt):] = torch.tensor(r.prompt)
            mask[i, P - len(r.prompt):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        padded = not bool(mask.all())
        scratch = self._scratch(B, P)
        logits, h, attn = self._forward(ids, positions, scratch, 0, mask if padded else None,
                                        last_only=not self.speculative)
        firsts = self._sample_rows(reqs, logits[:, -1])
        if self.speculative:
            nxt = torch.cat([ids[:, 1:], torch.tensor(firsts, device=self.device)[:, None]], dim=1)
            mtp_h = self._mtp(h, nxt, positions, scratch, 0, attn)
            self._set_drafts(reqs, self._mtp_logits(mtp_h[:, -1]))
        for i, (req, first) in enumerate(zip(reqs, firsts)):
            self.stats["prompt_tokens"] += len(req.prompt)
            req.pos, req.last = len(req.prompt), first
            if not self._accept(req, first, outputs):
                self._join(req, scratch.kv[: self.n_layers, i, P - len(req.prompt):P])

    def _prefill_chunk(self, req: Request, budget: int, outputs) -> int:
        """Prefill the next `budget` prompt tokens of a long prompt in its own cache; returns tokens used."""
        P, a = len(req.prompt), req.prefilled
        b = min(P, a + budget)
        if req.scratch is None:
            req.scratch = self._scratch(1, P)
        ids = torch.tensor([req.prompt[a:b]], device=self.device)
        positions = torch.arange(a, b, device=self.device)[None]
        last = b == P
        logits, h, attn = self._forward(ids, positions, req.scratch, a, None,
                                        last_only=not self.speculative)
        req.prefilled = b
        first = self._sample_rows([req], logits[:, -1])[0] if last else None
        if self.speculative:
            nxt = req.prompt[a + 1:b] + [first if last else req.prompt[b]]
            mtp_h = self._mtp(h, torch.tensor([nxt], device=self.device), positions, req.scratch, a, attn)
            if last:
                self._set_drafts([req], self._mtp_logits(mtp_h[:, -1]))
        if last:
            self.prefilling.remove(req)
            self.stats["prompt_tokens"] += P
            req.pos, req.last = P, first
            if not self._accept(req, first, outputs):
                self._join(req, req.scratch.kv[: self.n_layers, 0, :P])
            req.scratch = None
        return b - a

    def _scratch(self, batch: int, length: int) -> LatentCache:
        return LatentCache(self.config, batch, length, with_mtp=self.speculative, device=self.device, dtype=self.dtype)

    # ---- decode ---------------------------------------------------------------------------------
    def _decode(self, outputs):
        self._ensure_room(1)
        n, L = len(self.rows), self.length
        ids = torch.tensor([[r.last] for r in self.rows], device=self.device)
        positions = torch.tensor([[r.pos] for r in self.rows], device=self.device)
        logits, _, _ = self._forward(ids, positions, self._view(n), L, None, last_only=True)
        self.length = L + 1
        tokens = self._sample_rows(self.rows, logits[:, 0])
        done = []
        for i, (req, token) in enumerate(zip(self.rows, tokens)):
            req.pos += 1
            req.last = token
            if self._accept(req, token, outputs):
                done.append(i)
        self._remove_rows(done)

    def _decode_speculative(self, outputs):
        self._ensure_room(2)
        n, L = len(self.rows), self.length
        rows = self.rows
        ids = torch.tensor([[r.last, r.draft] for r in rows], device=self.device)
        positions = torch.tensor([[r.pos, r.pos + 1] for r in rows], device=self.device)
        view = self._view(n)
        logits, h, _ = self._forward(ids, positions, view, L, None)
        self.length = L + 2
        verified = self._verify(rows, logits)
        done, accepted = [], []
        for i, (req, (tokens, ok)) in enumerate(zip(rows, verified)):
            req.drafted += 1
            req.accepted += ok
            if any(self._accept(req, t, outputs) for t in tokens):  # stops at the finishing token
                done.append(i)
            req.pos += len(tokens)
            req.last = tokens[-1]
            accepted.append(ok)
        self.stats["drafted"] += n
        self.stats["accepted"] += sum(accepted)
        ok = torch.tensor(accepted, device=self.device)
        self.valid[:n, L + 1] = ok  # a rejected draft's slot belongs to nobody
        # MTP on the new positions: accepted rows (h_t, emb(d)), (h_d, emb(t2)); rejected (h_t, emb(t1))
        nxt = torch.tensor([[r.draft, r.last] if a else [r.last, r.last] for r, a in zip(rows, accepted)],
                           device=self.device)
        attn = causal_mask(self.valid[:n, : L + 2], L, 2)
        mtp_h = self._mtp(h, nxt, positions, view, L, attn)
        pick = ok.long()  # the draft comes from the last accepted position
        last_h = mtp_h[torch.arange(n, device=self.device), pick]
        finished = set(done)
        live = [i for i in range(n) if i not in finished]
        if live:
            self._set_drafts([rows[i] for i in live], self._mtp_logits(last_h[live]))
        self._remove_rows(done)

    def _verify(self, rows: list[Request], logits: torch.Tensor) -> list[tuple[list[int], bool]]:
        """logits (n, 2, V) at [t, d] -> per row (new tokens, draft accepted)."""
        greedy = logits.argmax(dim=-1).tolist()  # (n, 2)
        out = []
        for i, req in enumerate(rows):
            p = req.params
            if p.greedy:
                t1, t2 = greedy[i]
                out.append(([t1, t2], True) if t1 == req.draft else ([t1], False))
                continue
            probs = probabilities(logits[i, 0], p.temperature, p.top_p, p.top_k)
            q = req.draft_q
            if uniform(req.generator, self.device) * float(q[req.draft]) <= float(probs[req.draft]):
                t2 = sample(probabilities(logits[i, 1], p.temperature, p.top_p, p.top_k), req.generator)
                out.append(([req.draft, t2], True))
            else:
                residual = (probs - q).clamp(min=0)
                total = float(residual.sum())
                t1 = sample(residual / total if total > 0 else probs, req.generator)
                out.append(([t1], False))
        return out

    # ---- model calls ----------------------------------------------------------------------------
    def _forward(self, ids, positions, cache, start, attention_mask, last_only=False):
        """Main model over T new tokens in cache slots start..start+T -> (logits, hidden, mask)."""
        T = ids.shape[1]
        key_valid = cache.mark(start, attention_mask, T)
        if key_valid is not None and T == 1 and bool(key_valid.all()):
            mask = None  # one new token that may see every slot: no mask to build and apply per layer
        elif key_valid is not None:
            mask = causal_mask(key_valid, start, T)
        elif T == 1 or start == 0:
            mask = None
        else:
            mask = causal_mask(cache.valid[:, : start + T], start, T)
        h = self.model.hidden_states(ids, positions, cache, start, mask)
        cache.length = start + T
        out = h[:, -1:] if last_only else h
        return self.model.lm_head(self.model.norm(out)), h, mask

    def _mtp(self, hidden, next_ids, positions, cache, start, mask):
        """MTP module 1 over the same slots: (h_i, emb(t_{i+1})) -> its hidden state (B, T, D)."""
        module = self.model.mtp[0]
        return module(hidden, self.model.embed_tokens(next_ids), self.model.rotary(positions), cache, start, mask)

    def _mtp_logits(self, hidden):
        return self.model.lm_head(self.model.mtp[0].shared_head.norm(hidden))

    # ---- sampling -------------------------------------------------------------------------------
    def _sample_rows(self, reqs: list[Request], logits: torch.Tensor) -> list[int]:
        """logits (n, V) -> one token per request by its own params and generator. Rows with the same
        params share one probabilities() call; rows sharing a generator draw together from it, in row
        order, so what they sample does not depend on the other rows in the batch."""
        tokens = logits.argmax(dim=-1).tolist()
        groups: dict[tuple, list[int]] = {}
        for i, req in enumerate(reqs):
            p = req.params
            if not p.greedy:
                groups.setdefault((p.temperature, p.top_p, p.top_k), []).append(i)
        for (temperature, top_p, top_k), rows in groups.items():
            probs = probabilities(logits[rows], temperature, top_p, top_k)  # (g, V)
            shared: dict[int, list[int]] = {}  # generator -> positions in rows, in row order
            for j, i in enumerate(rows):
                shared.setdefault(id(reqs[i].generator), []).append(j)
            for members in shared.values():
                generator = reqs[rows[members[0]]].generator
                if len(members) == 1 and len(shared) > 1:  # a request with its own generator
                    tokens[rows[members[0]]] = sample(probs[members[0]], generator)
                else:  # requests sharing a generator (a batch, a GRPO group): one draw for them all
                    picks = torch.multinomial(probs[members], 1, generator=generator).squeeze(-1)
                    for j, t in zip(members, picks.tolist()):
                        tokens[rows[j]] = t
        return tokens

    def _set_drafts(self, reqs: list[Request], logits: torch.Tensor):
        """MTP logits (n, V) -> a draft token (and its distribution when sampling) per request."""
        drafts = logits.argmax(dim=-1).tolist()
        for i, req in enumerate(reqs):
            p = req.params
            if p.greedy:
                req.draft, req.draft_q = drafts[i], None
            else:
                req.draft_q = probabilities(logits[i], p.temperature, p.top_p, p.top_k)
                req.draft = sample(req.draft_q, req.generator)

    # ---- outputs --------------------------------------------------------------------------------
    def _accept(self, req: Request, token: int, outputs) -> bool:
        """Append a generated token; returns True when the request finished with it."""
        req.output_ids.append(token)
        self.stats["generated_tokens"] += 1
        out = self._output_for(req, outputs)
        out.token_ids.append(token)
        p = req.params
        if token in p.stop_token_ids or (token in self.eos_ids and not p.ignore_eos):
            self._finish(req, "stop", outputs)
            return True
        if req.detok is not None:
            piece = req.detok.push(token)
            if req.stops is not None:
                piece, stopped = req.stops.push(piece)
                self._emit(req, piece, outputs)
                if stopped:
                    req.stops = None  # the stop string and what follows are dropped
                    self._finish(req, "stop", outputs)
                    return True
            else:
                self._emit(req, piece, outputs)
        if len(req.output_ids) >= req.limit:
            self._finish(req, "length", outputs)
            return True
        return False

    def _emit(self, req: Request, text: str, outputs):
        if text:
            req.text += text
            self._output_for(req, outputs).text += text

    def _finish(self, req: Request, reason: str, outputs):
        if req.detok is not None and reason in ("stop", "length"):
            rest = req.detok.flush()
            if req.stops is not None:
                piece, stopped = req.stops.push(rest)
                rest = piece if stopped else piece + req.stops.flush()
            self._emit(req, rest, outputs)
        req.finish_reason = reason
        req.draft_q = None
        out = self._output_for(req, outputs)
        out.finished, out.finish_reason = True, reason
        out.completion_tokens = len(req.output_ids)

    def _output_for(self, req: Request, outputs) -> RequestOutput:
        out = outputs.get(req.request_id)
        if out is None:
            out = outputs[req.request_id] = self._output(req, [], "")
        out.completion_tokens = len(req.output_ids)
        return out

    def _output(self, req: Request, token_ids, text) -> RequestOutput:
        return RequestOutput(req.request_id, token_ids, text, req.finished, req.finish_reason, len(req.prompt),
                             len(req.output_ids), req.error)

    # ---- the shared cache -----------------------------------------------------------------------
    def _view(self, n: int) -> _CacheView:
        return _CacheView(self.kv[:, :n], self.valid[:n], self.length, self.config.kv_lora_rank)

    def _allocate(self, slots: int):
        """(Re)allocate the cache with `slots` slots, keeping the first `length` of every row."""
        kv = torch.zeros(self.n_layers, self.max_batch, slots, self.width, device=self.device, dtype=self.dtype)
        valid = torch.zeros(self.max_batch, slots, device=self.device, dtype=torch.bool)
        if self.kv is not None and self.length:
            kv[:, :, : self.length] = self.kv[:, :, : self.length]
            valid[:, : self.length] = self.valid[:, : self.length]
        self.kv, self.valid = kv, valid

    @property
    def slots(self) -> int:
        return 0 if self.kv is None else self.kv.shape[2]

    def _reserve(self, needed: int):
        """Make the cache at least `needed` slots long (doubling, capped at max_slots)."""
        if needed > self.slots:
            if needed > self.max_slots:
                raise RuntimeError(f"cache overflow: {needed} slots needed, at most {self.max_slots}")
            self._allocate(min(self.max_slots, max(needed, 2 * self.slots, 64)))

    def _ensure_room(self, T: int):
        """Before writing T tokens at `length`: compact the holes away, grow if still short."""
        if self.length + T <= self.slots:
            return
        self._compact()
        if self.length + T > self.slots * 3 // 4 and self.slots < self.max_slots:
            self._reserve(min(self.max_slots, 2 * self.slots))
        self._reserve(self.length + T)

    def _compact(self):
        """Right-align every row's valid slots, dropping padding and rejected drafts."""
        n, L = len(self.rows), self.length
        if n == 0:
            self.length = 0
            return
        valid = self.valid[:n, :L]
        new_len = int(valid.sum(dim=1).max())
        order = torch.sort(valid.to(torch.int8), dim=1, stable=True).indices[:, L - new_len:]  # (n, new_len)
        kv = self.kv[:, :n, :L]
        index = order[None, :, :, None].expand(self.n_layers, n, new_len, self.width)
        self.kv[:, :n, :new_len] = torch.gather(kv, 2, index)
        self.valid[:n, :new_len] = torch.gather(valid, 1, order)
        self.length = new_len
        self.stats["compactions"] += 1

    def _join(self, req: Request, rows: torch.Tensor):
        """Add a prefilled request as row n: its cache rows (layers, P, width) end at slot `length`."""
        P, n = rows.shape[1], len(self.rows)
        if n == 0:
            self.length = 0
        self._reserve(max(self.length, P) + 2)
        if P > self.length:  # shift everyone right to make room on the left
            shift, L = P - self.length, self.length
            if n and L:
                self.kv[:, :n, shift:shift + L] = self.kv[:, :n, :L].clone()
                self.valid[:n, shift:shift + L] = self.valid[:n, :L].clone()
            self.valid[:n, :shift] = False
            self.length = P
        L = self.length
        self.kv[:, n, L - P:L] = rows
        self.valid[n, : L - P] = False
        self.valid[n, L - P:L] = True
        self.rows.append(req)

    def _remove_rows(self, indices: list[int]):
        """Free finished rows: the last row moves into each freed one (rows stay a prefix)."""
        L = self.length
        for i in sorted(indices, reverse=True):
            last = len(self.rows) - 1
            if i != last:
                self.kv[:, i, :L] = self.kv[:, last, :L]
                self.valid[i, :L] = self.valid[last, :L]
                self.rows[i] = self.rows[last]
            self.rows.pop()
        if not self.rows:
            self.length = 0

    def acceptance_rate(self) -> float:
        return self.stats["accepted"] / self.stats["drafted"] if self.stats["drafted"] else math.nan
