"""Why the demo's MoE does not beat its dense twin on addition3: the figures of docs/moe_vs_dense.md.

    OMP_NUM_THREADS=1 .venv/bin/python bench/moe_diagnosis.py --work /tmp/diag [--steps 600]
        [--variants moe,moe_no_bias,moe_no_aux,moe_no_mtp,dense] [--parity-steps 200] [--dev 200]

1. Variants of the demo's SFT stage (same data, seed, batches and recipe as `nanoseek demo`), each
   trained by a loop that is the trainer's step (training_loss, clip, fused AdamW, bias update) plus
   instruments read every --log-every steps: tokens per routed expert, per-expert gradient RMS and
   relative update (||dW|| / ||W|| of one AdamW step) beside the shared expert's and the dense layer's,
   router entropy, dead (no token) and saturated (> 2x the mean load) experts. At the end: validation
   loss, loss on the first training batches (the memorisation gap) and greedy accuracy on a dev split
   (train-split problems the SFT data does not contain; never the demo's test problems).
2. Parity: the same initial weights copied into transformers' DeepseekV3ForCausalLM (through the HF
   folder), the same batches and the same step (MTP off: transformers has none; the bias update applied
   to its router's e_score_correction_bias from the indices it picked; aux loss off), loss curves side
   by side; max relative difference printed.
Each variant writes WORK/NAME.json and is skipped when present, so variants can run as parallel
processes (one thread each) and a final call with --report prints the tables from the JSON files.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanoseek import save_model  # noqa: E402
from nanoseek.data.loader import TokenLoader  # noqa: E402
from nanoseek.demo import DemoSettings, base_recipe, dense_overrides, model_overrides, prepare_data  # noqa: E402
from nanoseek.eval.tasks import evaluate_task  # noqa: E402
from nanoseek.tasks import get_task  # noqa: E402
from nanoseek.train.common import (build_optimizer, expert_loads, load_balance, lr_at, masked_cross_entropy,  # noqa: E402
                                   training_loss, update_routing_bias)
from nanoseek.train.loop import set_aux_loss_alpha  # noqa: E402
from nanoseek.train.trainer import build_model, evaluate  # noqa: E402

warnings.simplefilter("ignore")

VARIANTS = {  # name: (model overrides builder, recipe changes)
    "moe": (model_overrides, {}),
    "moe_no_bias": (model_overrides, {"bias_update_speed": 0.0}),
    "moe_no_aux": (model_overrides, {"aux_loss_alpha": 0.0}),
    "moe_no_mtp": (model_overrides, {"mtp_loss_weight": 0.0}),
    "moe_no_extras": (model_overrides, {"mtp_loss_weight": 0.0, "aux_loss_alpha": 0.0, "bias_update_speed": 0.0}),
    "dense": (dense_overrides, {"bias_update_speed": 0.0, "aux_loss_alpha": 0.0}),
    "dense_no_mtp": (dense_overrides, {"bias_update_speed": 0.0, "aux_loss_alpha": 0.0, "mtp_loss_weight": 0.0}),
}


class Probe:
    """Router statistics of every MoE layer for the forwards since the last read: mean per-token entropy
    of the normalised affinity scores (nats; ln E is uniform) and the mean top-k routing weight."""

    def __init__(self, model):
        self.entropy: list[list[float]] = [[] for _ in model.moe_layers()]
        for i, moe in enumerate(model.moe_layers()):
            moe.gate.register_forward_hook(self._hook(i))

        self.bias_decides: list[list[float]] = [[] for _ in model.moe_layers()]
        self.spread: list[list[float]] = [[] for _ in model.moe_layers()]

    def _hook(self, i):
        def hook(module, args, out):
            with torch.no_grad():
                scores, idx = out[2], out[1]
                p = scores / scores.sum(-1, keepdim=True)
                self.entropy[i].append(float(-(p * p.clamp_min(1e-12).log()).sum(-1).mean()))
                # would the token pick other experts without the balancing bias? (group limit included)
                choice = module._mask_groups(scores) if module.n_group > 1 else scores
                plain = choice.topk(module.top_k, dim=-1).indices.sort(-1).values
                self.bias_decides[i].append(float((plain != idx.sort(-1).values).any(-1).float().mean()))
                self.spread[i].append(float(scores.std(-1).mean()))  # per-token spread of the affinities
        return hook

    def read(self) -> list[float]:
        vals = [sum(e) / max(len(e), 1) for e in self.entropy]
        for e in self.entropy:
            e.clear()
        return vals

    def read_bias(self) -> tuple[list[float], list[float]]:
        """(share of tokens whose experts the bias changed, mean per-token std of the scores) per layer."""
        out = ([sum(e) / max(len(e), 1) for e in self.bias_decides], [sum(e) / max(len(e), 1) for e in self.spread])
        for e in self.bias_decides + self.spread:
            e.clear()
        return out


def _rms(t: torch.Tensor | None) -> float:
    return 0.0 if t is None else float(t.pow(2).mean().sqrt())


def instrument(model, before: dict[str, torch.Tensor]) -> dict:
    """Per MoE layer: gradient RMS and relative update of each routed expert, the shared expert and (for
    scale) the first dense layer's MLP. `before`: parameters before the optimizer step; gradients are
    read before it too (the caller passes them in `before['grad:...']`)."""
    rows = []
    for i, moe in enumerate(model.moe_layers()):
        gu, dn = moe.experts.gate_up, moe.experts.down
        g_gu, g_dn = before[f"grad:{i}:gate_up"], before[f"grad:{i}:down"]
        w_gu, w_dn = before[f"w:{i}:gate_up"], before[f"w:{i}:down"]
        grad = [math.sqrt((g_gu[e].pow(2).sum() + g_dn[e].pow(2).sum()).item() / (g_gu[e].numel() + g_dn[e].numel()))
                for e in range(gu.shape[0])]
        upd = [math.sqrt(((gu[e] - w_gu[e]).pow(2).sum() + (dn[e] - w_dn[e]).pow(2).sum()).item()
                         / (w_gu[e].pow(2).sum() + w_dn[e].pow(2).sum()).item()) for e in range(gu.shape[0])]
        shared = moe.shared_experts
        sh_params = list(shared.parameters()) if shared is not None else []
        sh_grad = math.sqrt(sum(float(before[f"grad:{i}:shared:{j}"].pow(2).sum()) for j in range(len(sh_params)))
                            / max(sum(p.numel() for p in sh_params), 1))
        sh_upd = math.sqrt(sum(float((p - before[f"w:{i}:shared:{j}"]).pow(2).sum()) for j, p in enumerate(sh_params))
                           / max(sum(float(before[f"w:{i}:shared:{j}"].pow(2).sum()) for j in range(len(sh_params))),
                                 1e-30))
        rows.append({"expert_grad_rms": grad, "expert_rel_update": upd, "shared_grad_rms": sh_grad,
                     "shared_rel_update": sh_upd})
    return {"moe_layers": rows}


def snapshot(model) -> dict[str, torch.Tensor]:
    snap = {}
    for i, moe in enumerate(model.moe_layers()):
        for name in ("gate_up", "down"):
            p = getattr(moe.experts, name)
            snap[f"w:{i}:{name}"] = p.detach().clone()
            snap[f"grad:{i}:{name}"] = p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
        if moe.shared_experts is not None:
            for j, p in enumerate(moe.shared_experts.parameters()):
                snap[f"w:{i}:shared:{j}"] = p.detach().clone()
                snap[f"grad:{i}:shared:{j}"] = p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
    return snap


def dense_layer_stats(model, before_w, before_g) -> dict:
    """Gradient RMS and relative update of the first (dense) layer's MLP: the scale of a weight that
    sees every token."""
    mlp = model.layers[0].mlp
    ps = list(mlp.parameters())
    grad = math.sqrt(sum(float(g.pow(2).sum()) for g in before_g) / sum(p.numel() for p in ps))
    upd = math.sqrt(sum(float((p - w).pow(2).sum()) for p, w in zip(ps, before_w))
                    / sum(float(w.pow(2).sum()) for w in before_w))
    return {"dense_mlp_grad_rms": grad, "dense_mlp_rel_update": upd}


@torch.no_grad()
def split_loss(model, recipe, split: str, batches: int = 4) -> float:
    """Mean main loss over the first `batches` unshuffled batches of a split (train: the memorisation
    side of the train/validation gap)."""
    loader = TokenLoader(recipe.data, split, batch_size=recipe.batch_size, seq_len=recipe.seq_len, shuffle=False,
                         whole_documents=True, vocab_size=model.config.vocab_size)
    model.eval()
    plain = replace(recipe, mtp_loss_weight=0.0)
    losses = [training_loss(model, b, plain)[1]["loss"] for b in loader.epoch_batches(batches)]
    model.train()
    return sum(losses) / len(losses)


def dev_problems(task, train_jsonl: Path, n: int) -> list:
    """Train-split problems not among the SFT conversations: settings are chosen on these, never on
    the held-out test split the report card scores."""
    seen = {json.loads(line)["messages"][0]["content"] for line in train_jsonl.read_text().splitlines() if line}
    pool = task.generate(4 * n + len(seen), seed=991, split="train")
    return [p for p in pool if p.prompt not in seen][:n]


def train_variant(name: str, work: Path, s: DemoSettings, steps: int, log_every: int, n_dev: int) -> dict:
    """The demo's SFT stage for `name`, instrumented; returns (and writes WORK/NAME.json) the figures."""
    task = get_task(s.task)
    tok, tok_dir, data_dir, vocab = prepare_data(work / "data", s, task)
    overrides, changes = VARIANTS[name]
    recipe = replace(base_recipe(s, data_dir, tok_dir), max_steps=steps, model=overrides(vocab), **changes,
                     out=str(work / name))
    torch.manual_seed(s.seed)
    model = build_model(recipe, torch.device("cpu")).train()
    set_aux_loss_alpha(model, recipe.aux_loss_alpha)
    opt = build_optimizer(model, recipe)
    loader = TokenLoader(recipe.data, "train", batch_size=recipe.batch_size, seq_len=recipe.seq_len, seed=recipe.seed,
                         whole_documents=True, vocab_size=vocab)
    probe = Probe(model) if model.moe_layers() else None
    curve, logs, t0 = [], [], time.perf_counter()
    for step in range(steps):
        batch = loader.next_batch()
        loss, parts = training_loss(model, batch, recipe)
        loss.backward()
        loads = expert_loads(model)
        log = step % log_every == 0 or step == steps - 1
        if log:
            snap = snapshot(model)
            mlp = list(model.layers[0].mlp.parameters())
            mw, mg = [p.detach().clone() for p in mlp], [p.grad.detach().clone() for p in mlp]
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip or float("inf"))
        for g in opt.param_groups:
            g["lr"] = lr_at(step, recipe)
        opt.step()
        opt.zero_grad(set_to_none=True)
        update_routing_bias(model, loads, recipe.bias_update_speed)
        curve.append(parts["loss"])
        if log:
            row = {"step": step, "loss": parts["loss"], "grad_norm": float(grad_norm), **parts,
                   **dense_layer_stats(model, mw, mg)}
            if loads:
                row.update(instrument(model, snap), expert_load=[l.tolist() for l in loads],
                           load_max_over_mean=load_balance(loads), router_entropy=probe.read(),
                           bias_changes_choice=probe.read_bias()[0],
                           bias=[m.gate.e_score_correction_bias.tolist() for m in model.moe_layers()])
            logs.append(row)
    wall = time.perf_counter() - t0
    val = evaluate(model, recipe, vocab, _Single())
    train_l = split_loss(model, recipe, "train")
    dev = dev_problems(task, work / "data" / "data" / "train.jsonl", n_dev) if n_dev else []
    model.eval()
    acc = (evaluate_task(model, tok, task, k=0, problems=dev, seed=s.seed, split="train")["greedy_accuracy"]
           if dev else {"value": float("nan"), "ci95": [float("nan")] * 2})
    out = {"name": name, "steps": steps, "wall_seconds": wall, "val_loss": val, "train_loss": train_l,
           "dev_accuracy": acc["value"], "dev_ci95": acc["ci95"],
           "dev_n": len(dev), "curve": curve, "logs": logs, "recipe_changes": changes,
           "total_params": sum(p.numel() for p in model.parameters())}
    (work / f"{name}.json").write_text(json.dumps(out))
    save_model(model, work / name / "model")
    return out


