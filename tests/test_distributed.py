"""Scale-out on 2 CPU processes with gloo, launched by torchrun: FSDP2 data parallel and expert
parallelism compute the same steps as one process (fp32 tolerance), the all-to-all dispatch survives
experts (and whole ranks) that receive no tokens, and checkpoints move between world sizes.

This file is also the worker script of the dispatch test:
    torchrun --nproc_per_node=2 tests/test_distributed.py dispatch OUT.json
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SMALL_MODEL = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32,
               "num_hidden_layers": 2, "num_attention_heads": 2, "n_routed_experts": 8, "n_group": 2,
               "topk_group": 1, "num_experts_per_tok": 2, "q_lora_rank": 32, "kv_lora_rank": 16,
               "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16}
LOSS_TOL = 1e-5       # per-step losses (main, MTP, aux, validation), absolute; seen <= 7e-7
GRAD_NORM_TOL = 1e-4  # seen <= 5e-6
WEIGHT_TOL = 5e-5     # weights after the run, absolute; seen <= 5e-6 (Adam magnifies the rounding of tiny grads)


# ---- launching -----------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list[str], ep: int = 1, nproc: int = 2) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node=nproc ARGS` on 127.0.0.1, one thread per worker; fails with the log.
    tests/ is on the path too (GRPO runs import this file's reward)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", *args]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]), "OMP_NUM_THREADS": "1",
           "NANOSEEK_EP": str(ep)}
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[:6000]}\n...\n" \
                                 f"{proc.stderr[-3000:]}"
    return proc


def train_cli(recipe: dict) -> list[str]:
    """`-m nanoseek train` with the recipe as command-line fields."""
    args = ["-m", "nanoseek", "train"]
    for key, value in recipe.items():
        args += [f"--{key.replace('_', '-')}", json.dumps(value) if isinstance(value, dict) else str(value)]
    return args


# ---- data and reference runs ---------------------------------------------------------------------
def base_recipe(corpus: Path, out: Path, **overrides) -> dict:
    values = dict(out=str(out), data=str(corpus / "data"), tokenizer=str(corpus / "tok"), preset="tiny",
                  model=SMALL_MODEL, batch_size=4, seq_len=32, max_steps=6, eval_every=3, eval_batches=2,
                  save_every=3, warmup_steps=2, lr=3e-3, progress=False, device="cpu")  # gloo, also on a GPU host
    values.update(overrides)
    return values


def train_here(recipe: dict) -> dict:
    from nanoseek.train import TrainRecipe, train
    return train(TrainRecipe(**recipe).validate())


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def max_weight_diff(a: Path, b: Path) -> float:
    from nanoseek import load_model
    sa, sb = load_model(a).state_dict(), load_model(b).state_dict()
    assert sa.keys() == sb.keys()
    return max((sa[k].float() - sb[k].float()).abs().max().item() for k in sa)


def assert_same_run(single: Path, parallel: Path, steps: int) -> dict:
    """Same per-step losses, expert loads (exactly) and final weights; returns the max diffs."""
    rows_a, rows_b = metrics(single), metrics(parallel)
    assert [r["step"] for r in rows_b] == list(range(1, steps + 1))
    diffs = {"loss": 0.0, "val_loss": 0.0}
    for a, b in zip(rows_a, rows_b):
        for key in ("loss", "mtp_loss", "aux_loss", "val_loss", "grad_norm"):
            if key in a:
                diffs[key] = max(diffs.get(key, 0.0), abs(a[key] - b[key]))
        assert a["expert_load"] == b["expert_load"]  # globally reduced loads: the same integers
    diffs["weights"] = max_weight_diff(single / "model", parallel / "model")
    print(f"max differences vs one process: {diffs}")
    assert all(diffs[k] < LOSS_TOL for k in ("loss", "mtp_loss", "aux_loss", "val_loss") if k in diffs), diffs
    assert diffs["grad_norm"] < GRAD_NORM_TOL and diffs["weights"] < WEIGHT_TOL, diffs
    return diffs


def reference_run(corpus: Path, tmp_path_factory) -> Path:
    """One process, 6 steps, global batch 4."""
    out = tmp_path_factory.mktemp("ref") / "run"
    train_here(base_recipe(corpus, out))
    return out


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    return reference_run(corpus, tmp_path_factory)


# ---- tests ---------------------------------------------------------------------------------------
def test_ep_dispatch_with_empty_experts_and_an_idle_rank(tmp_path):
    """EP all-to-all output and gradients equal the stacked experts run locally, when some experts get
    no token from one rank, some from none, and (second case) one rank's experts receive nothing. And a
    whole model under FSDP2 + EP=2 gives the plain model's logits and gathers back to its weights."""
    out = tmp_path / "dispatch.json"
    torchrun([str(Path(__file__).resolve()), "dispatch", str(out)])
    result = json.loads(out.read_text())
    print(f"EP dispatch max differences: {result}")
    assert all(v < 1e-5 for v in result.values()), result


