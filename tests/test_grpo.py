"""GRPO: advantages, the clipped loss and its gradient on a hand-computed example (three aggregations,
k3 KL), sequence packing, recipes, a tiny end-to-end run with exact resume, and distillation."""

import json
import math

import sys

import pytest
import torch

import nanoseek
from nanoseek import ConfigError
from nanoseek.errors import CheckpointError
from nanoseek.tasks import Rewards, get_task
from nanoseek.tokenizer import Tokenizer
from nanoseek.train.grpo import (GRPOError, GRPORecipe, GRPOTrainer, grpo, grpo_loss, group_advantages, k3_kl,
                                 load_grpo_recipe, pack_sequences)

from conftest import TINY_TASK_MODEL as TINY  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def policy(tiny_task_model):
    """A random tiny MoE with a byte-level tokenizer saved beside it (an HF model folder)."""
    return tiny_task_model


# ---- the math -----------------------------------------------------------------------------------
def test_group_advantages():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5])
    adv, zero = group_advantages(rewards, 4)
    std = math.sqrt(1 / 3)  # unbiased std of (1, 0, 0, 1)
    assert torch.allclose(adv[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (std + 1e-4))
    assert torch.equal(adv[4:], torch.zeros(4)) and zero.tolist() == [False, True]
    adv, _ = group_advantages(rewards, 4, scale=False)  # Dr. GRPO: no std
    assert torch.allclose(adv[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]))


def hand_example():
    """Two completions; the first (A=+1) has 2 tokens, the second (A=-1) 3 tokens.
    ratios: [1.25, 1.0, -] and [0.625, 0.9, 1.0]; eps 0.2 clips (0,0) (ratio > 1.2, A > 0) and
    (1,0) (ratio < 0.8, A < 0). Per-token losses -min(rho A, clip(rho) A):
        [-1.2 (clipped), -1.0]   [0.8 (clipped), 0.9, 1.0]
    gradients d/dlogp = -A rho where not clipped: [0, -1] and [0, 0.9, 1.0]."""
    old = torch.log(torch.tensor([[0.4, 0.3, 0.5], [0.8, 0.5, 0.2]]))
    new = torch.log(torch.tensor([[0.5, 0.3, 0.5], [0.5, 0.45, 0.2]]))
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    adv = torch.tensor([1.0, -1.0])
    return new.clone().requires_grad_(True), old, adv, mask


@pytest.mark.parametrize("agg, loss, grads", [
    ("token", (-1.2 - 1.0 + 0.8 + 0.9 + 1.0) / 5, [[0, -1 / 5, 0], [0, 0.9 / 5, 1 / 5]]),
    ("sequence", ((-1.2 - 1.0) / 2 + (0.8 + 0.9 + 1.0) / 3) / 2, [[0, -1 / 4, 0], [0, 0.9 / 6, 1 / 6]]),
    ("dr_grpo", (-1.2 - 1.0 + 0.8 + 0.9 + 1.0) / (2 * 4), [[0, -1 / 8, 0], [0, 0.9 / 8, 1 / 8]]),
])
def test_grpo_loss_and_gradient_by_hand(agg, loss, grads):
    logp, old, adv, mask = hand_example()
    value, stats = grpo_loss(logp, old, adv, mask, eps_low=0.2, eps_high=0.2, loss_agg=agg, max_len=4)
    value.backward()
    assert value.item() == pytest.approx(loss, abs=1e-6)
    assert torch.allclose(logp.grad, torch.tensor(grads), atol=1e-6)
    assert stats["clipped_tokens"].item() == 2 and stats["tokens"].item() == 5


def test_grpo_loss_with_k3_kl_by_hand():
    logp, old, adv, mask = hand_example()
    ref = logp.detach().clone()
    ref[0, 1] += math.log(2)  # pi_ref = 2 pi there: k3 = 2 - ln 2 - 1, d k3 / d logp = 1 - 2 = -1
    value, stats = grpo_loss(logp, old, adv, mask, ref_logp=ref, beta=0.1, loss_agg="token")
    value.backward()
    assert value.item() == pytest.approx((0.5 + 0.1 * (1 - math.log(2))) / 5, abs=1e-6)
    assert logp.grad[0, 1].item() == pytest.approx((-1 - 0.1) / 5, abs=1e-6)
    assert stats["kl_sum"].item() == pytest.approx(1 - math.log(2), abs=1e-6)
    assert torch.all(k3_kl(torch.randn(50), torch.randn(50)) >= 0)


def test_asymmetric_clip_and_micro_batch_denominators():
    logp, old, adv, mask = hand_example()
    # eps_high 0.28 (DAPO): ratio 1.25 with A > 0 is no longer clipped
    value, stats = grpo_loss(logp, old, adv, mask, eps_low=0.2, eps_high=0.28)
    assert stats["clipped_tokens"].item() == 1
    assert value.item() == pytest.approx((-1.25 - 1.0 + 0.8 + 0.9 + 1.0) / 5, abs=1e-6)
    # two micro-batches with the batch's denominators add up to the whole-batch loss
    for agg in ("token", "sequence", "dr_grpo"):
        whole, _ = grpo_loss(logp, old, adv, mask, loss_agg=agg, max_len=4)
        parts = sum(grpo_loss(logp[i:i + 1], old[i:i + 1], adv[i:i + 1], mask[i:i + 1], loss_agg=agg, max_len=4,
                              num_seqs=2, num_tokens=5)[0] for i in range(2))
        assert parts.item() == pytest.approx(whole.item(), abs=1e-6)


