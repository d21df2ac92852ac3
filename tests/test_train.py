"""Training: recipes, schedules, losses, DeepSeek's balancing, checkpoints that resume bit for bit
(with a real SIGKILL), signals, non-finite losses, and the run folder's outputs."""

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nanoseek import ConfigError, load_model
from nanoseek.data import prepare
from nanoseek.errors import CheckpointError, DataError
from nanoseek.tokenizer import Tokenizer
from nanoseek.train import TrainingError, load_recipe, loop, train
from nanoseek.train.common import lr_at, masked_cross_entropy, update_routing_bias
from nanoseek.train.recipe import TrainRecipe

REPO = Path(__file__).resolve().parents[1]
SMALL_MODEL = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32,
               "num_hidden_layers": 2, "num_attention_heads": 2, "n_routed_experts": 8, "n_group": 2,
               "topk_group": 1, "num_experts_per_tok": 2, "q_lora_rank": 32, "kv_lora_rank": 16,
               "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A tokenizer and a prepared data folder from generated text (fast, no network)."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "moe", "expert", "latent", "token", "route", "cache"]
    files = []
    for i in range(12):
        text = "\n".join(" ".join(rng.choice(words) for _ in range(12)) + f" {rng.randint(0, 999)}."
                         for _ in range(60))
        f = root / f"doc{i}.txt"
        f.write_text(text)
        files.append(f)
    tok = Tokenizer.train((f.read_text() for f in files), vocab_size=400)
    tok.save(root / "tok")
    prepare(tok, files, root / "data", val_fraction=0.2, progress=False)
    return root


def recipe(corpus: Path, out: Path, **overrides) -> TrainRecipe:
    values = dict(out=str(out), data=str(corpus / "data"), tokenizer=str(corpus / "tok"), preset="tiny",
                  model=SMALL_MODEL, batch_size=2, seq_len=32, max_steps=6, eval_every=3, eval_batches=2,
                  save_every=3, warmup_steps=2, lr=3e-3, progress=False)
    values.update(overrides)
    return TrainRecipe(**values).validate()


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in rows}


# ---- recipes ------------------------------------------------------------------------------------
def test_recipe_files_and_overrides(tmp_path):
    toml = tmp_path / "r.toml"
    toml.write_text('data = "d"\npreset = "tiny"\nlr = 1e-3\nmax_steps = 5\n[model]\nnum_hidden_layers = 2\n')
    r = load_recipe(toml, {"max_steps": "7", "schedule": "wsd"})
    assert (r.lr, r.max_steps, r.schedule, r.model) == (1e-3, 7, "wsd", {"num_hidden_layers": 2})
    yaml_file = tmp_path / "r.yaml"
    yaml_file.write_text("data: d\npreset: tiny\nbatch_size: 3\n")
    assert load_recipe(yaml_file).batch_size == 3


@pytest.mark.parametrize("content, match", [
    ('data = "d"\npreset = "tiny"\nlearning_rate = 1\n', "unknown recipe field 'learning_rate'"),
    ('data = "d"\npreset = "tiny"\nmax_steps = "many"\n', "'max_steps'.* must be int"),
    ('data = "d"\npreset = "tiny"\nschedule = "linear"\n', "'schedule'"),
    ('data = "d"\n', "exactly one of preset, config, init_from"),
    ('data = "d"\npreset = "tiny"\nlr = \n', "cannot parse recipe"),
])
def test_bad_recipes_name_the_field(tmp_path, content, match):
    f = tmp_path / "bad.toml"
    f.write_text(content)
    with pytest.raises(ConfigError, match=match):
        load_recipe(f)


def test_schedules_by_hand():
    r = TrainRecipe(data="d", preset="tiny", lr=1.0, min_lr_ratio=0.1, warmup_steps=10, max_steps=110)
    assert lr_at(0, r) == pytest.approx(0.1) and lr_at(9, r) == pytest.approx(1.0)
    assert lr_at(60, r) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(110, r) == pytest.approx(0.1)
    w = TrainRecipe(data="d", preset="tiny", lr=1.0, min_lr_ratio=0.0, warmup_steps=0, max_steps=100,
                    schedule="wsd", wsd_decay_fraction=0.2)
    assert lr_at(50, w) == 1.0 and lr_at(90, w) == pytest.approx(0.5) and lr_at(100, w) == pytest.approx(0.0)


