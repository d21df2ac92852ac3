"""tools / tool_choice in DeepSeek-V3's format: the tools and earlier calls and results rendered into
the prompt, tool calls parsed out of the answer (streamed as delta.tool_calls) with finish_reason
"tool_calls", tool_choice "required" or a named function enforced by constrained decoding (shown with
a random model), "auto" calls held to the tools' schemas by a lazy grammar, and clear 400s for what
cannot be honoured."""

import json

import httpx
import jsonschema
import pytest

from nanoseek.infer import load_tokenizer
from nanoseek.infer.request import RequestOutput
from nanoseek.serve.protocol import ChoiceStream
from nanoseek.serve.tools import ToolCallParser
from nanoseek.tokenizer import (ASSISTANT, BOS, END_THINK, EOS, THINK, TOOL_CALL_BEGIN, TOOL_CALL_END,
                                TOOL_CALLS_BEGIN, TOOL_CALLS_END, TOOL_OUTPUT_BEGIN, TOOL_OUTPUT_END,
                                TOOL_OUTPUTS_BEGIN, TOOL_OUTPUTS_END, TOOL_SEP, USER, Tokenizer, render_tool_call,
                                render_tool_chat)
from test_response_format import make_random_chat_model, openai_client, serve_random

pytestmark = pytest.mark.usefixtures("one_thread")

