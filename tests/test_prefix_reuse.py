"""Prefix reuse: identical prompts in one prefill (GRPO's groups, eval's k samples, distill's samples)
are prefilled once and their latent cache copied to every sample. The tokens drawn must be those of
the reference path (prefix_reuse=False: each prompt prefilled for itself) for the same seeds.

On this CPU (fp32) the prefill of the distinct prompts gives bitwise the logits and cache rows of the
repeated prefill (every op is row-wise in the batch), so tokens are compared exactly; logits are
compared to 1e-5 so that a BLAS that picks another kernel for another batch size still passes while
any real mix-up of rows (off by O(1)) fails."""

import sys

import pytest
import torch

from nanoseek import generate
from nanoseek.infer import Engine, SamplingParams, generate_batches

from conftest import random_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

# 4 distinct prompts of different lengths (so the prefill is left-padded), G = 4 samples each
PROMPTS = [[5, 17, 300, 42, 9, 1000, 3], [7, 7, 100], [500, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [12]]
G = 4


def model_for_test(seed=0):
    return random_tiny_model(seed, num_nextn_predict_layers=0)


def group_generators(n_groups: int, group: int, seed: int = 100) -> list[torch.Generator]:
    """GRPO's way: one generator per group, shared by its samples."""
    gens = [torch.Generator().manual_seed(seed + i) for i in range(n_groups)]
    return [g for g in gens for _ in range(group)]


def rollouts(model, prompts, reuse: bool, temperature: float, **kw):
    rows = [p for p in prompts for _ in range(G)]
    return generate(model, rows, max_new_tokens=24, temperature=temperature, prefix_reuse=reuse,
                    generator=group_generators(len(prompts), G), **kw)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_grouped_rollouts_draw_the_reference_tokens(temperature):
    model = model_for_test()
    ref = rollouts(model, PROMPTS, False, temperature)
    got = rollouts(model, PROMPTS, True, temperature)
    assert got == ref
    if temperature:  # the samples of a group differ: each drew its own tokens from the shared generator
        assert len({tuple(o) for o in got[:G]}) > 1


def test_one_generator_for_the_batch_and_scattered_duplicates():
    """Identical prompts need not be consecutive; a seed (one generator for the whole batch) too."""
    model = model_for_test(seed=1)
    rows = [PROMPTS[0], PROMPTS[1], PROMPTS[0], PROMPTS[2], PROMPTS[1], PROMPTS[0]]
    for kw in ({"seed": 3, "temperature": 1.0, "top_p": 0.9}, {"temperature": 0.0}):
        assert generate(model, rows, max_new_tokens=16, prefix_reuse=True, **kw) == \
            generate(model, rows, max_new_tokens=16, prefix_reuse=False, **kw)


def test_logits_of_every_step_match_the_reference():
    """The first token's logits come from the shared prefill, the later ones read the copied cache:
    the model's logprobs of every generated token agree with the reference path to 1e-5."""
    model = model_for_test(seed=2)
    rows = [p for p in PROMPTS for _ in range(G)]
    params = SamplingParams(max_tokens=12, temperature=1.0, logprobs=3)
    out = {}
    for reuse in (False, True):
        engine = Engine(model, max_batch=len(rows), prefill_chunk=1024, eos_ids=(), prefix_reuse=reuse)
        reqs = engine.generate(rows, params, generator=group_generators(len(PROMPTS), G))
        out[reuse] = ([r.output_ids for r in reqs],
                      torch.tensor([[t.logprob for t in r.pending_logprobs] for r in reqs]),
                      torch.tensor([[v for t in r.pending_logprobs for _, v in t.top] for r in reqs]))
        assert engine.stats["reused_prompts"] == (len(rows) - len(PROMPTS) if reuse else 0)
    assert out[True][0] == out[False][0]
    for a, b in zip(out[True][1:], out[False][1:]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_each_distinct_prompt_is_prefilled_once():
    model = model_for_test()
    engine = Engine(model, max_batch=16, prefill_chunk=1024, eos_ids=())
    shapes = []
    prefill = engine.decoder.prefill

    def recording(reqs, ids, *args, **kw):
        shapes.append((len(reqs), tuple(ids.shape)))
        return prefill(reqs, ids, *args, **kw)
    engine.decoder.prefill = recording
    engine.generate([p for p in PROMPTS for _ in range(G)], SamplingParams(max_tokens=4))
    assert shapes == [(len(PROMPTS) * G, (len(PROMPTS), max(map(len, PROMPTS))))]
    assert engine.stats["reused_prompts"] == len(PROMPTS) * (G - 1)
    assert engine.stats["prompt_tokens"] == G * sum(map(len, PROMPTS))  # still counted per request


def test_generate_batches_splitting_a_group_matches_the_reference(monkeypatch):
    """eval / distill: groups split across batches still draw the reference tokens (batch b: seed + b)."""
    gen = sys.modules["nanoseek.infer.generate"]  # the module (the package exports a function of its name)
    model = model_for_test(seed=3)
    rows = [p for p in PROMPTS for _ in range(3)]
    kw = dict(max_new_tokens=10, temperature=1.0, top_p=1.0, seed=5, eos_id=1023, batch_size=5)
    got = generate_batches(model, rows, **kw)
    reference, calls = gen.generate, []

    def without_reuse(*a, **k):
        calls.append(len(a[1]))
        return reference(*a, prefix_reuse=False, **k)
    monkeypatch.setattr(gen, "generate", without_reuse)
    assert got == generate_batches(model, rows, **kw)
    assert calls == [5, 5, 2]


def test_speculative_engine_prefills_every_request():
    """With MTP drafts the MTP cache's last slot depends on each request's first token: no reuse, and
    greedy tokens stay those of the plain engine."""
    model = random_tiny_model(4)
    rows = [PROMPTS[0]] * 3
    spec = Engine(model, max_batch=3, speculative=True, prefill_chunk=1024, eos_ids=())
    plain = Engine(model, max_batch=3, prefill_chunk=1024, eos_ids=())
    params = SamplingParams(max_tokens=10, temperature=0.0)
    assert [r.output_ids for r in spec.generate(rows, params)] == [r.output_ids for r in plain.generate(rows, params)]
    assert spec.stats["reused_prompts"] == 0 and plain.stats["reused_prompts"] == 2