# ---- losses and balancing -----------------------------------------------------------------------
def test_masked_cross_entropy_counts_only_masked_targets():
    logits = torch.randn(2, 3, 5)
    targets = torch.tensor([[1, 2, 3], [4, 0, 1]])
    mask = torch.tensor([[True, False, True], [False, False, True]])
    per_token = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
    expected = per_token[mask.flatten()].mean()
    assert torch.allclose(masked_cross_entropy(logits, targets, mask), expected)


def test_bias_update_moves_against_load():
    from nanoseek import ModelConfig, Transformer
    model = Transformer(ModelConfig.preset("tiny"))
    moe = model.moe_layers()[0]
    load = torch.tensor([10, 0, 5, 5, 5, 5, 5, 5])  # mean 5: expert 0 over, expert 1 under, rest even
    update_routing_bias(model, [load] + [torch.full((8,), 5)] * (len(model.moe_layers()) - 1), gamma=0.01)
    assert moe.gate.e_score_correction_bias.tolist()[:3] == pytest.approx([-0.01, 0.01, 0.0])


# ---- runs ---------------------------------------------------------------------------------------
def test_run_folder_outputs(corpus, tmp_path, monkeypatch):
    kept = []  # a CPU run keeps freed memory for reuse (nanoseek.train.allocator; tests/test_allocator.py)
    monkeypatch.setattr(loop, "keep_freed_memory", lambda: kept.append(True))
    summary = train(recipe(corpus, tmp_path / "run", sample_every=3, sample_prompt="alpha"))
    assert kept == [True]
    run = tmp_path / "run"
    assert summary["step"] == 6 and not summary["interrupted"]
    model = load_model(run / "model")
    assert model.config.num_hidden_layers == 2 and (run / "model" / "tokenizer.json").exists()
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert "val_loss" in rows[2] and "sample" in rows[2] and rows[2]["sample"].startswith("alpha")
    assert len(rows[0]["expert_load"]) == 2 and sum(rows[0]["expert_load"][0]) == 2 * 32 * 2
    cost = json.loads((run / "cost.json").read_text())
    assert cost["tokens"] == 6 * 2 * 32 and cost["training_flops"] > 0 and cost["mfu"] > 0
    assert (run / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert any((run / "tb").iterdir())
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000003", "step-0000006"]


def test_resume_continues_exactly_in_process(corpus, tmp_path):
    train(recipe(corpus, tmp_path / "full", max_steps=6))
    train(recipe(corpus, tmp_path / "part", max_steps=3))
    train(recipe(corpus, tmp_path / "part", max_steps=6, resume=True))
    assert losses(tmp_path / "part") == losses(tmp_path / "full")


def test_sigkill_at_a_random_step_then_resume_is_bitwise_identical(corpus, tmp_path):
    """A real subprocess, killed with SIGKILL mid-run, resumed: same loss at every later step."""
    steps = 14
    common = ["--data", str(corpus / "data"), "--preset", "tiny", "--model", json.dumps(SMALL_MODEL),
              "--batch-size", "2", "--seq-len", "32", "--max-steps", str(steps), "--save-every", "1",
              "--eval-every", "0", "--warmup-steps", "2", "--progress", "false"]
    cmd = [sys.executable, "-m", "nanoseek", "train"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd + common + ["--out", str(tmp_path / "full")], check=True, env=env, cwd=REPO,
                   capture_output=True)
    kill_after = random.Random().randint(3, steps - 4)
    run = tmp_path / "killed"
    proc = subprocess.Popen(cmd + common + ["--out", str(run)], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (run / "metrics.jsonl").exists() and len(losses(run)) >= kill_after:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(losses(run))
    assert killed_at < steps, "the run finished before it could be killed"
    subprocess.run(cmd + common + ["--out", str(run), "--resume", "true"], check=True, env=env, cwd=REPO,
                   capture_output=True)
    full, resumed = losses(tmp_path / "full"), losses(run)
    assert sorted(resumed) == list(range(1, steps + 1))
    assert resumed == full  # exact float equality at every step, before and after the kill


def test_sigterm_saves_a_checkpoint_and_stops(corpus, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "nanoseek", "train", "--data", str(corpus / "data"), "--preset", "tiny",
           "--model", json.dumps(SMALL_MODEL), "--batch-size", "2", "--seq-len", "32", "--max-steps", "100000",
           "--save-every", "0", "--eval-every", "0", "--out", str(run), "--progress", "false"]
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not ((run / "metrics.jsonl").exists() and len(losses(run)) >= 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "stopped by a signal" in out
    saved = sorted((run / "checkpoints").iterdir())
    assert len(saved) == 1 and int(saved[0].name.split("-")[1]) == max(losses(run))


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(corpus, tmp_path, monkeypatch):
    import nanoseek.train.trainer as trainer
    real = trainer.training_loss
    calls = {"n": 0}

    def poisoned(model, batch, r, *rest):
        loss, parts = real(model, batch, r, *rest)
        calls["n"] += 1
        return (loss * float("nan"), parts) if calls["n"] == 5 else (loss, parts)

    monkeypatch.setattr(trainer, "training_loss", poisoned)
    run = tmp_path / "run"
    with pytest.raises(TrainingError, match="non-finite loss .* at step 5"):
        train(recipe(corpus, run, max_steps=10, save_every=2, eval_every=0))
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == ["step-0000002", "step-0000004"]
    load_model(run / "checkpoints" / "step-0000004" / "model")  # intact


def test_resume_mismatch_and_overwrite_protection(corpus, tmp_path):
    run = tmp_path / "run"
    train(recipe(corpus, run, max_steps=3))
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        train(recipe(corpus, run, max_steps=3))
    with pytest.raises(TrainingError, match="'seq_len' was 32 there and is 16 now"):
        train(recipe(corpus, run, max_steps=6, seq_len=16, resume=True))


def test_sft_trains_only_assistant_tokens_without_crossing_examples(tmp_path):
    tok = Tokenizer.train(["user asks a question and the assistant answers " * 50], vocab_size=300)
    tok.save(tmp_path / "tok")
    chats = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"what is {i} plus {i}?"},
                          {"role": "assistant", "content": str(2 * i), "reasoning_content": f"{i}+{i}"}]}
            for i in range(40)]
    chats.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prepare(tok, [chats], tmp_path / "data", progress=False)
    r = TrainRecipe(out=str(tmp_path / "run"), data=str(tmp_path / "data"), tokenizer=str(tmp_path / "tok"),
                    mode="sft", preset="tiny", model=dict(SMALL_MODEL, vocab_size=300), batch_size=2,
                    seq_len=64, max_steps=3, eval_every=0, save_every=0, progress=False).validate()
    from nanoseek.data import TokenLoader
    batch = TokenLoader(r.data, "train", batch_size=2, seq_len=64, whole_documents=True).next_batch()
    ids, mask = tok.encode_chat(rows[0]["messages"])
    assistant = [t for t, m in zip(ids, mask) if m]
    assert tok.decode(assistant) == "<think>\n0+0\n</think>\n\n0<｜end▁of▁sentence｜>"  # the reply only
    assert batch.input_segments.max() >= 1  # several examples packed per row
    summary = train(r)
    assert summary["step"] == 3


