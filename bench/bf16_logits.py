"""bf16 logit error against fp32 for the parity configs (tests/test_parity.py) and the tiny preset.

For each config: random transformers weights (as the parity tests build them) loaded into nanoseek in
fp32, and a bf16 copy made the way `--precision bf16` makes it (`nanoseek.infer.compute.cast_copy`:
bf16 weights, router gate and bias in fp32). Over a batch of token sequences (a few hundred
positions): max and mean absolute logit error, the mean error relative to the mean |fp32 logit|, and
how often the top-1 token agrees (and fp32's top-1 margin over the runner-up, overall and where the
top-1 differs: random weights give many near-ties). Then greedy decoding of 32 new tokens through the engine (bf16
latent cache): how many prompts give exactly the fp32 tokens, and the mean length of the common prefix.
Prints a markdown table and its JSON, and writes bench/results/bf16_logits.json. No timing.

    .venv/bin/python bench/bf16_logits.py [--batch 4] [--seq 64] [--prompts 8]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from nanoseek import ModelConfig, Transformer, generate, load_model  # noqa: E402
from nanoseek.infer.compute import cast_copy  # noqa: E402
from test_parity import CONFIGS, build_hf  # noqa: E402  (the parity configs, built as the tests build them)
sys.path.insert(0, str(ROOT / "bench"))
from gguf_parity import agreement  # noqa: E402  (leading tokens that agree)

warnings.simplefilter("ignore")
import transformers  # noqa: E402

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
NEW_TOKENS = 32


def parity_model(name: str) -> Transformer:
    """The parity config `name` with transformers' random weights, loaded by nanoseek in fp32."""
    kind, kwargs = CONFIGS[name]
    with tempfile.TemporaryDirectory() as tmp:
        build_hf(kind, kwargs).save_pretrained(tmp)
        return load_model(tmp, dtype=torch.float32).eval()


def tiny_model() -> Transformer:
    cfg = ModelConfig.preset("tiny", initializer_range=0.08, num_nextn_predict_layers=0)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for moe in model.moe_layers():
            moe.gate.e_score_correction_bias.normal_(0, 0.1)
    return model


@torch.inference_mode()
def logit_error(model: Transformer, batch: int, seq: int, prompts: int) -> dict:
    """bf16 copy against fp32 `model`: logit errors over batch x seq positions and greedy equality."""
    bf16 = cast_copy(model, torch.bfloat16)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, vocab, (batch, seq), generator=g)
    ref, got = model(x).float(), bf16(x).float()
    err = (got - ref).abs()
    top2 = ref.topk(2, dim=-1).values
    margin = top2[..., 0] - top2[..., 1]  # fp32's lead of its top-1 token over the runner-up
    flipped = got.argmax(-1) != ref.argmax(-1)
    ids = torch.randint(0, vocab, (prompts, 16), generator=g).tolist()
    ref_tokens = generate(model, ids, max_new_tokens=NEW_TOKENS)
    bf16_tokens = generate(model, ids, max_new_tokens=NEW_TOKENS, precision="bf16")
    prefixes = [agreement(a, b) for a, b in zip(ref_tokens, bf16_tokens)]
    return {"positions": batch * seq, "max_abs": err.max().item(), "mean_abs": err.mean().item(),
            "mean_abs_fp32_logit": ref.abs().mean().item(),
            "relative": (err.mean() / ref.abs().mean()).item(),
            "top1_agreement": 1 - flipped.float().mean().item(),
            "median_margin": margin.median().item(),
            "median_margin_where_top1_differs": margin[flipped].median().item() if flipped.any() else None,
            "greedy_equal": sum(p == NEW_TOKENS for p in prefixes), "greedy_prompts": prompts,
            "greedy_mean_prefix": sum(prefixes) / len(prefixes)}


def markdown(rows: dict) -> str:
    lines = ["| config | positions | max abs | mean abs | mean abs / mean abs fp32 logit | top-1 agreement | "
             "fp32 top-1 margin: median / where top-1 differs | "
             f"greedy {NEW_TOKENS} tokens equal | mean equal prefix |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['positions']} | {r['max_abs']:.3g} | {r['mean_abs']:.3g} | "
                     f"{100 * r['relative']:.2f}% | {100 * r['top1_agreement']:.1f}% | {r['median_margin']:.3g} / "
                     f"{_num(r['median_margin_where_top1_differs'])} | "
                     f"{r['greedy_equal']}/{r['greedy_prompts']} | {r['greedy_mean_prefix']:.1f} |")
    return "\n".join(lines)


def _num(v) -> str:
    return "-" if v is None else f"{v:.3g}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4, help="sequences per config (default 4)")
    ap.add_argument("--seq", type=int, default=64, help="tokens per sequence (default 64)")
    ap.add_argument("--prompts", type=int, default=8, help="prompts decoded greedily (default 8)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "bf16_logits.json"))
    args = ap.parse_args()
    models = {"tiny": tiny_model} | {name: (lambda name=name: parity_model(name)) for name in CONFIGS}
    rows = {name: logit_error(build(), args.batch, args.seq, args.prompts) for name, build in models.items()}
    print(markdown(rows))
    print(json.dumps(rows, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=2))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
