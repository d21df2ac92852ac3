"""bench/llama_column.py, the llama.cpp column of bench/perf.py: the table it assembles from perf.py's
rows, the one-line skip when the side environment is missing (perf.py then runs as before), and, where
bench/.llama-env exists, llama.cpp's greedy tokens on the exported weights."""

import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import llama_column  # noqa: E402


def test_split_row():
    assert llama_column.split_row("decode b8 nanoseek int8") == ("decode b8", "nanoseek int8")
    assert llama_column.split_row("prefill llama.cpp q8_0") == ("prefill", "llama.cpp q8_0")
    assert llama_column.split_row("train nanoseek") is None
    assert llama_column.split_row("prefill") is None


def test_comparison_and_targets_follow_the_rows_present():
    rows = {"decode b1 nanoseek": {"tokens_per_s": 200.0}, "decode b1 transformers": {"tokens_per_s": 50.0},
            "decode b1 nanoseek int8": {"tokens_per_s": 300.0}, "decode b1 bf16": {"tokens_per_s": 150.0},
            "decode b1 llama.cpp f32": {"tokens_per_s": 100.0}, "decode b1 llama.cpp q8_0": {"tokens_per_s": 400.0},
            "decode b8 nanoseek": {"tokens_per_s": 800.0},  # llama.cpp did not run b8: no entry
            "prefill nanoseek": {"tokens_per_s": 1000.0}, "prefill llama.cpp f32": {"tokens_per_s": 2000.0},
            "train nanoseek": {"tokens_per_s": 5.0}}
    table = {c["row"]: c for c in llama_column.comparison(rows)}
    assert list(table) == ["decode b1 nanoseek", "decode b1 nanoseek int8", "decode b1 bf16", "prefill nanoseek"]
    assert table["decode b1 nanoseek"]["ratios"] == {"llama.cpp f32": 2.0, "llama.cpp q8_0": 0.5}
    assert table["prefill nanoseek"]["llama_cpp"] == {"llama.cpp f32": 2000.0}
    targets = llama_column.llama_targets(rows)  # fp32 against f32, int8 against q8_0; prefill and bf16 none
    assert [(t["goal"], t["value"], t["holds"]) for t in targets] == [
        ("decode b1 nanoseek >= llama.cpp f32", 2.0, True),
        ("decode b1 nanoseek int8 >= llama.cpp q8_0", 0.75, False)]


def test_print_comparison(capsys):
    rows = {"decode b1 nanoseek": {"tokens_per_s": 200.0}, "decode b1 llama.cpp f32": {"tokens_per_s": 100.0},
            "decode b1 llama.cpp q8_0": {"tokens_per_s": 400.0}}
    llama_column.print_comparison(rows, "== head")
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "== head" and "2.00x" in out[2] and "0.50x" in out[2]
    assert out[-1].split()[-2:] == ["2.00x", "holds"]
    llama_column.print_comparison({"decode b1 nanoseek": {"tokens_per_s": 1.0}}, "== head")
    assert capsys.readouterr().out == ""  # no llama.cpp rows: nothing printed


def test_perf_skips_the_column_with_one_line_without_the_side_env(tmp_path, monkeypatch, capsys):
    import perf
    monkeypatch.setattr(llama_column, "ENV", tmp_path / "missing-env")
    column = llama_column.for_perf(False, 1)
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].startswith("llama.cpp column skipped") and "missing-env" in out[0]
    assert not column.enabled and column.version is None
    assert column.prefill(torch.zeros(1, 4, dtype=torch.long)) == {} and column.decode([[1, 2]], 3) == {}
    column.load(None), column.close()
    # perf.py's phases default to the same stand-in, so its rows are the ones it had before the column
    assert not perf.bench_config.__defaults__[-1].enabled
    assert not perf.bench_rollout_rows.__defaults__[-1].enabled


@pytest.mark.skipif(llama_column.side_env_python() is None, reason="needs bench/.llama-env (bench/gguf_parity.py)")
def test_llama_cpp_greedy_tokens_equal_nanoseek_on_the_exported_weights():
    """f32 GGUF: llama.cpp's multi-sequence greedy decode draws nanoseek.generate's tokens (random tiny
    weights, 8 tokens; its f16 KV cache rounds, which the margins of these logits absorb)."""
    from nanoseek import ModelConfig, generate
    from perf import random_model
    model = random_model(ModelConfig.preset("tiny", num_nextn_predict_layers=0)).eval()
    prompts = torch.randint(0, 1024, (2, 16), generator=torch.Generator().manual_seed(0)).tolist()
    column = llama_column.Column(llama_column.side_env_python(), 1)
    try:
        column.load(model)
        fns = column.decode(prompts, 8)
        assert set(fns) == {"decode b2 llama.cpp f32", "decode b2 llama.cpp q8_0"}
        fn, tokens = fns["decode b2 llama.cpp f32"]
        assert tokens == 16 and fn()["tokens"] == generate(model, prompts, max_new_tokens=8)
        assert column.rollouts(prompts, 3, 4)["llama.cpp q8_0"]()["tokens"] == 2 * 3 * 4
    finally:
        column.close()
