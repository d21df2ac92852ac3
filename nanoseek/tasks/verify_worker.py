"""The process that runs math-verify for nanoseek.tasks.verify (started as a script, never imported by
the package): one JSON request per line on stdin, one JSON reply per line on stdout, in order.

    {"op": "gold", "gold": "\\frac{1}{2}"}                    -> {"ok": true}   (the gold answer parses)
    {"op": "math", "gold": "\\frac{1}{2}", "answer": "0.5"}   -> {"ok": true}   (equivalent)
    {"op": "regex", "pattern": "7[0-9]", "text": "72"}        -> {"ok": true}   (re.fullmatch)
    {"op": "ping"}                                             -> {"ok": true}   (started and warmed up)

It imports only math-verify and the standard library (not torch), so it starts in a fraction of a
second, with its address space capped (MEMORY_LIMIT: a huge power fails with MemoryError instead of
eating the machine's memory). math-verify's own timeouts (signal.alarm) are off: some expressions block inside C code
(`10^{10^{10}}` is a ten-billion-digit integer power) where no signal reaches, so the parent gives
each request a deadline and kills this process when it passes. Parsed gold answers are cached.
"""

import functools
import json
import logging
import re
import resource
import sys

MEMORY_LIMIT = 4 << 30  # bytes of address space


def main() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = MEMORY_LIMIT if hard == resource.RLIM_INFINITY else min(MEMORY_LIMIT, hard)
    if soft == resource.RLIM_INFINITY or soft > limit:
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    logging.disable(logging.WARNING)  # math-verify warns that its timeouts are off: we time it from outside
    from math_verify import parse, verify

    @functools.lru_cache(maxsize=8192)
    def parsed(text: str, fallback: str = "first_match"):
        """math-verify's readings of text; gold answers must parse (no_fallback: no bare string)."""
        latex = f"${text}$" if "$" not in text and "\\boxed" not in text else text
        return parse(latex, fallback_mode=fallback, parsing_timeout=None)

    for line in sys.stdin:
        request = json.loads(line)
        try:
            op = request["op"]
            if op == "ping":
                ok = bool(parsed("1"))
            elif op == "gold":
                ok = bool(parsed(request["gold"], "no_fallback"))
            elif op == "math":
                gold, answer = parsed(request["gold"], "no_fallback"), parsed(request["answer"])
                ok = bool(gold) and bool(answer) and bool(verify(gold, answer, timeout_seconds=None))
            elif op == "regex":
                ok = re.fullmatch(request["pattern"], request["text"]) is not None
            else:
                raise ValueError(f"unknown op {op!r}")
            reply = {"ok": ok}
        except Exception as e:  # a verdict of False with the reason, never a dead worker
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}"[:200]}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
