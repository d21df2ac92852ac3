"""Sharded checkpoints (torch.distributed.checkpoint): every rank writes its own shards; a checkpoint
written by 2 gloo processes resumes in 1 and the other way round with the same losses; a half-written
one is never resumed; `consolidate` streams one into an HF folder that transformers loads, holding
about one output shard in memory, not the model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from test_distributed import (WEIGHT_TOL, assert_same_run, base_recipe, max_weight_diff, metrics, reference_run,
                              torchrun, train_cli, train_here)

REPO = Path(__file__).resolve().parents[1]


def step_dir(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step-{step:07d}"


def assert_same_files(a: Path, b: Path) -> None:
    """Two HF folders hold the same tensors under the same keys, in the same files."""
    from safetensors.torch import load_file
    files = sorted(p.name for p in a.glob("*.safetensors"))
    assert files == sorted(p.name for p in b.glob("*.safetensors"))
    for name in files:
        ta, tb = load_file(a / name), load_file(b / name)
        assert ta.keys() == tb.keys()
        assert all(torch.equal(ta[k], tb[k]) for k in ta), name
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    return reference_run(corpus, tmp_path_factory)


# ---- across world sizes ------------------------------------------------------------------------------
def test_sharded_checkpoints_move_between_one_and_two_processes(corpus, reference, tmp_path):
    """1 process writes a sharded checkpoint at step 2; 2 processes with EP=2 resume it and write theirs
    at step 3 (one file per rank, nothing gathered), and publish model/ by streamed consolidation; 1
    process resumes that to step 6: the same 6 steps as the single-process reference."""
    run = tmp_path / "run"
    train_here(base_recipe(corpus, run, max_steps=2, checkpoint_format="sharded"))
    torchrun(train_cli(base_recipe(corpus, run, max_steps=3, resume=True)), ep=2)  # auto: sharded
    ckpt = step_dir(run, 3)
    assert sorted(p.name for p in ckpt.iterdir()) == ["rng.safetensors", "sharded", "trainer.json"]
    assert sorted(p.name for p in (ckpt / "sharded").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert (ckpt / "sharded" / "tokenizer.json").exists()
    # model/ is the consolidation of step 3: the reference's weights after 3 steps
    assert max_weight_diff(run / "model", step_dir(reference, 3) / "model") < WEIGHT_TOL
    assert (run / "model" / "tokenizer.json").exists()
    train_here(base_recipe(corpus, run, max_steps=6, resume=True))
    assert_same_run(reference, run, 6)


def test_sharded_resume_in_one_process_is_exact(corpus, reference, tmp_path):
    """checkpoint_format = "sharded" in one process: resumes bit for bit, and model/ (consolidated
    from the last checkpoint) holds the reference's weights exactly."""
    run = tmp_path / "run"
    train_here(base_recipe(corpus, run, max_steps=3, checkpoint_format="sharded"))
    assert not (step_dir(run, 3) / "model").exists() and (step_dir(run, 3) / "sharded" / ".metadata").exists()
    train_here(base_recipe(corpus, run, max_steps=6, checkpoint_format="sharded", resume=True))
    assert [r["loss"] for r in metrics(run)] == [r["loss"] for r in metrics(reference)]
    assert max_weight_diff(run / "model", reference / "model") == 0.0


# ---- atomicity and damage ----------------------------------------------------------------------------
def test_half_written_sharded_checkpoint_is_never_resumed(corpus, tmp_path, monkeypatch):
    """A save that fails after the shards are written leaves no step folder; the staging folder a
    killed save leaves is removed when the run resumes; a damaged shard file falls back to the
    checkpoint before it."""
    import nanoseek.train.sharded as sharded
    run = tmp_path / "run"
    train_here(base_recipe(corpus, run, max_steps=3, checkpoint_format="sharded"))

    real_save = sharded.dcp.save

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sharded.dcp, "save", save_then_die)
    with pytest.raises(OSError, match="No space left"):
        train_here(base_recipe(corpus, run, max_steps=4, checkpoint_format="sharded", resume=True))
    monkeypatch.undo()
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-0000003"]

    # what a kill in the middle of a save leaves: a staging folder with shards and no metadata
    stale = run / "checkpoints" / f".step-0000005.tmp-{'0' * 32}"
    (stale / "sharded").mkdir(parents=True)
    (stale / "sharded" / "__0_0.distcp").write_bytes(b"partial")
    train_here(base_recipe(corpus, run, max_steps=5, checkpoint_format="sharded", resume=True))
    assert not stale.exists()
    assert metrics(run)[3]["step"] == 4  # resumed from step 3, not from the half-written step 5

    shard = step_dir(run, 5) / "sharded" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # truncated
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_here(base_recipe(corpus, run, max_steps=6, checkpoint_format="sharded", resume=True))
    assert any("step-0000005" in str(w.message) and "does not load" in str(w.message) for w in caught)
    assert metrics(run)[-1]["step"] == 6


def test_checkpoint_format_is_validated(corpus, tmp_path):
    from nanoseek import ConfigError
    with pytest.raises(ConfigError, match="'checkpoint_format'.*one of"):
        train_here(base_recipe(corpus, tmp_path / "run", checkpoint_format="zip"))


# ---- consolidation -----------------------------------------------------------------------------------
def sharded_copy(model, folder: Path, tokenizer: Path | None = None) -> Path:
    """`model` written as a sharded model folder by this process (no optimizer state)."""
    from nanoseek.train.loop import SingleProcess
    from nanoseek.train.sharded import save_sharded
    save_sharded(folder, model, torch.optim.AdamW(model.parameters()), SingleProcess(torch.device("cpu")),
                 tokenizer)
    return folder


