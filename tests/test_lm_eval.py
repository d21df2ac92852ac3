"""lm-evaluation-harness on a nanoseek model folder, offline, with local YAML tasks over local JSONL files
run by `lm_eval.simple_evaluate(model="hf")` (transformers' DeepseekV3 on our folder): a multiple-choice
task gives per-choice log-likelihoods equal to nanoseek's own scoring of the same context + continuation
(our Transformer, our tokenizer, lm-eval's context/continuation split) and the accuracy those imply; a
generation task through our R1 chat template, with the think block cut at `</think>`'s id, gets the
toy's memorized answers."""

import json

import pytest
import torch
import torch.nn.functional as F

import nanoseek
from nanoseek.tokenizer import Tokenizer

lm_eval = pytest.importorskip("lm_eval", reason="pip install -e .[dev] for lm-evaluation-harness")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")

# multi-byte characters, merged BPE tokens and a context ending in a space exercise the context /
# continuation split; the toy never saw these contexts, and the labels make its scores right on 2 of 3
ROWS = [
    {"question": "What is 2+2?", "choices": ["2+2 = 4.", "Hello!", "the sea"], "label": 2},
    {"question": "hi", "choices": ["Hello! 你好 👋", "Ende.", "2+2 = 4."], "label": 1},
    {"question": "Tell me a story ", "choices": ["Once upon a time", "<i>not italic</i>", "four"], "label": 0},
]

MC_YAML = """\
task: nanoseek_toy_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""

GEN_ROWS = [{"question": "What is 2+2?", "answer": "2+2 = 4. Voilà, déjà vu: ça marche."},
            {"question": "hi", "answer": "Hello! 你好 👋 How can I help?"}]

GEN_YAML = """\
task: nanoseek_toy_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: answer
generation_kwargs:
  until: ["<｜end▁of▁sentence｜>"]
  max_gen_toks: 48
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


def write_task(folder, name: str, rows: list[dict], yaml: str):
    """A local lm-eval task: folder/name.jsonl and folder/name.yaml (its datasets cache inside folder)."""
    folder.mkdir(exist_ok=True)
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    (folder / f"{name}.yaml").write_text(yaml.format(data=data, cache=folder / "datasets-cache"), encoding="utf-8")


def evaluate(folder, task: str, model_args: str, **kw) -> dict:
    from lm_eval.tasks import TaskManager
    return lm_eval.simple_evaluate(model="hf", model_args=model_args, tasks=[task], device="cpu", batch_size=4,
                                   log_samples=True, **kw,
                                   task_manager=TaskManager(include_path=str(folder), include_defaults=False))


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def nanoseek_loglikelihood(model, tok: Tokenizer, context: str, continuation: str) -> tuple[float, bool]:
    """log p(continuation | context) and whether it is the greedy continuation, tokenized as lm-eval's
    HF model does: trailing spaces of the context move to the continuation, context + continuation is
    encoded whole (with BOS: the folder's tokenizer_config sets add_bos_token) and split after the
    context's own tokens."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tok.encode(context + continuation, bos=True)
    n_context = len(tok.encode(context, bos=True))
    targets = torch.tensor(whole[n_context:])
    with torch.no_grad():
        logits = model(torch.tensor([whole[:-1]]))[0, n_context - 1:]  # (len(targets), vocab)
    logp = F.log_softmax(logits.float(), dim=-1)
    return logp.gather(1, targets[:, None]).sum().item(), bool((logits.argmax(-1) == targets).all())


@pytest.mark.usefixtures("offline")
def test_lm_eval_loglikelihoods_match_nanoseek(toy, tmp_path):
    write_task(tmp_path / "tasks", "toy_mc", ROWS, MC_YAML)
    out = evaluate(tmp_path / "tasks", "nanoseek_toy_mc", f"pretrained={toy},dtype=float32")
    samples = sorted(out["samples"]["nanoseek_toy_mc"], key=lambda s: s["doc_id"])
    assert len(samples) == len(ROWS)

    model, tok = nanoseek.load_model(toy, dtype=torch.float32).eval(), Tokenizer.load(toy)
    hf_tok = transformers.AutoTokenizer.from_pretrained(toy)
    correct = 0
    for sample, row in zip(samples, ROWS):
        assert [a[1] for a in sample["arguments"]] == [" " + c for c in row["choices"]]  # target_delimiter
        scores = []
        for (context, continuation), (harness_logp, harness_greedy) in zip(sample["arguments"],
                                                                           sample["filtered_resps"]):
            # the tokenizer files give transformers exactly nanoseek's ids, BOS first
            assert hf_tok.encode(context + continuation) == tok.encode(context + continuation, bos=True)
            logp, greedy = nanoseek_loglikelihood(model, tok, context, continuation)
            assert logp == pytest.approx(harness_logp, abs=1e-4), (context, continuation)
            assert greedy == harness_greedy
            scores.append(logp)
        correct += max(range(len(scores)), key=scores.__getitem__) == row["label"]
    assert samples[2]["arguments"][0][0].endswith(" ")  # the trailing-space case was exercised
    assert correct == 2 and out["results"]["nanoseek_toy_mc"]["acc,none"] == pytest.approx(correct / len(ROWS))


@pytest.mark.usefixtures("offline")
def test_lm_eval_generates_through_the_chat_template(toy, tmp_path):
    write_task(tmp_path / "tasks", "toy_gen", GEN_ROWS, GEN_YAML)
    end_think = Tokenizer.load(toy).end_think_id  # a special token: lm-eval decodes without it, so give its id
    out = evaluate(tmp_path / "tasks", "nanoseek_toy_gen",
                   f"pretrained={toy},dtype=float32,think_end_token={end_think}", apply_chat_template=True)
    samples = sorted(out["samples"]["nanoseek_toy_gen"], key=lambda s: s["doc_id"])
    assert samples[0]["arguments"][0][0].endswith("<｜User｜>What is 2+2?<｜Assistant｜><think>\n")  # R1's template
    assert [s["filtered_resps"][0] for s in samples] == [r["answer"] for r in GEN_ROWS]
    assert out["results"]["nanoseek_toy_gen"]["exact_match,none"] == 1.0
