"""bf16 under torchrun with FSDP2's MixedPrecisionPolicy (2 CPU processes, gloo): blocks and routed
experts are gathered in bf16, each MoE gate in fp32, the residual stream, the sharded master weights, the
reduced gradients and the Adam state stay fp32; the losses track one process's bf16 run; a resumed run
continues bit for bit.

This file is also the worker script of the dtype test:
    torchrun --nproc_per_node=2 tests/test_fsdp_mixed_precision.py dtypes OUT.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from test_distributed import SMALL_MODEL, base_recipe, metrics, torchrun, train_cli, train_here

LOSS_REL_TOL = 2e-3  # bf16 under 2 processes vs 1 process, relative per-step loss; seen <= 3.9e-5
LOGITS_TOL = 0.02    # parallelized vs plain model's logits under bf16 autocast; seen <= 3.9e-3


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(run)}


@pytest.mark.parametrize("ep", [1, 2])
def test_gate_gathers_fp32_blocks_bf16_master_and_adam_state_fp32(tmp_path, ep):
    out = tmp_path / "dtypes.json"
    torchrun([str(Path(__file__).resolve()), "dtypes", str(out)], ep=ep)
    seen = json.loads(out.read_text())
    print(f"EP={ep}: {seen}")
    assert set(seen["gate"]) == {"torch.float32"}          # unsharded inside the gate's forward
    assert set(seen["attention"]) == {"torch.bfloat16"}    # a block's weights inside its forward
    assert set(seen["experts"]) == {"torch.bfloat16"}      # the routed experts' (their own unit under EP)
    assert set(seen["block_input"]) == {"torch.float32"}   # the residual stream is not cast
    assert seen["master"] == ["torch.float32"] and seen["grads"] == ["torch.float32"]
    assert seen["adam"] == ["torch.float32"]
    assert seen["logits_diff"] < LOGITS_TOL


def test_bf16_under_torchrun_tracks_one_process_and_resumes_bit_for_bit(corpus, tmp_path):
    recipe = base_recipe(corpus, tmp_path / "single", precision="bf16")
    train_here(recipe)
    proc = torchrun(train_cli({**recipe, "out": str(tmp_path / "dp")}))
    assert "precision: bf16 (requested)" in proc.stdout
    one, two = losses(tmp_path / "single"), losses(tmp_path / "dp")
    assert sorted(two) == list(range(1, 7))
    worst = max(abs(one[s] - two[s]) / one[s] for s in one)
    print(f"bf16, 2 processes vs 1: worst relative loss difference {worst:.2e}")
    assert worst < LOSS_REL_TOL
    torchrun(train_cli({**recipe, "out": str(tmp_path / "resumed"), "max_steps": 3}))
    proc = torchrun(train_cli({**recipe, "out": str(tmp_path / "resumed"), "precision": "auto", "resume": True}))
    assert "precision: bf16 (resumed: step-0000003 ran in bf16)" in proc.stdout
    assert losses(tmp_path / "resumed") == two


# ---- worker (runs under torchrun) ----------------------------------------------------------------
def _dtypes_worker(out: str) -> None:
    from nanoseek import ModelConfig, Transformer
    from nanoseek.model import MoE
    from nanoseek.precision import Precision
    from nanoseek.train.distributed import Parallel

    torch.set_num_threads(1)
    parallel = Parallel.init(device="cpu")  # EP from $NANOSEEK_EP
    parallel.precision = Precision("bf16", "requested")
    cfg = ModelConfig.preset("tiny").replace(**SMALL_MODEL)
    torch.manual_seed(0)
    plain = Transformer(cfg)
    torch.manual_seed(0)
    model = parallel.parallelize(Transformer(cfg))
    seen = {"gate": set(), "attention": set(), "experts": set(), "block_input": set()}

    def record(key, tensor):
        assert not isinstance(tensor, torch.distributed.tensor.DTensor), f"{key}: still sharded in forward"
        seen[key].add(str(tensor.dtype))

    for block in model.layers:  # pre-hooks run after FSDP2's (prepended): the unit's weights are gathered
        block.register_forward_pre_hook(lambda m, args: record("block_input", args[0]))
        block.self_attn.register_forward_pre_hook(lambda m, args: record("attention", next(m.parameters())))
        if isinstance(block.mlp, MoE):
            block.mlp.gate.register_forward_pre_hook(lambda m, args: record("gate", m.weight))
            block.mlp.experts.register_forward_pre_hook(lambda m, args: record("experts", m.gate_up))
    x = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(parallel.rank))
    with parallel.precision.autocast("cpu"):
        logits = model(x)
        with torch.no_grad():
            ref = plain(x)
    logits.float().square().mean().backward()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    optimizer.step()
    result = {k: sorted(v) for k, v in seen.items()}
    result["master"] = sorted({str(p.dtype) for p in model.parameters()})
    result["grads"] = sorted({str(p.grad.dtype) for p in model.parameters() if p.grad is not None})
    result["adam"] = sorted({str(t.dtype) for s in optimizer.state.values() for k, t in s.items() if k != "step"})
    diff = torch.tensor([(logits.float() - ref.float()).abs().max().item()])
    torch.distributed.all_reduce(diff, op=torch.distributed.ReduceOp.MAX)
    result["logits_diff"] = diff.item()
    if parallel.is_main:
        Path(out).write_text(json.dumps(result))
    del model, optimizer
    parallel.close()


if __name__ == "__main__":
    if sys.argv[1] == "dtypes":
        _dtypes_worker(sys.argv[2])