def test_consolidate_equals_save_model_and_loads_in_transformers(tmp_path):
    """Streamed consolidation writes exactly what save_model writes (shards, index, config.json), also
    with a dtype, and transformers loads it with the same logits."""
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    from conftest import random_tiny_model
    from nanoseek import save_model
    from nanoseek.checkpoint import INDEX_NAME, consolidate, load_model
    model = random_tiny_model(num_nextn_predict_layers=1)
    src = sharded_copy(model, tmp_path / "sharded")
    summary = consolidate(src, tmp_path / "hf", max_shard_size="300KB")
    save_model(model, tmp_path / "direct", max_shard_size="300KB")
    assert summary.files > 1 and (tmp_path / "hf" / INDEX_NAME).exists()
    assert json.loads((tmp_path / "hf" / INDEX_NAME).read_text()) == \
        json.loads((tmp_path / "direct" / INDEX_NAME).read_text())
    assert_same_files(tmp_path / "hf", tmp_path / "direct")
    consolidate(src, tmp_path / "bf16", dtype=torch.bfloat16)
    save_model(model, tmp_path / "direct-bf16", dtype=torch.bfloat16)
    assert_same_files(tmp_path / "bf16", tmp_path / "direct-bf16")

    x = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x)
        assert torch.equal(load_model(tmp_path / "hf")(x), ref)
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
        assert torch.allclose(hf(x).logits, ref, atol=1e-5, rtol=0)


def test_consolidate_names_a_missing_or_misshaped_tensor(tmp_path):
    from conftest import random_tiny_model
    from nanoseek import CheckpointError
    from nanoseek.checkpoint import consolidate
    src = sharded_copy(random_tiny_model(), tmp_path / "sharded")
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": cfg["num_hidden_layers"] + 1}))
    with pytest.raises(CheckpointError, match=r"tensor 'model\.layers\.3\..*' .*missing"):
        consolidate(src, tmp_path / "out")
    (src / "config.json").write_text(json.dumps({**cfg, "vocab_size": cfg["vocab_size"] * 2}))
    with pytest.raises(CheckpointError, match=r"'model.embed_tokens.weight' has shape \(1024, 128\), expected"):
        consolidate(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


CONSOLIDATE_RSS = """
import json, re, sys
from pathlib import Path
import torch.distributed.checkpoint  # imported before the baseline: not what consolidation holds
from nanoseek.checkpoint import consolidate, read_sharded_metadata

def status(field):  # kB -> bytes
    return int(re.search(field + r":\\s+(\\d+) kB", Path("/proc/self/status").read_text())[1]) * 1024

read_sharded_metadata(sys.argv[1])
Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS (VmHWM) to the current RSS
base = status("VmRSS")
summary = consolidate(sys.argv[1], sys.argv[2], max_shard_size=sys.argv[3])
print(json.dumps({"peak_increase": status("VmHWM") - base, "bytes": summary.bytes, "files": summary.files,
                  "largest_shard": summary.largest_shard}))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc peak-RSS reset")
def test_consolidation_memory_is_bounded_by_a_shard_not_the_model(tmp_path):
    """A 158 MB model (64 experts x 3 MoE layers of 0.8 MB each) consolidated into 8 MB shards in a
    fresh process: its peak RSS grows by a few shards (the tensors read, the slices cut from them,
    safetensors' serialized bytes), far below the model's size."""
    from nanoseek import ModelConfig, Transformer
    cfg = ModelConfig.preset("tiny", hidden_size=256, moe_intermediate_size=256, n_routed_experts=64,
                             n_group=1, topk_group=1, num_hidden_layers=4, num_nextn_predict_layers=0)
    torch.manual_seed(0)
    model = Transformer(cfg)
    model_bytes = sum(p.numel() * 4 for p in model.parameters())
    src = sharded_copy(model, tmp_path / "sharded")
    del model
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", CONSOLIDATE_RSS, str(src), str(tmp_path / "hf"), "8MB"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"consolidation of {model_bytes / 1e6:.0f} MB: {result}")
    assert result["bytes"] >= model_bytes > 140e6 and result["files"] >= 18
    # seen: +24 MB, 3 shards' worth: the tensors read, the slices cut from them, safetensors' bytes
    assert result["peak_increase"] < 5 * result["largest_shard"] and result["peak_increase"] < model_bytes / 4, result


def test_export_consolidate_command(corpus, tmp_path, capsys):
    """`nanoseek export consolidate RUN --out DIR` takes the run's newest checkpoint; a folder with no
    sharded checkpoint is one line on stderr and exit code 2."""
    from nanoseek.checkpoint import load_model
    from nanoseek.cli import main
    run = tmp_path / "run"
    train_here(base_recipe(corpus, run, max_steps=2, eval_every=0, checkpoint_format="sharded"))
    assert main(["export", "consolidate", str(run), "--out", str(tmp_path / "hf")]) == 0
    out = capsys.readouterr().out
    assert "step-0000002" in out and str(tmp_path / "hf") in out
    assert max_weight_diff(tmp_path / "hf", run / "model") == 0.0
    assert (tmp_path / "hf" / "tokenizer.json").exists() and load_model(tmp_path / "hf").config.vocab_size == 512

    full = tmp_path / "full"
    train_here(base_recipe(corpus, full, max_steps=1, eval_every=0))
    for source, message in ((tmp_path / "nothing", "neither a sharded checkpoint"),
                            (full, "is not sharded")):
        assert main(["export", "consolidate", str(source), "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1