def test_ratio_one_gradient_is_the_policy_gradient():
    logp = torch.log(torch.tensor([[0.3, 0.6]])).requires_grad_(True)
    value, _ = grpo_loss(logp, logp.detach(), torch.tensor([2.0]), torch.ones(1, 2, dtype=torch.bool))
    value.backward()
    assert value.item() == pytest.approx(-2.0)
    assert torch.allclose(logp.grad, torch.tensor([[-1.0, -1.0]]))  # -A / tokens


def test_pack_sequences():
    ids, mask = pack_sequences([[1, 2, 3], [4]], [[5, 6], [7, 8, 9]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3, 5, 6], [4, 7, 8, 9, 0]]
    # position t predicts token t+1: completion tokens 5, 6 sit at 3, 4 -> targets at 2, 3
    assert mask.tolist() == [[False, False, True, True], [True, True, True, False]]


# ---- recipes ------------------------------------------------------------------------------------
def test_recipe_files_overrides_and_validation(tmp_path):
    f = tmp_path / "g.toml"
    f.write_text('init_from = "m"\ntask = "countdown3"\nbeta = 0.04\n[rewards]\naccuracy = 1.0\nformat = 0.2\n')
    r = load_grpo_recipe(f, {"group_size": "4", "loss_agg": "dr_grpo", "scale_rewards": "false"})
    assert (r.task, r.beta, r.group_size, r.loss_agg, r.scale_rewards) == ("countdown3", 0.04, 4, "dr_grpo", False)
    assert r.rewards == {"accuracy": 1.0, "format": 0.2}
    for bad, match in [({"loss_agg": "mean"}, "loss_agg"), ({"group_size": "1"}, "group_size"),
                       ({"eps_low": "1.5"}, "eps_low"), ({"temperature": "0"}, "temperature"),
                       ({"learning_rate": "1"}, "unknown GRPO recipe field")]:
        with pytest.raises(ConfigError, match=match):
            load_grpo_recipe(f, bad)
    with pytest.raises(ConfigError, match="init_from"):
        load_grpo_recipe(None, {"task": "addition3"})


# ---- end to end ---------------------------------------------------------------------------------
def _recipe(policy, out, **kw):
    values = dict(init_from=str(policy), out=str(out), task="addition3", prompts_per_step=2, group_size=4,
                  max_new_tokens=6, max_steps=2, save_every=1, lr=1e-3, mask_truncated=False, progress=False,
                  micro_batch=3, seed=1)
    values.update(kw)
    return GRPORecipe(**values)


def checksum_reward(prompts, completions, **_):
    """Variance for a random policy, whatever it samples: a checksum of its text, 0 to 6."""
    return [float(sum(map(ord, c)) % 7) for c in completions]


def run(recipe):
    trainer = GRPOTrainer(recipe)
    trainer.rewards = Rewards([("accuracy", "accuracy", 1.0), ("checksum", checksum_reward, 0.5)])
    return trainer.run()


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_grpo_runs_logs_and_resumes_exactly(policy, tmp_path):
    full = tmp_path / "full"
    summary = run(_recipe(policy, full, beta=0.05, mu=2))
    assert summary["step"] == 2 and (full / "model" / "tokenizer.json").exists() and (full / "grpo.png").exists()
    log = rows(full)
    for key in ("reward_mean", "reward_std", "accuracy", "completion_len", "kl", "entropy", "clip_frac",
                "zero_std_frac", "rollout_tokens_per_s", "update_tokens_per_s", "loss", "grad_norm"):
        assert key in log[-1], key
    assert log[0]["kl"] == pytest.approx(0.0, abs=1e-6) and log[-1]["kl"] > 0  # moved away from the reference
    # interrupted after 2 steps, then resumed: the same rollouts, losses and weights
    half = tmp_path / "half"
    run(_recipe(policy, half, beta=0.05, mu=2, max_steps=1))
    run(_recipe(policy, half, beta=0.05, mu=2, resume=True))
    assert [r["loss"] for r in rows(half)] == [r["loss"] for r in rows(full)]
    a, b = nanoseek.load_model(full / "model"), nanoseek.load_model(half / "model")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        GRPOTrainer(_recipe(policy, full))
    with pytest.raises(GRPOError, match="already at step 2"):
        GRPOTrainer(_recipe(policy, full, resume=True))
    with pytest.raises(GRPOError, match="'group_size'"):
        GRPOTrainer(_recipe(policy, full, resume=True, max_steps=3, group_size=2))


