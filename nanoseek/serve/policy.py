"""Content policy: the operator's explicit, auditable rules on what the model is used for.

No policy is the default. A policy file (YAML) names rules; each matches user input and/or model
output by keywords or regular expressions, and either refuses (the request is answered with the rule's
message, or the streamed output stops at the match) or flags (generation goes on; the decision is
recorded). Every decision is appended to an audit JSONL file.

    refusal: "I can't help with that."     # default message of refuse rules
    audit: policy-audit.jsonl              # relative to this file; --audit overrides
    input_roles: [user]                    # chat messages input rules read: user (default), system, assistant
    rules:
      - name: no-secrets
        applies_to: [input, output]        # default: both
        keywords: [password, api key, 天安门]
        regex: ['\\bsk-[a-z0-9]{20,}']
        action: refuse                     # refuse | flag
        message: "I won't handle credentials."

What a rule matches: rules and text are both normalised (`normalize`: NFKC, so full-width letters and
compatibility forms become plain ones; case-folded; zero-width characters removed; traditional
Chinese characters folded to simplified ones with OpenCC), so one keyword catches 天安门, 天安門,
ＰＡＳＳＷＯＲＤ and pass\u200bword. A keyword that begins (ends) with a letter or digit of a spaced
script (Latin, Cyrillic, Greek, ...) must begin (end) a word: `cat` does not match `cats` or
`concatenate`, though it matches `我的cat`. A keyword side in a script written without spaces (Chinese,
Japanese, Korean, Thai, ...) matches anywhere: 天安门 matches 我想了解天安门事件. Regular expressions
are searched in the same normalised text, case-insensitively.
"""

from __future__ import annotations

import json
import re
import threading
import time
import unicodedata
from array import array
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..errors import NanoseekError

TARGETS = ("input", "output")
ACTIONS = ("refuse", "flag")
ROLES = ("user", "system", "assistant")
DEFAULT_REFUSAL = "I can't help with that request."
REGEX_WINDOW = 512  # characters of already-checked output re-scanned for a regex spanning a boundary

# Scripts written without spaces between words: a keyword side in one of them needs no word boundary.
# Thai, Lao, Tibetan, Myanmar, Hangul jamo, Khmer, New Tai Lue, Tai Tham, Balinese, CJK radicals and
# symbols, kana, Bopomofo, Hangul compatibility jamo, CJK (ext. A, unified, compatibility), Yi,
# Javanese, Myanmar ext., Tai Viet, Hangul syllables and jamo ext., half-width kana/Hangul, kana
# supplements, CJK ext. B and later.
NON_SPACED = ("\u0e00-\u0fff\u1000-\u109f\u1100-\u11ff\u1780-\u17ff\u1980-\u1aaf\u1b00-\u1b7f"
              "\u2e80-\u2fdf\u3000-\u33ff\u3400-\u4dbf\u4e00-\u9fff\ua000-\ua4cf\ua960-\ua97f\ua980-\ua9df"
              "\uaa60-\uaadf\uac00-\ud7ff\uf900-\ufaff\uff65-\uffdc\U0001b000-\U0001b16f\U00020000-\U0003ffff")
_NON_SPACED = re.compile(f"[{NON_SPACED}]")
_SPACED_WORD = f"[^\\W{NON_SPACED}]"  # a letter, digit or _ of a spaced script
# zero-width and invisible formatting characters that split a keyword without showing
ZERO_WIDTH = ("\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f\u202a-\u202e"
              "\u2060-\u206f\ufe00-\ufe0f\ufeff")
_ZERO_WIDTH = re.compile(f"[{ZERO_WIDTH}]")


class PolicyError(NanoseekError, ValueError):
    """An invalid policy file (names the file, the rule and the field)."""


