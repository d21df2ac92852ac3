"""response_format by constrained decoding (llguidance): the answer after `</think>` is JSON that the
schema accepts, the reasoning stays free. A random (untrained) model shows it: every answer that
finishes parses and validates; answers cut by max_tokens say finish_reason "length"."""

import json

import httpx
import jsonschema
import openai
import pytest
import torch

from nanoseek import ModelConfig, Transformer, save_model
from nanoseek.infer import Engine, SamplingParams, load_tokenizer
from nanoseek.infer.grammar import GrammarError, GrammarTokenizer
from nanoseek.serve import ServerConfig, build_app
from nanoseek.tokenizer import Tokenizer
from test_serve import Server
from toy import TOY_SIZES

pytestmark = pytest.mark.usefixtures("one_thread")

SCHEMA = {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                           "size": {"enum": [1, 2, 3]}, "ok": {"type": "boolean"}},
          "required": ["color", "size", "ok"], "additionalProperties": False}


def make_random_chat_model(path, toy, seed=0):
    """An untrained model (the toy's sizes, a 2048-token context, no MTP) with the toy's tokenizer."""
    tok = Tokenizer.load(toy)
    sizes = dict(TOY_SIZES, num_nextn_predict_layers=0)
    cfg = ModelConfig.preset("tiny", vocab_size=tok.vocab_size + 3, max_position_embeddings=2048, **sizes)
    torch.manual_seed(seed)
    save_model(Transformer(cfg).eval(), path)
    tok.save(path)
    return path


@pytest.fixture(scope="session")
def random_chat(toy, tmp_path_factory):
    return make_random_chat_model(tmp_path_factory.mktemp("random-chat") / "model", toy)


# ---- the engine ------------------------------------------------------------------------------------
def test_random_model_answers_always_match_the_schema(random_chat):
    """No reasoning block: the grammar applies from the first token."""
    from nanoseek import load_model
    model, tok = load_model(random_chat).eval(), load_tokenizer(random_chat)
    grammar = GrammarTokenizer(tok.tokenizer_json(), model.config.vocab_size, tok.eos_ids[0]).json_grammar(SCHEMA)
    engine = Engine(model, tok, max_batch=8)
    prompt = tok.encode("Describe a thing as JSON:")
    params = [SamplingParams(max_tokens=60, temperature=1.0, seed=s, grammar=grammar) for s in range(16)]
    reqs = engine.generate([prompt] * 16, params)
    finished = [r for r in reqs if r.finish_reason == "stop"]
    assert len(finished) >= 12
    for r in finished:
        assert r.output_ids[-1] == tok.eos_ids[0]
        jsonschema.validate(json.loads(r.text), SCHEMA)
    assert all(r.finish_reason == "length" for r in reqs if r not in finished)
    free = engine.generate([prompt], SamplingParams(max_tokens=60, temperature=1.0, seed=0))[0]
    with pytest.raises(ValueError):  # the same seed without the grammar: not JSON
        json.loads(free.text)


def test_bad_schema_is_a_grammar_error(random_chat):
    tok = load_tokenizer(random_chat)
    grammars = GrammarTokenizer(tok.tokenizer_json(), tok.vocab_size, tok.eos_ids[0])
    with pytest.raises(GrammarError, match="type"):
        grammars.json_grammar({"type": 5})


# ---- the server ------------------------------------------------------------------------------------
def serve_random(path):
    """A server for the model folder `path` (named "random"), stopped when the generator is closed."""
    app, scheduler = build_app(path, config=ServerConfig(model_name="random"), max_batch=8)
    s = Server(app, scheduler)
    yield s
    s.stop()


def openai_client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def served(random_chat):
    yield from serve_random(random_chat)


@pytest.fixture(scope="module")
def client(served):
    return openai_client(served)


def ask(client, response_format, n=8, max_tokens=1500, **kw):
    return client.chat.completions.create(model="random", messages=[{"role": "user", "content": "A color?"}],
                                          temperature=1.0, seed=0, n=n, max_tokens=max_tokens,
                                          response_format=response_format, **kw)


def test_json_schema_after_free_reasoning(client):
    """The random model reasons freely until it happens to emit </think>; its answer then follows the
    schema, and it may only end once the answer is complete."""
    r = ask(client, {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA, "strict": True}})
    finished = [c for c in r.choices if c.finish_reason == "stop"]
    assert finished, "no choice finished within max_tokens"
    for c in finished:
        jsonschema.validate(json.loads(c.message.content), SCHEMA)
        assert c.message.model_extra["reasoning_content"]  # the reasoning was not constrained
        assert not c.message.model_extra["reasoning_content"].lstrip().startswith("{")
    assert all(c.finish_reason == "length" for c in r.choices if c not in finished)


def test_json_object_streamed(client):
    stream = ask(client, {"type": "json_object"}, n=1, stream=True)
    content, finish = "", None
    for chunk in stream:
        if chunk.choices:
            content += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
    if finish == "stop":
        assert isinstance(json.loads(content), dict)
    else:
        assert finish == "length"


def test_text_format_is_free(client):
    r = ask(client, {"type": "text"}, n=1, max_tokens=20)
    assert r.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("fmt, match", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}, "response_format"),
    ({"type": "json_schema"}, "json_schema"),
    ({"type": "xml"}, "response_format"),
])
def test_bad_response_format_gets_400(served, fmt, match):
    r = httpx.post(served.url + "/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "x"}], "response_format": fmt}, timeout=30)
    assert r.status_code == 400, r.text
    assert match in r.json()["error"]["param"]


def test_response_format_with_tools_is_refused(served):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    r = httpx.post(served.url + "/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"},
        "tools": tools}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format"


def test_speculative_decoding_keeps_the_grammar_and_the_greedy_tokens(toy):
    """The toy model (it memorized its replies) reasons as it learned to, then answers in the schema;
    MTP drafts are verified against the masked logits, so greedy tokens equal plain decoding's."""
    from nanoseek import load_model
    from nanoseek.infer.text import ReasoningSplitter
    from toy import CONVERSATIONS
    model, tok = load_model(toy).eval(), load_tokenizer(toy)
    grammar = GrammarTokenizer(tok.tokenizer_json(), model.config.vocab_size,
                               tok.eos_ids[0]).json_grammar(SCHEMA, start_after=tok.end_think_id)
    prompts = [tok.chat_prompt([{"role": "user", "content": q}])[0] for q, _, _ in CONVERSATIONS[:3]]
    params = SamplingParams(max_tokens=100, grammar=grammar)
    runs = [Engine(model, tok, max_batch=4, speculative=s).generate(prompts, params) for s in (False, True)]
    for plain, spec, (_, thought, _) in zip(*runs, CONVERSATIONS):
        assert plain.output_ids == spec.output_ids and plain.finish_reason == "stop"
        splitter = ReasoningSplitter(thinking=True)
        reasoning, content = splitter.push(plain.text)
        r2, c2 = splitter.flush()
        assert reasoning + r2 == thought
        jsonschema.validate(json.loads(content + c2), SCHEMA)


def test_completions_refuse_response_format(served):
    r = httpx.post(served.url + "/v1/completions", json={"prompt": "x", "response_format": {"type": "json_object"}},
                   timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format"
    assert r.json()["error"]["code"] == "unsupported_parameter"
