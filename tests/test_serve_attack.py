"""`nanoseek serve` under attack and in Chinese (issue 13): rate-limit evasion, long prompts, invalid
Unicode, requests that can never fit, fields the server does not honour, unusable API keys, the 404's
echo, a Chinese content policy end to end, /metrics, and 64 concurrent streaming clients."""

import asyncio
import json
import statistics
import threading
import time
import types

import httpx
import pytest

from nanoseek import cli
from nanoseek.serve import Policy, ServerConfig, build_app
from nanoseek.serve.access import RateLimiter
from test_serve import KEY, Server, user

pytestmark = pytest.mark.usefixtures("one_thread")
AUTH = {"Authorization": f"Bearer {KEY}"}
POLICY = """
audit: audit.jsonl
rules:
  - name: tiananmen
    keywords: [天安門]
    message: "[policy]"
  - name: cat-watch
    applies_to: input
    keywords: [cat]
    action: flag
"""


@pytest.fixture(scope="module")
def server(toy, tmp_path_factory):
    folder = tmp_path_factory.mktemp("attack")
    (folder / "policy.yaml").write_text(POLICY, encoding="utf-8")
    app, scheduler = build_app(toy, config=ServerConfig(model_name="toy", api_key=KEY),
                               policy=Policy.load(folder / "policy.yaml"), max_batch=16, max_waiting=64)
    s = Server(app, scheduler)
    s.audit = folder / "audit.jsonl"
    yield s
    s.stop()


@pytest.fixture
def limits(server):
    """The server's limiter with rate_limit 5 and auth_failure_limit 5, reset after the test."""
    config, limiter = server.app.state.api.config, server.app.state.api.limiter
    saved = config.rate_limit, config.auth_failure_limit
    limiter.hits.clear(), limiter.failures.clear()
    config.rate_limit, config.auth_failure_limit = 5, 5
    yield config
    config.rate_limit, config.auth_failure_limit = saved
    limiter.hits.clear(), limiter.failures.clear()


def post(server, path, body, client=httpx, **kw):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return client.post(server.url + path, content=content, timeout=60,
                       headers={**AUTH, "Content-Type": "application/json", **kw.pop("headers", {})}, **kw)


# ---- defect 2: the rate limit ------------------------------------------------------------------------
@pytest.mark.parametrize("headers", [
    lambda i: {"Authorization": f"junk-{i}", "api-key": KEY},  # the key in api-key, junk beside it
    lambda i: {"Authorization": f"{'bearer' if i % 2 else 'BEARER'} {KEY}"},  # the case of "Bearer"
    lambda i: {**AUTH, "X-Forwarded-For": f"10.0.{i}.1"},  # a forged client address
], ids=["junk-authorization", "bearer-case", "x-forwarded-for"])
def test_rate_limit_cannot_be_dodged_with_headers(server, limits, headers):
    codes = [httpx.get(server.url + "/v1/models", headers=headers(i)).status_code for i in range(12)]
    assert codes[:5] == [200] * 5 and set(codes[5:]) == {429}


@pytest.mark.parametrize("argv, options", [
    ([], {"proxy_headers": False}),
    (["--forwarded-allow-ips", "10.0.0.1"], {"proxy_headers": True, "forwarded_allow_ips": "10.0.0.1"}),
])
def test_serve_believes_x_forwarded_for_only_from_named_proxies(toy, monkeypatch, argv, options):
    import uvicorn
    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append(kw))
    monkeypatch.setenv("NANOSEEK_API_KEY", "k-1")
    assert cli.main(["serve", str(toy), *argv]) == 0
    assert {k: v for k, v in calls[0].items() if k in ("proxy_headers", "forwarded_allow_ips")} == options


def test_wrong_keys_are_throttled(server, limits):
    limits.rate_limit = 0  # even without a rate limit, guessing keys is limited
    codes = [httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer guess-{i}"}).status_code
             for i in range(8)]
    assert codes[:5] == [401] * 5 and set(codes[5:]) == {429}
    assert httpx.get(server.url + "/v1/models", headers=AUTH).status_code == 429  # until the window passes