def test_compiled_training_matches_eager(corpus, tmp_path):
    """compile = true: torch.compile runs the model (routed experts stay eager) with the same losses,
    and the checkpoint it writes loads into a plain model."""
    train(recipe(corpus, tmp_path / "eager", max_steps=3, eval_every=0, save_every=3))
    train(recipe(corpus, tmp_path / "compiled", max_steps=3, eval_every=0, save_every=3, compile=True))
    eager, compiled = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert eager.keys() == compiled.keys() == {1, 2, 3}
    for step in eager:
        assert compiled[step] == pytest.approx(eager[step], rel=1e-4), step
    assert load_model(tmp_path / "compiled" / "model").config.num_hidden_layers > 0


def test_max_seconds_stops_with_a_checkpoint_and_the_config_stays_architecture(corpus, tmp_path):
    """max_seconds (CPU time) stops the loop after a step, with a checkpoint; the recipe's training
    knobs reach the MoE layers but never the model's config.json."""
    run = tmp_path / "run"
    summary = train(recipe(corpus, run, max_steps=50, max_seconds=1e-9, eval_every=0, aux_loss_alpha=0.01))
    assert summary["step"] == 1 and summary["stopped_by"] == "max_seconds" and summary["interrupted"]
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-0000001"]
    assert json.loads((run / "checkpoints" / "step-0000001" / "trainer.json").read_text())["cpu_seconds"] > 0
    saved = json.loads((run / "model" / "config.json").read_text())
    assert saved["aux_loss_alpha"] == 0.0 and "bias_update_speed" not in saved and "mtp_loss_weight" not in saved
    assert "aux_loss" in losses_rows(run)[0]  # the layers did use the recipe's alpha


