"""Loading a checkpoint folder straight into int8 (`nanoseek.infer.int8_load`): the same model, bit for
bit, as quantizing the fp32 load (bf16, fp32, FP8, sharded, tied, MTP checkpoints), errors that name the
file and tensor, and `--quantize int8` taking this path."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import random_tiny_model, save_task_model

from nanoseek import load_model, save_model
from nanoseek.checkpoint import inspect_checkpoint
from nanoseek.errors import CheckpointError
from nanoseek.infer.int8_load import load_int8_model, load_int8_model_and_tokenizer
from nanoseek.infer.quant import QUANTIZE_CHUNK, int8_copy, is_quantized, quantize_rows, quantize_rows_into

pytestmark = pytest.mark.usefixtures("one_thread")


def all_tensors(model) -> dict[str, torch.Tensor]:
    """Every parameter and buffer, persistent or not (the kernel's bf16 scales too)."""
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def assert_same_model(got, want):
    a, b = all_tensors(got), all_tensors(want)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    x = torch.randint(0, want.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(got(x), want(x))


@pytest.mark.parametrize("dtype,shard,overrides", [
    (torch.bfloat16, "300KB", {}),  # several shards, the DeepSeek-V2/V3 layout stored in bf16
    (torch.float32, "5GB", {"tie_word_embeddings": True}),  # one file; lm_head quantized from the embedding
    (torch.bfloat16, "5GB", {"num_nextn_predict_layers": 1}),  # an MTP layer (its Linears quantized too)
])
def test_streamed_int8_equals_quantizing_the_fp32_load(tmp_path, dtype, shard, overrides):
    save_model(random_tiny_model(**overrides), tmp_path, dtype=dtype, max_shard_size=shard)
    streamed = load_int8_model(tmp_path)
    assert is_quantized(streamed) and not streamed.training and streamed.dtype == torch.float32
    assert_same_model(streamed, int8_copy(load_model(tmp_path, dtype=torch.float32)))


def test_streamed_int8_from_fp8_weights(fp8_folder):
    assert_same_model(load_int8_model(fp8_folder), int8_copy(load_model(fp8_folder, dtype=torch.float32)))


@pytest.fixture
def fp8_folder(tmp_path):
    """A bf16 checkpoint whose attention projections are stored as FP8 e4m3 with 128x128 block scales."""
    save_model(random_tiny_model(), tmp_path, dtype=torch.bfloat16)
    from safetensors.torch import load_file, save_file
    tensors = load_file(tmp_path / "model.safetensors")
    for key in [k for k in tensors if k.endswith(("q_proj.weight", "o_proj.weight"))]:
        w = tensors[key].float()
        rows, cols = (-(-d // 128) for d in w.shape)
        scale = torch.rand(rows, cols) * 0.01 + 0.001
        full = scale.repeat_interleave(128, 0)[: w.shape[0]].repeat_interleave(128, 1)[:, : w.shape[1]]
        tensors[key] = (w / full).to(torch.float8_e4m3fn)
        tensors[key + "_scale_inv"] = scale
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    return tmp_path


def test_quantize_rows_into_is_quantize_rows_in_blocks(monkeypatch):
    monkeypatch.setattr("nanoseek.infer.quant.QUANTIZE_CHUNK", 3 * 40)  # blocks of 3 rows, the last one short
    w = torch.randn(10, 40).bfloat16()
    q, s, sb = torch.empty(10, 40, dtype=torch.int8), torch.empty(10), torch.empty(10, dtype=torch.bfloat16)
    quantize_rows_into(w, q, s, sb)
    want_q, want_s = quantize_rows(w.float())
    assert torch.equal(q, want_q) and torch.equal(s, want_s) and torch.equal(sb, want_s.bfloat16())
    assert QUANTIZE_CHUNK >= 1 << 14  # the real blocks are not tiny: few calls per tensor


# ---- bad checkpoints -----------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path):
    save_model(random_tiny_model(), tmp_path, dtype=torch.bfloat16)
    return tmp_path


def test_a_truncated_shard_names_the_file(saved):
    f = saved / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated: tensor '"):
        load_int8_model(saved)


def test_a_misshaped_tensor_names_it(saved):
    from safetensors.torch import load_file, save_file
    tensors = load_file(saved / "model.safetensors")
    key = "model.layers.1.mlp.experts.0.up_proj.weight"
    tensors[key] = tensors[key][:-1].clone()
    save_file(tensors, saved / "model.safetensors")
    with pytest.raises(CheckpointError, match=f"tensor '{key}' has shape"):
        load_int8_model(saved)


@pytest.mark.parametrize("key", ["model.layers.1.mlp.experts.3.down_proj.weight",
                                 "model.layers.0.self_attn.o_proj.weight"])
def test_a_non_finite_weight_names_the_tensor(saved, key):
    from safetensors.torch import load_file, save_file
    tensors = load_file(saved / "model.safetensors")
    tensors[key][2, 5] = float("nan")
    save_file(tensors, saved / "model.safetensors")
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: tensor '{key}' holds NaN or infinite"):
        load_int8_model(saved)


def test_missing_folder_and_config_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint folder not found"):
        load_int8_model(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_int8_model(tmp_path)


def test_inspect_checkpoint_reads_no_weight(saved):
    contents = inspect_checkpoint(saved)
    assert all(p.is_meta for p in contents.model.parameters())
    keys = [key for key, *_ in contents.reads()]
    assert sorted(keys) == sorted(contents.expected)
    offsets = [info.offset for _, info, _, _ in contents.reads()]
    assert offsets == sorted(offsets)  # one sequential pass over the file


# ---- the commands' --quantize int8 ---------------------------------------------------------------
def test_load_engine_int8_streams_and_never_loads_full_precision(tmp_path, monkeypatch):
    from nanoseek.serve import load_engine
    folder = save_task_model(tmp_path / "m")
    want = int8_copy(load_model(folder, dtype=torch.float32))

    def refuse(*args, **kwargs):
        raise AssertionError("load_model was called for --quantize int8")
    monkeypatch.setattr("nanoseek.checkpoint.load_model", refuse)
    engine, _ = load_engine(folder, max_batch=2, quantize="int8")
    assert engine.precision_plan.name == "int8" and engine.model is not None
    assert_same_model(engine.model, want)


def test_eval_quantize_int8_loads_streamed(tmp_path, monkeypatch, capsys):
    from nanoseek.cli import main
    folder = save_task_model(tmp_path / "m")
    calls = []

    def spy(path, tokenizer=None):
        calls.append(path)
        return load_int8_model_and_tokenizer(path, tokenizer)
    monkeypatch.setattr("nanoseek.commands.rl.load_int8_model_and_tokenizer", spy)
    assert main(["eval", str(folder), "--task", "addition3", "--n", "2", "--k", "0", "--quantize", "int8",
                 "--max-new-tokens", "4", "--json"]) == 0
    assert calls == [folder]
    assert json.loads(capsys.readouterr().out)["precision"] == "int8"
