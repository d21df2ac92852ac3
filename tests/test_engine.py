"""Generation engine: greedy parity (nanoseek.generate, transformers), self-speculative decoding with MTP
(identical greedy tokens, exact sampling distribution), streaming text that never splits a character,
stop strings and tokens, continuous batching (joins, chunked prefill, cancellation, compaction), the
scheduler thread, and the text helpers."""

import asyncio
import threading

import pytest
import torch

from nanoseek import Transformer, generate, load_model, save_model
from nanoseek.infer import (Engine, IncrementalDetokenizer, ReasoningSplitter, SamplingParams, StopStrings,
                            load_tokenizer)
from nanoseek.infer.request import Request
from nanoseek.infer.scheduler import QueueFull, Scheduler
from conftest import random_tiny_model
from toy import CONVERSATIONS

PROMPTS = [[5, 17, 300, 42, 9, 1000, 3], [7, 7, 100], [1], [900, 800, 700, 600, 500, 400, 300, 200, 100, 50, 25]]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def toy_model(toy):
    return load_model(toy), load_tokenizer(toy)


def random_model(seed=0, mtp=1) -> Transformer:
    return random_tiny_model(seed, num_nextn_predict_layers=mtp)


def greedy(n, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, **kw)


def alone(model, prompt, params, **engine_kw):
    return Engine(model, max_batch=1, **engine_kw).generate([prompt], params)[0]


def chat_ids(tok, question):
    return tok.chat_prompt([{"role": "user", "content": question}])[0]


def expected_text(i):
    _, thought, answer = CONVERSATIONS[i]
    return f"{thought}\n</think>\n\n{answer}"


# ---- greedy parity ---------------------------------------------------------------------------------
def test_greedy_engine_equals_generate_and_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = random_model(mtp=0)
    ours = [r.output_ids for r in Engine(model, max_batch=4).generate(PROMPTS, greedy(24))]
    assert ours == generate(model, PROMPTS, max_new_tokens=24)
    save_model(model, tmp_path / "m")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    with torch.no_grad():
        for prompt, out in zip(PROMPTS, ours):
            ref = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)
            assert out == ref[0, len(prompt):].tolist()


# ---- speculative decoding --------------------------------------------------------------------------
def test_speculative_greedy_is_identical_on_a_random_model():
    """Random MTP weights: drafts are (almost) always rejected; the tokens must not change."""
    model = random_model(seed=1)
    plain = [r.output_ids for r in Engine(model, max_batch=2).generate(PROMPTS, greedy(20))]
    spec = Engine(model, max_batch=2, speculative=True)
    assert [r.output_ids for r in spec.generate(PROMPTS, greedy(20))] == plain
    assert spec.stats["drafted"] > 0


def test_speculative_greedy_on_a_trained_mtp_head(toy_model):
    """The toy model's MTP head drafts its memorized replies: high acceptance, fewer steps, same tokens;
    with ignore_eos it runs past them into text it never saw (rejections and holes in the cache)."""
    model, tok = toy_model
    prompts = [chat_ids(tok, q) for q, _, _ in CONVERSATIONS]
    rates = []
    for params in (greedy(80), greedy(90, ignore_eos=True)):
        plain = Engine(model, tok, max_batch=4)
        spec = Engine(model, tok, max_batch=4, speculative=True)
        a, b = plain.generate(prompts, params), spec.generate(prompts, params)
        if not params.ignore_eos:
            assert [r.text for r in b] == [expected_text(i) for i in range(len(prompts))]
        assert [r.output_ids for r in b] == [r.output_ids for r in a]
        assert [r.text for r in b] == [r.text for r in a]
        assert spec.stats["steps"] < plain.stats["steps"]
        rates.append(spec.acceptance_rate())
    assert [r.text for r in b] != [expected_text(i) for i in range(len(prompts))]  # ran past the replies
    assert rates[0] > 0.9  # the memorized replies
    assert 0.3 < rates[1] < rates[0]  # beyond them, drafts fail more often


def test_speculative_sampling_keeps_the_target_distribution():
    """Accept d ~ q with min(1, p/q), else resample from max(p - q, 0): the token is distributed as p."""
    model = random_model(seed=2)
    engine = Engine(model, speculative=True)
    V = model.config.vocab_size
    logits = torch.full((1, 2, V), -1e9)
    logits[0, :, :4] = torch.tensor([1.0, 0.5, 0.0, -1.0])
    p = logits[0, 0].softmax(-1)[:4]
    q = torch.zeros(V)
    q[:4] = torch.tensor([0.1, 0.6, 0.2, 0.1])
    req = Request("r", [1], SamplingParams(temperature=1.0))
    req.generator = torch.Generator().manual_seed(0)
    req.draft_q = q
    draw = torch.Generator().manual_seed(1)
    counts = torch.zeros(4)
    trials = 3000
    for _ in range(trials):
        req.draft = int(torch.multinomial(q, 1, generator=draw))
        (tokens, _), = engine.decoder.verify([req], logits)
        counts[tokens[0]] += 1
    assert torch.allclose(counts / trials, p, atol=0.03), (counts / trials, p)


