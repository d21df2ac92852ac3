"""Content policy: the operator's explicit, auditable rules on what the model is used for.

No policy is the default. A policy file (YAML) names rules; each matches user input and/or model
output by keywords (case-insensitive, whole words) or regular expressions, and either refuses (the
request is answered with the rule's message, or the streamed output stops at the match) or flags
(generation goes on; the decision is recorded). Every decision is appended to an audit JSONL file.

    refusal: "I can't help with that."     # default message of refuse rules
    audit: policy-audit.jsonl              # relative to this file; --audit overrides
    rules:
      - name: no-secrets
        applies_to: [input, output]        # default: both
        keywords: [password, api key]
        regex: ['\\bsk-[A-Za-z0-9]{20,}']
        action: refuse                     # refuse | flag
        message: "I won't handle credentials."
"""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..errors import NanoseekError

TARGETS = ("input", "output")
ACTIONS = ("refuse", "flag")
DEFAULT_REFUSAL = "I can't help with that request."
REGEX_WINDOW = 512  # characters of already-checked output re-scanned for a regex spanning a boundary


class PolicyError(NanoseekError, ValueError):
    """An invalid policy file (names the file, the rule and the field)."""


@dataclass(frozen=True)
class Rule:
    name: str
    targets: frozenset
    patterns: tuple
    action: str
    message: str
    keyword_hold: int  # longest keyword - 1: output held back so a keyword is caught before it is shown


@dataclass(frozen=True)
class Decision:
    rule: str
    action: str
    where: str  # "input" or "output"
    match: str
    message: str

    @property
    def refuses(self) -> bool:
        return self.action == "refuse"


class Policy:
    def __init__(self, rules: list[Rule], audit_path: Path | None = None, source: str = "policy"):
        self.rules = rules
        self.audit_path = audit_path
        self.source = source
        self._lock = threading.Lock()

    # ---- loading --------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, audit_path: str | Path | None = None) -> "Policy":
        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise PolicyError(f"{path}: not valid YAML ({e})") from None
        return cls.from_dict(raw, source=str(path), base=path.parent, audit_path=audit_path)

    @classmethod
    def from_dict(cls, raw, source: str = "policy", base: Path | None = None,
                  audit_path: str | Path | None = None) -> "Policy":
        def bad(where: str, why: str):
            raise PolicyError(f"{source}: {where}: {why}")

        if not isinstance(raw, dict):
            bad("top level", "must be a mapping with a 'rules' list")
        unknown = set(raw) - {"rules", "refusal", "audit"}
        if unknown:
            bad("top level", f"unknown field(s) {', '.join(sorted(unknown))} (expected rules, refusal, audit)")
        refusal = raw.get("refusal", DEFAULT_REFUSAL)
        if not isinstance(refusal, str) or not refusal:
            bad("refusal", "must be a non-empty string")
        rules_raw = raw.get("rules")
        if not isinstance(rules_raw, list) or not rules_raw:
            bad("rules", "must be a non-empty list of rules")
        rules, names = [], set()
        for i, r in enumerate(rules_raw):
            rules.append(_parse_rule(i, r, refusal, bad))
            if rules[-1].name in names:
                bad(f"rule {i}", f"duplicate name {rules[-1].name!r}")
            names.add(rules[-1].name)
        audit = audit_path if audit_path is not None else raw.get("audit")
        if audit is not None and not isinstance(audit, (str, Path)):
            bad("audit", "must be a file path")
        if audit is not None:
            audit = Path(audit)
            if not audit.is_absolute() and base is not None and audit_path is None:
                audit = base / audit
        return cls(rules, audit, source)

    # ---- checks ---------------------------------------------------------------------------------
    def check(self, text: str, where: str) -> list[Decision]:
        """Every rule for `where` that matches `text`, refusals first."""
        found = []
        for rule in self.rules:
            if where in rule.targets:
                m = _search(rule, text)
                if m is not None:
                    found.append(Decision(rule.name, rule.action, where, m.group(0), rule.message))
        return sorted(found, key=lambda d: not d.refuses)

    def check_input(self, text: str, **context) -> Decision | None:
        """Check user input and audit every decision (with `context`); -> the refusing one, if any."""
        decisions = self.check(text, "input")
        for d in decisions:
            self.audit(d, **context)
        return next((d for d in decisions if d.refuses), None)

    def monitor(self) -> "OutputMonitor":
        return OutputMonitor(self)

    def output_monitor(self) -> "OutputMonitor | None":
        """A monitor for one output stream; None when no rule applies to output."""
        return self.monitor() if self.has_output_rules else None

    def audit(self, decision: Decision, **context) -> None:
        """Append one decision (with context such as request_id, source) to the audit log."""
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "rule": decision.rule, "action": decision.action,
                  "where": decision.where, "match": decision.match[:200], **context}
        if self.audit_path is None:
            return
        line = json.dumps(record, ensure_ascii=False)
        with self._lock:
            self.audit_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.audit_path, "a", encoding="utf-8") as f:
                f.write(line + "\n")

    @property
    def has_output_rules(self) -> bool:
        return any("output" in r.targets for r in self.rules)