def test_rate_limit_table_stays_bounded(monkeypatch):
    config = ServerConfig(model_name="m", rate_limit=3, rate_limit_clients=100)
    limiter = RateLimiter(config)
    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])

    def request(i):
        return types.SimpleNamespace(client=types.SimpleNamespace(host=f"10.{i // 65536}.{i // 256 % 256}.{i % 256}"),
                                     headers={"authorization": f"Bearer {'k' * 100}{i}"})
    for i in range(2000):
        limiter.check(request(i))
    assert len(limiter.hits) <= 100
    clock[0] += 61  # everyone's window is over: the next requests forget them (64 per request)
    limiter.check(request(5000))
    limiter.check(request(5001))
    assert len(limiter.hits) <= 2


# ---- defect 3: long prompts --------------------------------------------------------------------------
def test_a_huge_prompt_is_refused_without_tokenizing(server, monkeypatch):
    tokenizer = server.app.state.api.tokenizer
    calls = []
    encode = tokenizer.encode
    monkeypatch.setattr(tokenizer, "encode", lambda text: calls.append(len(text)) or encode(text))
    start = time.perf_counter()
    r = post(server, "/v1/completions", {"prompt": "the sea " * 120_000, "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
    assert calls == [] and time.perf_counter() - start < 1.0
    r = post(server, "/v1/chat/completions", {"messages": user("海" * 100_000)})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_tokenizing_leaves_the_event_loop_free(server, monkeypatch):
    """While requests are stuck in tokenizing (held on an event, not slowed by a sleep: no timing
    threshold), /health still answers: tokenizing runs off the event loop."""
    tokenizer = server.app.state.api.tokenizer
    encode = tokenizer.encode
    entered, release = threading.Event(), threading.Event()

    def held(text):
        entered.set()
        release.wait(30)
        return encode(text)
    monkeypatch.setattr(tokenizer, "encode", held)
    codes = []
    threads = [threading.Thread(target=lambda: codes.append(
        post(server, "/v1/completions", {"prompt": "the sea", "max_tokens": 2}).status_code)) for _ in range(4)]
    try:
        for t in threads:
            t.start()
        assert entered.wait(10), "no request reached the tokenizer"
        for _ in range(3):  # a blocked loop would hold these until `release` (30 s): the client gives up at 10
            assert httpx.get(server.url + "/health", timeout=10).status_code == 200
        assert not release.is_set()  # answered while every tokenizing request was still held
    finally:
        release.set()
        for t in threads:
            t.join(30)
    assert codes == [200] * 4


# ---- defect 4: lone surrogates -----------------------------------------------------------------------
@pytest.mark.parametrize("path, body, status, param", [
    ("/v1/completions", b'{"prompt": "\\ud800x", "max_tokens": 2}', 400, "prompt"),
    ("/v1/completions", b'{"prompt": ["ok", "\\udfff"], "max_tokens": 2}', 400, "prompt.1"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "a\\ud83d"}]}', 400, "messages.0.content"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "stop": ["\\ud800"]}', 400, "stop.0"),
    ("/v1/chat/completions", b'{"model": "\\ud800", "messages": [{"role": "user", "content": "hi"}]}', 404, "model"),
])
def test_lone_surrogates_get_a_4xx_and_the_connection_stays(server, path, body, status, param):
    with httpx.Client() as client:
        r = post(server, path, body, client=client)
        assert r.status_code == status, r.text
        assert r.json()["error"]["param"] == param
        ok = post(server, "/v1/chat/completions", {"messages": user("hi"), "max_tokens": 2}, client=client)
        assert ok.status_code == 200


# ---- defect 5: a request that can never fit ----------------------------------------------------------
def test_more_sequences_than_the_server_can_ever_run_is_a_400(server):
    capacity = server.scheduler.capacity  # 16 + 64
    r = post(server, "/v1/completions", {"prompt": ["the sea"] * 64, "n": 8, "max_tokens": 2})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "n" and "512" in error["message"] and str(capacity) in error["message"]


