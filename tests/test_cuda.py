"""On a CUDA GPU: fp32 gives the CPU's numbers (TF32 off), training and its checkpoints work there, greedy
generation picks the CPU's tokens, bf16 autocast stays close to fp32, and (with 2 GPUs) NCCL runs FSDP2 +
EP with sharded checkpoints. Every test is marked `cuda`: skipped where torch sees no CUDA device
(conftest.py); `pytest -m cuda` (and bench/gpu.sh) runs them."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import random_tiny_model
from test_distributed import base_recipe, metrics, torchrun, train_cli, train_here

pytestmark = pytest.mark.cuda


@pytest.fixture(autouse=True)
def strict_fp32():
    """fp32 matmuls in fp32 (not TF32), so the GPU can be held to the CPU's numbers."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def tokens(vocab: int, batch: int = 2, length: int = 16) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(1))


def test_forward_and_gradients_match_the_cpu_in_fp32():
    model = random_tiny_model()
    gpu = copy.deepcopy(model).cuda()
    x = tokens(model.config.vocab_size)
    ref, ref_mtp = model(x, return_mtp=True)
    out, out_mtp = gpu(x.cuda(), return_mtp=True)
    assert torch.allclose(out.cpu(), ref, atol=1e-4, rtol=0)
    assert torch.allclose(out_mtp[0].cpu(), ref_mtp[0], atol=1e-4, rtol=0)
    ref.square().mean().backward()
    out.square().mean().backward()
    for (name, p), q in zip(model.named_parameters(), gpu.parameters()):
        if p.grad is not None:
            assert torch.allclose(q.grad.cpu(), p.grad, atol=1e-4, rtol=1e-3), name


def test_greedy_generation_on_cuda_picks_the_cpus_tokens(toy):
    from nanoseek import generate
    from nanoseek.checkpoint import load_model_and_tokenizer
    model, tok = load_model_and_tokenizer(toy)
    prompts = [tok.encode("What is the capital of France?", bos=True), tok.encode("Hello", bos=True)]
    cpu = generate(model, prompts, max_new_tokens=24)
    gpu = generate(model.cuda(), prompts, max_new_tokens=24)
    assert gpu == cpu


@pytest.mark.parametrize("checkpoint_format", ["full", "sharded"])
def test_training_on_cuda_matches_the_cpu_and_resumes(corpus, tmp_path, checkpoint_format):
    """3 steps on the GPU give the CPU's losses (fp32 tolerance); the checkpoint (with the CUDA RNG
    state; full, or DCP shards of CUDA tensors) resumes on the GPU, and then on the CPU."""
    recipe = dict(max_steps=3, eval_every=0, save_every=3, checkpoint_format=checkpoint_format)
    train_here(base_recipe(corpus, tmp_path / "cpu", **recipe))
    train_here(base_recipe(corpus, tmp_path / "gpu", **recipe, device="cuda"))
    for a, b in zip(metrics(tmp_path / "cpu"), metrics(tmp_path / "gpu")):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-4)
        assert b["expert_load"] == a["expert_load"]
    train_here(base_recipe(corpus, tmp_path / "gpu", **{**recipe, "max_steps": 4}, device="cuda", resume=True))
    train_here(base_recipe(corpus, tmp_path / "gpu", **{**recipe, "max_steps": 5}, resume=True))  # device cpu
    assert [r["step"] for r in metrics(tmp_path / "gpu")] == [1, 2, 3, 4, 5]


def test_bf16_autocast_stays_close_to_fp32():
    """bf16 autocast on the GPU: logits within bf16 rounding of fp32's (loose: a random tiny model)."""
    model = random_tiny_model().cuda()
    x = tokens(model.config.vocab_size).cuda()
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x).float()
    assert (out - ref).abs().max().item() < 0.05 * ref.abs().max().item()
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean().item() > 0.9


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices (NCCL, one GPU per process)")
def test_nccl_fsdp_and_ep_with_sharded_checkpoints(corpus, tmp_path):
    """2 GPUs over NCCL with EP=2 for 3 steps (sharded checkpoint), resumed on 1 GPU: the losses of 6
    steps on one GPU."""
    single = tmp_path / "single"
    train_here(base_recipe(corpus, single, device="cuda"))
    run = tmp_path / "nccl"
    torchrun(train_cli(base_recipe(corpus, run, max_steps=3, device="cuda")), ep=2)
    assert (run / "checkpoints" / "step-0000003" / "sharded" / "__1_0.distcp").exists()
    train_here(base_recipe(corpus, run, max_steps=6, device="cuda", resume=True))
    for a, b in zip(metrics(single), metrics(run)):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-4)