def test_fsdp_data_parallel_matches_one_process_sft(corpus, tmp_path):
    """SFT (ranks hold different numbers of targets) with grad_accum 2: FSDP2 over 2 ranks computes the
    same losses and weights as one process with the same global batch."""
    recipe = base_recipe(corpus, tmp_path / "single", data=str(corpus / "sft"), mode="sft", grad_accum=2,
                         max_steps=4, eval_every=2)
    train_here(recipe)
    proc = torchrun(train_cli({**recipe, "out": str(tmp_path / "dp")}))
    assert proc.stdout.count("finished at step 4") == 1  # rank 0 prints, rank 1 does not
    assert_same_run(tmp_path / "single", tmp_path / "dp", 4)


def test_expert_parallel_matches_one_process_and_resumes_on_one(corpus, reference, tmp_path):
    """EP=2 for 3 steps (checkpoint_format "full": gathered to one HF folder), then resumed by a single
    process: the same 6 steps as the single-process reference. (Sharded checkpoints: test_sharded.py.)"""
    run = tmp_path / "ep"
    torchrun(train_cli(base_recipe(corpus, run, max_steps=3, checkpoint_format="full")), ep=2)
    from nanoseek import load_model
    ckpt = run / "checkpoints" / "step-0000003"
    model = load_model(ckpt / "model")  # a plain single-process model, all 8 experts per layer
    assert model.layers[1].mlp.experts.gate_up.shape[0] == 8
    assert max_weight_diff(ckpt / "model", reference / "checkpoints" / "step-0000003" / "model") < WEIGHT_TOL
    train_here(base_recipe(corpus, run, max_steps=6, resume=True))
    assert_same_run(reference, run, 6)


def test_single_process_checkpoint_resumes_on_two_processes(corpus, reference, tmp_path):
    """A checkpoint written by one process resumes under torchrun with EP=2 (world size 1 -> 2)."""
    run = tmp_path / "one-then-two"
    train_here(base_recipe(corpus, run, max_steps=3))
    torchrun(train_cli(base_recipe(corpus, run, max_steps=6, resume=True)), ep=2)
    assert_same_run(reference, run, 6)


def test_global_batch_must_divide_over_processes(corpus, tmp_path, monkeypatch):
    """Checked before joining the process group: every rank fails at once, naming the field."""
    from nanoseek import ConfigError
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"'batch_size'.*divisible by the number of processes \(2\)"):
        train_here(base_recipe(corpus, tmp_path / "odd", batch_size=3))


# ---- GRPO ----------------------------------------------------------------------------------------
def checksum_reward(prompts, completions, **columns) -> list[float]:
    """A reward a random model's samples differ in, whatever they are (accuracy is 0 for all)."""
    return [(sum(map(ord, text)) % 7) / 4 for text in completions]


@pytest.fixture(scope="module")
def grpo_policy(tmp_path_factory):
    """A random MoE (8 experts over 2 groups) with a byte-level tokenizer beside it."""
    from conftest import save_task_model
    return save_task_model(tmp_path_factory.mktemp("grpo") / "policy",
                           **{**SMALL_MODEL, "vocab_size": 272, "max_position_embeddings": 256})


def grpo_recipe(policy: Path, out: Path, **overrides) -> dict:
    """2 steps of 4 prompts x 4 samples; mu 2 (stored old log-probs), a KL term (reference model) and
    micro-batches of 3 (ranks keep different numbers of completions: some run dead micro-batches)."""
    values = dict(init_from=str(policy), out=str(out), task="addition3", prompts_per_step=4, group_size=4,
                  max_new_tokens=12, mask_truncated=False, mu=2, beta=0.05, micro_batch=3, max_steps=2, lr=1e-3,
                  save_every=1, eval_every=2, eval_n=6, bias_update_speed=0.01, progress=False,
                  rewards={"test_distributed:checksum_reward": 1.0, "format": 0.1}, device="cpu")
    values.update(overrides)
    return values


def grpo_cli(recipe: dict, folder: Path) -> list[str]:
    lines = [f"{k} = {json.dumps(v)}" for k, v in recipe.items() if not isinstance(v, dict)]
    lines += ["[rewards]"] + [f'"{k}" = {v}' for k, v in recipe["rewards"].items()]
    path = folder / "grpo.toml"
    path.write_text("\n".join(lines) + "\n")
    return ["-m", "nanoseek", "grpo", "--recipe", str(path)]