def test_speculative_needs_mtp():
    with pytest.raises(ValueError, match="MTP"):
        Engine(random_model(mtp=0), speculative=True)


# ---- streaming text --------------------------------------------------------------------------------
def test_streaming_never_emits_half_a_character(toy_model):
    model, tok = toy_model
    engine = Engine(model, tok)
    req = engine.add(chat_ids(tok, "hi"), greedy(80))
    deltas = []
    while not req.finished:
        deltas += [o.text for o in engine.step()]
    assert req.text == expected_text(0) and req.finish_reason == "stop"
    assert "".join(deltas) == req.text
    assert all("\ufffd" not in d for d in deltas)
    split = [t for t in req.output_ids if "\ufffd" in tok.decode([t])]
    assert split, "the test needs a reply whose characters span several tokens"
    assert "" in deltas  # a step that produced only part of a character emitted nothing


def test_incremental_detokenizer(toy_model):
    _, tok = toy_model
    text = "déjà vu: 你好 👋 ça"
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok.decode)
    pieces = [detok.push(t) for t in ids] + [detok.flush()]
    assert "".join(pieces) == text and all("\ufffd" not in p for p in pieces)
    lone = tok.encode("你")[:1]  # the first byte of a 3-byte character, alone
    detok = IncrementalDetokenizer(tok.decode)
    assert detok.push(lone[0]) == "" and detok.flush() == "\ufffd"


# ---- stops -----------------------------------------------------------------------------------------
def test_stop_strings_tokens_and_max_tokens(toy_model):
    model, tok = toy_model
    prompt = chat_ids(tok, "hi")
    full = expected_text(0)
    engine = Engine(model, tok, max_batch=4)
    end_think = tok.end_think_id
    reqs = engine.generate([prompt] * 4, [greedy(80, stop=["你好"]), greedy(80, stop=("xyz", "greets")),
                                          greedy(80, stop_token_ids=(end_think,)), greedy(5)])
    assert (reqs[0].text, reqs[0].finish_reason) == (full[: full.index("你好")], "stop")
    assert (reqs[1].text, reqs[1].finish_reason) == ("The user ", "stop")
    assert reqs[2].output_ids[-1] == end_think and reqs[2].text == full[: full.index("</think>")]
    assert (len(reqs[3].output_ids), reqs[3].finish_reason) == (5, "length")
    eos = Engine(model, tok).generate([prompt], greedy(80))[0]
    assert eos.output_ids[-1] == tok.eos_ids[0] and "<｜end" not in eos.text  # EOS stops, not shown


def test_stop_strings_hold_back_only_what_could_start_a_stop():
    s = StopStrings(["xyz"])
    assert s.push("abx") == ("a", False)
    assert s.push("y") == ("b", False)
    assert s.push("q") == ("x", False)
    assert s.flush() == "yq"
    s = StopStrings(["cd", "zzz"])
    assert s.push("ab") == ("", False)
    assert s.push("c") == ("a", False)
    assert s.push("de") == ("b", True)


@pytest.mark.parametrize("thinking, text", [(True, "A B\n</think>\n\nAnswer 你好"),
                                            (False, "<think>\nA B\n</think>\n\nAnswer 你好")])
def test_reasoning_split_at_every_chunk_boundary(thinking, text):
    for i in range(len(text) + 1):
        for j in range(i, len(text) + 1, 3):
            s = ReasoningSplitter(thinking)
            parts = [s.push(text[:i]), s.push(text[i:j]), s.push(text[j:]), s.flush()]
            assert "".join(p[0] for p in parts) == "A B", (i, j)
            assert "".join(p[1] for p in parts) == "Answer 你好", (i, j)


def test_reasoning_split_without_a_closing_tag_or_a_think_block():
    s = ReasoningSplitter(True)
    assert s.push("still thinking\n") == ("still thinking", "") and s.flush() == ("", "")
    s = ReasoningSplitter(False)
    assert s.push("plain") == ("", "plain")


