"""Fixtures shared by several test modules: one CPU thread for tiny models, the toy chat model, a random
tiny MoE with a byte-level tokenizer for the reasoning tasks, and a small training corpus. Tests marked
`cuda` (see pyproject.toml) are skipped, with the reason, where torch sees no CUDA device."""

from __future__ import annotations

import json
import os
import random

import pytest
import torch

# `precision = "auto"` (the recipes' default) means fp32 in tests unless a test asks otherwise: the tests
# that compare numbers stay on the fp32 reference path on every machine, AMX or not, and no test pays
# the bf16 probe (tests/test_precision.py and tests/test_bf16_train.py set what they test explicitly)
os.environ.setdefault("NANOSEEK_BF16", "0")
# decode steps run eagerly in tests unless a test asks for the compiled step (tests/test_compiled_decode.py):
# no test pays a torch.compile warm-up or the compile probe by default
os.environ.setdefault("NANOSEEK_COMPILE", "0")

# a random tiny MoE for the reasoning tests: byte-level vocabulary, 4 experts, no MTP
TINY_TASK_MODEL = dict(vocab_size=272, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                       num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=2, n_routed_experts=4,
                       n_group=1, topk_group=1, num_experts_per_tok=2, q_lora_rank=16, kv_lora_rank=16,
                       qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, max_position_embeddings=256,
                       num_nextn_predict_layers=0)


def pytest_collection_modifyitems(config, items):
    """Skip the `cuda` tests on a machine without a CUDA device (`pytest -m cuda` selects them)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run as fast on one thread, and much faster when other processes share the CPU.
    Modules use it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def toy(tmp_path_factory):
    """A tiny model (with MTP) that memorized R1-style conversations, and its tokenizer (on disk)."""
    from toy import make_toy_chat_model
    path = tmp_path_factory.getbasetemp() / "toy-chat"
    if not (path / "config.json").exists():
        make_toy_chat_model(path)
    return path


def random_experts(n_experts: int, hidden: int, intermediate: int, seed: int, std: float = 0.3):
    """Stacked routed experts (nanoseek.model.RoutedExperts) with N(0, std) weights from `seed`."""
    from nanoseek.model import RoutedExperts
    torch.manual_seed(seed)
    experts = RoutedExperts(n_experts, hidden, intermediate)
    with torch.no_grad():
        experts.gate_up.normal_(0, std)
        experts.down.normal_(0, std)
    return experts


def random_tiny_model(seed: int = 0, **overrides):
    """A random tiny-preset Transformer in eval mode (weights N(0, 0.1) from `seed`, with a random routing
    bias so selection differs from the unbiased scores); `overrides` are ModelConfig fields."""
    from nanoseek import ModelConfig, Transformer
    cfg = ModelConfig.preset("tiny", **{"initializer_range": 0.1, **overrides})
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for moe in model.moe_layers():
            moe.gate.e_score_correction_bias.normal_(0, 0.1)
    return model


def save_task_model(root, **model):
    """A random tiny-preset model (with `model` overrides, seed 0) and a byte-level tokenizer trained on
    addition3 text, saved together in `root` (an HF model folder); returns root."""
    import nanoseek
    from nanoseek import ModelConfig, Transformer
    from nanoseek.tasks import get_task
    from nanoseek.tokenizer import Tokenizer
    task = get_task("addition3")
    tok = Tokenizer.train([task.completion(p) + p.prompt for p in task.generate(20)], vocab_size=263)
    torch.manual_seed(0)
    nanoseek.save_model(Transformer(ModelConfig.preset("tiny", **model)), root)
    tok.save(root)
    return root


@pytest.fixture(scope="session")
def tiny_task_model(tmp_path_factory):
    """A random TINY_TASK_MODEL with a byte-level tokenizer (trained on addition3 text) beside it."""
    return save_task_model(tmp_path_factory.mktemp("tiny-task") / "model", **TINY_TASK_MODEL)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A tokenizer, a pretraining data folder and a chat (SFT) data folder; no network (the training
    tests on several processes, and on CUDA)."""
    from nanoseek.data import prepare
    from nanoseek.tokenizer import Tokenizer
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "moe", "expert", "latent", "token", "route", "cache"]
    files = []
    for i in range(12):
        f = root / f"doc{i}.txt"
        f.write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) + f" {rng.randint(0, 999)}."
                               for _ in range(60)))
        files.append(f)
    tok = Tokenizer.train((f.read_text() for f in files), vocab_size=400)
    tok.save(root / "tok")
    prepare(tok, files, root / "data", val_fraction=0.2, progress=False)
    chats = root / "chat.jsonl"  # replies of very different lengths: ranks hold different target counts
    chats.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"route token {i} to which expert?"},
        {"role": "assistant", "content": " ".join(rng.choice(words) for _ in range(rng.randint(1, 12)))}]}) + "\n"
        for i in range(80)))
    prepare(tok, [chats], root / "sft", val_fraction=0.2, progress=False)
    return root