class _Single:
    """The one-process stand-in `evaluate` expects (world size 1, no collectives)."""
    world_size, rank, is_main = 1, 0, True

    def all_reduce_sum(self, tensors):
        return tensors

    def mean_floats(self, values):
        return values


def parity_recipe(work: Path, s: DemoSettings, steps: int):
    """(vocabulary size, recipe) of the parity runs: the demo's data and SFT recipe for `steps` steps, with
    MTP and the aux loss off (transformers has neither) and no MTP module."""
    _, tok_dir, data_dir, vocab = prepare_data(work / "data", s, get_task(s.task))
    return vocab, replace(base_recipe(s, data_dir, tok_dir), max_steps=steps, mtp_loss_weight=0.0, aux_loss_alpha=0.0,
                        model=dict(model_overrides(vocab), num_nextn_predict_layers=0))


def parity(work: Path, s: DemoSettings, steps: int) -> dict:
    """nanoseek against transformers' DeepseekV3ForCausalLM: same weights, batches and step (MTP and
    aux loss off, the bias update on for both, computed from each model's own routing choices)."""
    import transformers
    vocab, recipe = parity_recipe(work, s, steps)
    torch.manual_seed(s.seed)
    ours = build_model(recipe, torch.device("cpu")).train()
    folder = work / "parity_init"
    save_model(ours, folder)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).train()
    shutil.rmtree(folder)
    routers = [m for m in theirs.modules() if type(m).__name__ == "DeepseekV3TopkRouter"]
    hf_loads: list[torch.Tensor] = []
    for r in routers:
        r.register_forward_hook(lambda mod, a, out: hf_loads.append(
            torch.bincount(out[2].flatten(), minlength=mod.e_score_correction_bias.numel())))
    opts = {"nanoseek": build_optimizer(ours, recipe), "transformers": _hf_optimizer(theirs, recipe)}
    loader = TokenLoader(recipe.data, "train", batch_size=recipe.batch_size, seq_len=recipe.seq_len, seed=s.seed,
                         whole_documents=True, vocab_size=vocab)
    curves: dict[str, list[float]] = {"nanoseek": [], "transformers": []}
    for step in range(steps):
        b = loader.next_batch()
        lr = lr_at(step, recipe)
        # plain causal attention over the packed rows on both sides (transformers has no segment masks)
        for name, model in (("nanoseek", ours), ("transformers", theirs)):
            hf_loads.clear()
            logits = model(b.inputs) if name == "nanoseek" else model(input_ids=b.inputs).logits
            loss = masked_cross_entropy(logits, b.targets, b.target_mask)
            loss.backward()
            loads = expert_loads(ours) if name == "nanoseek" else list(hf_loads)
            torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
            for g in opts[name].param_groups:
                g["lr"] = lr
            opts[name].step()
            opts[name].zero_grad(set_to_none=True)
            if name == "nanoseek":
                update_routing_bias(ours, loads, recipe.bias_update_speed)
            else:
                with torch.no_grad():
                    for r, load in zip(routers, loads):
                        r.e_score_correction_bias += recipe.bias_update_speed * torch.sign(load.float().mean() - load)
            curves[name].append(loss.item())
    a, b_ = torch.tensor(curves["nanoseek"]), torch.tensor(curves["transformers"])
    rel = ((a - b_).abs() / b_.abs()).tolist()
    out = {"steps": steps, "curves": curves, "max_rel_diff": max(rel), "rel_diff_first_100": max(rel[:100]),
           "mean_last_20": {k: sum(v[-20:]) / len(v[-20:]) for k, v in curves.items()}}
    (work / "parity.json").write_text(json.dumps(out))
    return out