class OutputMonitor:
    """Checks streamed output against the output rules. `push` returns the text safe to show and the
    refusing decision that stopped it (the text before the match is shown, the match is not).
    Flags are collected in `flags` (once per rule)."""

    def __init__(self, policy: Policy):
        self.rules = [r for r in policy.rules if "output" in r.targets]
        self.hold = max((r.keyword_hold for r in self.rules), default=0)
        self.text = ""
        self.shown = 0
        self.flags: list[Decision] = []
        self.stopped: Decision | None = None

    def push(self, text: str, final: bool = False) -> tuple[str, Decision | None]:
        if self.stopped is not None:
            return "", None
        self.text += text
        scan = max(0, self.shown - max(REGEX_WINDOW, self.hold))
        window = self.text[scan:]
        for rule in self.rules:
            m = _search(rule, window)
            if m is None:
                continue
            decision = Decision(rule.name, rule.action, "output", m.group(0), rule.message)
            if rule.action == "refuse":
                end = max(self.shown, scan + m.start())
                out, self.shown = self.text[self.shown:end], len(self.text)
                self.stopped = decision
                return out, decision
            if all(f.rule != rule.name for f in self.flags):
                self.flags.append(decision)
        end = len(self.text) if final else max(self.shown, len(self.text) - self.hold)
        out, self.shown = self.text[self.shown:end], end
        return out, None

    def new_flags(self, seen: int) -> list[Decision]:
        return self.flags[seen:]


def _search(rule: Rule, text: str):
    best = None
    for p in rule.patterns:
        m = p.search(text)
        if m is not None and (best is None or m.start() < best.start()):
            best = m
    return best


def _parse_rule(i: int, r, refusal: str, bad) -> Rule:
    where = f"rule {i}"
    if not isinstance(r, dict):
        bad(where, "must be a mapping (name, keywords/regex, action)")
    unknown = set(r) - {"name", "applies_to", "keywords", "regex", "action", "message"}
    if unknown:
        bad(where, f"unknown field(s) {', '.join(sorted(unknown))}")
    name = r.get("name")
    if not isinstance(name, str) or not name.strip():
        bad(where, "'name' must be a non-empty string")
    where = f"rule {i} ({name})"
    targets = r.get("applies_to", list(TARGETS))
    targets = [targets] if isinstance(targets, str) else targets
    if not isinstance(targets, list) or not targets or any(t not in TARGETS for t in targets):
        bad(where, f"'applies_to' must be input, output or both (got {targets!r})")
    action = r.get("action", "refuse")
    if action not in ACTIONS:
        bad(where, f"'action' must be refuse or flag (got {action!r})")
    message = r.get("message", refusal)
    if not isinstance(message, str) or not message:
        bad(where, "'message' must be a non-empty string")
    keywords = _string_list(r.get("keywords", []), f"{where}: 'keywords'", bad)
    regexes = _string_list(r.get("regex", []), f"{where}: 'regex'", bad)
    if not keywords and not regexes:
        bad(where, "needs 'keywords' or 'regex'")
    patterns = []
    for k in keywords:
        left = r"(?<!\w)" if re.match(r"\w", k[0]) else ""
        right = r"(?!\w)" if re.match(r"\w", k[-1]) else ""
        patterns.append(re.compile(left + re.escape(k) + right, re.IGNORECASE))
    for j, rx in enumerate(regexes):
        try:
            patterns.append(re.compile(rx))
        except re.error as e:
            bad(f"{where}: regex {j}", f"invalid regular expression ({e})")
    hold = max((len(k) for k in keywords), default=1) - 1
    return Rule(name, frozenset(targets), tuple(patterns), action, message, hold)


def _string_list(value, where: str, bad) -> list[str]:
    value = [value] if isinstance(value, str) else value
    if not isinstance(value, list) or any(not isinstance(v, str) or not v for v in value):
        bad(where, "must be a list of non-empty strings")
    return value