def assert_same_grpo_run(single: Path, parallel: Path) -> dict:
    rows_a, rows_b = metrics(single), metrics(parallel)
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b] == [0, 1, 2]
    diffs = {}
    for a, b in zip(rows_a, rows_b):
        for key in ("reward_mean", "completion_len", "kept_seqs", "eval_accuracy", "zero_std_frac"):
            if key in a:  # the same rollouts: per-group generators do not depend on the world size
                assert a[key] == pytest.approx(b[key], abs=1e-9), (key, a[key], b[key])
        for key in ("loss", "kl", "entropy", "grad_norm", "ratio", "mtp_loss", "mtp_grad_norm"):
            if key in a:
                diffs[key] = max(diffs.get(key, 0.0), abs(a[key] - b[key]))
    diffs["weights"] = max_weight_diff(single / "model", parallel / "model")  # the MTP module's too
    print(f"GRPO max differences vs one process: {diffs}")
    assert all(diffs[k] < LOSS_TOL for k in ("loss", "kl", "entropy", "ratio", "mtp_loss")), diffs
    assert diffs["grad_norm"] < GRAD_NORM_TOL and diffs["mtp_grad_norm"] < GRAD_NORM_TOL, diffs
    assert diffs["weights"] < WEIGHT_TOL, diffs
    return diffs


@pytest.fixture(scope="module")
def grpo_reference(grpo_policy, tmp_path_factory):
    from nanoseek.train.grpo import GRPORecipe, grpo
    out = tmp_path_factory.mktemp("grpo-ref") / "run"
    torch.manual_seed(0)
    grpo(GRPORecipe(**grpo_recipe(grpo_policy, out)))
    return out


@pytest.mark.parametrize("ep", [1, 2], ids=["fsdp", "fsdp+ep2"])
def test_grpo_data_parallel_matches_one_process(grpo_policy, grpo_reference, tmp_path, ep):
    """GRPO under torchrun (rollouts split over 2 ranks, sharded update; with EP=2 too): the same
    rollouts, losses and weights as one process, and checkpoints that resume in one process."""
    run = tmp_path / "dp"
    recipe = grpo_recipe(grpo_policy, run)
    torchrun(grpo_cli(recipe, tmp_path), ep=ep)
    assert_same_grpo_run(grpo_reference, run)
    assert json.loads((run / "summary.json").read_text())["step"] == 2
    from nanoseek.train.grpo import GRPORecipe, grpo
    grpo(GRPORecipe(**{**recipe, "max_steps": 3, "resume": True, "eval_every": 0}))  # 2 ranks -> 1
    assert metrics(run)[-1]["step"] == 3


def test_grpo_prompts_must_divide_over_processes(grpo_policy, tmp_path, monkeypatch):
    from nanoseek import ConfigError
    from nanoseek.train.grpo import GRPORecipe, grpo
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match=r"'prompts_per_step': 4 prompts cannot be split evenly over 3"):
        grpo(GRPORecipe(**grpo_recipe(grpo_policy, tmp_path / "odd")))


# ---- memory arithmetic ---------------------------------------------------------------------------
def test_training_memory_per_gpu_for_the_published_presets():
    from nanoseek import ConfigError, ModelConfig, count_parameters
    from nanoseek.params import meta_model, training_memory
    v3 = ModelConfig.preset("deepseek-v3")
    counts = count_parameters(v3)
    m = training_memory(v3, 2048, 64, precision="bf16", recompute=True)
    mtp_experts = sum(p.numel() for p in meta_model(v3).mtp[0].block.mlp.experts.parameters())
    assert m.params == counts.total + counts.mtp  # MTP is trained too
    assert m.routed_params == counts.components["routed_experts"] + mtp_experts
    assert m.weights == round(m.params / 2048 * 4) and m.optimizer == 2 * m.weights  # fp32 master, Adam m + v
    assert 4.5 * 2**30 < m.sharded < 5.5 * 2**30  # 16 bytes x 682.6B / 2048
    no_ep = training_memory(v3, 2048, 1, precision="bf16", recompute=True)
    assert no_ep.sharded == m.sharded  # EP moves experts, it does not shard them further
    assert no_ep.largest_unit_params > 11e9 > m.largest_unit_params  # a whole MoE layer's 256 experts
    assert training_memory(v3, 2048, 64, precision="bf16").activations > 10 * m.activations  # recompute
    lite = training_memory(ModelConfig.preset("deepseek-v2-lite"), 8, 8)
    assert 25 * 2**30 < lite.sharded < 32 * 2**30  # 16 bytes x 15.7B / 8
    for world, ep, match in ((8, 3, "must divide the world size"), (6, 6, "must divide n_routed_experts 64")):
        with pytest.raises(ConfigError, match=match):
            training_memory(ModelConfig.preset("deepseek-v2-lite"), world, ep)


