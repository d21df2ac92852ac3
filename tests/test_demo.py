"""The main job end to end at the quick scale: data -> tokenizer -> SFT -> GRPO -> control -> dense ->
evaluation -> report card, for two seeds in parallel processes; a resumed demo skips finished stages;
the verdicts pair the seeds; a seed's SFT model is bitwise the same when trained again."""

import json
from dataclasses import replace

import pytest
import torch

from nanoseek import load_model
from nanoseek.cli import main
from nanoseek.demo import (DemoSettings, _train_stage, base_recipe, model_overrides, run_demo, verdicts)
from nanoseek.eval.report import paired_interval, t975


def test_quick_demo_two_seeds_end_to_end_resume_and_determinism(tmp_path, capsys):
    settings = DemoSettings.quick(sft_steps=12, eval_problems=24, train_problems=120)
    run = tmp_path / "demo"
    results = run_demo(run, settings, progress=False, seeds=2)
    assert set(results["accuracy"]) == {"SFT (before RL)", "SFT + GRPO", "SFT + more SFT (control)", "dense SFT"}
    # what each stage cost this process in CPU seconds (the budget of a seed on a shared machine)
    assert list(results["cpu_seconds"]) == ["data", "sft", "grpo", "control", "dense", "eval"]
    assert results["cpu_seconds"]["sft"] > 0
    for r in results["accuracy"].values():
        assert -1e-9 <= r["ci_low"] <= r["accuracy"] + 1e-9 and r["accuracy"] <= r["ci_high"] + 1e-9 <= 1 + 2e-9
        assert r["n"] == 24
    moe, dense = results["moe_vs_dense"]["moe"], results["moe_vs_dense"]["dense"]
    # equal activated width; the MoE also activates its small routing gates (experts x hidden per layer)
    assert abs(moe["activated_params"] - dense["activated_params"]) <= 0.01 * dense["activated_params"]
    assert moe["total_params"] > 1.5 * dense["total_params"]
    assert moe["tokens"] == dense["tokens"]
    # the second seed ran into seeds/seed-1 and the verdicts pair the two seeds
    seed1 = json.loads((run / "seeds" / "seed-1" / "results.json").read_text())
    assert seed1["seed"] == 1 and [r["seed"] for r in results["per_seed"]] == [0, 1]
    v = {x["key"]: x for x in results["verdicts"]}
    grpo = v["grpo_vs_control"]
    assert grpo["diffs"][1] == pytest.approx(seed1["accuracy"]["SFT + GRPO"]["accuracy"]
                                             - seed1["accuracy"]["SFT + more SFT (control)"]["accuracy"])
    assert grpo["low"] <= grpo["mean"] <= grpo["high"] and grpo["verdict"] in ("holds", "reversed", "not resolved")
    report = (run / "report.md").read_text()
    assert report.index("## What this run shows") < report.index("## Model")
    for section in ("## Model", "## Training", "## Held-out accuracy", "## MoE versus dense", "## Cost"):
        assert section in report
    assert "seeds/seed-1" in report and "CPU-seconds" in report
    for png in ("loss.png", "expert_load.png"):
        assert (run / png).read_bytes()[:4] == b"\x89PNG"
    model = load_model(run / "model")
    assert model.config.n_routed_experts > 0 and (run / "model" / "tokenizer.json").exists()
    before = json.loads((run / "results.json").read_text())["accuracy"]
    # resuming a finished demo redoes nothing and gives the same numbers
    again = run_demo(run, settings, progress=False, seeds=2)
    assert again["accuracy"] == before and again["verdicts"] == results["verdicts"]
    assert main(["report", str(run)]) == 0 and "report.md" in capsys.readouterr().out
    # determinism: seed 1's SFT stage trained again here (one thread, like the seed's process) gives
    # bitwise the same model file
    s1 = replace(settings, seed=1)
    folder = run / "seeds" / "seed-1"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        recipe = base_recipe(s1, folder / "data" / "tokens", folder / "tokenizer")
        again_sft = _train_stage(replace(recipe, out=str(tmp_path / "sft-again"), max_steps=s1.sft_steps,
                                         progress=False, model=model_overrides(seed1["config"]["vocab_size"])))
    finally:
        torch.set_num_threads(threads)
    assert (again_sft / "model.safetensors").read_bytes() == (folder / "sft" / "model" / "model.safetensors").read_bytes()


def test_paired_interval_and_t_quantiles():
    ci = paired_interval([1.0, 2.0, 3.0], [0.0, 0.0, 0.0])
    # mean 2, sd 1, t(2) = 4.303: 2 +- 4.303 / sqrt(3)
    assert ci["mean"] == 2.0 and ci["high"] == pytest.approx(2 + 4.303 / 3 ** 0.5)
    assert ci["a_higher"] == 3 and ci["a_lower"] == 0
    one = paired_interval([1.0], [2.0])
    assert one["low"] is None and one["mean"] == -1.0
    assert t975(1) == 12.706 and abs(t975(100) - 1.984) < 0.01
    with pytest.raises(ValueError, match="pairs"):
        paired_interval([1.0], [1.0, 2.0])


def _row(seed, moe, dense, sft, grpo, control, moe_loss=0.02, dense_loss=0.01):
    return {"seed": seed, "folder": "." if seed == 0 else f"seeds/seed-{seed}", "n": 500,
            "moe_val_loss": moe_loss, "dense_val_loss": dense_loss,
            "accuracy": {"SFT (before RL)": sft, "SFT + GRPO": grpo, "SFT + more SFT (control)": control,
                         "dense SFT": dense}}


def test_verdicts_hold_reverse_or_stay_unresolved():
    rows = [_row(0, 0, 0.9, 0.5, 0.9, 0.6), _row(1, 0, 0.8, 0.4, 0.85, 0.9), _row(2, 0, 0.95, 0.45, 0.8, 0.5)]
    v = {x["key"]: x for x in verdicts(rows)}
    assert v["grpo_vs_sft"]["verdict"] == "holds" and v["grpo_vs_sft"]["wins"] == 3
    assert v["moe_vs_dense_accuracy"]["verdict"] == "reversed"  # dense 0.9/0.8/0.95 against MoE SFT 0.5/0.4/0.45
    assert v["grpo_vs_control"]["verdict"] == "not resolved"  # +0.3, -0.05, +0.3
    assert v["moe_vs_dense_loss"]["verdict"] == "reversed"  # +0.01 every seed: an interval of width 0
    # one seed: accuracy intervals over the held-out problems, none for the loss
    one = {x["key"]: x for x in verdicts(rows[:1])}
    assert one["grpo_vs_sft"]["low"] is not None and one["moe_vs_dense_loss"]["low"] is None
    assert "one seed" in one["grpo_vs_sft"]["basis"]


def test_demo_defaults_to_three_seeds_and_quick_to_one():
    """The main job's verdicts need seeds: `nanoseek demo` runs DEMO_SEEDS (3) unless told otherwise;
    --quick (a smoke run) one; --seeds 0 is refused in one line."""
    import argparse

    from nanoseek.commands.report import _demo_arguments, demo_seeds
    from nanoseek.demo import DEMO_SEEDS
    from nanoseek.errors import ConfigError

    p = argparse.ArgumentParser()
    _demo_arguments(p)
    assert DEMO_SEEDS == 3 and demo_seeds(p.parse_args([])) == 3
    assert demo_seeds(p.parse_args(["--quick"])) == 1 and demo_seeds(p.parse_args(["--quick", "--seeds", "2"])) == 2
    with pytest.raises(ConfigError, match="--seeds"):
        demo_seeds(p.parse_args(["--seeds", "0"]))