def losses_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_single_process_stands_in_for_parallel():
    """loop.SingleProcess has the interface of distributed.Parallel that the loops use, over one rank."""
    from nanoseek.train.distributed import Parallel
    from nanoseek.train.loop import SingleProcess
    one = SingleProcess(torch.device("cpu"))
    for name in ("all_reduce_sum", "mean_floats", "all_reduce_max", "all_gather_rows", "any", "barrier",
                 "parallelize", "gather_model", "gather_optimizer", "shard_optimizer_state", "clip_grad_norm_",
                 "close", "rank", "world_size", "is_main"):
        assert hasattr(Parallel, name) and hasattr(one, name), name
    t = torch.arange(3)
    assert one.all_reduce_sum([t])[0] is t and one.mean_floats({"a": 0.5}) == {"a": 0.5}
    assert one.any(True) and not one.any(False) and one.all_reduce_max(3) == 3.0
    assert (one.rank, one.world_size, one.is_main) == (0, 1, True)


# ---- resume after a kill: stale staging folders, torn metrics, corrupt checkpoints ----------------
STAGE = ".{}.tmp-" + "0123456789abcdef" * 2  # a staging folder's name (runio.staged_dir)


def test_resume_removes_staging_folders_a_killed_writer_left(corpus, tmp_path):
    """kill -9 during a save leaves `.step-N.tmp-<uuid>` (and `.model.tmp-<uuid>`) folders; the next run
    in that folder removes them, and only them."""
    run = tmp_path / "run"
    train(recipe(corpus, run, max_steps=3))
    ckpts = run / "checkpoints"
    stale = [ckpts / STAGE.format("step-0000006"), ckpts / (STAGE.format("step-0000003") + ".old"),
             ckpts / ".tmp-step-0000005-x1y2", run / STAGE.format("model")]
    kept = [ckpts / ".notes", run / ".model.tmp-mine", run / STAGE.format("mine")]
    for d in stale + kept:
        d.mkdir()
        (d / "weights.bin").write_bytes(b"x" * 100)
    train(recipe(corpus, run, max_steps=6, resume=True))
    assert not [d for d in stale if d.exists()]
    assert all(d.exists() for d in kept)
    assert sorted(p.name for p in ckpts.glob("step-*")) == ["step-0000003", "step-0000006"]


def test_a_killed_swap_gets_its_old_folder_back(tmp_path):
    """Killed between swap_dir's two renames: the target is gone, `.{name}.tmp-<uuid>.old` holds it."""
    from nanoseek.runio import remove_stale_staging
    old = tmp_path / (STAGE.format("step-0000004") + ".old")
    old.mkdir()
    (old / "trainer.json").write_text("{}")
    (tmp_path / STAGE.format("step-0000004")).mkdir()  # the half-swapped new one
    removed = remove_stale_staging(tmp_path, r"step-\d+")
    assert (tmp_path / "step-0000004" / "trainer.json").exists() and len(removed) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-0000004"]