def rounding_noise(work: Path, s: DemoSettings, steps: int, rel: float = 1e-7) -> dict:
    """The noise floor for the parity check: nanoseek against itself, its initial weights perturbed by
    a relative `rel` (rounding size), the same batches and step as `parity`. Training with top-k routing
    (and the sign-based bias update) is chaotic: a rounding difference flips a routing choice, and the
    curves part. Writes WORK/rounding_noise.json."""
    vocab, recipe = parity_recipe(work, s, steps)
    torch.manual_seed(s.seed)
    model = build_model(recipe, torch.device("cpu")).train()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1 + rel * torch.randn(p.shape, generator=gen))
    opt = build_optimizer(model, recipe)
    loader = TokenLoader(recipe.data, "train", batch_size=recipe.batch_size, seq_len=recipe.seq_len, seed=s.seed,
                         whole_documents=True, vocab_size=vocab)
    curve = []
    for step in range(steps):
        b = loader.next_batch()
        loss = masked_cross_entropy(model(b.inputs), b.targets, b.target_mask)
        loss.backward()
        loads = expert_loads(model)
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, recipe)
        opt.step()
        opt.zero_grad(set_to_none=True)
        update_routing_bias(model, loads, recipe.bias_update_speed)
        curve.append(loss.item())
    out = {"steps": steps, "rel": rel, "curve": curve}
    (work / "rounding_noise.json").write_text(json.dumps(out))
    return out


