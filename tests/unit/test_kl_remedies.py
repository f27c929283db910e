"""KL remedies (all off by default): free bits per dimension, the kl weight warm-up, the per-dimension KL record."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from avs.engine.diagnostics import LATENT_KL_FILE, append_latent_kl, latent_kl_record
from avs.engine.hooks import HookBase, KLWarmupHook
from avs.engine.state import RunState
from avs.errors import ConfigError
from avs.models.latent import Gaussian, build_latent
from avs.models.latent_parts import free_bits_sum

PX = 64


def _inputs(n: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    frames = torch.randn(n, 3, PX, PX, generator=g)
    audio = torch.rand(n, 128, generator=g)
    masks = (torch.rand(n, 1, PX, PX, generator=g) > 0.5).float()
    return frames, audio, masks


# ---------------------------------------------------------------- free bits
def test_free_bits_floors_each_dimensions_batch_mean_kl_by_hand():
    # q = N(mu, 1), p = N(0, 1): KL per element = mu^2 / 2
    mu = torch.tensor([[1.0, 0.0, 0.2], [-1.0, 0.0, 0.0]], requires_grad=True)
    q, p = Gaussian(mu, torch.zeros(2, 3)), Gaussian(torch.zeros(2, 3), torch.zeros(2, 3))
    # batch means per dimension: 0.5, 0, 0.01
    plain = build_latent(image_size=PX, variant="visual_only")
    torch.testing.assert_close(plain.kl(q, p), torch.tensor(0.5 + 0.0 + 0.01))
    floored = build_latent(image_size=PX, variant="visual_only", free_bits=0.1)
    kl = floored.kl(q, p)
    torch.testing.assert_close(kl, torch.tensor(0.5 + 0.1 + 0.1))  # max(0.1, .5) + max(0.1, 0) + max(0.1, .01)
    kl.backward()
    assert torch.all(mu.grad[:, 1:] == 0)  # dimensions under the floor get no gradient
    torch.testing.assert_close(mu.grad[:, 0], torch.tensor([0.5, -0.5]))  # d/dmu of mean(mu^2/2)


def test_free_bits_sum_needs_per_dimension_values():
    torch.testing.assert_close(free_bits_sum(torch.tensor([[0.3, 0.0], [0.1, 0.0]]), 0.05), torch.tensor(0.25))
    with pytest.raises(ValueError, match="per-dimension"):
        free_bits_sum(torch.zeros(3), 0.1)


@pytest.mark.parametrize("divergence,floored_codes", [("kl", 3), ("js", 3), ("poe", 2)])
def test_free_bits_on_each_per_dimension_divergence(divergence, floored_codes):
    frames, audio, masks = _inputs()

    def kl_term(free_bits: float) -> torch.Tensor:
        torch.manual_seed(0)
        m = build_latent(image_size=PX, divergence=divergence, free_bits=free_bits).eval()
        with torch.no_grad():
            return m.losses(m.encode(frames, audio, masks), {})["kl"]

    # a floor below every dimension's divergence changes nothing: the per-dimension terms sum to the plain term
    torch.testing.assert_close(kl_term(1e-12), kl_term(0.0))
    # a floor above every dimension's divergence: floor x (codes regularised) x L
    torch.testing.assert_close(kl_term(1e3), torch.tensor(1e3 * floored_codes * 16))


def test_free_bits_applies_to_every_variational_variant():
    frames, audio, masks = _inputs()
    for variant, codes in (("visual_only", 1), ("no_factor", 2)):
        m = build_latent(image_size=PX, variant=variant, free_bits=1e3).eval()
        with torch.no_grad():
            st = m.encode(frames, None if variant == "visual_only" else audio, masks)
            torch.testing.assert_close(m.losses(st, {})["kl"], torch.tensor(1e3 * codes * 16))
    # where free bits make no sense the config is refused before the run (test_config_refuses_remedies_...)
    assert build_latent(image_size=PX, divergence="moe").free_bits == 0.0  # off: every divergence builds


# ---------------------------------------------------------------- config checks
def _check(overrides: list[str]) -> None:
    from avs.config_checks import check_config
    from tests.conftest import compose_cfg

    check_config(compose_cfg("train", ["data=synth_ms3", *overrides]))


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["model=ecmvae", "model.latent.free_bits=-1"], "must be >= 0"),
        (["model=ecmvae", "model.latent.variant=ae", "model.latent.free_bits=0.1"], "variant=ae has no KL"),
        (["model=ecmvae", "model.latent.divergence=moe", "model.latent.free_bits=0.1"], "divergence=moe"),
        (["model=ecmvae", "model.preset=release", "model.latent.free_bits=0.1"], "divergence=js_sampled"),
        (["model=ecmvae", "model.latent.divergence=js_sampled", "model.latent.free_bits=0.1"], "divergence=js_sampled"),
        (["model=tpavi", "trainer.kl_warmup.steps=10"], "has no KL term"),
        (["model=ecmvae", "model.latent.variant=ae", "trainer.kl_warmup.steps=10"], "has no KL term"),
        (["model=ecmvae", "trainer.kl_warmup.steps=10", "trainer.kl_warmup.start=2"], "must lie in"),
        (["model=ecmvae", "trainer.kl_warmup.steps=10", "trainer.kl_warmup.cycle_steps=5"], "cycle_steps=5"),
        (["model=tpavi", "trainer.record_latent_kl=true"], "no latent part"),
    ],
)
def test_config_refuses_remedies_that_make_no_sense(overrides, match):
    with pytest.raises(ConfigError, match=match):
        _check(overrides)


def test_config_accepts_the_remedies_on_a_latent_model():
    _check(
        [
            "model=ecmvae",
            "model.latent.free_bits=0.05",
            "trainer.kl_warmup.steps=100",
            "trainer.kl_warmup.cycle_steps=400",
            "trainer.record_latent_kl=true",
        ]
    )


# ---------------------------------------------------------------- warm-up hook
def _weights_over(hook: KLWarmupHook, steps: int, weights: dict[str, float]) -> list[float]:
    loop = SimpleNamespace(state=RunState(), loss_weights=weights)
    hook.loop = loop
    hook.before_train()
    seen = []
    for _ in range(steps):
        hook.before_step()
        seen.append(loop.loss_weights["kl"])
        loop.state.step += 1
        hook.after_step()
    return seen


def test_warmup_ramps_the_kl_weight_linearly_and_leaves_the_configured_weights_alone():
    weights = {"kl": 0.05, "seg_post": 0.5}
    seen = _weights_over(KLWarmupHook(steps=4), 6, weights)
    assert seen == pytest.approx([0.0, 0.0125, 0.025, 0.0375, 0.05, 0.05])
    assert seen[-1] == 0.05  # exactly the configured weight once warm
    assert weights == {"kl": 0.05, "seg_post": 0.5}  # metrics.json records these


def test_warmup_start_and_cycles():
    seen = _weights_over(KLWarmupHook(steps=2, start=0.5), 3, {"kl": 1.0})
    assert seen == pytest.approx([0.5, 0.75, 1.0])
    seen = _weights_over(KLWarmupHook(steps=2, cycle_steps=4), 9, {"kl": 1.0})
    assert seen == pytest.approx([0.0, 0.5, 1.0, 1.0, 0.0, 0.5, 1.0, 1.0, 0.0])


def test_warmup_continues_the_schedule_after_a_resume():
    hook = KLWarmupHook(steps=10)
    loop = SimpleNamespace(state=RunState(), loss_weights={"kl": 1.0})
    loop.state.step = 7  # a run resumed after 7 steps
    hook.loop = loop
    hook.before_train()
    hook.before_step()
    assert loop.loss_weights["kl"] == pytest.approx(0.7)


@pytest.mark.parametrize("kw", [{"steps": 0}, {"steps": 4, "start": -0.1}, {"steps": 4, "cycle_steps": 3}])
def test_warmup_refuses_bad_arguments(kw):
    with pytest.raises(ValueError, match="trainer.kl_warmup"):
        KLWarmupHook(**kw)


# ---------------------------------------------------------------- per-dimension record
def test_latent_kl_record_and_file(tmp_path):
    rec = latent_kl_record({"s_v": [0.5, 0.25], "c": [0.0, 0.0], "frames": 6}, epoch=1, step=2, split="val")
    assert rec == {
        "epoch": 1,
        "step": 2,
        "split": "val",
        "frames": 6,
        "kl": {"s_v": [0.5, 0.25], "c": [0.0, 0.0]},
        "total": {"s_v": 0.75, "c": 0.0},
    }
    append_latent_kl(tmp_path, rec)
    append_latent_kl(tmp_path, {**rec, "epoch": 2, "step": 4})
    append_latent_kl(tmp_path, {**rec, "epoch": 2, "step": 4, "frames": 7})  # same step again (a resume): replaced
    lines = [json.loads(x) for x in (tmp_path / LATENT_KL_FILE).read_text().splitlines()]
    assert [(x["step"], x["frames"]) for x in lines] == [(2, 6), (4, 7)]


def test_a_run_records_per_dimension_kl_at_each_validation_and_warms_up(synth_data_dir, tmp_path):
    from avs.engine.trainer import Trainer
    from tests.conftest import compose_cfg, tiny_overrides

    spy = "{_target_: tests.unit.test_kl_remedies.WeightSpy}"
    cfg = compose_cfg(
        "train",
        tiny_overrides(synth_data_dir)
        + [
            "model=ecmvae",
            "model.channels=32",
            "model.audio_dim=32",
            "audio.embed_dim=32",
            "model.latent.latent_dim=4",
            "model.latent.free_bits=0.01",
            "trainer.max_steps=4",  # 2 batches per epoch: 2 epochs, 2 validations
            "trainer.test_at_end=false",
            "trainer.kl_warmup.steps=2",
            "trainer.record_latent_kl=true",
            f"trainer.hooks=[{spy}]",
        ],
    )
    WeightSpy.seen.clear()
    Trainer(cfg, tmp_path / "run").fit()
    assert WeightSpy.seen == pytest.approx([0.0, 0.025, 0.05, 0.05])  # paper preset: kl weight 0.05
    lines = [json.loads(x) for x in (tmp_path / "run" / LATENT_KL_FILE).read_text().splitlines()]
    assert [(x["epoch"], x["step"], x["split"]) for x in lines] == [(1, 2, "val"), (2, 4, "val")]
    for x in lines:
        assert set(x["kl"]) == {"s_v", "s_a", "c"}
        assert all(len(v) == 4 and min(v) >= 0 for v in x["kl"].values())
        assert x["frames"] == 2 * 3  # 2 val clips x 3 frames
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["loss_weights"]["kl"] == 0.05


class WeightSpy(HookBase):
    """Records the kl weight each step uses (registered after the warm-up hook)."""

    seen: list[float] = []

    def before_step(self) -> None:
        WeightSpy.seen.append(self.loop.loss_weights["kl"])