def test_resume_drops_a_torn_last_metrics_line(corpus, tmp_path):
    run = tmp_path / "run"
    train(recipe(corpus, run, max_steps=3))
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 5.1')  # what a kill mid-write leaves
    train(recipe(corpus, run, max_steps=6, resume=True))
    assert [r["step"] for r in losses_rows(run)] == [1, 2, 3, 4, 5, 6]


def test_resume_names_a_corrupt_metrics_line(corpus, tmp_path):
    run = tmp_path / "run"
    train(recipe(corpus, run, max_steps=3))
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines[1] = lines[1][:20]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"metrics.jsonl:2"):
        train(recipe(corpus, run, max_steps=6, resume=True))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


CORRUPTIONS = {
    "optimizer": lambda c: _truncate(c / "optimizer.safetensors"),
    "weights": lambda c: _truncate(c / "model" / "model.safetensors"),
    "rng": lambda c: _truncate(c / "rng.safetensors"),
    "trainer.json": lambda c: (c / "trainer.json").write_text('{"step": 4, "recip'),
}


@pytest.mark.parametrize("part", list(CORRUPTIONS))
def test_resume_falls_back_to_the_previous_checkpoint(corpus, tmp_path, part):
    """A checkpoint that does not load is skipped with a warning naming it; the run resumes from the one
    before (keep_last kept it) and continues exactly as an uninterrupted run."""
    train(recipe(corpus, tmp_path / "full", max_steps=6, save_every=2))
    run = tmp_path / "run"
    train(recipe(corpus, run, max_steps=4, save_every=2))
    CORRUPTIONS[part](run / "checkpoints" / "step-0000004")
    with pytest.warns(UserWarning, match="step-0000004.*falling back to .*step-0000002"):
        train(recipe(corpus, run, max_steps=6, save_every=2, resume=True))
    assert losses(run) == losses(tmp_path / "full")


def test_resume_with_no_loadable_checkpoint_is_one_clear_error(corpus, tmp_path, capsys):
    run = tmp_path / "run"
    train(recipe(corpus, run, max_steps=4, save_every=2))
    for step in ("step-0000002", "step-0000004"):
        _truncate(run / "checkpoints" / step / "optimizer.safetensors")
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="no checkpoint.*step-0000002.*step-0000004"):
        train(recipe(corpus, run, max_steps=6, save_every=2, resume=True))
    from nanoseek.cli import main
    (tmp_path / "r.json").write_text(json.dumps(recipe(corpus, run, max_steps=6, save_every=2,
                                                       resume=True).as_dict()))
    with pytest.warns(UserWarning):
        assert main(["train", "--recipe", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "optimizer.safetensors" in err[0]


def test_checkpoint_files_respect_the_umask(corpus, tmp_path):
    """safetensors' save_file writes through mkstemp (mode 0600): nanoseek's files are 0666 & ~umask."""
    run = tmp_path / "run"
    train(recipe(corpus, run, max_steps=3))
    umask = os.umask(0)
    os.umask(umask)
    files = [p for p in run.rglob("*.safetensors")]
    assert len(files) >= 4  # checkpoint weights, optimizer, rng; model/
    assert {oct(p.stat().st_mode & 0o777) for p in files} == {oct(0o666 & ~umask)}


def test_a_checkpoint_that_does_not_load_is_moved_aside_not_counted(corpus, tmp_path):
    """After falling back, the bad checkpoint is kept for inspection under a hidden name, so keep_last's
    pruning never deletes the good checkpoint the run resumed from in its favour."""
    run = tmp_path / "run"
    train(recipe(corpus, run, max_steps=4, save_every=2, keep_last=2))
    _truncate(run / "checkpoints" / "step-0000004" / "optimizer.safetensors")
    with pytest.warns(UserWarning, match="falling back"):
        train(recipe(corpus, run, max_steps=3, save_every=1, keep_last=2, resume=True))
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names[-2:] == ["step-0000002", "step-0000003"]
    assert len(names) == 3 and names[0].startswith(".corrupt-step-0000004-")
