"""The `nanoseek` command: `params` output, --help everywhere, one-line errors with exit code 2."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nanoseek import ModelConfig, cli
from nanoseek.cli import COMMAND_MODULES, load_commands, main

ROOT = Path(__file__).resolve().parents[1]


def run_module(*args: str) -> subprocess.CompletedProcess:
    """`python -m nanoseek ...` in a fresh interpreter, as a user would run it."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "nanoseek", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def assert_one_line_error(code: int, err: str, *needles: str):
    assert code == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0]


# ---- params ------------------------------------------------------------------------------------
def test_params_preset_in_process(capsys):
    assert main(["params", "--preset", "deepseek-v3"]) == 0
    out = capsys.readouterr().out
    assert "671.03B" in out and "671,026,404,352" in out  # total
    assert "36.63B" in out and "37.55B" in out  # activated, without / with the embedding table
    assert "70,272" in out and "4,997,120" in out and "71.1x" in out  # KV bytes per token, bf16


def test_params_dtype_changes_cache_bytes(capsys):
    assert main(["params", "--preset", "deepseek-v3", "--dtype", "fp32"]) == 0
    out = capsys.readouterr().out
    assert "140,544" in out and "fp32" in out


def test_params_json(capsys):
    assert main(["params", "--preset", "deepseek-v2-lite", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert 15.5e9 <= data["total"] <= 16.0e9
    assert data["kv_cache"]["latent_values_per_layer"] == 576
    assert set(data["components"]) >= {"embedding", "attention", "routed_experts", "mtp"}


@pytest.mark.parametrize("as_folder", [False, True])
def test_params_config_file_or_folder(tmp_path, capsys, as_folder):
    ModelConfig.preset("tiny").save(tmp_path / "config.json")
    target = tmp_path if as_folder else tmp_path / "config.json"
    assert main(["params", "--config", str(target)]) == 0
    assert "routed experts" in capsys.readouterr().out


def test_params_subprocess():
    result = run_module("params", "--preset", "deepseek-v3")
    assert result.returncode == 0, result.stderr
    assert "671" in result.stdout and "37" in result.stdout


# ---- --help on every command -----------------------------------------------------------------------
@pytest.mark.parametrize("argv", [["--help"]] + [[name, "--help"] for name in load_commands()])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    assert "usage: nanoseek" in capsys.readouterr().out


def test_no_command_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    assert "params" in capsys.readouterr().err


# ---- the command registry ------------------------------------------------------------------------
def test_every_command_module_imports_and_is_listed():
    for name in COMMAND_MODULES:
        assert importlib.import_module(name).__name__ == name
    files = {f"nanoseek.commands.{p.stem}" for p in (ROOT / "nanoseek" / "commands").glob("*.py")
             if not p.name.startswith("_")}
    assert files == set(COMMAND_MODULES)  # a module left out of COMMAND_MODULES would drop its commands


def test_missing_command_module_fails_loudly(monkeypatch):
    monkeypatch.setattr(cli, "COMMAND_MODULES", COMMAND_MODULES + ("nanoseek.commands.nope",))
    with pytest.raises(ModuleNotFoundError) as exc:
        main(["--help"])
    assert exc.value.name == "nanoseek.commands.nope"


def test_broken_command_module_fails_loudly(tmp_path, monkeypatch):
    (tmp_path / "broken_commands.py").write_text("import nanoseek_no_such_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError) as exc:
        load_commands(("broken_commands",))
    assert exc.value.name == "nanoseek_no_such_dependency"


# ---- errors: one line, exit code 2, no traceback ---------------------------------------------------
def _write(tmp_path: Path, **changes) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**ModelConfig.preset("tiny").to_hf(), **changes}))
    return path