# ---- continuous batching ---------------------------------------------------------------------------
def test_requests_joining_midway_get_the_same_tokens_as_alone():
    model = random_model(seed=3, mtp=0)
    params = [greedy(30), greedy(12), greedy(25), greedy(20)]
    ref = [alone(model, p, sp).output_ids for p, sp in zip(PROMPTS, params)]
    engine = Engine(model, max_batch=3, prefill_chunk=4)  # the 11-token prompt is prefilled in 3 chunks
    reqs = [engine.add(PROMPTS[0], params[0])]
    got_token = []
    for step in range(14):
        if step == 3:
            reqs.append(engine.add(PROMPTS[3], params[3]))
        if step == 5:
            reqs += [engine.add(PROMPTS[1], params[1]), engine.add(PROMPTS[2], params[2])]  # one must wait
        outs = {o.request_id: o for o in engine.step()}
        got_token.append(bool(outs.get(reqs[0].request_id) and outs[reqs[0].request_id].token_ids))
    while engine.has_work:
        engine.step()
    assert got_token[0] is False and all(got_token[1:])  # 7 prompt tokens take 2 steps; then a token
    # at every step, while the long prompt is prefilled in chunks and others join
    order = [0, 3, 1, 2]
    assert [r.output_ids for r in reqs] == [ref[i] for i in order]


def test_cancel_frees_the_slot_for_a_waiting_request():
    model = random_model(seed=4, mtp=0)
    engine = Engine(model, max_batch=1)
    long = engine.add(PROMPTS[0], greedy(200))
    waiting = engine.add(PROMPTS[1], greedy(10))
    for _ in range(3):
        assert waiting.request_id not in {o.request_id for o in engine.step()}
    assert engine.cancel(long.request_id)
    outs = {o.request_id: o for o in engine.step()}
    assert outs[long.request_id].finish_reason == "cancelled"
    assert outs[waiting.request_id].token_ids  # admitted in the same step
    while engine.has_work:
        engine.step()
    assert waiting.output_ids == alone(model, PROMPTS[1], greedy(10)).output_ids


@pytest.mark.parametrize("speculative", [False, True])
def test_cache_compaction_and_growth_keep_outputs(speculative):
    """A small context forces the shared cache to compact (dropping the left padding of rows that
    joined late and rejected drafts) and to grow; nothing changes in the tokens."""
    model = random_model(seed=5)
    kw = dict(max_model_len=32, speculative=speculative)  # at most 32 + 16 cache slots
    params = [greedy(24), greedy(20), greedy(25)]
    prompts = [PROMPTS[0], PROMPTS[3], PROMPTS[1]]
    ref = [alone(model, p, sp, **kw).output_ids for p, sp in zip(prompts, params)]
    engine = Engine(model, max_batch=3, **kw)
    reqs = [engine.add(prompts[0], params[0])]
    for step in range(60):
        if step in (10, 18):
            reqs.append(engine.add(prompts[len(reqs)], params[len(reqs)]))
        if not engine.has_work:
            break
        engine.step()
    assert [r.output_ids for r in reqs] == ref
    assert engine.stats["compactions"] > 0


def test_a_request_joining_a_cache_full_of_holes_compacts_it():
    """Rows that run on while others leave and join keep the shared length growing (two slots a step
    with speculation) and fill the cache with holes; a join then compacts instead of overflowing."""
    model = random_model(seed=0)
    engine = Engine(model, max_batch=4, max_model_len=48, prefill_chunk=64, speculative=True)
    reqs = [engine.add(p, SamplingParams(max_tokens=40 - len(p), temperature=1.0, seed=i))
            for i, p in enumerate(PROMPTS * 3)]
    while engine.has_work:
        engine.step()
    assert all(r.finish_reason == "length" and len(r.output_ids) == 40 - len(r.prompt) for r in reqs)
    assert engine.stats["compactions"] > 1


def test_context_length_caps_generation():
    model = random_model(seed=6, mtp=0)
    engine = Engine(model, max_model_len=10)
    r = engine.generate([PROMPTS[0]], greedy(100))[0]
    assert (len(r.output_ids), r.finish_reason) == (3, "length")
    with pytest.raises(ValueError, match="context length is 10"):
        engine.add(list(range(10)), greedy(1))


def test_seeded_sampling_does_not_depend_on_the_batch():
    model = random_model(seed=7, mtp=0)
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, top_k=50, seed=11)
    solo = alone(model, PROMPTS[0], params).output_ids
    engine = Engine(model, max_batch=3)
    reqs = engine.generate([PROMPTS[1], PROMPTS[0], PROMPTS[0]],
                           [SamplingParams(max_tokens=8, temperature=1.0, seed=1), params,
                            SamplingParams(max_tokens=12, temperature=1.0, seed=12)])
    assert reqs[1].output_ids == solo
    assert reqs[2].output_ids != solo


