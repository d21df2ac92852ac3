"""The main job end to end at the quick scale: data -> tokenizer -> SFT -> GRPO -> control -> dense ->
evaluation -> report card; a resumed demo skips finished stages."""

import json

from nanoseek import load_model
from nanoseek.cli import main
from nanoseek.demo import DemoSettings, run_demo


def test_quick_demo_end_to_end_and_resume(tmp_path, capsys):
    settings = DemoSettings.quick(sft_steps=12, eval_problems=24, train_problems=120)
    run = tmp_path / "demo"
    results = run_demo(run, settings, progress=False)
    assert set(results["accuracy"]) == {"SFT (before RL)", "SFT + GRPO", "SFT + more SFT (control)", "dense SFT"}
    for r in results["accuracy"].values():
        assert -1e-9 <= r["ci_low"] <= r["accuracy"] + 1e-9 and r["accuracy"] <= r["ci_high"] + 1e-9 <= 1 + 2e-9
        assert r["n"] == 24
    moe, dense = results["moe_vs_dense"]["moe"], results["moe_vs_dense"]["dense"]
    # equal activated width; the MoE also activates its small routing gates (experts x hidden per layer)
    assert abs(moe["activated_params"] - dense["activated_params"]) <= 0.01 * dense["activated_params"]
    assert moe["total_params"] > 1.5 * dense["total_params"]
    assert moe["tokens"] == dense["tokens"]
    report = (run / "report.md").read_text()
    for section in ("## Model", "## Training", "## Held-out accuracy", "## MoE versus dense", "## Cost"):
        assert section in report
    for png in ("loss.png", "expert_load.png"):
        assert (run / png).read_bytes()[:4] == b"\x89PNG"
    model = load_model(run / "model")
    assert model.config.n_routed_experts > 0 and (run / "model" / "tokenizer.json").exists()
    before = json.loads((run / "results.json").read_text())["accuracy"]
    # resuming a finished demo redoes nothing and gives the same numbers
    again = run_demo(run, settings, progress=False)
    assert again["accuracy"] == before
    assert main(["report", str(run)]) == 0 and "report.md" in capsys.readouterr().out
