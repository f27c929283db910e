"""The shared optimizer: fused Adam (the fast path) follows the per-tensor Adam (the plain path)."""

from __future__ import annotations

import pytest
import torch

from avs.engine.optim import build_optimizer, use_fused


def _train(fused: bool, steps: int = 5) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(), torch.nn.Conv2d(8, 1, 1))
    model[1].weight.requires_grad_(False)  # frozen parameters are left out
    opt = build_optimizer(model.parameters(), {"lr": 1e-2, "weight_decay": 1e-4, "fused_optimizer": fused})
    assert opt.defaults["fused"] is (True if fused else None)
    assert all(p.requires_grad for g in opt.param_groups for p in g["params"])
    x = torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def test_fused_adam_matches_the_loop_implementation():
    fast, plain = _train(True), _train(False)
    moved = any(not torch.equal(a, b) for a, b in zip(_train(True, steps=0), fast))
    assert moved  # the steps changed the weights
    # float rounding only: < 1 % of one step's size (lr 1e-2); a different update rule moves by ~lr
    for a, b in zip(fast, plain):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


def test_auto_picks_fused_for_float_cpu_parameters_and_true_refuses_other_devices():
    cpu = [torch.nn.Parameter(torch.zeros(3))]
    assert use_fused("auto", cpu) is True
    assert use_fused(False, cpu) is False
    meta = [torch.nn.Parameter(torch.zeros(3, device="meta"))]
    assert use_fused("auto", meta) is False
    with pytest.raises(ValueError, match="trainer.fused_optimizer=true needs float parameters on CPU or CUDA"):
        use_fused(True, meta)
