"""GRPO keeps a model's MTP module trained (mtp_loss_weight): the gradient stops at the MTP modules, the
policy's update is bit for bit the one without the MTP loss (its clip too), the loss falls on rollouts,
does not depend on micro-batching, is off at weight 0 (no MTP forward, MTP weights untouched), and a
resumed run is exact."""

import json

import pytest
import torch

import nanoseek
from nanoseek import ConfigError
from nanoseek.tasks import Rewards
from nanoseek.train.grpo import GRPOTrainer, load_grpo_recipe

from conftest import TINY_TASK_MODEL, save_task_model  # noqa: E402
from test_grpo import _recipe, checksum_reward  # noqa: E402  (the same tiny GRPO recipe and reward)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def mtp_policy(tmp_path_factory):
    """A random tiny MoE with one MTP module and a byte-level tokenizer beside it."""
    return save_task_model(tmp_path_factory.mktemp("tiny-mtp") / "model",
                           **{**TINY_TASK_MODEL, "num_nextn_predict_layers": 1})


class TrunkGradientTrainer(GRPOTrainer):
    mtp_trunk_gradient = True


def trainer(recipe, cls=GRPOTrainer) -> GRPOTrainer:
    t = cls(recipe)
    t.rewards = Rewards([("checksum", checksum_reward, 1.0)])
    return t


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def split(state: dict) -> tuple[dict, dict]:
    """(policy tensors, MTP tensors) of a state dict."""
    mtp = {k: v for k, v in state.items() if k.startswith("mtp.")}
    return {k: v for k, v in state.items() if k not in mtp}, mtp


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- the model: where the gradient goes -----------------------------------------------------------
def test_detached_mtp_logits_train_only_the_mtp_modules(mtp_policy):
    model = nanoseek.load_model(mtp_policy).train()
    ids = torch.randint(0, 200, (2, 12))
    for detach in (False, True):
        model.zero_grad(set_to_none=True)
        logits, mtp = model(ids, return_mtp=True, mtp_detach_trunk=detach)
        mtp[0].float().logsumexp(-1).sum().backward()
        touched = {n.split(".")[0] for n, p in model.named_parameters() if p.grad is not None and p.grad.any()}
        assert touched == ({"mtp"} if detach else {"mtp", "layers", "embed_tokens", "lm_head"}), (detach, touched)
    with torch.no_grad():  # the same logits either way
        a = model(ids, return_mtp=True)[1][0]
        assert torch.equal(a, model(ids, return_mtp=True, mtp_detach_trunk=True)[1][0])


# ---- the recipe ---------------------------------------------------------------------------------
def test_recipe_field(tmp_path):
    f = tmp_path / "g.toml"
    f.write_text('init_from = "m"\nmtp_loss_weight = 0.1\n')
    assert load_grpo_recipe(f).mtp_loss_weight == 0.1
    assert load_grpo_recipe(None, {"init_from": "m"}).mtp_loss_weight == 0.3  # on by default
    assert load_grpo_recipe(f, {"mtp_loss_weight": "0"}).mtp_loss_weight == 0.0
    for bad, match in [("-0.1", "'mtp_loss_weight'.*non-negative"), ("nan", "'mtp_loss_weight'.*finite"),
                       ("x", "mtp_loss_weight")]:
        with pytest.raises(ConfigError, match=match):
            load_grpo_recipe(f, {"mtp_loss_weight": bad})