def _parting(a: list[float], b: list[float], tol: float = 1e-3) -> int | None:
    """The first step where two loss curves differ by more than `tol` relative."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if abs(x - y) > tol * abs(y)), None)


def _hf_optimizer(model, recipe) -> torch.optim.AdamW:
    """The same parameter groups as nanoseek's build_optimizer (matrices decay; norms, embeddings not)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and "embed_tokens" not in name else no_decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=recipe.lr,
                             betas=(recipe.beta1, recipe.beta2), eps=recipe.eps, fused=True)


@torch.no_grad()
def trained_run(run: Path, work: Path, n_dev: int) -> dict:
    """The finished models of a demo run folder (sft = MoE, dense): loss on the first training batches
    against validation loss (the memorisation gap), greedy accuracy on SFT problems it was trained on
    and on dev problems it was not, and the MoE's routing on validation tokens (load per expert,
    router entropy). Writes WORK/trained_run.json."""
    from nanoseek import load_model
    from nanoseek.tokenizer import Tokenizer
    results = json.loads((run / "results.json").read_text())
    s = DemoSettings(**results["settings"])
    task = get_task(s.task)
    tok = Tokenizer.load(run / "tokenizer")
    recipe = base_recipe(s, run / "data" / "tokens", run / "tokenizer")
    train_probs = task.generate(s.train_problems, seed=s.seed, split="train")[:n_dev]  # the SFT data's problems
    dev = dev_problems(task, run / "data" / "train.jsonl", n_dev)
    out = {"run": str(run), "models": {}}
    for name in ("sft", "dense"):
        model = load_model(run / name / "model", dtype=torch.float32).eval()
        row = {"val_loss": evaluate(model, recipe, model.config.vocab_size, _Single()),
               "train_loss": split_loss(model, recipe, "train"),
               "params": sum(p.numel() for p in model.parameters())}
        for label, probs in (("train_problems", train_probs), ("dev", dev)):
            if probs:
                r = evaluate_task(model, tok, task, k=0, problems=probs, seed=s.seed, split="train")
                row[f"{label}_accuracy"] = r["greedy_accuracy"]["value"]
                row[f"{label}_n"] = len(probs)
        if model.moe_layers():
            probe = Probe(model)
            model.train()  # expert_load is counted in grad-enabled forwards only
            loads = None
            val = TokenLoader(recipe.data, "val", batch_size=recipe.batch_size, seq_len=recipe.seq_len, shuffle=False,
                              whole_documents=True, vocab_size=model.config.vocab_size)
            with torch.enable_grad():
                for b in val.epoch_batches(4):
                    model(b.inputs, positions=b.input_positions, segment_ids=b.input_segments)
                    cur = expert_loads(model)
                    loads = cur if loads is None else [x + y for x, y in zip(loads, cur)]
            row["val_expert_load"] = [l.tolist() for l in loads]
            row["router_entropy"] = probe.read()
            row["bias_changes_choice"], row["score_spread"] = probe.read_bias()
            row["bias"] = [m.gate.e_score_correction_bias.tolist() for m in model.moe_layers()]
        out["models"][name] = row
    (work / "trained_run.json").write_text(json.dumps(out, indent=1))
    return out


