"""Output assembly: the RequestOutputs of one engine step, and the rules that end a request (stop
tokens, end-of-sentence, stop strings, max tokens) as its tokens arrive."""

from __future__ import annotations

from .request import Request, RequestOutput


class StepOutputs:
    """Collects, per request and in the order requests first produced something, the token ids and
    text (complete characters, stop strings held back) of one step. `stats` is the engine's counter
    dict ("generated_tokens")."""

    def __init__(self, eos_ids: tuple[int, ...], stats: dict):
        self.eos_ids = eos_ids
        self.stats = stats
        self.by_id: dict[str, RequestOutput] = {}

    def list(self) -> list[RequestOutput]:
        return list(self.by_id.values())

    def accept(self, req: Request, token: int) -> bool:
        """Append a generated token; returns True when the request finished with it."""
        req.output_ids.append(token)
        self.stats["generated_tokens"] += 1
        out = self._output_for(req)
        out.token_ids.append(token)
        if req.pending_logprobs:
            out.logprobs.append(req.pending_logprobs.pop(0))
        p = req.params
        if token in p.stop_token_ids or (token in self.eos_ids and not p.ignore_eos):
            self.finish(req, "stop")
            return True
        if req.detok is not None:
            piece = req.detok.push(token)
            if req.stops is not None:
                piece, stopped = req.stops.push(piece)
                self._emit(req, piece)
                if stopped:
                    req.stops = None  # the stop string and what follows are dropped
                    self.finish(req, "stop")
                    return True
            else:
                self._emit(req, piece)
        if len(req.output_ids) >= req.limit:
            self.finish(req, "length")
            return True
        return False

    def finish(self, req: Request, reason: str):
        """End a request ("stop", "length", "cancelled"): flush the text it still holds back."""
        if req.detok is not None and reason in ("stop", "length"):
            rest = req.detok.flush()
            if req.stops is not None:
                piece, stopped = req.stops.push(rest)
                rest = piece if stopped else piece + req.stops.flush()
            self._emit(req, rest)
        req.finish_reason = reason
        req.draft_q = None
        out = self._output_for(req)
        out.finished, out.finish_reason = True, reason
        out.completion_tokens = len(req.output_ids)

    def _emit(self, req: Request, text: str):
        if text:
            req.text += text
            self._output_for(req).text += text

    def _output_for(self, req: Request) -> RequestOutput:
        out = self.by_id.get(req.request_id)
        if out is None:
            out = self.by_id[req.request_id] = RequestOutput.of(req)
        out.completion_tokens = len(req.output_ids)
        return out
