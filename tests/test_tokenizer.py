"""Behaviour specs for nanoseek.tokenizer: byte-level BPE training, R1 special tokens, the chat template
(same ids as transformers' apply_chat_template on the saved folder), the SFT assistant mask."""

from __future__ import annotations

import json
import os

import pytest

from nanoseek import DataError
from nanoseek.cli import main
from nanoseek.tokenizer import (ASSISTANT, BOS, END_THINK, EOS, MIN_VOCAB_SIZE, PAD, SPECIAL_TOKENS, THINK,
                                USER, Tokenizer, render_chat)

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may reach a hub

CORPUS = [
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer "
    "the slings and arrows of outrageous fortune. 1234567 + 89 = 1234656.\n\n",
    "Naïve café, 東京, emoji 🙂 and tabs\tand  double  spaces.\r\nWindows line end.\n",
    "def add(a, b):\n    return a + b  # code with indentation\n",
]

CONVERSATIONS = {
    "user only": [{"role": "user", "content": "Hello there"}],
    "system + reasoning": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "Two plus two is four."}],
    "no reasoning": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
    "multi-turn": [
        {"role": "system", "content": "First rule."},
        {"role": "system", "content": "Second rule."},
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1", "reasoning_content": "old thoughts"},
        {"role": "user", "content": "q2 with <think> inside"},
        {"role": "assistant", "content": "a2 🙂", "reasoning_content": "new\nthoughts"}],
    "earlier inline think": [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "<think>\nhidden\n</think>\n\na1"},
        {"role": "user", "content": "q2"}],
    "reasoning null": [{"role": "user", "content": "x"},
                       {"role": "assistant", "content": "y", "reasoning_content": None}],
}


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(CORPUS * 20, vocab_size=400)


@pytest.fixture(scope="module")
def tok_dir(tok, tmp_path_factory):
    return tok.save(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def hf(tok_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(tok_dir))


# ---- training and encoding -----------------------------------------------------------------------
def test_special_tokens_take_the_first_ids(tok):
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(7))
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.user_id, tok.assistant_id, tok.think_id,
            tok.end_think_id) == tuple(range(7))
    assert "\uff5c" in BOS and "\u2581" in BOS  # fullwidth bar, lower one-eighth block
    for t in SPECIAL_TOKENS:
        assert tok.encode(f"a{t}b") == tok.encode("a") + [tok.token_to_id(t)] + tok.encode("b")


def test_vocab_size_and_merges(tok):
    assert MIN_VOCAB_SIZE < tok.vocab_size <= 400
    assert len(tok.encode(CORPUS[0])) < len(CORPUS[0].encode()) / 2  # merges were learned


@pytest.mark.parametrize("text", CORPUS + ["", " leading space", "unseen: Ωμέγα ✓ 𝔘", "\n\n\n  \t"])
def test_decode_encode_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_bos_eos_and_digit_groups(tok):
    ids = tok.encode("12345", bos=True, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    pieces = [tok.decode([i]) for i in ids[1:-1]]
    assert "".join(pieces) == "12345" and all(len(p) <= 3 for p in pieces)  # digits in groups of <= 3
    assert tok.decode(ids, skip_special_tokens=True) == "12345"


def test_too_small_vocab_is_refused():
    with pytest.raises(DataError, match="minimum 263"):
        Tokenizer.train(CORPUS, vocab_size=100)


def test_save_load_keeps_ids_hash_and_other_files(tok, tmp_path):
    (tmp_path / "config.json").write_text("{}")  # a model folder: its files must survive
    tok.save(tmp_path)
    again = Tokenizer.load(tmp_path)
    assert again.hash == tok.hash and again.vocab_size == tok.vocab_size
    assert again.encode(CORPUS[1]) == tok.encode(CORPUS[1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "tokenizer.json", "tokenizer_config.json"]
    config = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["bos_token"] == BOS and config["eos_token"] == EOS and config["pad_token"] == PAD
    assert "chat_template" in config


def test_load_errors(tmp_path):
    with pytest.raises(DataError, match="no tokenizer.json"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(DataError, match="not a valid tokenizers file"):
        Tokenizer.load(tmp_path)


# ---- transformers compatibility ------------------------------------------------------------------
def test_transformers_loads_the_folder(tok, hf):
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 2)
    assert len(hf) == tok.vocab_size
    for text in CORPUS:
        assert hf(text)["input_ids"] == tok.encode(text, bos=True)  # HF convention: BOS prepended
        assert hf.decode(tok.encode(text)) == text
    for t in SPECIAL_TOKENS:
        assert hf.convert_tokens_to_ids(t) == tok.token_to_id(t)
        assert hf(t, add_special_tokens=False)["input_ids"] == [tok.token_to_id(t)]


@pytest.mark.parametrize("generation_prompt", [False, True])
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_chat_template_matches_transformers(tok, hf, name, generation_prompt):
    messages = CONVERSATIONS[name]
    ours = tok.apply_chat_template(messages, add_generation_prompt=generation_prompt)
    theirs = hf.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True,
                                    return_dict=False)
    assert ours == list(theirs)
    text = tok.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)
    assert text == hf.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)
    assert tok.decode(ours) == text