def test_params_command_prints_training_memory(capsys):
    from nanoseek.cli import main
    assert main(["params", "--preset", "deepseek-v3", "--world-size", "2048", "--ep", "64", "--precision",
                 "bf16", "--recompute"]) == 0
    out = capsys.readouterr().out
    assert "FSDP2 over 2,048 GPUs, EP 64: 4 routed experts per GPU" in out
    assert "Adam m + v" in out and "activations (4,096 tokens, recompute per block" in out
    assert main(["params", "--preset", "deepseek-v2-lite", "--world-size", "8", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)["training_memory"]
    assert data["world_size"] == 8 and data["ep"] == 1 and data["total"] > data["sharded"] > 0
    assert main(["params", "--preset", "deepseek-v2-lite", "--world-size", "8", "--ep", "3"]) == 2
    assert "must divide the world size 8" in capsys.readouterr().err


# ---- worker (runs under torchrun) ----------------------------------------------------------------
def _dispatch_worker(out: str) -> None:
    from nanoseek.train.distributed import Parallel

    torch.set_num_threads(1)
    parallel = Parallel.init(ep=2, device="cpu")
    result = {**_compare_dispatch(parallel), **_compare_model(parallel)}
    diffs = torch.tensor(list(result.values()))
    torch.distributed.all_reduce(diffs, op=torch.distributed.ReduceOp.MAX)
    if parallel.is_main:
        Path(out).write_text(json.dumps(dict(zip(result, diffs.tolist()))))
    parallel.close()


def _compare_model(parallel) -> dict[str, float]:
    """A whole model under FSDP2 + EP=2: same logits as the plain model, and gathered back whole."""
    from nanoseek import ModelConfig, Transformer
    from nanoseek.train.distributed import gather_model, parallelize
    cfg = ModelConfig.preset("tiny").replace(**SMALL_MODEL)
    torch.manual_seed(0)
    plain = Transformer(cfg)
    torch.manual_seed(0)
    model = parallelize(Transformer(cfg), parallel.mesh)
    x = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(parallel.rank))
    with torch.no_grad():
        logits = (model(x) - plain(x)).abs().max().item()
    copy = gather_model(model, parallel, everywhere=True).state_dict()  # on both ranks
    weights = max((copy[k] - v).abs().max().item() for k, v in plain.state_dict().items())
    return {"model/logits": logits, "model/gathered_weights": weights}


def _compare_dispatch(parallel) -> dict[str, float]:
    """Compare ExpertParallelExperts against the full RoutedExperts on each rank's tokens."""
    import torch.distributed as dist

    from nanoseek.model import RoutedExperts
    from nanoseek.train.distributed import ExpertParallelExperts

    rank, E, D, I, N, k = parallel.rank, 8, 16, 8, 12, 2
    torch.manual_seed(0)
    full = RoutedExperts(E, D, I)
    torch.nn.init.normal_(full.gate_up, std=0.1)
    torch.nn.init.normal_(full.down, std=0.1)
    ep = ExpertParallelExperts.from_experts(full, parallel.mesh.get_group("ep"), parallel.ep_rank, 2)
    gen = torch.Generator().manual_seed(100 + rank)
    cases = {
        # rank 0 uses only experts {0, 1, 2, 6}: 3-5 get nothing from it, 7 gets nothing at all
        "empty_experts": torch.tensor([0, 1, 2, 6]) if rank == 0 else torch.tensor([0, 2, 3, 4, 5, 6]),
        # every token goes to experts 0-3 (rank 0's): rank 1's experts receive no token from anyone
        "idle_rank": torch.tensor([0, 1, 2, 3]),
    }
    result = {}
    for name, allowed in cases.items():
        choice = torch.stack([allowed[torch.randperm(len(allowed), generator=gen)[:k]] for _ in range(N)])
        x = torch.randn(N, D, generator=gen, requires_grad=True)
        w = torch.rand(N, k, generator=gen)
        y_ref = full(x, choice, w)
        g_ref, *ref_grads = torch.autograd.grad(y_ref.square().sum(), [x, full.gate_up, full.down])
        for t in ref_grads:  # this rank's tokens only: an expert's owner sums over every rank's tokens
            dist.all_reduce(t)
        y = ep(x, choice, w)
        g, *grads = torch.autograd.grad(y.square().sum(), [x, ep.gate_up, ep.down])
        mine = slice(ep.first, ep.first + ep.n_experts)
        result[f"{name}/output"] = (y - y_ref).abs().max().item()
        result[f"{name}/grad_x"] = (g - g_ref).abs().max().item()
        result[f"{name}/grad_experts"] = max((grads[0] - ref_grads[0][mine]).abs().max().item(),
                                             (grads[1] - ref_grads[1][mine]).abs().max().item())
    return result


if __name__ == "__main__":
    if sys.argv[1] == "dispatch":
        _dispatch_worker(sys.argv[2])