@pytest.mark.parametrize("changes, needle", [
    ({"topk_group": 3, "n_group": 2}, "topk_group"),
    ({"model_type": "llama"}, "model_type"),
    ({"hidden_size": -1}, "hidden_size"),
])
def test_bad_config_field(tmp_path, capsys, changes, needle):
    path = _write(tmp_path, **changes)
    code = main(["params", "--config", str(path)])
    captured = capsys.readouterr()
    assert_one_line_error(code, captured.err, needle, str(path))
    assert captured.out == ""


def test_missing_file_and_folder(tmp_path, capsys):
    missing = tmp_path / "nope.json"
    assert_one_line_error(main(["params", "--config", str(missing)]), capsys.readouterr().err, str(missing))
    assert_one_line_error(main(["params", "--config", str(tmp_path)]), capsys.readouterr().err, "config.json")


def test_invalid_json(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text('{"model_type": ')
    assert_one_line_error(main(["params", "--config", str(path)]), capsys.readouterr().err, str(path))


def test_unknown_preset(capsys):
    assert_one_line_error(main(["params", "--preset", "gpt-5"]), capsys.readouterr().err, "gpt-5")


def test_bad_config_subprocess(tmp_path):
    path = _write(tmp_path, topk_group=3, n_group=2)
    result = run_module("params", "--config", str(path))
    assert_one_line_error(result.returncode, result.stderr, "topk_group", str(path))
    missing = run_module("params", "--config", str(tmp_path / "missing.json"))
    assert_one_line_error(missing.returncode, missing.stderr, "missing.json")


@pytest.mark.parametrize("argv, needle", [
    (["params"], "--preset"),
    (["params", "--preset", "tiny", "--dtype", "int3"], "int3"),
    (["params", "--preset", "tiny", "--config", "x.json"], "not allowed"),
    (["frobnicate"], "frobnicate"),
])
def test_usage_errors_are_one_line(argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert_one_line_error(exc.value.code, capsys.readouterr().err, needle)


@pytest.mark.parametrize("stopped_by, words", [(None, "finished at"), ("signal", "stopped by a signal at"),
                                               ("max_seconds", "reached max_seconds at")])
def test_train_says_how_the_run_ended(monkeypatch, capsys, stopped_by, words):
    """`nanoseek train` reports a max_seconds stop as such, not as a signal (the summary's stopped_by)."""
    import nanoseek.commands.train as train_command
    summary = {"step": 7, "tokens": 1234, "wall_seconds": 3.0, "model": "m", "cost": "c",
               "stopped_by": stopped_by, "interrupted": stopped_by is not None}
    monkeypatch.setattr(train_command, "load_recipe", lambda path, overrides: None)
    monkeypatch.setattr(train_command, "train", lambda recipe: summary)
    assert main(["train", "--max-steps", "7"]) == 0
    assert capsys.readouterr().out.startswith(f"{words} step 7 (1,234 tokens")


# ---- bad numbers on the generation options: one line, exit 2, before any model loads -------------
@pytest.mark.parametrize("argv, needle", [
    (["chat", "{m}", "--temperature", "nan"], "temperature must be a finite number"),
    (["chat", "{m}", "--temperature", "-1"], "temperature must be a finite number"),
    (["chat", "{m}", "--top-p", "0"], "top_p must be in (0, 1]"),
    (["chat", "{m}", "--max-tokens", "0"], "max_tokens must be a positive integer"),
    (["chat", "{m}", "--threads", "-1"], "--threads must be a positive integer"),
    (["serve", "{m}", "--threads", "-1"], "--threads must be a positive integer"),
    (["eval", "{m}", "--task", "addition3", "--temperature", "inf"], "temperature must be a finite number"),
    (["eval", "{m}", "--task", "addition3", "--batch-size", "0"], "batch_size must be a positive integer"),
    (["distill", "--teacher", "{m}", "--task", "addition3", "--out", "{m}/d", "--top-p", "nan"], "top_p"),
])
def test_generation_options_reject_bad_numbers(tmp_path, capsys, argv, needle):
    argv = [a.replace("{m}", str(tmp_path / "no-model")) for a in argv]
    assert_one_line_error(main(argv), capsys.readouterr().err, needle)