# ---- defect 6: fields the server does not honour -----------------------------------------------------
@pytest.mark.parametrize("field, value, param", [
    # (logprobs, response_format and tools are honoured: tests/test_logprobs.py, test_response_format.py,
    # test_tools.py; here only what of them cannot be honoured)
    ("top_logprobs", 2, "top_logprobs"),
    ("tool_choice", "required", "tool_choice"),
    ("response_format", {"type": "json_schema"}, "response_format.json_schema"),
    ("logit_bias", {"5": 10}, "logit_bias"),
    ("presence_penalty", 0.5, "presence_penalty"),
    ("frequency_penalty", -1, "frequency_penalty"),
    ("reasoning_effort", "high", "reasoning_effort"),
    ("some_new_field", 1, "some_new_field"),
    ("stream_options", {"include_usage": True, "continuous_usage_stats": True},
     "stream_options.continuous_usage_stats"),
    ("messages", [{"role": "user", "content": "hi", "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]}],
     "messages.0.tool_calls"),
    ("tools", [{"type": "function", "function": {"name": "f", "cache": True}}], "tools.0.function.cache"),
    ("messages", [{"role": "user", "content": "hi", "name": "bob"}], "messages.0.name"),
    ("messages", [{"role": "user", "content": [{"type": "text", "text": "hi", "cache_control": {}}]}],
     "messages.0.content.0.cache_control"),
])
def test_unhonoured_fields_get_a_400_naming_them(server, field, value, param):
    r = post(server, "/v1/chat/completions", {"messages": user("hi"), "max_tokens": 2, field: value})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and param in r.json()["error"]["message"]


def test_unknown_fields_with_odd_names_are_refused_without_repeating_them(server):
    for body in [b'{"messages": [{"role": "user", "content": "hi"}], "\\ud800": 1}',
                 json.dumps({"messages": user("hi"), "<script>" * 20: 1}).encode()]:
        r = post(server, "/v1/chat/completions", body)
        assert r.status_code == 400 and r.json()["error"]["param"] is None, r.text
        assert "script" not in r.text


def test_unhonoured_fields_are_fine_when_they_ask_for_nothing(server):
    r = post(server, "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "hi", "tool_calls": None, "refusal": None}], "max_tokens": 2,
        "logprobs": False, "presence_penalty": 0, "frequency_penalty": 0.0, "tool_choice": "none", "tools": [],
        "response_format": {"type": "text"}, "top_logprobs": None, "user": "u1", "metadata": None})
    assert r.status_code == 200, r.text
    r = post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 2, "best_of": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "best_of"


# ---- defect 7: unusable API keys ---------------------------------------------------------------------
@pytest.mark.parametrize("argv, env", [(["--api-key", " k "], None), (["--api-key", ""], None), ([], ""),
                                       ([], "two words")])
def test_unusable_api_key_stops_serve_at_start(toy, monkeypatch, capsys, argv, env):
    import uvicorn
    started = []
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: started.append(1))
    if env is None:
        monkeypatch.delenv("NANOSEEK_API_KEY", raising=False)
    else:
        monkeypatch.setenv("NANOSEEK_API_KEY", env)
    assert cli.main(["serve", str(toy), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert started == [] and err.startswith("error: ") and "\n" not in err
    assert ("--api-key" if argv else "$NANOSEEK_API_KEY") in err
    with pytest.raises(ValueError, match="api_key"):
        ServerConfig(model_name="m", api_key=argv[1] if argv else env)


# ---- the 404 -----------------------------------------------------------------------------------------
def test_unknown_model_is_not_echoed(server):
    name = "<script>" + "x" * 90
    r = post(server, "/v1/chat/completions", {"model": name, "messages": user("hi")})
    assert r.status_code == 404 and "script" not in r.text and "xxxx" not in r.text
    r = httpx.get(server.url + "/v1/models/" + name, headers=AUTH)
    assert r.status_code == 404 and "script" not in r.text


# ---- the policy in Chinese, end to end ---------------------------------------------------------------
def test_chinese_policy_refuses_chinese_text_in_either_script(server):
    for text in ["我想了解天安门事件", "关于天安門", "天\u200b安门"]:
        r = post(server, "/v1/chat/completions", {"messages": user(text), "user": "u-7"})
        choice = r.json()["choices"][0]
        assert (choice["finish_reason"], choice["message"]["content"]) == ("content_filter", "[policy]"), text
    record = json.loads(server.audit.read_text(encoding="utf-8").splitlines()[-1])
    assert (record["rule"], record["match"], record["user"], record["source"]) == \
        ("tiananmen", "天安门", "u-7", "serve")


# ---- /metrics ----------------------------------------------------------------------------------------
def test_metrics_in_prometheus_format(server):
    from prometheus_client.parser import text_string_to_metric_families
    post(server, "/v1/chat/completions", {"messages": user("hi"), "max_tokens": 4})
    post(server, "/v1/chat/completions", {"messages": user("hi"), "stream": True, "max_tokens": 4})
    post(server, "/v1/chat/completions", {"messages": user("my cat")})  # flagged
    post(server, "/v1/chat/completions", {"messages": user("天安门")})  # refused
    post(server, "/v1/chat/completions", {"messages": user("hi"), "n": 0})  # 422
    httpx.get(server.url + "/no/such/path")
    r = httpx.get(server.url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value

    def value(name, **labels):
        return samples.get((name, tuple(sorted(labels.items()))), 0)
    chat = "/v1/chat/completions"
    assert value("nanoseek_requests_total", endpoint=chat, status="200") >= 4
    assert value("nanoseek_requests_total", endpoint=chat, status="422") >= 1
    assert value("nanoseek_requests_total", endpoint="other", status="404") >= 1
    assert value("nanoseek_request_duration_seconds_count", endpoint=chat) >= 5
    assert value("nanoseek_time_to_first_token_seconds_count", endpoint=chat) >= 2
    assert value("nanoseek_generated_tokens_total") >= 8
    assert value("nanoseek_policy_decisions_total", rule="cat-watch", action="flag", where="input") >= 1
    assert value("nanoseek_policy_decisions_total", rule="tiananmen", action="refuse", where="input") >= 1
    for gauge in ("nanoseek_queue_depth", "nanoseek_requests_running", "nanoseek_kv_cache_rows_in_use",
                  "nanoseek_kv_cache_slots_in_use"):
        assert (gauge, ()) in samples
    assert value("nanoseek_kv_cache_rows") == 16 and value("nanoseek_queue_capacity") == 80


# ---- load: 64 concurrent streaming clients -----------------------------------------------------------
def test_64_concurrent_streaming_clients_all_complete(server):
    """Loopback only, bounded: 64 streams of 16 tokens each, none dropped, within 60 s."""
    body = {"prompt": "the sea and the", "max_tokens": 16, "ignore_eos": True, "stream": True, "temperature": 0}

    async def one(client):
        start, text, finish, done = time.perf_counter(), "", None, False
        async with client.stream("POST", server.url + "/v1/completions", json=body, headers=AUTH) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    choice = json.loads(line[6:])["choices"][0]
                    text += choice["text"]
                    finish = choice["finish_reason"] or finish
        return done, finish, text, time.perf_counter() - start

    async def run():
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        async with httpx.AsyncClient(limits=limits, timeout=60) as client:
            return await asyncio.gather(*(one(client) for _ in range(64)))

    start = time.perf_counter()
    results = asyncio.run(asyncio.wait_for(run(), 60))
    wall = time.perf_counter() - start
    latencies = sorted(t for *_, t in results)
    assert len(results) == 64 and all(done and finish == "length" for done, finish, _, _ in results)
    assert len({text for _, _, text, _ in results}) == 1  # greedy: every client got the whole same reply
    p95 = latencies[int(0.95 * len(latencies)) - 1]
    print(f"\n64 streaming clients: wall {wall:.2f} s, p50 {statistics.median(latencies):.2f} s, p95 {p95:.2f} s")
