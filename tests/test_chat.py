"""`nanoseek chat`: streamed replies with the thinking shown apart (dimmed with color), multi-turn history,
slash commands, the content policy, the command line, and HF folders whose tokenizer is not nanoseek's."""

import io
import json
import sys

import pytest
import torch

from nanoseek import ModelConfig, Transformer, save_model
from nanoseek.cli import main
from nanoseek.infer import load_tokenizer
from toy import CONVERSATIONS
from nanoseek.serve import Policy, load_engine
from nanoseek.serve.chat import DIM, RESET, TerminalChat


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def engine(toy):
    return load_engine(toy)


def talk(engine, lines, **options) -> tuple[str, TerminalChat]:
    engine_, tok = engine
    chat = TerminalChat(engine_, tok, temperature=0.0, **options)
    out = io.StringIO()
    chat.run(io.StringIO("".join(line + "\n" for line in lines)), out)
    return out.getvalue(), chat


def test_chat_streams_thinking_apart_and_keeps_history(engine):
    out, chat = talk(engine, ["hi", "What is 2+2?", "/max_tokens 3", "hi", "/bogus", "/exit", "never read"])
    _, thought, reply = CONVERSATIONS[0]
    assert f"[thinking]\n{thought}\n[/thinking]\n{reply}\n" in out
    assert out.count("\n> ") == 6  # one prompt per input line up to /exit
    assert "max_tokens = 3" in out and "[length limit]" in out and "unknown command /bogus" in out
    assert "never read" not in out
    assert [m["role"] for m in chat.history] == ["user", "assistant"] * 3
    assert chat.history[1] == {"role": "assistant", "content": reply}  # the reasoning is not kept


def test_reset_temperature_and_color(engine):
    out, chat = talk(engine, ["hi", "/reset", "/temperature 9", "/temperature 0", "hi"], color=True)
    assert "conversation cleared" in out and "usage: /temperature" in out and "temperature = 0" in out
    assert f"{DIM}thinking: {CONVERSATIONS[0][1]}{RESET}" in out
    assert len(chat.history) == 2  # /reset dropped the first turn


def test_chat_applies_the_policy(engine, tmp_path):
    (tmp_path / "p.yaml").write_text("rules:\n"
                                     "  - {name: pw, applies_to: input, keywords: [password], message: No.}\n"
                                     "  - {name: cats, applies_to: output, keywords: [cat], message: Stopped.}\n")
    policy = Policy.load(tmp_path / "p.yaml", audit_path=tmp_path / "audit.jsonl")
    out, chat = talk(engine, ["my password", "Tell me a story"], policy=policy)
    assert "No.\n" in out
    assert "Once upon a time a small \nStopped." in out and " cat " not in out
    records = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [(r["rule"], r["where"], r["source"]) for r in records] == [("pw", "input", "chat"),
                                                                      ("cats", "output", "chat")]
    assert len(chat.history) == 2  # the refused input never entered the conversation


def test_chat_command_line(toy, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n"))
    assert main(["chat", str(toy), "--temperature", "0", "--no-color", "--speculative"]) == 0
    assert CONVERSATIONS[0][2] in capsys.readouterr().out
    assert main(["chat", str(tmp_path / "missing")]) == 2
    assert "not found" in capsys.readouterr().err
    save_model(Transformer(ModelConfig.preset("tiny")), tmp_path / "no-tokenizer")
    assert main(["chat", str(tmp_path / "no-tokenizer")]) == 2
    assert "no tokenizer files" in capsys.readouterr().err


def test_any_hf_folder_with_its_own_chat_template(tmp_path, monkeypatch):
    """A tokenizer without R1's special tokens: transformers' tokenizer and the folder's template."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(["hello world, a chat template test"] * 10,
                                trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                                    initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")
    hf.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                        "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    folder = tmp_path / "hf"
    hf.save_pretrained(folder)
    torch.manual_seed(0)
    save_model(Transformer(ModelConfig.preset("tiny", vocab_size=len(hf), num_nextn_predict_layers=0)), folder)
    tok = load_tokenizer(folder)
    assert tok.name == "transformers"
    ids, thinking = tok.chat_prompt([{"role": "user", "content": "hello"}])
    assert not thinking and tok.decode(ids) == "<|user|>hello\n<|assistant|>"
    monkeypatch.setattr(sys, "stdin", io.StringIO("/max_tokens 4\nhello\n"))
    assert main(["chat", str(folder), "--no-color"]) == 0


def test_chat_policy_reads_the_system_prompt_when_asked(engine, tmp_path):
    rules = "rules:\n  - {name: cn, applies_to: input, keywords: [天安门], message: No.}\n"
    (tmp_path / "p.yaml").write_text(rules + "input_roles: [user, system]\n", encoding="utf-8")
    out, chat = talk(engine, ["hi"], policy=Policy.load(tmp_path / "p.yaml"), system="谈谈天安門")
    assert "No.\n" in out and chat.history == []
    (tmp_path / "p.yaml").write_text(rules, encoding="utf-8")  # default: user messages only
    out, chat = talk(engine, ["hi"], policy=Policy.load(tmp_path / "p.yaml"), system="谈谈天安門")
    assert "No.\n" not in out and len(chat.history) == 2
