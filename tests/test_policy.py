"""The content policy in every script: normalisation (NFKC, case, zero-width characters, traditional ->
simplified Chinese), keywords that match anywhere in non-spaced scripts and on word boundaries in
spaced ones, the streamed-output monitor stopping the original text at a normalised match, and the
option to read system and assistant messages."""

import pytest

from nanoseek.serve.policy import Policy, PolicyError, normalize, normalize_mapped


def policy(*rules, **top):
    return Policy.from_dict({"rules": list(rules), **top})


def rule(name, keywords=(), regex=(), **kw):
    return {"name": name, "keywords": list(keywords), "regex": list(regex), **kw}


def hits(p, text, where="input"):
    return [d.rule for d in p.check(text, where)]


CN = policy(rule("tiananmen", ["天安门"]))


@pytest.mark.parametrize("text", ["天安门", "我想了解天安门事件", "天安门事件", "关于天安门", "天安門",
                                  "我想了解天安門事件", "天\u200b安\u200d门", "天安\ufeff門广场"])
def test_chinese_keyword_matches_inside_chinese_text_in_either_script(text):
    assert hits(CN, text) == ["tiananmen"]


def test_a_traditional_keyword_catches_simplified_text_too():
    p = policy(rule("t", ["天安門"]))
    assert hits(p, "关于天安门") == ["t"] and hits(p, "天安") == []


@pytest.mark.parametrize("keyword, text, found", [
    ("cat", "a cat.", True), ("cat", "cats", False), ("cat", "concatenate", False), ("cat", "CAT!", True),
    ("cat", "我的cat呢", True),  # Latin inside Chinese: the Chinese characters are no word
    ("password", "ＰＡＳＳＷＯＲＤ?", True),  # full-width letters (NFKC)
    ("password", "pass\u200bword", True),  # a zero-width space does not hide it
    ("straße", "STRASSE", True),  # case folding, not just lower()
    ("ยาเสพติด", "ขายยาเสพติดที่นี่", True),  # Thai: no spaces between words
    ("ドラッグ", "違法ドラッグの売買", True),  # Japanese katakana
    ("ﾄﾞﾗｯｸﾞ", "違法ドラッグ", True),  # half-width katakana keyword, full-width text
    ("마약", "마약을 팔아요", True),  # Korean with a particle attached
    ("водка", "водками", False), ("водка", "водка!", True),  # Cyrillic keeps word boundaries
])
def test_keywords_by_script(keyword, text, found):
    assert hits(policy(rule("r", [keyword])), text) == (["r"] if found else [])


def test_regex_sees_normalised_text_case_insensitively():
    p = policy(rule("key", regex=[r"\bsk-[A-Za-z0-9]{8,}"]), rule("cn", regex=["天安門.?事件"]))
    assert hits(p, "my SK-ABCDEFGH12 key") == ["key"]
    assert hits(p, "ＳＫ-abcdefgh12") == ["key"]
    assert hits(p, "天安门事件") == ["cn"]


def test_normalize_and_its_map():
    assert normalize("Ｈｅｌｌｏ\u200b 天安門") == "hello 天安门"
    text = "ａ\u200bß e\u0301門"
    norm, starts, ends = normalize_mapped(text)
    assert norm == normalize(text) == "ass é门"
    assert [text[s:e] for s, e in zip(starts, ends)] == ["ａ", "ß", "ß", " ", "e\u0301", "門"]


def test_output_monitor_stops_streamed_chinese_before_the_match():
    m = CN.monitor()
    shown, decision = "", None
    for piece in ["我想", "了解天", "\u200b安", "門事件", "的历史"]:
        out, d = m.push(piece)
        shown += out
        decision = decision or d
    assert shown == "我想了解" and decision.rule == "tiananmen" and decision.match == "天\u200b安門"


def test_output_monitor_shows_everything_when_nothing_matches():
    m = policy(rule("x", ["天安门"]), rule("cat", ["cat"])).monitor()
    pieces = ["Ｈｅｌｌｏ ", "e\u0301", "\u0301 ca", "t", "s are 天安", "全"]
    shown = "".join(m.push(p)[0] for p in pieces[:-1]) + m.push(pieces[-1], final=True)[0]
    assert shown == "".join(pieces) and m.stopped is None


def test_input_roles_option_reads_system_and_assistant_messages():
    messages = [("system", "天安門"), ("user", "hello"), ("assistant", "cat")]
    default = policy(rule("cn", ["天安门"]), rule("cat", ["cat"]))
    assert default.check(default.input_text(messages), "input") == []
    every = policy(rule("cn", ["天安门"]), rule("cat", ["cat"]), input_roles=["user", "system", "assistant"])
    assert sorted(hits(every, every.input_text(messages))) == ["cat", "cn"]


@pytest.mark.parametrize("raw, match", [
    ({"rules": [rule("a", ["x"])], "input_roles": ["tool"]}, "input_roles"),
    ({"rules": [rule("a", ["\u200b"])]}, "empty once normalised"),
])
def test_bad_policy_options(raw, match):
    with pytest.raises(PolicyError, match=match):
        Policy.from_dict(raw)
