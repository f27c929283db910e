"""The hooks group: order by priority, required hooks, after_backward with the gradient norm, hook state on resume."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf, open_dict

from avs.engine.checkpoint import load_checkpoint
from avs.engine.hook_config import build_hooks, hook_nodes
from avs.engine.hooks import HookBase
from avs.engine.trainer import Trainer
from avs.errors import ConfigError
from tests.conftest import compose_cfg, tiny_overrides

ARCHITECTURE = Path(__file__).resolve().parents[2] / "docs" / "architecture.md"


def _doc_example(name: str) -> str:
    """The ```python block of docs/architecture.md that defines `name`."""
    blocks = re.findall(r"```python\n(.*?)```", ARCHITECTURE.read_text(), flags=re.S)
    (block,) = [b for b in blocks if f"class {name}(" in b]
    return block


exec(_doc_example("GradNormHook"), globals())  # the docs' example, as written there: GradNormHook
GradNormHook = globals()["GradNormHook"]


class CheckedGradNorm(GradNormHook):
    """The docs' GradNormHook, plus the norm computed here from the gradients themselves."""

    def __init__(self, every: int = 1) -> None:
        super().__init__(every)
        self.independent: list[float] = []

    def after_backward(self) -> None:
        super().after_backward()
        grads = [p.grad.detach().double().flatten() for p in self.loop.model.parameters() if p.grad is not None]
        self.independent.append(float(torch.cat(grads).norm()))


class StepCounter(HookBase):
    """A hook with state: the optimizer steps it has seen, over resumes."""

    def __init__(self) -> None:
        self.count, self.loaded = 0, None

    def after_step(self) -> None:
        self.count += 1

    def state_dict(self) -> dict:
        return {"count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.loaded, self.count = dict(state), int(state["count"])


def _cfg(data_dir, *extra):
    return compose_cfg("train", tiny_overrides(data_dir) + ["model.channels=32", *extra])


def _names(trainer):
    return [h.name for h in build_hooks(trainer)]


DEFAULT_ORDER = [
    "logging",
    "nonfinite",
    "validation",
    "checkpoint",
    "interrupt_after",
    "signal",
    "final_evaluation",
    "metrics",
    "run_report",
]


def test_hooks_run_in_priority_order_and_a_user_hook_goes_where_its_priority_says(synth_data_dir, tmp_path):
    assert _names(Trainer(_cfg(synth_data_dir), tmp_path / "a")) == DEFAULT_ORDER  # kl hooks off by default
    first = "+hooks.first={_target_: tests.unit.test_hook_config.StepCounter, priority: 5}"
    listed = "trainer.hooks=[{_target_: tests.unit.test_hook_config.StepCounter}]"
    names = _names(Trainer(_cfg(synth_data_dir, first, listed, "trainer.record_latent_kl=false"), tmp_path / "b"))
    assert names == ["first", *DEFAULT_ORDER[:6], "trainer.hooks[0]", *DEFAULT_ORDER[6:]]
    kl = ["model=ecmvae", "model.audio_dim=32", "audio.embed_dim=32", "trainer.record_latent_kl=true"]
    kl += ["trainer.kl_warmup.steps=2", "hooks.final_evaluation.priority=1"]
    names = _names(Trainer(_cfg(synth_data_dir, *kl), tmp_path / "c"))
    assert names == ["final_evaluation", *DEFAULT_ORDER[:6], "kl_warmup", "latent_kl", *DEFAULT_ORDER[7:]]
    cfg = _cfg(synth_data_dir)
    with open_dict(cfg):
        del cfg["hooks"]  # a config written before the hooks group: its default file
    assert [n for n, _ in hook_nodes(cfg) if n not in ("kl_warmup", "latent_kl")] == DEFAULT_ORDER


def test_a_needed_hook_is_dropped_only_knowingly(synth_data_dir, tmp_path):
    refused = r"hooks\.checkpoint \(no last\.ckpt.*trainer\.allow_missing_hooks=\[checkpoint\]"
    with pytest.raises(ConfigError, match=refused):
        build_hooks(Trainer(_cfg(synth_data_dir, "~hooks.checkpoint"), tmp_path / "a"))
    knowingly = _cfg(synth_data_dir, "~hooks.checkpoint", "trainer.allow_missing_hooks=[checkpoint]")
    assert "checkpoint" not in _names(Trainer(knowingly, tmp_path / "b"))
    assert "logging" not in _names(Trainer(_cfg(synth_data_dir, "~hooks.logging"), tmp_path / "c"))  # not needed
    with pytest.raises(ConfigError, match=r"hooks\.logging\.priority: expected a number"):
        build_hooks(Trainer(_cfg(synth_data_dir, "hooks.logging.priority=soon"), tmp_path / "d"))


def test_the_docs_grad_norm_hook_records_the_norm_before_clipping_on_real_steps(synth_data_dir, tmp_path):
    node = "+hooks.gradnorm={_target_: tests.unit.test_hook_config.CheckedGradNorm, priority: 65}"
    clip = 1e-4
    trainer = Trainer(_cfg(synth_data_dir, node, "trainer.max_steps=3", f"trainer.grad_clip={clip}"), tmp_path / "r")
    trainer.fit()
    (hook,) = [h for h in trainer.loop.hooks if h.name == "gradnorm"]
    assert len(hook.norms) == 3 and all(n > clip for n in hook.norms)  # before clipping
    assert hook.norms == pytest.approx(hook.independent, rel=1e-5)
    assert trainer.loop.last.grad_norm is not None and float(trainer.loop.last.grad_norm) == hook.norms[-1]


def test_a_hook_with_state_keeps_it_over_a_resume(synth_data_dir, tmp_path):
    node = "+hooks.counter={_target_: tests.unit.test_hook_config.StepCounter, priority: 65}"
    run = tmp_path / "run"
    first = Trainer(_cfg(synth_data_dir, node, "trainer.max_steps=4", "trainer.interrupt_after_steps=2"), run)
    assert first.fit()["interrupted"]
    assert load_checkpoint(run / "checkpoints" / "last.ckpt")["hooks"] == {"counter": {"count": 2}}
    again = Trainer(_cfg(synth_data_dir, node, "trainer.max_steps=4", "trainer.resume=auto"), run)
    again.fit()
    (hook,) = [h for h in again.loop.hooks if h.name == "counter"]
    assert hook.loaded == {"count": 2} and hook.count == 4  # 2 restored + the 2 steps of the resumed run
    assert load_checkpoint(run / "checkpoints" / "last.ckpt")["hooks"]["counter"] == {"count": 4}
    # a stateless run writes no hooks entry
    plain = tmp_path / "plain"
    Trainer(_cfg(synth_data_dir, "trainer.test_at_end=false"), plain).fit()
    assert "hooks" not in load_checkpoint(plain / "checkpoints" / "last.ckpt")
    assert OmegaConf.select(_cfg(synth_data_dir), "hooks.checkpoint._target_") == "avs.engine.hooks.CheckpointHook"


def test_the_documented_command_line_spellings_pass_the_override_check():
    """`+hooks.<name>=` and `+eval.evaluators.<name>=` add an entry that is read; a typo inside an entry is refused."""
    from avs.script_args import check_overrides

    hook = "+hooks.gradnorm={_target_: tests.unit.test_hook_config.CheckedGradNorm, priority: 65}"
    evaluator = "+eval.evaluators.mine={_target_: avs.evaluation.evaluators.MetricsEvaluator}"
    check_overrides([hook, "~hooks.logging", evaluator], "scripts/train.py", "train", open_nodes=["model"])
    with pytest.raises(ConfigError, match=r"hooks\.gradnorm\.priority.*nothing would read it"):
        check_overrides(["+hooks.gradnorm.priority=3"], "scripts/train.py", "train", open_nodes=["model"])
    with pytest.raises(ConfigError, match=r"hookz\.gradnorm.*nothing would read it"):
        check_overrides(["+hookz.gradnorm={_target_: x.Y}"], "scripts/train.py", "train", open_nodes=["model"])