class _Fold(dict):
    """str.translate table, filled on first sight of a character: zero-width characters -> removed,
    traditional Chinese -> simplified (OpenCC's t2s, character by character so that every text,
    keyword and streamed piece folds the same way), everything else -> itself."""

    LIMIT = 200_000  # distinct characters remembered (all of Unicode's CJK fits)

    def __init__(self):
        super().__init__()
        import opencc
        self.t2s = opencc.OpenCC("t2s")
        self.lock = threading.Lock()  # (the server folds text on its loop and in worker threads)

    def __missing__(self, code: int):
        c = chr(code)
        if _ZERO_WIDTH.match(c):
            value = None
        elif _NON_SPACED.match(c):
            with self.lock:
                value = self.t2s.convert(c)
        else:
            value = c
        if len(self) < self.LIMIT:
            self[code] = value
        return value


_fold: _Fold | None = None
_fold_lock = threading.Lock()


def _fold_table() -> _Fold:
    global _fold
    with _fold_lock:
        if _fold is None:
            _fold = _Fold()
    return _fold


def normalize(text: str) -> str:
    """The text rules are matched in: NFKC, case-folded, zero-width characters removed, traditional
    Chinese folded to simplified."""
    return unicodedata.normalize("NFKC", text).casefold().translate(_fold_table())


def normalize_mapped(text: str) -> tuple[str, list[int], list[int]]:
    """normalize(text) built piece by piece (a character with the combining marks after it), with the
    original span [starts[i], ends[i]) of each normalised character i."""
    out, starts, ends = [], [], []
    table = _fold_table()
    i, n = 0, len(text)
    while i < n:
        j = i + 1
        while j < n and unicodedata.combining(text[j]):
            j += 1
        piece = unicodedata.normalize("NFKC", text[i:j]).casefold().translate(table)
        out.append(piece)
        starts += [i] * len(piece)
        ends += [j] * len(piece)
        i = j
    return "".join(out), starts, ends


def keyword_pattern(keyword: str) -> re.Pattern:
    """A normalised keyword as a regex: word boundaries on its spaced-script sides only."""
    k = normalize(keyword)
    left = f"(?<!{_SPACED_WORD})" if re.match(_SPACED_WORD, k[0]) else ""
    right = f"(?!{_SPACED_WORD})" if re.match(_SPACED_WORD, k[-1]) else ""
    return re.compile(left + re.escape(k) + right)


