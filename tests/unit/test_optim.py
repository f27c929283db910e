"""The optimizer and scheduler: fused Adam follows the per-tensor Adam; optimizer and scheduler are config choices."""

from __future__ import annotations

import pytest
import torch

from avs.engine.optim import build_optimizer, build_scheduler, use_fused
from avs.errors import ConfigError


def _train(fused: bool, steps: int = 5) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(), torch.nn.Conv2d(8, 1, 1)
    )
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


def _params() -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    return list(torch.nn.Linear(4, 2).parameters())


def test_adamw_is_a_config_choice_with_the_trainer_lr_and_weight_decay(tmp_path):
    from tests.conftest import compose_cfg

    cfg = compose_cfg(
        "train",
        [
            "optimizer=adamw",
            "trainer.lr=0.02",
            "trainer.weight_decay=0.1",
            "+trainer.optimizer.amsgrad=true",
            f"paths.data_dir={tmp_path}",
        ],
    )
    opt = build_optimizer(_params(), cfg.trainer)
    assert type(opt) is torch.optim.AdamW
    assert opt.defaults["lr"] == 0.02 and opt.defaults["weight_decay"] == 0.1 and opt.defaults["amsgrad"] is True
    assert opt.defaults["fused"] is True  # trainer.fused_optimizer=auto: AdamW has a fused kernel
    default = build_optimizer(_params(), compose_cfg("train", [f"paths.data_dir={tmp_path}"]).trainer)
    assert type(default) is torch.optim.Adam
    assert default.defaults["lr"] == 1e-4 and default.defaults["weight_decay"] == 0.0


def test_the_trainer_keys_fill_the_optimizer_and_the_node_may_not_set_them():
    node = {"_target_": "torch.optim.SGD", "_partial_": True, "momentum": 0.9}
    opt = build_optimizer(_params(), {"optimizer": node, "lr": 0.5, "fused_optimizer": False})
    assert type(opt) is torch.optim.SGD and opt.defaults["lr"] == 0.5 and opt.defaults["momentum"] == 0.9
    with pytest.raises(ConfigError, match="trainer.optimizer.lr is set by the trainer from trainer.lr"):
        build_optimizer(_params(), {"optimizer": {**node, "lr": 0.1}, "lr": 0.5})
    rms = {"_target_": "torch.optim.RMSprop", "_partial_": True}
    assert "fused" not in build_optimizer(_params(), {"optimizer": rms, "lr": 0.1}).defaults  # auto: no kernel, off
    with pytest.raises(ValueError, match="needs an optimizer with a fused kernel"):
        build_optimizer(_params(), {"optimizer": rms, "lr": 0.1, "fused_optimizer": True})


@pytest.mark.parametrize(
    ("choice", "cls", "length_arg"),
    [
        ("cosine", torch.optim.lr_scheduler.CosineAnnealingLR, "T_max"),
        ("poly", torch.optim.lr_scheduler.PolynomialLR, "total_iters"),
    ],
)
def test_scheduler_choice_gets_the_run_length_at_build_time(choice, cls, length_arg, tmp_path):
    from tests.conftest import compose_cfg

    cfg = compose_cfg("train", [f"scheduler={choice}", f"paths.data_dir={tmp_path}"])
    assert cfg.trainer.scheduler[length_arg] is None  # filled by build_scheduler
    sched = build_scheduler(build_optimizer(_params(), cfg.trainer), cfg.trainer, total_steps=40)
    assert type(sched) is cls and getattr(sched, length_arg) == 40
    short = build_scheduler(build_optimizer(_params(), cfg.trainer), cfg.trainer, total_steps=0)
    assert getattr(short, length_arg) == 1
    constant = compose_cfg("train", [f"paths.data_dir={tmp_path}"]).trainer
    assert constant.scheduler is None and build_scheduler(build_optimizer(_params(), constant), constant, 40) is None
