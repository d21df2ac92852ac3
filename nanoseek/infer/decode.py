"""The engine's model calls: prefill forwards, the decode step over the running rows (one token each,
or a verified draft and one more with speculation), sampling, and MTP drafts.

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

import torch

from ..model import LatentCache
from .compiled import buckets, compilable, compile_pays, compile_setting, compiled_for
from .compute import ComputeModels
from .outputs import StepOutputs
from .request import Request, TokenLogprob
from .sampling import probabilities, sample, uniform
from .slots import Slots


class Decoder:
    """Runs the engine's models (`compute`: the main one and, for a split precision, its bf16 copy for
    forwards of many tokens); `speculative` drafts with the MTP module. `stats` is the engine's counter
    dict ("drafted", "accepted"). The cache is in the main model's dtype; logits reach the sampler in fp32.
    `compile` (True | False | None: NANOSEEK_COMPILE, else off) runs plain decode steps as one compiled
    graph (`nanoseek.infer.compiled`) where that can be and, under auto, where its probe measured it faster."""

    def __init__(self, compute: ComputeModels, speculative: bool, stats: dict, compile: bool | None = None):
        self.compute = compute
        self.model = compute.main
        self.config = self.model.config
        self.speculative = speculative
        self.stats = stats
        self.device, self.dtype = self.model.device, self.model.dtype
        self.compile = compile_setting(compile)
        if self.compile != "off" and (speculative or not compilable(self.model)):
            self.compile = "off"  # decode_step covers neither (see `compiled_bucket`)
        self._pays: dict[int, bool] = {}  # auto's verdict per batch bucket

    def scratch(self, batch: int, length: int) -> LatentCache:
        """A cache of its own for a prefill (its rows then join the shared one)."""
        return LatentCache(self.config, batch, length, with_mtp=self.speculative, device=self.device,
                           dtype=self.dtype)

    # ---- prefill --------------------------------------------------------------------------------
    def prefill(self, reqs: list[Request], ids: torch.Tensor, positions: torch.Tensor, cache: LatentCache,
                start: int, attention_mask: torch.Tensor | None = None,
                following: list[int] | None = None, source: list[int] | None = None) -> list[int] | None:
        """Prompt tokens ids (B, T) into cache slots start..start+T. When they end the prompts
        (`following` None), returns the first generated token per request (and sets its draft);
        otherwise `following` holds the prompt token after this chunk, which the MTP module needs.
        `source`: the row of ids each request's prompt is (prefix reuse: requests may share a row;
        not with speculation); None: row i is request i."""
        model = self.compute.for_tokens(ids.numel())
        out = model.forward_cached(ids, cache, positions, start=start, attention_mask=attention_mask,
                                   last_only=not self.speculative)
        last = out.logits[:, -1].float()  # (B, V)
        if source is not None:
            if self.speculative:
                raise ValueError("prefix reuse (source) is not supported with speculative decoding")
            last = last[torch.tensor(source, device=last.device)]  # (len(reqs), V)
        firsts = self.pick(reqs, last) if following is None else None
        if self.speculative:
            tail = torch.tensor(firsts if following is None else following, device=self.device)
            nxt = torch.cat([ids[:, 1:], tail[:, None]], dim=1)
            mtp_h = model.mtp_draft(out, nxt, positions, cache, start)
            if following is None:
                self.set_drafts(reqs, model.mtp_head(mtp_h[:, -1]).float())
        return firsts

    # ---- decode ---------------------------------------------------------------------------------
    def decode(self, slots: Slots, outputs: StepOutputs) -> list[int]:
        """One token for every running row; returns the rows that finished."""
        slots.ensure_room(1)
        rows = slots.rows
        bucket = self.compiled_bucket(len(rows), slots.max_batch)
        if bucket is not None:
            logits = self.compiled_logits(slots, bucket)
        else:
            ids = torch.tensor([[r.last] for r in rows], device=self.device)
            positions = torch.tensor([[r.pos] for r in rows], device=self.device)
            view = slots.view()
            model = self.compute.for_tokens(len(rows))
            logits = model.forward_cached(ids, view, positions, last_only=True).logits[:, 0].float()
            slots.length = view.length
        tokens = self.pick(rows, logits)
        done = []
        for i, (req, token) in enumerate(zip(rows, tokens)):
            req.pos += 1
            req.last = token
            if outputs.accept(req, token):
                done.append(i)
        return done

    def compiled_bucket(self, n: int, max_batch: int) -> int | None:
        """The batch bucket a compiled step of n rows runs in, or None to decode eagerly: compile off
        (also with speculation and for a model `decode_step` does not cover), a forward that runs on
        the bf16 copy, or (auto) a bucket whose probe did not measure the compiled step MIN_SPEEDUP x
        faster."""
        if self.compile == "off" or self.compute.for_tokens(n) is not self.model:
            return None
        bucket = next(b for b in buckets(max_batch) if b >= n)
        if self.compile == "auto":
            if bucket not in self._pays:
                self._pays[bucket] = compile_pays(self.model, bucket)
            if not self._pays[bucket]:
                return None
        return bucket

    def compiled_logits(self, slots: Slots, bucket: int) -> torch.Tensor:
        """One compiled decode step of the running rows, padded to `bucket` rows (the padding rows
        write their cache rows beyond the running ones, which a joining request overwrites) -> logits
        (n, V) fp32; the cache advances by one slot."""
        rows, L = slots.rows, slots.length
        pad = [0] * (bucket - len(rows))
        ids = torch.tensor([r.last for r in rows] + pad, device=self.device)
        positions = torch.tensor([r.pos for r in rows] + pad, device=self.device)
        slots.valid[: len(rows), L] = True
        logits = compiled_for(self.model)(ids, positions, slots.kv[:, :bucket], slots.valid[:bucket], L)
        slots.length = L + 1
        return logits[: len(rows)]

    def decode_speculative(self, slots: Slots, outputs: StepOutputs) -> list[int]:
        """Verify every row's draft (one or two new tokens each), then draft again; returns the rows
        that finished."""
        slots.ensure_room(2)
        rows, n, L = slots.rows, len(slots.rows), slots.length
        ids = torch.tensor([[r.last, r.draft] for r in rows], device=self.device)
        positions = torch.tensor([[r.pos, r.pos + 1] for r in rows], device=self.device)
        view = slots.view()
        model = self.compute.for_tokens(2 * n)
        main = model.forward_cached(ids, view, positions)
        slots.length = view.length
        verified = self.verify(rows, main.logits.float())
        done, accepted = [], []
        for i, (req, (tokens, ok)) in enumerate(zip(rows, verified)):
            req.drafted += 1
            req.accepted += ok
            if any(outputs.accept(req, t) for t in tokens):  # stops at the finishing token
                done.append(i)
            req.pos += len(tokens)
            req.last = tokens[-1]
            accepted.append(ok)
        self.stats["drafted"] += n
        self.stats["accepted"] += sum(accepted)
        ok = torch.tensor(accepted, device=self.device)
        view.valid[:, L + 1] = ok  # a rejected draft's slot belongs to nobody
        # MTP on the new positions: accepted rows (h_t, emb(d)), (h_d, emb(t2)); rejected (h_t, emb(t1))
        nxt = torch.tensor([[r.draft, r.last] if a else [r.last, r.last] for r, a in zip(rows, accepted)],
                           device=self.device)
        mtp_h = model.mtp_draft(main, nxt, positions, view, L, revalidated=True)
        pick = ok.long()  # the draft comes from the last accepted position
        last_h = mtp_h[torch.arange(n, device=self.device), pick]
        finished = set(done)
        live = [i for i in range(n) if i not in finished]
        if live:
            self.set_drafts([rows[i] for i in live], model.mtp_head(last_h[live]).float())
        return done

    def verify(self, rows: list[Request], logits: torch.Tensor) -> list[tuple[list[int], bool]]:
        """logits (n, 2, V) at [t, d] -> per row (new tokens, draft accepted)."""
        greedy = logits.argmax(dim=-1).tolist()  # (n, 2)
        out = []
        for i, req in enumerate(rows):
            p = req.params
            if req.special:
                out.append(self.verify_special(req, logits[i]))
                continue
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

    def verify_special(self, req: Request, logits: torch.Tensor) -> tuple[list[int], bool]:
        """`verify` for a row with a grammar or logprobs: logits (2, V) at [t, d]. The grammar masks
        each position in its own state (the draft is consumed before the second position is masked);
        draws from the row's generator in the same order as the plain path."""
        p = req.params
        first = self.constrained(req, logits[0])
        if p.greedy:
            t1 = int(first.argmax())
            ok = t1 == req.draft
        else:
            probs = probabilities(first, p.temperature, p.top_p, p.top_k)
            q = req.draft_q
            ok = uniform(req.generator, self.device) * float(q[req.draft]) <= float(probs[req.draft])
            if ok:
                t1 = req.draft
            else:
                residual = (probs - q).clamp(min=0)
                total = float(residual.sum())
                t1 = sample(residual / total if total > 0 else probs, req.generator)
        self.record(req, logits[0], t1)
        if not ok:
            return [t1], False
        second = self.constrained(req, logits[1])
        t2 = int(second.argmax()) if p.greedy else \
            sample(probabilities(second, p.temperature, p.top_p, p.top_k), req.generator)
        self.record(req, logits[1], t2)
        return [t1, t2], True

    # ---- sampling -------------------------------------------------------------------------------
    def pick(self, reqs: list[Request], logits: torch.Tensor) -> list[int]:
        """logits (n, V) -> one token per request. Rows with a grammar sample from the logits its mask
        allows; rows asking for logprobs record them. Without such rows this is `sample_rows`."""
        special = [i for i, r in enumerate(reqs) if r.special]
        if not special:
            return self.sample_rows(reqs, logits)
        raw = logits
        constrained = [i for i in special if reqs[i].constraint is not None]
        if constrained:
            logits = logits.clone()  # the raw logits stay for the logprobs
            for i in constrained:
                logits[i] = self.constrained(reqs[i], raw[i])
        tokens = self.sample_rows(reqs, logits)
        for i in special:
            self.record(reqs[i], raw[i], tokens[i])
        return tokens

    def constrained(self, req: Request, logits: torch.Tensor) -> torch.Tensor:
        """logits (V,) with the tokens the request's grammar forbids at -inf (the same tensor when free)."""
        mask = req.constraint.mask(logits.device) if req.constraint is not None else None
        return logits if mask is None else logits.masked_fill(~mask, float("-inf"))

    def record(self, req: Request, logits: torch.Tensor, token: int):
        """The request sampled `token` from raw logits (V,): advance its grammar, keep its logprobs."""
        if req.constraint is not None:
            req.constraint.advance(token)
        if req.pending_logprobs is not None:
            logp = logits.float().log_softmax(dim=-1)
            k = req.params.logprobs
            top = logp.topk(k) if k else None
            pairs = list(zip(top.indices.tolist(), top.values.tolist())) if k else []
            req.pending_logprobs.append(TokenLogprob(token, float(logp[token]), pairs))

    # ---- sampling of plain rows -----------------------------------------------------------------
    def sample_rows(self, reqs: list[Request], logits: torch.Tensor) -> list[int]:
        """logits (n, V) -> one token per request by its own params and generator. Rows with the same
        params share one probabilities() call; rows sharing a generator draw together from it, in row
        order, so what they sample does not depend on the other rows in the batch."""
        tokens = [0] * len(reqs)
        greedy: list[int] = []
        groups: dict[tuple, list[int]] = {}
        for i, req in enumerate(reqs):
            p = req.params
            if p.greedy:
                greedy.append(i)
            else:
                groups.setdefault((p.temperature, p.top_p, p.top_k), []).append(i)
        if greedy:
            for i, t in zip(greedy, take_rows(logits, greedy).argmax(dim=-1).tolist()):
                tokens[i] = t
        for (temperature, top_p, top_k), rows in groups.items():
            probs = probabilities(take_rows(logits, rows), temperature, top_p, top_k)  # (g, V)
            shared: dict[int, list[int]] = {}  # generator -> positions in rows, in row order
            for j, i in enumerate(rows):
                shared.setdefault(id(reqs[i].generator), []).append(j)
            for members in shared.values():
                generator = reqs[rows[members[0]]].generator
                if len(members) == 1 and len(shared) > 1:  # a request with its own generator
                    tokens[rows[members[0]]] = sample(probs[members[0]], generator)
                else:  # requests sharing a generator (a batch, a GRPO group): one draw for them all
                    picks = torch.multinomial(take_rows(probs, members), 1, generator=generator).squeeze(-1)
                    for j, t in zip(members, picks.tolist()):
                        tokens[rows[j]] = t
        return tokens

    def set_drafts(self, reqs: list[Request], logits: torch.Tensor):
        """MTP logits (n, V) -> a draft token (and its distribution when sampling) per request."""
        drafts = logits.argmax(dim=-1).tolist()
        for i, req in enumerate(reqs):
            p = req.params
            if p.greedy:
                req.draft, req.draft_q = drafts[i], None
            else:
                req.draft_q = probabilities(logits[i], p.temperature, p.top_p, p.top_k)
                req.draft = sample(req.draft_q, req.generator)


def take_rows(x: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """x[rows] for sorted row indices; a view, not a copy, when they are consecutive (all rows, a GRPO
    group's samples): the same values either way."""
    if rows[-1] - rows[0] + 1 == len(rows):
        return x[rows[0]:rows[-1] + 1]
    return x[rows]