@dataclass(frozen=True)
class Rule:
    name: str
    targets: frozenset
    patterns: tuple  # compiled, searched in normalised text
    action: str
    message: str
    keyword_hold: int  # longest normalised keyword - 1: output held back so a keyword is caught before it is shown


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
    def __init__(self, rules: list[Rule], audit_path: Path | None = None, source: str = "policy",
                 input_roles: tuple[str, ...] = ("user",)):
        self.rules = rules
        self.audit_path = audit_path
        self.source = source
        self.input_roles = tuple(input_roles)
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
        unknown = set(raw) - {"rules", "refusal", "audit", "input_roles"}
        if unknown:
            bad("top level", f"unknown field(s) {', '.join(sorted(unknown))} (expected rules, refusal, audit, "
                "input_roles)")
        refusal = raw.get("refusal", DEFAULT_REFUSAL)
        if not isinstance(refusal, str) or not refusal:
            bad("refusal", "must be a non-empty string")
        roles = raw.get("input_roles", ["user"])
        roles = [roles] if isinstance(roles, str) else roles
        if not isinstance(roles, list) or not roles or any(r not in ROLES for r in roles):
            bad("input_roles", f"must list some of {', '.join(ROLES)} (got {roles!r})")
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
        return cls(rules, audit, source, tuple(roles))

    # ---- checks ---------------------------------------------------------------------------------
    def check(self, text: str, where: str) -> list[Decision]:
        """Every rule for `where` that matches `text`, refusals first (match: the normalised text)."""
        norm = normalize(text)
        found = []
        for rule in self.rules:
            if where in rule.targets:
                m = _search(rule, norm)
                if m is not None:
                    found.append(Decision(rule.name, rule.action, where, m.group(0), rule.message))
        return sorted(found, key=lambda d: not d.refuses)

    def input_text(self, messages: list[tuple[str, str]]) -> str:
        """The (role, text) pairs of a request the input rules read (input_roles), one per line."""
        return "\n".join(text for role, text in messages if role in self.input_roles)

    def check_input(self, text: str, **context) -> Decision | None:
        """Check user input and audit every decision (with `context`); -> the refusing one, if any."""
        return next((d for d in self.check_input_all(text, **context) if d.refuses), None)

    def check_input_all(self, text: str, **context) -> list[Decision]:
        """check_input, returning every decision (refusals first)."""
        decisions = self.check(text, "input")
        for d in decisions:
            self.audit(d, **context)
        return decisions

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
    Flags are collected in `flags` (once per rule).

    The text is normalised as it arrives (a character joins once the next base character shows that
    no combining mark follows it), keeping each normalised character's place in the original text, so
    a match found in normalised text stops the original text at the right place.
    """

    def __init__(self, policy: Policy):
        self.rules = [r for r in policy.rules if "output" in r.targets]
        self.hold = max((r.keyword_hold for r in self.rules), default=0)
        self.text = ""
        self.done = 0  # text[:done] is normalised into `norm`
        self.norm = ""
        self.starts, self.ends = array("q"), array("q")  # original span of each normalised character
        self.shown = 0  # original characters shown
        self.shown_n = 0  # normalised characters shown
        self.flags: list[Decision] = []
        self.stopped: Decision | None = None

    def _normalize_more(self, final: bool):
        end = len(self.text)
        if not final:  # the last base character may still get combining marks
            while end > self.done and unicodedata.combining(self.text[end - 1]):
                end -= 1
            end -= 1
        if end <= self.done:
            return
        norm, starts, ends = normalize_mapped(self.text[self.done:end])
        self.norm += norm
        self.starts.extend(s + self.done for s in starts)
        self.ends.extend(e + self.done for e in ends)
        self.done = end

    def push(self, text: str, final: bool = False) -> tuple[str, Decision | None]:
        if self.stopped is not None:
            return "", None
        self.text += text
        self._normalize_more(final)
        scan = max(0, self.shown_n - max(REGEX_WINDOW, self.hold))
        window = self.norm[scan:]
        for rule in self.rules:
            m = _search(rule, window)
            if m is None:
                continue
            start, stop = scan + m.start(), scan + m.end()
            match = self.text[self.starts[start]:self.ends[stop - 1]] if stop > start else m.group(0)
            decision = Decision(rule.name, rule.action, "output", match, rule.message)
            if rule.action == "refuse":
                cut = self.starts[start] if start < len(self.starts) else self.done
                out, self.shown = self.text[self.shown:max(self.shown, cut)], len(self.text)
                self.stopped = decision
                return out, decision
            if all(f.rule != rule.name for f in self.flags):
                self.flags.append(decision)
        safe = len(self.norm) if final else max(self.shown_n, len(self.norm) - self.hold)
        end = self.done if safe >= len(self.norm) else self.starts[safe]
        end = max(end, self.shown)
        out, self.shown, self.shown_n = self.text[self.shown:end], end, safe
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
    for j, k in enumerate(keywords):
        if not normalize(k).strip():
            bad(f"{where}: keyword {j}", "is empty once normalised (only spaces or zero-width characters)")
        patterns.append(keyword_pattern(k))
    for j, rx in enumerate(regexes):
        try:  # Chinese in a regex folds like the text; case is ignored (the text is case-folded)
            patterns.append(re.compile(rx.translate(_fold_table()), re.IGNORECASE))
        except re.error as e:
            bad(f"{where}: regex {j}", f"invalid regular expression ({e})")
    hold = max((len(normalize(k)) for k in keywords), default=1) - 1
    return Rule(name, frozenset(targets), tuple(patterns), action, message, hold)


def _string_list(value, where: str, bad) -> list[str]:
    value = [value] if isinstance(value, str) else value
    if not isinstance(value, list) or any(not isinstance(v, str) or not v for v in value):
        bad(where, "must be a list of non-empty strings")
    return value
