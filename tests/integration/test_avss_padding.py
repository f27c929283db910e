"""AVSS padded frames in the latent path (docs/avss.md): ECMVAE's latent terms and the per-dimension KL
evaluator count only the real frames (`frame_valid`); what a padded frame holds changes none of them."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import compose_cfg
from tests.integration.test_avss_train import _batch, _overrides, avss_dir  # noqa: F401 (fixture)

LATENT_TERMS = ("kl", "diff", "sic")


def _with_other_padding(batch: dict, num_classes: int, seed: int = 3) -> dict:
    """The batch with random frames and labels in its padded frames (the real frames untouched)."""
    g = torch.Generator().manual_seed(seed)
    pad = ~batch["frame_valid"]
    other = {**batch, "frames": batch["frames"].clone(), "masks": batch["masks"].clone()}
    other["frames"][pad] = torch.randn(other["frames"][pad].shape, generator=g)
    other["masks"][pad] = torch.randint(0, num_classes, other["masks"][pad].shape, generator=g)
    return other


@pytest.mark.parametrize(
    ("method", "extra"),
    [
        ("ecmvae", []),
        ("ecmvae", ["model.latent.divergence=kl", "model.latent.free_bits=0.001"]),
        ("ecmvae_bg", ["model.latent.divergence=poe"]),
    ],
)
def test_latent_terms_count_only_real_frames(avss_dir, method, extra):  # noqa: F811
    cfg = compose_cfg("train", _overrides(avss_dir) + [f"model={method}", *extra])
    from avs.models.build import build_model

    torch.manual_seed(0)
    model = build_model(cfg).train()
    batch = _batch(cfg, [0, 1])  # v1s and v1m clips: frames 5-9 are padded
    assert batch["frame_valid"][:, :5].all() and not batch["frame_valid"][:, 5:].any()
    torch.manual_seed(1)
    terms = {k: v.detach() for k, v in model(batch).items()}
    assert set(LATENT_TERMS) <= set(terms)
    torch.manual_seed(1)
    changed = model(_with_other_padding(batch, int(cfg.data.num_classes)))
    for k in LATENT_TERMS:
        assert torch.equal(terms[k], changed[k].detach()), k

    # the terms are those of the real rows: the latent's losses on the state the forward built, with its rows
    captured = {}
    losses = model.latent.losses

    def capture(state, codes):
        captured["rows"] = state.rows.clone()
        out = losses(state, codes)
        state.rows = None
        captured["all_rows"] = {k: v.detach() for k, v in losses(state, codes).items()}
        return out

    model.latent.losses = capture
    torch.manual_seed(1)
    again = model(batch)
    assert torch.equal(captured["rows"], batch["frame_valid"].reshape(-1))
    for k in LATENT_TERMS:
        assert torch.equal(again[k].detach(), terms[k]), k
    assert any(not torch.allclose(captured["all_rows"][k], terms[k]) for k in LATENT_TERMS)


def test_s4_batches_have_no_rows(synth_data_dir):
    from avs.models.build import build_model
    from tests.conftest import tiny_overrides

    cfg = compose_cfg("train", tiny_overrides(synth_data_dir, "s4") + ["model=ecmvae"])
    model = build_model(cfg)
    batch = {"frame_valid": torch.ones(2, 3, dtype=torch.bool)}
    assert model.num_classes == 1 and model.latent_rows(batch) is None  # S4/MS3: the plain means


def test_latent_kl_evaluator_skips_padded_frames(avss_dir):  # noqa: F811
    from avs.engine.diagnostics import gaussian_kl_per_dim
    from avs.evaluation.evaluators import LatentKLEvaluator
    from avs.models.build import build_model

    cfg = compose_cfg("train", _overrides(avss_dir) + ["model=ecmvae"])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    batch = _batch(cfg, [0, 2])  # a v1s clip (5 real frames) and a v2 clip (10)
    real = batch["frame_valid"]
    assert real.sum() == 15

    def run(b: dict) -> dict:
        ev = LatentKLEvaluator()
        ev.model = model
        ev.reset()
        with torch.no_grad():
            ev.process(b, {})
        return ev.summarize()

    got = run(batch)
    assert got["frames"] == 15  # 5 + 10 real frames, no padded one
    assert run(_with_other_padding(batch, int(cfg.data.num_classes)))["s_v"] == got["s_v"]
    # hand computation: the mean over the real frames of the per-frame KL of s_v
    with torch.no_grad():
        audio = model.encode_audio(batch["audio"])
        masks = model._posterior_masks(batch["masks"].flatten(0, 1), batch["mask_valid"])
        state = model.latent.encode(batch["frames"].flatten(0, 1), audio, masks)
    q, p = state.posterior["s_v"], state.prior["s_v"]
    per_frame = gaussian_kl_per_dim(q.mu, q.logvar, p.mu, p.logvar).double()  # [B*T,L]
    want = per_frame[real.reshape(-1)].mean(0)
    torch.testing.assert_close(torch.tensor(got["s_v"], dtype=torch.float64), want)
    assert not torch.allclose(per_frame.mean(0), want)  # counting the padded frames would differ


@pytest.mark.parametrize("method", ["tpavi", "ecmvae_bg"])
def test_hard_avm_mask_trains_and_ignores_padded_frames(avss_dir, method):  # noqa: F811
    from avs.models.build import build_model

    terms = {}
    for mask in ("soft", "hard"):
        cfg = compose_cfg("train", _overrides(avss_dir) + [f"model={method}", f"model.avm_loss.avss_mask={mask}"])
        torch.manual_seed(0)
        model = build_model(cfg).train()
        batch = _batch(cfg, [0, 1])
        torch.manual_seed(1)
        terms[mask] = model(batch)
        torch.manual_seed(1)
        other = model(_with_other_padding(batch, int(cfg.data.num_classes)))
        assert torch.equal(terms[mask]["avm"].detach(), other["avm"].detach())
    assert not torch.equal(terms["soft"]["avm"].detach(), terms["hard"]["avm"].detach())
    model.zero_grad()
    sum(terms["hard"].values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_tsne_codes_leave_out_padded_frames(tmp_path):
    from avs.inference.visualize import VisualizeEvaluator

    ev = VisualizeEvaluator(tmp_path, num_clips=0)
    ev.reset()
    real = torch.tensor([[True] * 5 + [False] * 5, [True] * 10])
    codes = torch.arange(20 * 3, dtype=torch.float32).view(20, 3)  # [B*T,L], row r = frame r
    ev.process({"frame_valid": real}, {"logits": torch.zeros(2, 10, 4, 2, 2), "latents": {"s_v": codes}})
    kept = ev.summarize()["codes"]["s_v"][0]
    assert kept.shape == (15, 3) and (kept[:, 0] // 3).tolist() == [*range(5), *range(10, 20)]