def test_bad_requests():
    model = random_model(mtp=0)
    engine = Engine(model, max_model_len=64)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.add([1, 99999])
    with pytest.raises(ValueError, match="non-empty"):
        engine.add([])
    with pytest.raises(ValueError, match="tokenizer"):
        engine.add([1], greedy(2, stop=["x"]))
    for bad, match in ((dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"), (dict(max_tokens=0),
                       "max_tokens"), (dict(top_k=-2), "top_k"), (dict(stop=[""]), "stop")):
        with pytest.raises(ValueError, match=match):
            SamplingParams(**bad)


# ---- the scheduler thread --------------------------------------------------------------------------
def test_scheduler_serves_concurrent_callers_and_cancels(toy_model):
    model, tok = toy_model
    scheduler = Scheduler(Engine(model, tok, max_batch=2), max_waiting=2)
    try:
        results = {}

        def ask(i):
            q = CONVERSATIONS[i % len(CONVERSATIONS)][0]
            outs = list(scheduler.stream_sync(chat_ids(tok, q), greedy(80)))
            results[i] = "".join(o.text for o in outs), outs[-1].finish_reason

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert results == {i: (expected_text(i % len(CONVERSATIONS)), "stop") for i in range(4)}

        async def first_two():
            outs = []
            async for out in scheduler.stream(chat_ids(tok, "hi"), greedy(80, ignore_eos=True)):
                outs.append(out)
                if len(outs) == 2:
                    break  # leaving the stream cancels the request
            return outs

        assert len(asyncio.run(first_two())) == 2
        for _ in range(200):
            if scheduler.in_flight == 0:
                break
            threading.Event().wait(0.01)
        assert scheduler.in_flight == 0
        sinks = [scheduler.submit(chat_ids(tok, "hi"), greedy(80, ignore_eos=True), lambda o: None)
                 for _ in range(scheduler.capacity)]
        with pytest.raises(QueueFull):
            scheduler.submit(chat_ids(tok, "hi"), greedy(5), lambda o: None)
        for rid in sinks:
            scheduler.cancel(rid)
    finally:
        scheduler.shutdown()


def test_scheduler_survives_a_request_that_fails_unexpectedly(toy_model, monkeypatch):
    """An exception other than ValueError while queueing one request ends that request with an error;
    the engine thread keeps serving the next ones (a server must not hang on one bad request)."""
    model, tok = toy_model
    engine = Engine(model, tok, max_batch=2)
    scheduler = Scheduler(engine, max_waiting=4)
    try:
        add = engine.add

        def flaky_add(prompt, params, request_id=None):
            if params.max_tokens == 3:
                raise RuntimeError("boom")
            return add(prompt, params, request_id=request_id)
        monkeypatch.setattr(engine, "add", flaky_add)
        got = []
        caller = threading.Thread(target=lambda: got.extend(scheduler.stream_sync(chat_ids(tok, "hi"), greedy(3))),
                                  daemon=True)
        caller.start()
        caller.join(30)
        assert got, "the request got no answer: the engine thread died"
        assert got[-1].finish_reason == "error" and "RuntimeError" in got[-1].error
        outs = list(scheduler.stream_sync(chat_ids(tok, CONVERSATIONS[0][0]), greedy(80)))
        assert "".join(o.text for o in outs) == expected_text(0) and outs[-1].finish_reason == "stop"
    finally:
        scheduler.shutdown()


def test_extreme_sampling_values_and_a_failed_prefill_never_hang(toy_model, monkeypatch):
    """Found by the schemathesis fuzz: temperature 1e-290 made logits / T overflow, the first sampling
    step failed inside a prefill, and that request, no longer waiting and not yet running, was never
    ended: its caller hung. Now tiny temperatures are greedy (as vLLM), a top_p that rounds to 0 keeps
    the top token, and a step that fails during a prefill ends the requests being admitted too."""
    model, tok = toy_model
    engine = Engine(model, tok, max_batch=2)
    prompt = chat_ids(tok, CONVERSATIONS[0][0])
    greedy_ids = engine.generate([prompt], greedy(20))[0].output_ids
    for params in (SamplingParams(max_tokens=20, temperature=1e-290),
                   SamplingParams(max_tokens=20, temperature=1.0, top_p=1e-300)):  # top token only: greedy
        assert engine.generate([prompt], params)[0].output_ids == greedy_ids
    scheduler = Scheduler(engine, max_waiting=4)
    try:
        monkeypatch.setattr(engine.decoder, "sample_rows", lambda reqs, logits: 1 / 0)
        got = []
        caller = threading.Thread(target=lambda: got.extend(scheduler.stream_sync(prompt, greedy(5))), daemon=True)
        caller.start()
        caller.join(30)
        assert got and got[-1].finish_reason == "error" and "ZeroDivisionError" in got[-1].error
        assert scheduler.in_flight == 0
    finally:
        scheduler.shutdown()
