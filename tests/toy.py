"""A toy chat model: a tiny nanoseek model (MTP included) that memorized a few R1-style conversations.

A test fixture (tests/conftest.py's `toy`; bench/serve.py and docs/inference.md use it too): exercises
the inference stack without downloads. Greedy decoding replays the memorized replies exactly (a think
block, then an answer with multi-byte characters, then end-of-sentence), and its MTP head has learned
to draft them, so speculative decoding accepts drafts. Builds in a few seconds on a CPU.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from nanoseek.checkpoint import save_model
from nanoseek.config import ModelConfig
from nanoseek.model import Transformer
from nanoseek.tokenizer import Tokenizer

CONVERSATIONS = [
    ("hi", "The user greets me. I greet back.", "Hello! 你好 👋 How can I help?"),
    ("What is 2+2?", "Two plus two is four.", "2+2 = 4. Voilà, déjà vu: ça marche."),
    ("Tell me a story", "A short story.", "Once upon a time a small cat lived by the sea. Ende."),
    ("html?", "Markup.", "<i>not italic</i> & <script>alert(1)</script>"),
]


# 2 layers (dense + MoE with 4 experts, top-2), MTP depth 1: ~0.2M parameters
TOY_SIZES = dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
                 num_attention_heads=2, n_routed_experts=4, n_group=1, topk_group=1, num_experts_per_tok=2,
                 q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                 num_nextn_predict_layers=1)


def toy_corpus(seed: int = 0) -> list[str]:
    """Text to train the toy tokenizer on: the conversations plus filler words (multi-byte characters
    stay rare, so they are split across byte tokens, which is what streaming tests need)."""
    rng = random.Random(seed)
    words = "the a cat sea boat fish story user help two plus four time small morning friend".split()
    texts = [f"{q} {t} {a}" for q, t, a in CONVERSATIONS]
    texts += [" ".join(rng.choice(words) for _ in range(20)) for _ in range(200)]
    return texts


def make_toy_chat_model(path: str | Path, *, steps: int = 150, seed: int = 0, vocab_size: int = 384) -> Path:
    """Train the tokenizer and the model; save an HF-format folder (config, weights, tokenizer) at path."""
    path = Path(path)
    tok = Tokenizer.train(toy_corpus(seed), vocab_size=vocab_size)
    cfg = ModelConfig.preset("tiny", vocab_size=tok.vocab_size, max_position_embeddings=512, **TOY_SIZES)
    torch.manual_seed(seed)
    model = Transformer(cfg)
    rows = []
    for q, thought, answer in CONVERSATIONS:
        messages = [{"role": "user", "content": q},
                    {"role": "assistant", "content": answer, "reasoning_content": thought}]
        rows.append(tok.apply_chat_template(messages))
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), tok.pad_id)
    mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = True
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: threads only add overhead (and thrash on a busy machine)
    try:
        _train(model, ids, mask, steps)
    finally:
        torch.set_num_threads(threads)
    model.eval()
    save_model(model, path)
    tok.save(path)
    return path


def _train(model, ids, mask, steps):
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(steps):
        logits, (mtp,) = model(ids, return_mtp=True)
        loss = _masked_ce(logits[:, :-1], ids[:, 1:], mask[:, 1:])
        loss = loss + _masked_ce(mtp[:, :-1], ids[:, 2:], mask[:, 2:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def _masked_ce(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                                             reduction="none")
    return (loss * mask.reshape(-1)).sum() / mask.sum()
