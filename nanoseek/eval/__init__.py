"""Evaluation: held-out accuracy on reasoning tasks (greedy, pass@1 over k samples, pass@k, maj@k,
95% intervals), written as JSON and a markdown table.

    from nanoseek.eval import evaluate_model
    result = evaluate_model("runs/r1zero/model", "addition3", n=1000, k=8, out="runs/r1zero/eval")
"""

from __future__ import annotations

import json
from pathlib import Path

from ..checkpoint import load_model_and_tokenizer
from .tasks import (evaluate_task, fmt_metric, majority_correct, markdown_table, mean_interval, pass_at_k,
                    summary_line, wilson_interval)


def write_eval(result: dict, out: str | Path, label: str | None = None) -> tuple[Path, Path]:
    """eval-{task}.json and eval-{task}.md in folder `out`, and eval-{task}-completions.jsonl with
    every completion and its verdict (the result's per_completion, left out of the JSON)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"eval-{result['task']}"
    json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
    records = result.get("per_completion")
    if records is not None:
        with open(out / f"{stem}-completions.jsonl", "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
    saved = {k: v for k, v in result.items() if k != "per_completion"}
    json_path.write_text(json.dumps(saved, indent=2) + "\n")
    md = markdown_table([result], [label or result.get("model", "")]) + "\n"
    if result.get("examples"):
        md += "\nExamples (greedy):\n"
        for ex in result["examples"]:
            mark = "correct" if ex["correct"] else "wrong"
            md += f"\n**{ex['prompt']}** ({mark})\n\n```\n{ex['completion']}\n```\n"
    md_path.write_text(md)
    return json_path, md_path


def evaluate_model(path: str | Path, task, out: str | Path | None = None, tokenizer=None,
                   device: str | None = None, **kwargs) -> dict:
    """Load a model folder, evaluate it on `task` (kwargs as evaluate_task) and, with `out`, write
    the JSON and markdown reports there."""
    model, tok = load_model_and_tokenizer(path, tokenizer, device)
    result = evaluate_task(model, tok, task, **kwargs)
    result["model"] = str(path)
    if out is not None:
        write_eval(result, out, str(path))
    return result


__all__ = ["evaluate_task", "evaluate_model", "write_eval",
           "markdown_table", "fmt_metric", "summary_line", "wilson_interval", "mean_interval", "pass_at_k",
           "majority_correct"]