WEATHER = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}, "unit": {"enum": ["C", "F"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
        "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "description": "Time", "parameters": TIME}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}
CONVERSATION = [{"role": "user", "content": "Weather in Rome?"},
                {"role": "assistant", "content": None, "tool_calls": [CALL]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
                {"role": "tool", "tool_call_id": "call_2", "content": "22C"}]


# ---- the template ----------------------------------------------------------------------------------
def test_template_renders_tools_calls_and_outputs():
    text = "".join(t for t, _ in render_tool_chat(CONVERSATION, TOOLS[:1], add_generation_prompt=True))
    call = (f"{TOOL_CALL_BEGIN}function{TOOL_SEP}get_weather\n```json\n{{\"city\": \"Rome\"}}\n```{TOOL_CALL_END}")
    assert render_tool_call("get_weather", '{"city": "Rome"}') == call
    assert text.startswith(BOS + "## Tools\nYou have access to the following tools:\n\n### get_weather\n"
                           "Description: Weather\n\nParameters: " + json.dumps(WEATHER) + "\n")
    assert text.endswith(f"{USER}Weather in Rome?{ASSISTANT}{THINK}\n\n{END_THINK}\n\n{TOOL_CALLS_BEGIN}{call}"
                         f"{TOOL_CALLS_END}{EOS}{TOOL_OUTPUTS_BEGIN}{TOOL_OUTPUT_BEGIN}sunny{TOOL_OUTPUT_END}\n"
                         f"{TOOL_OUTPUT_BEGIN}22C{TOOL_OUTPUT_END}{TOOL_OUTPUTS_END}{THINK}\n")
    # the answer after the outputs continues the turn (no new <｜Assistant｜>) and is a training target
    done = CONVERSATION + [{"role": "assistant", "content": "Sunny, 22C.", "reasoning_content": "ok"}]
    parts = render_tool_chat(done, TOOLS[:1])
    assert parts[-2:] == [(TOOL_OUTPUTS_END, False), (f"{THINK}\nok\n{END_THINK}\n\nSunny, 22C.{EOS}", True)]


def test_tokenizer_applies_the_tool_template(toy):
    tok = Tokenizer.load(toy)
    text = tok.apply_chat_template(CONVERSATION, tools=TOOLS, add_generation_prompt=True, tokenize=False)
    ids = tok.apply_chat_template(CONVERSATION, tools=TOOLS, add_generation_prompt=True)
    assert tok.decode(ids) == text
    with pytest.raises(Exception, match="unknown role 'tool'"):  # without tools=, the plain R1 template
        tok.apply_chat_template(CONVERSATION[:1] + CONVERSATION[2:])
    ids2, thinking = load_tokenizer(toy).chat_prompt(CONVERSATION, tools=TOOLS)
    assert ids2 == ids and thinking


# ---- parsing ---------------------------------------------------------------------------------------
ANSWER = ("Let me look. " + TOOL_CALLS_BEGIN + render_tool_call("get_weather", '{"city": "Paris", "unit": "C"}')
          + "\n" + render_tool_call("get_time", '{"zone": "CET"}') + TOOL_CALLS_END)


@pytest.mark.parametrize("step", [1, 3, 7, len(ANSWER)])
def test_parser_streams_calls_in_any_pieces(step):
    parser = ToolCallParser()
    content, calls = "", []
    for i in range(0, len(ANSWER), step):
        c, new = parser.push(ANSWER[i:i + step])
        content += c
        calls += new
    assert parser.flush() == ("", [])
    assert content == "Let me look. "
    assert [(c["type"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == \
        [("function", "get_weather", {"city": "Paris", "unit": "C"}), ("function", "get_time", {"zone": "CET"})]
    assert len({c["id"] for c in calls}) == 2 and all(c["id"].startswith("call_") for c in calls)


def test_parser_gives_back_an_unfinished_block_and_keeps_one_call_when_not_parallel():
    parser = ToolCallParser()
    cut = ANSWER[:ANSWER.index("get_weather") + 5]
    content, calls = parser.push(cut)
    assert calls == [] and content + parser.flush()[0] == cut  # nothing the model wrote is lost
    single = ToolCallParser(parallel=False)
    content, calls = single.push(ANSWER)
    assert [c["function"]["name"] for c in calls] == ["get_weather"] and content == "Let me look. "


def test_choice_stream_reports_tool_calls_finish_reason():
    stream = ChoiceStream(thinking=True, tools=ToolCallParser())
    text = "Thinking.\n</think>\n\n" + ANSWER
    half = len(text) // 2
    d1 = stream.feed(RequestOutput("r", [1] * 5, text[:half], False, None, 3, 5))
    d2 = stream.feed(RequestOutput("r", [1] * 5, text[half:], True, "stop", 3, 10))
    assert stream.reasoning == "Thinking." and stream.content == "Let me look. "
    assert [c["function"]["name"] for c in d1.tool_calls + d2.tool_calls] == ["get_weather", "get_time"]
    assert d2.finish_reason == "tool_calls" == stream.finish_reason


# ---- the server ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(toy, tmp_path_factory):
    path = make_random_chat_model(tmp_path_factory.mktemp("random-tools") / "model", toy, seed=1)
    yield from serve_random(path)


@pytest.fixture(scope="module")
def client(served):
    return openai_client(served)


def ask(client, tool_choice, n=6, messages=None, **kw):
    return client.chat.completions.create(model="random", messages=messages or [{"role": "user", "content": "Hi"}],
                                          temperature=1.0, seed=0, n=n, max_tokens=1400, tools=TOOLS,
                                          tool_choice=tool_choice, **kw)


def check_calls(calls, names):
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_") and call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_required_tool_choice_makes_a_random_model_call_tools(client):
    r = ask(client, "required")
    finished = [c for c in r.choices if c.finish_reason != "length"]
    assert finished, "no choice finished within max_tokens"
    for c in finished:
        assert c.finish_reason == "tool_calls" and c.message.content is None
        check_calls(c.message.tool_calls, SCHEMAS)


def test_named_function_streamed_as_tool_call_deltas(client):
    stream = ask(client, {"type": "function", "function": {"name": "get_time"}}, n=1, stream=True)
    calls, finish, content = {}, None, ""
    for chunk in stream:
        if not chunk.choices:
            continue
        d = chunk.choices[0].delta
        content += d.content or ""
        for tc in d.tool_calls or []:
            calls.setdefault(tc.index, tc)
        finish = chunk.choices[0].finish_reason or finish
    if finish == "length":
        pytest.skip("the random model did not end its reasoning within max_tokens")
    assert finish == "tool_calls" and content == ""
    assert list(calls) == [0]  # one call: a named function is called once
    check_calls(list(calls.values()), ["get_time"])


def test_auto_and_none_answer_in_text_and_tool_messages_are_accepted(served, client):
    messages = [{"role": "user", "content": "Weather in Rome?"},
                {"role": "assistant", "content": None, "tool_calls": [CALL]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    for choice in ("auto", "none"):
        r = client.chat.completions.create(model="random", messages=messages, tools=TOOLS, tool_choice=choice,
                                           max_tokens=10, temperature=0)
        assert r.choices[0].finish_reason in ("stop", "length") and not r.choices[0].message.tool_calls
    r = client.chat.completions.create(model="random", messages=messages, max_tokens=5)  # results without tools
    assert r.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("body, param", [
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": TOOLS + TOOLS[:1]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
])
def test_tool_requests_that_cannot_be_honoured_get_400(served, body, param):
    r = httpx.post(served.url + "/v1/chat/completions",
                   json={"messages": [{"role": "user", "content": "x"}], **body}, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"].startswith(param)


def test_tool_result_may_carry_its_function_name_but_a_user_may_not(served):
    messages = [{"role": "user", "content": "Weather in Rome?"},
                {"role": "assistant", "content": None, "tool_calls": [CALL]},
                {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "sunny"}]
    r = httpx.post(served.url + "/v1/chat/completions", json={"messages": messages, "max_tokens": 2}, timeout=30)
    assert r.status_code == 200, r.text
    messages[0]["name"] = "bob"
    r = httpx.post(served.url + "/v1/chat/completions", json={"messages": messages, "max_tokens": 2}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages.0.name"


def test_auto_tool_grammar_is_lazy(toy):
    """Under tool_choice "auto" the answer is free text (end-of-sentence included) until it writes
    <｜tool▁calls▁begin｜>; from there on the calls must name an offered function and give arguments
    its parameters accept."""
    from nanoseek.infer.grammar import GrammarTokenizer
    from nanoseek.serve.tools import tool_call_lark
    tok = load_tokenizer(toy)
    eos = tok.eos_ids[0]
    grammars = GrammarTokenizer(tok.tokenizer_json(), tok.vocab_size, eos)
    grammar = grammars.lark_grammar(tool_call_lark(TOOLS), tok.end_think_id).lazy(TOOL_CALLS_BEGIN)
    free = grammar.constraint()
    for t in tok.encode("Hmm.</think>\n\nIt is sunny."):
        assert free.mask("cpu") is None  # reasoning and a text answer: nothing is masked, EOS allowed
        free.advance(t)
    assert free.mask("cpu") is None
    c = grammar.constraint()
    call = TOOL_CALLS_BEGIN + render_tool_call("get_weather", '{"city":"Paris","unit":"C"}') + TOOL_CALLS_END
    for t in tok.encode("Hmm.</think>\n\nLet me look. "):
        c.advance(t)
    for k, t in enumerate(tok.encode(call)):
        mask = c.mask("cpu")
        assert mask is None or mask[t], f"token {k} of a valid call was masked"
        c.advance(t)
    mask = c.mask("cpu")
    assert mask[eos] and int(mask.sum()) == 1  # the calls block is complete: only the end
    bad = grammar.constraint()
    for t in tok.encode("Hmm.</think>\n\n" + TOOL_CALLS_BEGIN + TOOL_CALL_BEGIN + "function" + TOOL_SEP):
        bad.advance(t)
    mask = bad.mask("cpu")
    assert mask[tok.encode("g")[0]] and not mask[tok.encode("x")[0]] and not mask[eos]  # offered names only
