"""nanoseek.generate: greedy equals transformers' generate, padding does not change results, sampling."""

import warnings

import pytest
import torch

from nanoseek import Transformer, generate, load_model, save_model
from nanoseek.infer.sampling import probabilities

from conftest import random_tiny_model


def tiny_model(seed=0, **overrides) -> Transformer:
    return random_tiny_model(seed, **{"num_nextn_predict_layers": 0, **overrides})


def test_greedy_equals_transformers_generate(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = tiny_model()
    save_model(model, tmp_path / "m")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    prompts = [[5, 17, 300, 42, 9, 1000, 3], [7, 7, 7, 100, 200, 300, 400]]
    ours = generate(model, prompts, max_new_tokens=64)
    with torch.no_grad():
        ref = hf.generate(torch.tensor(prompts), attention_mask=torch.ones(2, 7, dtype=torch.long),
                          max_new_tokens=64, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert ours == ref[:, 7:].tolist()
    assert all(len(r) == 64 for r in ours)


def test_left_padded_batch_equals_one_by_one():
    model = tiny_model(seed=1)
    prompts = [[1, 2, 3], [9, 8, 7, 6, 5, 4, 3, 2, 1], [500]]
    batched = generate(model, prompts, max_new_tokens=20)
    single = [generate(model, [p], max_new_tokens=20)[0] for p in prompts]
    assert batched == single


def test_eos_stops_and_is_included():
    model = tiny_model(seed=2)
    free = generate(model, [[1, 2, 3]], max_new_tokens=10)[0]
    eos = free[4]
    cut = generate(model, [[1, 2, 3]], max_new_tokens=10, eos_token_id=eos)[0]
    assert cut == free[: free.index(eos) + 1]


def test_sampling_is_reproducible_and_respects_top_k():
    model = tiny_model(seed=3)
    a = generate(model, [[1, 2, 3]] * 3, max_new_tokens=12, temperature=1.0, top_p=0.9, seed=7)
    b = generate(model, [[1, 2, 3]] * 3, max_new_tokens=12, temperature=1.0, top_p=0.9, seed=7)
    assert a == b
    logits = torch.tensor([[0.0, 5.0, 4.0, -1.0]]).repeat(200, 1)
    g = torch.Generator().manual_seed(0)
    picks = torch.multinomial(probabilities(logits, 1.0, top_k=2), 1, generator=g).squeeze(-1)
    assert set(picks.tolist()) == {1, 2}
    picks = torch.multinomial(probabilities(logits, 1.0, top_p=0.5), 1, generator=g).squeeze(-1)
    assert set(picks.tolist()) == {1}  # the top token alone already holds > 50%


def test_bad_prompts():
    model = tiny_model()
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate(model, [[1, 99999]], max_new_tokens=2)
    with pytest.raises(ValueError, match="non-empty"):
        generate(model, [[]], max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, [[1]], max_new_tokens=0)


def test_generate_on_loaded_bf16_model(tmp_path):
    model = tiny_model()
    save_model(model, tmp_path / "m", dtype=torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = load_model(tmp_path / "m")
    assert loaded.dtype == torch.bfloat16
    out = generate(loaded, [[1, 2, 3]], max_new_tokens=4)
    assert len(out[0]) == 4
