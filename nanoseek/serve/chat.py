"""`nanoseek chat`: a terminal conversation with streaming output, the thinking shown dimmed and apart
from the answer, multi-turn history, slash commands, and the same content policy as the server."""

from __future__ import annotations

from typing import TextIO

from ..infer.engine import Engine
from ..infer.sampling import SamplingParams
from ..infer.text import ChatTokenizer
from .policy import Policy
from .protocol import ChoiceStream

DIM, BOLD, YELLOW, RESET = "\x1b[2m", "\x1b[1m", "\x1b[33m", "\x1b[0m"
HELP = """commands:
  /reset              start a new conversation
  /temperature X      sampling temperature (0 = greedy)
  /max_tokens N       reply length limit
  /system TEXT        set the system prompt (empty to clear; resets the conversation)
  /help               this list
  /exit               quit (or Ctrl-D); Ctrl-C stops a reply"""


class TerminalChat:
    def __init__(self, engine: Engine, tokenizer: ChatTokenizer, *, policy: Policy | None = None,
                 temperature: float = 0.6, top_p: float = 0.95, max_tokens: int = 1024, system: str | None = None,
                 seed: int | None = None, color: bool = False, name: str = "model"):
        self.engine, self.tokenizer, self.policy = engine, tokenizer, policy
        self.temperature, self.top_p, self.max_tokens = temperature, top_p, max_tokens
        self.system, self.seed, self.color, self.name = system, seed, color, name
        self.history: list[dict] = []
        self.turn = 0

    def _style(self, text: str, style: str) -> str:
        return f"{style}{text}{RESET}" if self.color else text

    def run(self, stdin: TextIO, out: TextIO) -> None:
        out.write(f"nanoseek chat with {self.name} (context {self.engine.max_model_len} tokens"
                  f"{', policy on' if self.policy else ''}). /help for commands, /exit to quit.\n")
        while True:
            out.write(self._style("> ", BOLD))
            out.flush()
            line = stdin.readline()
            if not line:
                out.write("\n")
                break
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                if not self.command(line, out):
                    break
                continue
            try:
                self.reply(line, out)
            except KeyboardInterrupt:
                self.engine.abort_all("cancelled")
                out.write(self._style("\n[stopped]\n", YELLOW))

    def command(self, line: str, out: TextIO) -> bool:
        """Run a slash command; False to quit."""
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        if name in ("/exit", "/quit"):
            return False
        if name == "/reset":
            self.history = []
            out.write("conversation cleared\n")
        elif name == "/help":
            out.write(HELP + "\n")
        elif name == "/temperature":
            try:
                value = float(arg)
                if not 0 <= value <= 2:
                    raise ValueError
            except ValueError:
                out.write("usage: /temperature X with 0 <= X <= 2\n")
            else:
                self.temperature = value
                out.write(f"temperature = {value:g}\n")
        elif name == "/max_tokens":
            if arg.isdigit() and int(arg) > 0:
                self.max_tokens = int(arg)
                out.write(f"max_tokens = {self.max_tokens}\n")
            else:
                out.write("usage: /max_tokens N with N > 0\n")
        elif name == "/system":
            self.system = arg or None
            self.history = []
            out.write("system prompt set; conversation cleared\n" if arg else "system prompt cleared\n")
        else:
            out.write(f"unknown command {name}; /help lists them\n")
        return True

    def reply(self, text: str, out: TextIO) -> None:
        """Generate and stream one answer to `text`; the turn joins the history when it completes."""
        refusal = None
        if self.policy is not None:  # the system prompt once, with the first line (assistant lines: output rules)
            checked = ([("system", self.system)] if self.system and not self.history else []) + [("user", text)]
            refusal = self.policy.check_input(self.policy.input_text(checked), source="chat")
        if refusal is not None:
            out.write(self._style(refusal.message, YELLOW) + "\n")
            return
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + self.history + \
            [{"role": "user", "content": text}]
        ids, thinking = self.tokenizer.chat_prompt(messages)
        room = self.engine.max_model_len - len(ids)
        if room < 1:
            out.write(self._style(f"the conversation ({len(ids)} tokens) fills the context of "
                                  f"{self.engine.max_model_len} tokens; /reset to start over\n", YELLOW))
            return
        seed = None if self.seed is None else self.seed + self.turn
        self.turn += 1
        params = SamplingParams(max_tokens=min(self.max_tokens, room), temperature=self.temperature,
                                top_p=self.top_p if self.temperature > 0 else 1.0, seed=seed)
        request = self.engine.add(ids, params)
        monitor = self.policy.output_monitor() if self.policy is not None else None
        stream = ChoiceStream(thinking, monitor, self.tokenizer.end_think_id)
        view = _Printer(out, self.color)
        while not request.finished:
            for o in self.engine.step():
                if o.request_id != request.request_id:
                    continue
                delta = stream.feed(o)
                view.reasoning(delta.reasoning)
                view.content(delta.content)
                delta.audit(self.policy, source="chat")
                if delta.refusal is not None:
                    self.engine.cancel(request.request_id)
                    view.content(self._style(("\n" if stream.content else "") + delta.refusal.message, YELLOW))
                    request.finish_reason = request.finish_reason or "content_filter"
                    break
        view.end(stream.finish_reason)
        self.engine.abort_all("cancelled")  # nothing else runs here: drop a cancelled request now
        self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": stream.content}]


class _Printer:
    """Writes reasoning dimmed (or between [thinking] markers without color), then the answer."""

    def __init__(self, out: TextIO, color: bool):
        self.out, self.color = out, color
        self.state = "start"

    def reasoning(self, text: str):
        if not text:
            return
        if self.state == "start":
            self.out.write(DIM + "thinking: " if self.color else "[thinking]\n")
            self.state = "thinking"
        self.out.write(text)
        self.out.flush()

    def content(self, text: str):
        if not text:
            return
        if self.state == "thinking":
            self.out.write(RESET + "\n\n" if self.color else "\n[/thinking]\n")
        self.state = "answer"
        self.out.write(text)
        self.out.flush()

    def end(self, finish_reason: str | None):
        if self.state == "thinking":
            self.out.write(RESET if self.color else "\n[/thinking]")
        note = {"length": " [length limit]", "content_filter": ""}.get(finish_reason or "", "")
        self.out.write(note + "\n")
        self.out.flush()