def test_zero_variance_groups_and_truncation_are_filtered(policy, tmp_path):
    # a random policy never answers: every reward is 0, every group is dropped, nothing is updated
    summary = grpo(_recipe(policy, tmp_path / "r", max_steps=1, mask_truncated=True))
    row = rows(tmp_path / "r")[0]
    assert summary["step"] == 1 and row["zero_std_frac"] == 1.0 and row["kept_seqs"] == 0
    assert row["skipped_update"] == 1 and row["truncated_frac"] > 0.5  # random: EOS is rare
    before = nanoseek.load_model(policy).state_dict()
    after = nanoseek.load_model(tmp_path / "r" / "model").state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_grpo_cli(policy, tmp_path):
    from nanoseek.cli import main
    recipe = tmp_path / "g.toml"
    recipe.write_text(f'init_from = "{policy}"\ntask = "addition3"\nmax_steps = 1\nprompts_per_step = 1\n'
                      'group_size = 2\nmax_new_tokens = 4\nprogress = false\n')
    assert main(["grpo", "--recipe", str(recipe), "--out", str(tmp_path / "cli"), "--loss-agg", "sequence"]) == 0
    assert json.loads((tmp_path / "cli" / "recipe.json").read_text())["loss_agg"] == "sequence"
    assert main(["grpo", "--recipe", str(recipe), "--out", str(tmp_path / "x"), "--loss-agg", "bad"]) == 2


# ---- distillation -------------------------------------------------------------------------------
def test_distill_keeps_only_correct_traces(policy, tmp_path, monkeypatch):
    """A fake teacher answers problem i correctly in its even samples and wrongly in its odd ones."""
    from nanoseek.train.distill import distill
    task = get_task("addition3")
    tok = Tokenizer.load(policy)
    problems = {p.prompt: p for p in task.generate(6, seed=0, split="train")}

    def fake_generate(model, prompts, max_new_tokens, temperature=0.0, top_p=1.0, top_k=0, seed=None,
                      eos_token_id=None):
        out = []
        for j, ids in enumerate(prompts):
            text = tok.decode(ids)
            prompt = text.split("<｜User｜>")[1].split("<｜Assistant｜>")[0]
            p = problems[prompt]
            reply = task.completion(p) if j % 2 == 0 else task.completion(p).replace(p.answer + "<", "1<")
            out.append(tok.encode(reply) + [tok.eos_id])
        return out

    # generate_batches calls the module's generate (the package attribute of that name is the function)
    monkeypatch.setattr(sys.modules["nanoseek.infer.generate"], "generate", fake_generate)
    stats = distill(policy, "addition3", tmp_path / "d", n_problems=6, samples_per_problem=2, seed=0,
                    student={"model": TINY, "max_steps": 2, "batch_size": 2, "seq_len": 160, "save_every": 0,
                             "mtp_loss_weight": 0.0})
    assert stats["samples"] == 12 and stats["correct_samples"] == 6 and stats["kept_traces"] == 6
    assert stats["acceptance_rate"] == 0.5
    records = [json.loads(line) for line in (tmp_path / "d" / "traces.jsonl").read_text().splitlines()]
    for r in records:
        p = problems[r["messages"][0]["content"]]
        assert r["messages"][1]["reasoning_content"] == task.solve(p)
        assert r["messages"][1]["content"] == f"<answer>{p.answer}</answer>"
    assert (tmp_path / "d" / "student" / "model" / "config.json").exists()
    from nanoseek.cli import main
    assert main(["distill", "--teacher", str(policy), "--task", "addition3", "--out", str(tmp_path / "cli"),
                 "--problems", "6", "--samples", "2", "--no-train"]) == 0
    assert json.loads((tmp_path / "cli" / "distill.json").read_text())["kept_traces"] == 6


@pytest.mark.parametrize("option, value", [("--temperature", "nan"), ("--temperature", "inf"),
                                           ("--top-p", "nan"), ("--beta", "nan"), ("--eps-high", "inf"),
                                           ("--lr", "inf"), ("--max-seconds", "nan")])
def test_grpo_non_finite_numbers_are_one_line_errors(policy, tmp_path, capsys, option, value):
    from nanoseek.cli import main
    recipe = tmp_path / "g.toml"
    recipe.write_text(f'init_from = "{policy}"\ntask = "addition3"\nmax_steps = 1\nprogress = false\n')
    assert main(["grpo", "--recipe", str(recipe), "--out", str(tmp_path / "x"), option, value]) == 2
    err = capsys.readouterr().err.strip()
    field = option[2:].replace("-", "_")
    assert err.startswith("error: ") and f"'{field}'" in err and "finite" in err and "\n" not in err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("option, value, field", [
    ("--temperature", "nan", "temperature"), ("--top-p", "0", "top_p"), ("--batch-size", "0", "batch_size"),
    ("--max-new-tokens", "0", "max_new_tokens"), ("--threads", "-2", "threads")])
def test_distill_bad_numbers_are_one_line_errors(policy, tmp_path, capsys, option, value, field):
    from nanoseek.cli import main
    assert main(["distill", "--teacher", str(policy), "--task", "addition3", "--out", str(tmp_path / "d"),
                 "--problems", "2", "--samples", "2", "--no-train", option, value]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {field} ") and "\n" not in err