def test_cli_option(mtp_policy, tmp_path, capsys):
    from nanoseek.cli import main
    recipe = tmp_path / "g.toml"
    recipe.write_text(f'init_from = "{mtp_policy}"\ntask = "addition3"\nmax_steps = 1\nprompts_per_step = 1\n'
                      'group_size = 2\nmax_new_tokens = 4\nprogress = false\n')
    assert main(["grpo", "--recipe", str(recipe), "--out", str(tmp_path / "x"), "--mtp-loss-weight", "-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "'mtp_loss_weight'" in err and "\n" not in err
    assert not (tmp_path / "x").exists()
    assert main(["grpo", "--recipe", str(recipe), "--out", str(tmp_path / "y"), "--mtp-loss-weight", "0.1"]) == 0
    assert json.loads((tmp_path / "y" / "recipe.json").read_text())["mtp_loss_weight"] == 0.1


# ---- the update ---------------------------------------------------------------------------------
def test_policy_update_is_exactly_the_one_without_mtp_loss(mtp_policy, tmp_path, monkeypatch):
    """Weight 0: no MTP forward at all, the MTP weights as they were; weight 0.3: the same policy weights
    and losses bit for bit (also when grad_clip bites: the MTP gradients are clipped on their own),
    the MTP weights trained, mtp_loss and mtp_grad_norm logged. With mtp_trunk_gradient (the measured
    alternative) the MTP loss moves the policy."""
    runs = {}
    arms = (("on", 0.3, GRPOTrainer), ("trunk", 0.3, TrunkGradientTrainer), ("off", 0.0, GRPOTrainer))
    for name, weight, cls in arms:
        out = tmp_path / name
        if weight == 0:  # the MTP modules never run
            monkeypatch.setattr(nanoseek.Transformer, "mtp_logits", lambda *a, **k: pytest.fail("MTP forward"))
        trainer(_recipe(mtp_policy, out, mtp_loss_weight=weight, grad_clip=0.05, mu=2, beta=0.05), cls).run()
        runs[name] = (rows(out), nanoseek.load_model(out / "model").state_dict())
    start_policy, start_mtp = split(nanoseek.load_model(mtp_policy).state_dict())
    (on_rows, on), (off_rows, off), (trunk_rows, trunk) = runs["on"], runs["off"], runs["trunk"]
    assert not same(split(trunk)[0], split(off)[0]) and "mtp_grad_norm" not in trunk_rows[-1]
    assert trunk_rows[0]["mtp_loss"] == on_rows[0]["mtp_loss"]  # the same start, the same rollouts
    assert same(split(on)[0], split(off)[0]) and not same(split(on)[0], start_policy)
    assert same(split(off)[1], start_mtp) and not any(torch.equal(split(on)[1][k], v) for k, v in start_mtp.items()
                                                      if "norm" not in k and "bias" not in k)
    for a, b in zip(on_rows, off_rows):
        for key in ("reward_mean", "loss", "grad_norm", "kl", "entropy", "clip_frac"):
            assert a[key] == b[key], key
        assert "mtp_loss" not in b and "mtp_grad_norm" not in b
        assert a["mtp_loss"] > 0 and a["mtp_grad_norm"] > 0.05 and a["grad_norm"] > 0.05  # both clipped


def test_mtp_loss_falls_on_the_rollouts_and_ignores_micro_batching(mtp_policy, tmp_path):
    """Repeated updates on one step's rollouts lower the MTP loss on them; the loss and the MTP weights
    after an update are the same (to rounding) for micro-batches of 2 and of the whole batch."""
    results = {}
    for n in (2, 64):
        t = trainer(_recipe(mtp_policy, tmp_path / f"mb{n}", micro_batch=n, lr=3e-3))
        ro = t.rollout(0)
        losses = [t.update(ro, 0)["mtp_loss"] for _ in range(4)]
        results[n] = losses, split(t.model.state_dict())[1]
        assert losses == sorted(losses, reverse=True) and losses[-1] < losses[0] - 0.05, losses
    (a, wa), (b, wb) = results[2], results[64]
    assert a == pytest.approx(b, abs=1e-5)
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


def test_mtp_targets_are_the_completion_tokens(mtp_policy, tmp_path):
    t = trainer(_recipe(mtp_policy, tmp_path / "r", max_steps=1))
    ro = t.rollout(0)
    kept = [i for i, c in enumerate(ro.completion_ids) if c]
    batch = t._pack(ro, kept, torch.ones(len(ro.completion_ids)))
    masks = torch.cat([batch.mtp_masks(j, 1)[0] for j in range(len(batch.chunks))])
    assert masks.shape[1] == batch.ids.shape[1] - 2
    for row, i in zip(masks, kept):  # depth 1: position i predicts token i + 2, counted if it is generated
        P, C = len(ro.prompt_ids[i]), len(ro.completion_ids[i])
        assert row.nonzero().flatten().tolist() == list(range(P - 2, P + C - 2))
        assert batch.ids[kept.index(i), P:P + C].tolist() == ro.completion_ids[i]
    assert batch.mtp_targets == [float(sum(len(ro.completion_ids[i]) for i in kept))]
    # a rank that keeps nothing runs a stand-in row (collectives stay in step) that counts no target
    empty = t._pack(ro, [], torch.ones(len(kept)))
    assert empty.mtp_targets == [0.0] and not empty.mtp_masks(0, 1)[0].any()


def test_resume_is_exact_with_the_mtp_loss(mtp_policy, tmp_path):
    full, half = tmp_path / "full", tmp_path / "half"
    trainer(_recipe(mtp_policy, full, mu=2)).run()
    trainer(_recipe(mtp_policy, half, mu=2, max_steps=1)).run()
    trainer(_recipe(mtp_policy, half, mu=2, resume=True)).run()
    assert [(r["loss"], r["mtp_loss"]) for r in rows(half)] == [(r["loss"], r["mtp_loss"]) for r in rows(full)]
    assert same(nanoseek.load_model(full / "model").state_dict(), nanoseek.load_model(half / "model").state_dict())
