"""GRPO against its equal-compute SFT control over RL seeds, from one finished demo's SFT model.

    OMP_NUM_THREADS=1 .venv/bin/python bench/grpo_seeds.py --run runs/demo --work /tmp/grpo-seeds --seeds 1,2,3

The demo's stages 4, 5 and 7 (GRPO, the control, held-out evaluation) with the demo's settings, the
SFT model, traces and tokenizer of RUN, and another seed: GRPO's rollouts and the control's data
order change, the starting model does not. So the spread measured here is the RL stage's alone (the
demo's `--seeds` also varies the SFT run, and with it the starting point). Prints per seed and the
paired mean difference (GRPO - control) with its 95% t interval over the seeds, RUN's own seed
included; writes WORK/grpo_seeds.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanoseek.demo import (DemoSettings, _control_steps, _evaluate, _grpo_stage, _train_stage,  # noqa: E402
                           base_recipe)
from nanoseek.eval.report import paired_interval  # noqa: E402
from nanoseek.tasks import get_task  # noqa: E402
from nanoseek.tokenizer import Tokenizer  # noqa: E402

GRPO, CONTROL = "SFT + GRPO", "SFT + more SFT (control)"


def one_seed(run: Path, work: Path, seed: int) -> dict:
    """GRPO and the control from RUN's SFT model with `seed`; their held-out accuracies."""
    results = json.loads((run / "results.json").read_text())
    s = replace(DemoSettings(**results["settings"]), seed=seed)
    out = work / f"seed-{seed}"
    out.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer", "data"):
        if not (out / name).exists():
            shutil.copytree(run / name, out / name)
    sft, tok_dir = run / "sft" / "model", out / "tokenizer"
    task, tok = get_task(s.task), Tokenizer.load(tok_dir)
    grpo = _grpo_stage(out, sft, tok_dir, s, progress=False)
    extra = _control_steps(out, s)
    base = base_recipe(s, out / "data" / "tokens", tok_dir)
    control = _train_stage(replace(base, out=str(out / "control"), init_from=str(sft), preset=None, max_steps=extra,
                                   warmup_steps=0, eval_every=max(extra // 2, 1), save_every=max(extra // 2, 1)))
    # the test problems do not depend on the seed (evaluate_task's fixed problem_seed); the sampling seed does
    # not matter for greedy decoding
    acc = {label: _evaluate(out, label, folder, tok, task, s, progress=False)["accuracy"]
           for label, folder in ((GRPO, grpo), (CONTROL, control))}
    return {"seed": seed, "folder": str(out), **acc, "control_steps": extra}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="a finished `nanoseek demo` run folder")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--seeds", default="1,2")
    p.add_argument("--report", action="store_true", help="only tabulate the finished seeds")
    a = p.parse_args()
    if not (a.run / "results.json").exists():
        sys.exit(f"error: --run {a.run}: no results.json (a finished demo run folder)")
    res = json.loads((a.run / "results.json").read_text())
    rows = [{"seed": res["seed"], "folder": str(a.run), GRPO: res["accuracy"][GRPO]["accuracy"],
             CONTROL: res["accuracy"][CONTROL]["accuracy"]}]
    for seed in (int(x) for x in a.seeds.split(",")):
        if a.report and not (a.work / f"seed-{seed}" / "eval").exists():
            continue
        rows.append(one_seed(a.run, a.work, seed))
    ci = paired_interval([r[GRPO] for r in rows], [r[CONTROL] for r in rows])
    print("| RL seed | SFT + GRPO | SFT + more SFT (control) | GRPO - control |\n|---:|---:|---:|---:|")
    for r, d in zip(rows, ci["diffs"]):
        print(f"| {r['seed']} | {100 * r[GRPO]:.1f}% | {100 * r[CONTROL]:.1f}% | {100 * d:+.1f} |")
    iv = f"[{100 * ci['low']:+.1f}, {100 * ci['high']:+.1f}]" if ci["low"] is not None else "(one seed)"
    print(f"\nGRPO - control over {ci['n']} seeds: {100 * ci['mean']:+.1f} points, 95% t interval {iv}; "
          f"GRPO ahead in {ci['a_higher']}/{ci['n']}")
    a.work.mkdir(parents=True, exist_ok=True)
    (a.work / "grpo_seeds.json").write_text(json.dumps({"rows": rows, "grpo_minus_control": ci}, indent=1))


if __name__ == "__main__":
    main()
