"""logprobs / top_logprobs: the engine reports each generated token's log-probability under the model
(log_softmax of the raw logits, before temperature and top-k/top-p), equal to a direct forward of the
prompt and the generated tokens, without changing what is sampled; the server returns them in OpenAI's
chat and legacy completions shapes, streamed and not, and refuses out-of-range values with 400."""

import httpx
import openai
import pytest
import torch

from nanoseek import load_model
from nanoseek.infer import Engine, SamplingParams, load_tokenizer
from nanoseek.serve import ServerConfig, build_app
from test_engine import random_model
from test_serve import Server

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = 1e-4


def forward_logprobs(model, prompt, output):
    """(len(output), V) log-probabilities of each generated position, from one full forward."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + output]))[0].float()
    return logits.log_softmax(dim=-1)[len(prompt) - 1: len(prompt) + len(output) - 1]


def check_against_forward(model, prompt, output, entries, k):
    """entries: (token, logprob, [(id, logprob)] * k) per generated token."""
    expected = forward_logprobs(model, prompt, output)
    assert len(entries) == len(output)
    for pos, (token, logprob, top) in enumerate(entries):
        assert token == output[pos]
        assert abs(logprob - float(expected[pos, token])) < TOL
        assert len(top) == k
        values, ids = expected[pos].topk(k) if k else (torch.empty(0), torch.empty(0))
        assert [t for t, _ in top] == ids.tolist() or torch.allclose(
            torch.tensor([v for _, v in top]), values, atol=TOL)  # ties may order differently
        for t, v in top:
            assert abs(v - float(expected[pos, t])) < TOL


# ---- the engine ------------------------------------------------------------------------------------
@pytest.mark.parametrize("speculative", [False, True])
def test_engine_logprobs_match_a_forward_and_leave_sampling_unchanged(speculative):
    model = random_model(mtp=1)
    prompts = [[5, 17, 300, 42], [7, 7, 100, 3, 9]]
    asked = [SamplingParams(max_tokens=12, logprobs=5), SamplingParams(max_tokens=12, temperature=0.9, seed=4,
                                                                      logprobs=0)]
    plain = [SamplingParams(max_tokens=12), SamplingParams(max_tokens=12, temperature=0.9, seed=4)]
    reqs, logprobs = run_collecting(Engine(model, max_batch=4, speculative=speculative), prompts, asked)
    base = Engine(model, max_batch=4, speculative=speculative).generate(prompts, plain)
    for req, ref, params in zip(reqs, base, asked):
        assert req.output_ids == ref.output_ids  # asking for logprobs samples exactly the same tokens
        entries = [(e.token, e.logprob, e.top) for e in logprobs[req.request_id]]
        check_against_forward(model, req.prompt, req.output_ids, entries, params.logprobs)


def run_collecting(engine, prompts, params):
    """Run to completion; -> (requests, each request's logprobs as the step outputs reported them)."""
    reqs = [engine.add(p, sp) for p, sp in zip(prompts, params)]
    seen = {r.request_id: [] for r in reqs}
    while engine.has_work:
        for out in engine.step():
            assert len(out.logprobs) == len(out.token_ids)
            seen[out.request_id] += out.logprobs
    return reqs, seen


def test_logprobs_range_is_checked():
    with pytest.raises(ValueError, match="logprobs"):
        SamplingParams(logprobs=21)


# ---- the server ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(toy):
    app, scheduler = build_app(toy, config=ServerConfig(model_name="toy"), max_batch=4, speculative=True)
    s = Server(app, scheduler)
    s.model, s.tokenizer = load_model(toy).eval(), load_tokenizer(toy)
    s.by_bytes = {s.tokenizer.token_bytes(i): i for i in range(s.tokenizer.vocab_size)}
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served.url + "/v1", api_key="none", max_retries=0, timeout=60)


def ids_of(served, entries):
    """Token ids from the entries' bytes (each token's bytes are unique in a byte-level BPE vocabulary)."""
    return [served.by_bytes[bytes(e["bytes"])] for e in entries]


def chat_entries(served, content):
    out = []
    for e in content:
        top = [(served.by_bytes[bytes(t["bytes"])], t["logprob"]) for t in e["top_logprobs"]]
        out.append((served.by_bytes[bytes(e["bytes"])], e["logprob"], top))
    return out


MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("temperature", [0, 0.8])
def test_chat_logprobs_match_a_forward(served, client, temperature):
    r = client.chat.completions.create(model="toy", messages=MESSAGES, temperature=temperature, seed=1,
                                       logprobs=True, top_logprobs=3, max_tokens=30)
    content = r.choices[0].logprobs.model_dump()["content"]
    assert len(content) == r.usage.completion_tokens
    output = ids_of(served, content)
    prompt = served.tokenizer.chat_prompt(MESSAGES)[0]
    check_against_forward(served.model, prompt, output, chat_entries(served, content), 3)
    for e in content:
        assert e["token"] == bytes(e["bytes"]).decode("utf-8", errors="replace")
    text = served.tokenizer.decode(output)
    msg = r.choices[0].message
    assert msg.content in text and msg.model_extra["reasoning_content"] in text


def test_chat_stream_carries_each_deltas_logprobs(client):
    full = client.chat.completions.create(model="toy", messages=MESSAGES, temperature=0, logprobs=True,
                                          top_logprobs=2)
    streamed = []
    for chunk in client.chat.completions.create(model="toy", messages=MESSAGES, temperature=0, logprobs=True,
                                                top_logprobs=2, stream=True):
        if chunk.choices and chunk.choices[0].logprobs is not None:
            streamed += chunk.choices[0].logprobs.model_dump()["content"]
    assert [(e["token"], e["bytes"]) for e in streamed] == \
        [(e.token, e.bytes) for e in full.choices[0].logprobs.content]
    assert all(abs(a["logprob"] - b.logprob) < TOL for a, b in zip(streamed, full.choices[0].logprobs.content))


def test_no_logprobs_unless_asked(client):
    r = client.chat.completions.create(model="toy", messages=MESSAGES, temperature=0, max_tokens=5)
    assert r.choices[0].logprobs is None


def test_completion_logprobs_legacy_shape(served, client):
    prompt = "Once upon a time"
    r = client.completions.create(model="toy", prompt=prompt, max_tokens=8, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 8
    assert all("\ufffd" not in t for t in lp.tokens)  # (this reply is ASCII: its token strings are its bytes)
    output = [served.by_bytes[t.encode()] for t in lp.tokens]
    expected = forward_logprobs(served.model, served.tokenizer.encode(prompt), output)
    for pos, (token, value, top) in enumerate(zip(output, lp.token_logprobs, lp.top_logprobs)):
        assert abs(value - float(expected[pos, token])) < TOL
        assert len(top) <= 2 and max(top.values()) == pytest.approx(float(expected[pos].max()), abs=TOL)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(8)]
    assert "".join(lp.tokens) == r.choices[0].text
    chunks = list(client.completions.create(model="toy", prompt=prompt, max_tokens=8, temperature=0, logprobs=2,
                                            stream=True))
    tokens = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    offsets = [o for c in chunks if c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset]
    assert tokens == lp.tokens and offsets == lp.text_offset


@pytest.mark.parametrize("path, body, param", [
    ("chat/completions", {"messages": MESSAGES, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("chat/completions", {"messages": MESSAGES, "logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    ("chat/completions", {"messages": MESSAGES, "top_logprobs": 2}, "top_logprobs"),
    ("completions", {"prompt": "x", "logprobs": 21}, "logprobs"),
    ("completions", {"prompt": "x", "logprobs": -1}, "logprobs"),
    ("completions", {"prompt": "x", "logprobs": 1, "echo": True}, "logprobs"),
])
def test_out_of_range_logprobs_get_400(served, path, body, param):
    r = httpx.post(f"{served.url}/v1/{path}", json=body, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_token_bytes_of_byte_level_and_other_tokenizers(toy):
    from nanoseek.infer.text import ChatTokenizer
    tok = load_tokenizer(toy)
    assert tok.byte_level
    ids = tok.encode("ça 你好 <think>")
    assert b"".join(tok.token_bytes(i) for i in ids) == "ça 你好 <think>".encode()
    assert tok.token_bytes(tok.end_think_id) == b"</think>"  # a special token: its text
    # a sentencepiece-style tokenizer: token strings like <0xE4> are not bytes; the token is decoded alone
    other = ChatTokenizer(None, lambda ids: "é", None, (1,), 10, None, "other", id_to_token=lambda i: "<0xC3>",
                          backend_json=lambda: '{"decoder": {"type": "Sequence", "decoders": [{"type": "ByteFallback"}]}}')
    assert not other.byte_level and other.token_bytes(3) == "é".encode()
