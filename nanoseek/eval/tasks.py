"""Held-out evaluation on reasoning tasks, reported as DeepSeek-R1 does.

For n problems of a task's test split (1,000 by default): greedy accuracy; k samples per problem at
temperature 0.6 / top_p 0.95 giving pass@1 (the mean correctness of the samples), pass@k (some sample
correct; the unbiased estimator of Chen et al. 2021, which for k of k samples is exactly that) and
maj@k (the most common answer is correct). Every figure has a 95% interval: Wilson's for proportions,
the normal interval of the per-problem mean for pass@1. A completion counts only if the task's strict
checker accepts it.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from typing import Sequence

from tqdm import tqdm

from ..infer import check_generation, generate_batches
from ..infer.compute import compute_models
from ..tasks import Problem, Task, default_max_new_tokens, get_task, prompt_ids

Z95 = 1.959963984540054


# ---- statistics ---------------------------------------------------------------------------------
def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion (good near 0 and 1, unlike the normal one)."""
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def mean_interval(values: Sequence[float], z: float = Z95) -> tuple[float, float]:
    """Normal interval of a mean of values in [0, 1] (clipped to [0, 1])."""
    n = len(values)
    if n == 0:
        return (0.0, 1.0)
    mean = sum(values) / n
    if n == 1:
        return (mean, mean)
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    half = z * math.sqrt(var / n)
    return (max(0.0, mean - half), min(1.0, mean + half))


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k)."""
    if not 0 < k <= n:
        raise ValueError(f"pass@k needs 0 < k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    prob_all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_wrong *= 1.0 - k / i
    return 1.0 - prob_all_wrong


def majority_correct(task: Task, problem: Problem, completions: Sequence[str]) -> bool:
    """Majority vote over the parsed answers (unparsable ones do not vote); ties go to the answer
    seen first. True when the winning answer passes the checker."""
    votes: Counter = Counter()
    first: dict = {}
    for c in completions:
        answer = task.extract(c)
        if answer is None:
            continue
        key = task.vote_key(answer, problem)
        votes[key] += 1
        first.setdefault(key, answer)
    if not votes:
        return False
    best = max(votes.values())
    winner = next(key for key in first if votes[key] == best)
    return task.check_answer(first[winner], problem)


# ---- evaluation ---------------------------------------------------------------------------------
def evaluate_task(model, tokenizer, task: Task | str, *, n: int = 1000, k: int = 8, temperature: float = 0.6,
                  top_p: float = 0.95, greedy: bool = True, max_new_tokens: int | None = None,
                  batch_size: int = 128, seed: int = 0, problem_seed: int = 1234, split: str = "test",
                  problems: Sequence[Problem] | None = None, examples: int = 3, progress: bool = False,
                  precision=None) -> dict:
    """Evaluate `model` on n held-out problems of `task` (k = 0 skips sampling). Returns a JSON-able
    dict: settings, greedy_accuracy, pass@1, pass@k, maj@k (each {value, ci95}), format and
    truncation rates, completion length, tokens/s, a few example completions, every completion with
    its verdict (`per_completion`: write_eval writes them as JSONL) and, for a dataset, what was read
    (`dataset`: unparseable gold answers skipped, problems per split). precision: how the
    generation computes (auto | fp32 | bf16, or an InferencePrecision such as the int8 plan of
    `nanoseek.infer.compute.inference_precision(..., quantize="int8")`; None: the model's dtype)."""
    check_generation(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, batch_size=batch_size)
    task = get_task(task)
    if problems is None:
        problems = task.generate(n, seed=problem_seed, split=split)
    problems = list(problems)
    if not problems:
        raise ValueError("no problems to evaluate")
    if max_new_tokens is None:
        max_new_tokens = default_max_new_tokens(task, tokenizer, problems)
    eos = tokenizer.eos_id
    prompts = prompt_ids(tokenizer, problems)
    compute = compute_models(model, precision) if precision is not None else None  # cast once for all batches
    total = len(prompts) * ((1 if greedy else 0) + k)
    bar = tqdm(total=total, desc=f"eval {task.name}", unit="seq", disable=not progress, leave=False)
    t0 = time.perf_counter()
    result: dict = {"task": task.name, "split": split, "n": len(problems), "k": k, "temperature": temperature,
                    "top_p": top_p, "max_new_tokens": max_new_tokens, "seed": seed, "problem_seed": problem_seed,
                    "precision": compute.plan.name if compute else None,
                    "precision_detail": compute.plan.describe() if compute else None}
    if hasattr(task, "report"):
        result["dataset"] = task.report()
    result["per_completion"] = []
    generated = 0
    try:
        if greedy:
            outs = generate_batches(model, prompts, max_new_tokens=max_new_tokens, temperature=0.0, top_p=1.0,
                                  seed=seed, eos_id=eos, batch_size=batch_size, on_batch=bar.update,
                                  precision=compute)
            texts = [tokenizer.decode(o) for o in outs]
            correct = [task.check(t, p) for t, p in zip(texts, problems)]
            generated += sum(map(len, outs))
            result["per_completion"] += _records(task, problems, texts, correct, "greedy", 1)
            result["greedy_accuracy"] = _proportion(sum(correct), len(correct))
            result["format_rate"] = sum(task.extract(t) is not None for t in texts) / len(texts)
            result["truncated_rate"] = sum(not o or o[-1] != eos for o in outs) / len(outs)
            result["mean_completion_tokens"] = sum(map(len, outs)) / len(outs)
            result["examples"] = [{"prompt": p.prompt, "completion": t, "correct": c}
                                  for p, t, c in list(zip(problems, texts, correct))[:examples]]
            result["per_problem_greedy"] = [int(c) for c in correct]
        if k > 0:
            repeated = [ids for ids in prompts for _ in range(k)]
            outs = generate_batches(model, repeated, max_new_tokens=max_new_tokens, temperature=temperature,
                                  top_p=top_p, seed=seed + 100_003, eos_id=eos, batch_size=batch_size,
                                  on_batch=bar.update, precision=compute)
            generated += sum(map(len, outs))
            texts = [tokenizer.decode(o) for o in outs]
            counts, maj = [], []
            for i, p in enumerate(problems):
                group = texts[i * k:(i + 1) * k]
                verdicts = [task.check(t, p) for t in group]
                result["per_completion"] += _records(task, [p] * k, group, verdicts, "sample", k, first=i)
                counts.append(sum(verdicts))
                maj.append(majority_correct(task, p, group))
            per_problem = [c / k for c in counts]
            pass1 = sum(per_problem) / len(per_problem)
            result["pass@1"] = {"value": pass1, "ci95": list(mean_interval(per_problem))}
            solved = sum(c > 0 for c in counts)
            result[f"pass@{k}"] = _proportion(solved, len(counts))
            result[f"maj@{k}"] = _proportion(sum(maj), len(maj))
            result["sample_mean_completion_tokens"] = sum(map(len, outs)) / len(outs)
            result["per_problem_correct_samples"] = counts
    finally:
        bar.close()
    wall = time.perf_counter() - t0
    result["wall_seconds"] = wall
    result["generated_tokens"] = generated
    result["tokens_per_s"] = generated / max(wall, 1e-9)
    return result


def _records(task: Task, problems: Sequence[Problem], texts: Sequence[str], verdicts: Sequence[bool], mode: str,
             per_problem: int, first: int = 0) -> list[dict]:
    """One inspection record per completion: which problem, the gold answer, the text, the extracted
    answer and the verdict."""
    return [{"problem": first + i // per_problem, "mode": mode, "sample": i % per_problem, "prompt": p.prompt,
             "gold": p.answer, "completion": t, "extracted": task.extract(t), "correct": bool(c)}
            for i, (p, t, c) in enumerate(zip(problems, texts, verdicts))]


def _proportion(successes: int, n: int) -> dict:
    return {"value": successes / n if n else 0.0, "ci95": list(wilson_interval(successes, n))}


# ---- reports ------------------------------------------------------------------------------------
def fmt_metric(metric: dict | None) -> str:
    """'52.3% [49.2, 55.4]' for {value, ci95}."""
    if not metric:
        return "-"
    lo, hi = metric["ci95"]
    return f"{100 * metric['value']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"


def markdown_table(results: Sequence[dict], labels: Sequence[str] | None = None) -> str:
    """One row per evaluation: greedy accuracy, pass@1, pass@k, maj@k with 95% intervals."""
    ks = sorted({r["k"] for r in results if r.get("k")})
    k_text = "/".join(map(str, ks)) or "k"
    head = ["model", "task", "n", "greedy", f"pass@1 (k={k_text}, T={results[0]['temperature']:g})",
            f"pass@{k_text}", f"maj@{k_text}", "format", "tokens"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, r in enumerate(results):
        label = labels[i] if labels else r.get("model", "")
        k = r.get("k", 0)
        cells = [label, r["task"], str(r["n"]), fmt_metric(r.get("greedy_accuracy")), fmt_metric(r.get("pass@1")),
                 fmt_metric(r.get(f"pass@{k}")), fmt_metric(r.get(f"maj@{k}")),
                 f"{100 * r['format_rate']:.1f}%" if "format_rate" in r else "-",
                 f"{r.get('mean_completion_tokens', r.get('sample_mean_completion_tokens', 0)):.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary_line(result: dict) -> str:
    k = result.get("k", 0)
    parts = [f"{result['task']} (n={result['n']})"]
    if "greedy_accuracy" in result:
        parts.append(f"greedy {fmt_metric(result['greedy_accuracy'])}")
    if "pass@1" in result:
        parts += [f"pass@1 {fmt_metric(result['pass@1'])}", f"pass@{k} {fmt_metric(result[f'pass@{k}'])}",
                  f"maj@{k} {fmt_metric(result[f'maj@{k}'])}"]
    return ", ".join(parts)