def test_template_renders_r1_format(tok):
    text = tok.apply_chat_template(CONVERSATIONS["system + reasoning"], tokenize=False)
    assert text == (f"{BOS}You are terse.{USER}What is 2 + 2?{ASSISTANT}{THINK}\nTwo plus two is four."
                    f"\n{END_THINK}\n\n4{EOS}")
    prompt = tok.apply_chat_template(CONVERSATIONS["system + reasoning"][:2], add_generation_prompt=True,
                                     tokenize=False)
    assert prompt.endswith(f"{ASSISTANT}{THINK}\n") and text.startswith(prompt)


def test_earlier_turns_drop_reasoning(tok):
    text = tok.apply_chat_template(CONVERSATIONS["multi-turn"], tokenize=False)
    assert text == (f"{BOS}First rule.\n\nSecond rule.{USER}q1{ASSISTANT}a1{EOS}{USER}q2 with {THINK} inside"
                    f"{ASSISTANT}{THINK}\nnew\nthoughts\n{END_THINK}\n\na2 🙂{EOS}")
    assert "old thoughts" not in text
    inline = tok.apply_chat_template(CONVERSATIONS["earlier inline think"], tokenize=False)
    assert "hidden" not in inline and f"{ASSISTANT}\n\na1{EOS}" in inline  # cut at </think> like R1


def test_no_reasoning_renders_an_empty_think_block(tok):
    text = tok.apply_chat_template(CONVERSATIONS["no reasoning"], tokenize=False)
    assert text.endswith(f"{ASSISTANT}{THINK}\n\n{END_THINK}\n\nHello!{EOS}")


@pytest.mark.parametrize("messages, match", [
    ([{"role": "tool", "content": "x"}], "message 0 has unknown role 'tool'"),
    ([{"role": "user", "content": "q"}, {"role": "assistant"}], "message 1 \\(assistant\\) has no content"),
    ([{"role": "user", "content": ["parts"]}], "non-string content"),
    ([], "non-empty list"),
    ("hello", "non-empty list"),
])
def test_bad_messages(tok, messages, match):
    with pytest.raises(DataError, match=match):
        tok.apply_chat_template(messages)


def test_unknown_role_fails_in_transformers_too(hf):
    with pytest.raises(Exception, match="unknown role 'tool'"):
        hf.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


# ---- the SFT mask --------------------------------------------------------------------------------
def test_assistant_mask_token_by_token(tok):
    """Built by hand: prompt tokens 0, every token of the reply (think block, answer, EOS) 1."""
    enc = tok.encode
    ids, mask = tok.encode_chat(CONVERSATIONS["multi-turn"])
    prompt1 = [tok.bos_id] + enc("First rule.\n\nSecond rule.") + [tok.user_id] + enc("q1") + [tok.assistant_id]
    reply1 = enc("a1") + [tok.eos_id]
    prompt2 = [tok.user_id] + enc("q2 with ") + [tok.think_id] + enc(" inside") + [tok.assistant_id]
    reply2 = ([tok.think_id] + enc("\nnew\nthoughts\n") + [tok.end_think_id] + enc("\n\na2 🙂") + [tok.eos_id])
    assert ids == prompt1 + reply1 + prompt2 + reply2
    assert mask == [False] * len(prompt1) + [True] * len(reply1) + [False] * len(prompt2) + [True] * len(reply2)


def test_assistant_mask_spans_decode_to_replies(tok):
    for messages in CONVERSATIONS.values():
        ids, mask = tok.encode_chat(messages)
        assert len(ids) == len(mask)
        replies = [text for text, is_reply in render_chat(messages) if is_reply]
        spans, current = [], []
        for i, m in zip(ids, mask):
            if m:
                current.append(i)
            elif current:
                spans.append(current)
                current = []
        spans += [current] if current else []
        assert [tok.decode(s) for s in spans] == replies
        ids_prompt, mask_prompt = tok.encode_chat(messages, add_generation_prompt=True)
        assert not any(mask_prompt[len(ids):])  # the generation prompt is never a target


# ---- CLI -----------------------------------------------------------------------------------------
def test_cli_train(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(CORPUS * 10), encoding="utf-8")
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": CONVERSATIONS["system + reasoning"]}) + "\n", encoding="utf-8")
    assert main(["tokenizer", "train", "--input", str(corpus), str(chat), "--vocab-size", "300",
                 "--out", str(tmp_path / "tok")]) == 0
    assert "-> " in capsys.readouterr().out
    tok = Tokenizer.load(tmp_path / "tok")
    assert MIN_VOCAB_SIZE < tok.vocab_size <= 300


@pytest.mark.parametrize("setup, needle", [
    (lambda d: None, "no such file"),
    (lambda d: (d / "in.txt").write_bytes(b""), "file is empty"),
    (lambda d: (d / "in.txt").write_bytes(b"ok\nbad \xff byte\n"), "in.txt:2: not valid UTF-8"),
])
def test_cli_train_bad_input(tmp_path, capsys, setup, needle):
    setup(tmp_path)
    code = main(["tokenizer", "train", "--input", str(tmp_path / "in.txt"), "--vocab-size", "300",
                 "--out", str(tmp_path / "tok")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and needle in err[0]
    assert not (tmp_path / "tok").exists()