def report(work: Path) -> None:
    """Tables from WORK/*.json (stdout, markdown)."""
    print("| variant | val loss | train loss | dev accuracy | wall |\n|---|---:|---:|---:|---:|")
    for name in VARIANTS:
        f = work / f"{name}.json"
        if not f.exists():
            continue
        r = json.loads(f.read_text())
        lo, hi = r["dev_ci95"]
        print(f"| {name} | {r['val_loss']:.4f} | {r['train_loss']:.4f} | {100 * r['dev_accuracy']:.1f}% "
              f"[{100 * lo:.1f}, {100 * hi:.1f}] (n={r['dev_n']}) | {r['wall_seconds']:.0f} s |")
    f = work / "moe.json"
    if f.exists():
        r = json.loads(f.read_text())
        print("\nrouted experts (demo MoE), per MoE layer, at logged steps:")
        print("| step | layer | tokens/expert (min-max, share of mean) | dead | >2x mean | router entropy "
              "(ln E = %.2f) | expert grad RMS / shared | expert rel. update / shared | dense MLP rel. update |"
              % math.log(len(r["logs"][0]["expert_load"][0])))
        print("|---:|---:|---|---:|---:|---:|---:|---:|---:|")
        for row in r["logs"][:: max(len(r["logs"]) // 6, 1)] + [r["logs"][-1]]:
            for i, load in enumerate(row["expert_load"]):
                m = sum(load) / len(load)
                L = row["moe_layers"][i]
                g = sum(L["expert_grad_rms"]) / len(load)
                u = sum(L["expert_rel_update"]) / len(load)
                print(f"| {row['step']} | {i} | {min(load) / m:.2f}-{max(load) / m:.2f} | "
                      f"{sum(x == 0 for x in load)} | {sum(x > 2 * m for x in load)} | {row['router_entropy'][i]:.3f} | "
                      f"{g:.2e} / {L['shared_grad_rms']:.2e} | {u:.2e} / {L['shared_rel_update']:.2e} | "
                      f"{row['dense_mlp_rel_update']:.2e} |")
    f = work / "trained_run.json"
    if f.exists():
        r = json.loads(f.read_text())
        print(f"\nfinished models of {r['run']}:")
        print("| model | params | train loss | val loss | accuracy, trained problems | accuracy, dev problems |")
        print("|---|---:|---:|---:|---:|---:|")
        for name, m in r["models"].items():
            print(f"| {name} | {m['params']:,} | {m['train_loss']:.4f} | {m['val_loss']:.4f} | "
                  f"{100 * m.get('train_problems_accuracy', float('nan')):.1f}% (n={m.get('train_problems_n')}) | "
                  f"{100 * m.get('dev_accuracy', float('nan')):.1f}% (n={m.get('dev_n')}) |")
            for i, load in enumerate(m.get("val_expert_load", [])):
                mean = sum(load) / len(load)
                print(f"  MoE layer {i}: validation tokens per expert / mean = "
                      f"{' '.join(f'{x / mean:.2f}' for x in load)}; router entropy {m['router_entropy'][i]:.3f} "
                      f"(uniform {math.log(len(load)):.3f}); bias {' '.join(f'{b:+.2f}' for b in m['bias'][i])}; "
                      f"score spread (std over experts) {m['score_spread'][i]:.4f}; tokens whose experts the bias "
                      f"changed {100 * m['bias_changes_choice'][i]:.0f}%")
    f = work / "parity.json"
    if f.exists():
        r = json.loads(f.read_text())
        a, b = r["curves"]["nanoseek"], r["curves"]["transformers"]
        print(f"\nparity over {r['steps']} steps: max relative loss difference {r['max_rel_diff']:.2e}; curves part "
              f"(> 1e-3 relative) at step {_parting(a, b)}; first 20 steps within "
              f"{max(abs(x - y) / y for x, y in zip(a[:20], b[:20])):.1e}; mean of the last 20 losses "
              + ", ".join(f"{k} {sum(v[-20:]) / len(v[-20:]):.4f}" for k, v in r["curves"].items()))
        n = work / "rounding_noise.json"
        if n.exists():
            c = json.loads(n.read_text())["curve"]
            print(f"noise floor: nanoseek against itself with weights perturbed by 1e-7 relative: curves part at "
                  f"step {_parting(a, c)}, max relative difference {max(abs(x - y) / y for x, y in zip(a, c)):.2e}, "
                  f"mean of the last 20 losses {sum(c[-20:]) / len(c[-20:]):.4f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--steps", type=int, default=None, help="SFT steps (default: the demo's)")
    p.add_argument("--batch-size", type=int, default=None, help="rows per step (default: the demo's; the "
                   "tables in docs/moe_vs_dense.md section 1 used the earlier demo's --steps 600 --batch-size 32)")
    p.add_argument("--variants", default="moe,moe_no_bias,moe_no_aux,moe_no_mtp,dense")
    p.add_argument("--parity-steps", type=int, default=0, help="also run the transformers parity (0: skip)")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--dev", type=int, default=200, help="dev problems for accuracy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--report", action="store_true", help="only print the tables of WORK/*.json")
    p.add_argument("--from-run", type=Path, help="also measure the finished models of this demo run folder")
    a = p.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    s = DemoSettings(seed=a.seed)
    s = replace(s, batch_size=a.batch_size or s.batch_size, sft_steps=a.steps or s.sft_steps)
    a.steps = s.sft_steps
    if not a.report:
        for name in filter(None, a.variants.split(",")):
            if name not in VARIANTS:
                sys.exit(f"error: unknown variant {name!r} (known: {', '.join(VARIANTS)})")
            if not (a.work / f"{name}.json").exists():
                train_variant(name, a.work, s, a.steps, a.log_every, a.dev)
        if a.parity_steps and not (a.work / "parity.json").exists():
            parity(a.work, s, a.parity_steps)
        if a.parity_steps and not (a.work / "rounding_noise.json").exists():
            rounding_noise(a.work, s, a.parity_steps)
        if a.from_run:
            trained_run(a.from_run, a.work, a.dev)
    report(a.work)


if __name__ == "__main__":
    main()
