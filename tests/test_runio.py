"""The base I/O layer: atomic writes and folder swaps keep the old state on failure and leave no temp files."""

import json

import pytest

from nanoseek.runio import MetricsLogger, read_metrics, staged_dir, write_json_atomic, write_text_atomic


def test_write_json_atomic_round_trip_and_no_temp_left(tmp_path):
    target = tmp_path / "sub" / "x.json"
    write_json_atomic(target, {"a": 1})
    write_json_atomic(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 2}
    assert [p.name for p in target.parent.iterdir()] == ["x.json"]


def test_write_text_atomic_failure_keeps_the_old_file(tmp_path):
    target = tmp_path / "t.txt"
    write_text_atomic(target, "old\n")
    with pytest.raises(TypeError):
        write_text_atomic(target, None)  # type: ignore[arg-type]
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["t.txt"]


def test_staged_dir_swaps_in_on_success_and_keeps_selected_old_entries(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "weights.safetensors").write_text("old weights")
    (target / "notes.txt").write_text("keep me")
    with staged_dir(target, keep_old=lambda name: not name.endswith(".safetensors")) as tmp:
        (tmp / "config.json").write_text("{}")
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_staged_dir_failure_keeps_the_target_and_removes_the_stage(tmp_path):
    target = tmp_path / "data"
    target.mkdir()
    (target / "a").write_text("1")
    with pytest.raises(RuntimeError):
        with staged_dir(target) as tmp:
            (tmp / "b").write_text("2")
            raise RuntimeError("boom")
    assert [p.name for p in target.iterdir()] == ["a"]
    assert [p.name for p in tmp_path.iterdir()] == ["data"]


def test_metrics_logger_resume_drops_rows_after_the_checkpoint(tmp_path):
    log = MetricsLogger(tmp_path)
    for step in (1, 2, 3):
        log.log({"step": step, "loss": 1.0 / step})
    log.close()
    log = MetricsLogger(tmp_path, resume_step=2)
    log.log({"step": 3, "loss": 0.5})
    log.close()
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == [(1, 1.0), (2, 0.5), (3, 0.5)]
