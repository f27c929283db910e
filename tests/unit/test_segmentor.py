"""AVSegmentor composition: every method family trains on S4 and MS3 batches and predicts in eval."""

from __future__ import annotations

import pytest
import torch

from avs.models.build import build_model
from avs.models.segmentor import AVSegmentor
from tests.conftest import compose_cfg, tiny_overrides

B, T, S = 2, 3, 64


def _batch(s4: bool) -> dict:
    torch.manual_seed(0)
    valid = torch.zeros(B, T, dtype=torch.bool)
    valid[:, 0] = True
    masks = (torch.rand(B, T, 1, S, S) > 0.6).float()
    if s4:
        masks[:, 1:] = 0
    return {
        "frames": torch.randn(B, T, 3, S, S),
        "masks": masks,
        "mask_valid": valid if s4 else torch.ones(B, T, dtype=torch.bool),
        "audio": torch.randn(B, T, 1, 96, 64),
    }


# Narrow widths keep every method's step fast; ECMVAE / AVS-BG need channels == audio_dim.
NARROW = ["model.channels=32", "model.audio_dim=32", "audio.embed_dim=32", "audio.width=8"]


def _model(tmp_path, *overrides: str) -> AVSegmentor:
    cfg = compose_cfg("train", tiny_overrides(tmp_path) + NARROW + list(overrides))
    torch.manual_seed(0)
    return build_model(cfg)


def _step(model: AVSegmentor, batch: dict) -> dict:
    model.train()
    model.zero_grad(set_to_none=True)
    terms = model(batch)
    assert terms, "no loss terms"
    for name, value in terms.items():
        assert value.dim() == 0 and torch.isfinite(value), name
    sum(terms.values()).backward()
    return terms


VARIANTS = [("factorised", d) for d in ("kl", "poe", "moe", "js")]
VARIANTS += [("no_factor", "js"), ("visual_only", "js"), ("ae", "js")]


CASES = [(v, d, False) for v, d in VARIANTS] + [("factorised", "js", True), ("visual_only", "js", True)]


@pytest.mark.parametrize("variant,divergence,s4", CASES)
def test_ecmvae_variants_train_and_reach_every_latent_encoder(tmp_path, variant, divergence, s4):
    extra = ["model=ecmvae", f"model.latent.variant={variant}", f"model.latent.divergence={divergence}"]
    if variant == "visual_only":
        extra.append("model.use_audio=false")
    model = _model(tmp_path, *extra)
    terms = _step(model, _batch(s4))
    assert {"seg_post", "seg_prior"} <= set(terms)
    expected = {"factorised": {"kl", "diff", "sic"}, "no_factor": {"kl"}, "visual_only": {"kl"}, "ae": {"diff", "sic"}}[
        variant
    ]
    assert expected <= set(terms)
    starved = [
        n
        for n, p in model.latent.named_parameters()
        if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)
    ]
    assert not starved, f"no gradient reaches {starved[:6]}"


def test_s4_posterior_sees_frame0_mask_repeated(tmp_path):
    model = _model(tmp_path, "model=ecmvae")
    batch = _batch(s4=True)
    masks = batch["masks"].flatten(0, 1)
    post = model._posterior_masks(masks, batch["mask_valid"])
    expected = batch["masks"][:, :1].expand(B, T, 1, S, S).reshape_as(masks)
    assert torch.equal(post, expected)
    ms3 = _batch(s4=False)
    ms3_masks = ms3["masks"].flatten(0, 1)
    assert torch.equal(model._posterior_masks(ms3_masks, ms3["mask_valid"]), ms3_masks)


def test_ecmvae_eval_with_k_samples_returns_mean_and_variance(tmp_path):
    model = _model(tmp_path, "model=ecmvae", "eval.num_samples=4").eval()
    out = model(_batch(s4=False))
    assert out["logits"].shape == (B, T, 1, S, S)
    assert out["variance"].shape == (B, T, 1, S, S) and (out["variance"] >= 0).all()
    assert out["samples"].shape == (4, B, T, 1, S, S)
    p = torch.sigmoid(out["logits"])
    assert torch.allclose(p, out["samples"].mean(0).clamp(1e-6, 1 - 1e-6), atol=1e-5)
    assert out["variance"].sum() > 0  # different latent draws give different masks
    det = _model(tmp_path, "model=ecmvae", "eval.num_samples=1").eval()
    a, b = det(_batch(False))["logits"], det(_batch(False))["logits"]
    assert torch.equal(a, b)  # K = 1 uses the prior mean: deterministic


AVSBG_ABLATIONS = {
    "full": [],
    "wo_audio": ["model.use_audio=false"],
    "wo_motion": ["model.motion=null"],
    "wo_bg": ["model.projector=null"],
    "pyramid_motion": ["model.motion.impl=pyramid"],
    "motion_then_fusion": ["model.order=motion_fusion"],
}


@pytest.mark.parametrize("name", sorted(AVSBG_ABLATIONS))
@pytest.mark.parametrize("s4", [True, False], ids=["s4", "ms3"])
def test_avsbg_ablations_train(tmp_path, name, s4):
    model = _model(tmp_path, "model=avsbg", *AVSBG_ABLATIONS[name])
    terms = _step(model, _batch(s4))
    has_bg = model.projector is not None and model.use_audio
    assert ("consistency" in terms) == has_bg
    if has_bg:
        enc = [p for p in model.projector.parameters()]
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in enc)


def test_combined_ecmvae_bg_trains_both_subsets(tmp_path):
    for s4 in (True, False):
        model = _model(tmp_path, "model=ecmvae_bg")
        terms = _step(model, _batch(s4))
        assert {"seg_post", "seg_prior", "kl", "diff", "sic", "consistency"} <= set(terms)
        assert model.motion is not None


def test_tpavi_plus_bg_trains(tmp_path):
    model = _model(
        tmp_path,
        "model=tpavi",
        "+model.projector={_target_: avs.models.projector.VisualToAudioProjector, _partial_: true}",
        "+model.loss_weights.consistency=1.0",
    )
    terms = _step(model, _batch(False))
    assert "consistency" in terms


def test_s4_segmentation_loss_ignores_unlabelled_frames(tmp_path):
    model = _model(tmp_path, "model=tpavi")
    model.train()
    batch = _batch(s4=True)
    torch.manual_seed(1)
    a = model(batch)["seg"]
    batch["masks"][:, 1:] = 1.0  # labels of unlabelled frames must not matter
    torch.manual_seed(1)
    b = model(batch)["seg"]
    assert torch.equal(a, b)


AUDIO_PARAM_PREFIXES = ("audio_encoder.", "projector.", "latent.enc_as", "latent.enc_vac")
NO_AUDIO = {
    "avsbg": ["model=avsbg", "model.use_audio=false"],
    "tpavi": ["model=tpavi", "model.use_audio=false"],
    "cvae": ["model=ecmvae", "model.use_audio=false", "model.fusion=null", "model.latent.variant=visual_only"],
}


@pytest.mark.parametrize("name", sorted(NO_AUDIO))
def test_no_audio_builds_no_audio_part_and_every_parameter_learns(tmp_path, name):
    model = _model(tmp_path, *NO_AUDIO[name])
    names = [n for n, _ in model.named_parameters()]
    assert model.audio_encoder is None and model.projector is None and not model.use_audio
    assert not [n for n in names if n.startswith(AUDIO_PARAM_PREFIXES) or "align_channel" in n]
    if name == "avsbg":  # the AVCorr attention convs only ever see the audio correlation
        assert not [n for n in names if n.startswith("fusion.")]
    batch = _batch(s4=False)
    del batch["audio"]
    _step(model, batch)
    # nothing built goes unused, so DDP needs no unused-parameter search
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused, unused[:6]


def test_no_audio_model_loads_a_checkpoint_that_has_the_audio_parts(tmp_path, caplog):
    """Runs made before the audio parts were left out saved them: those keys (only) are ignored, with one note."""
    old = _model(tmp_path, "model=avsbg")  # what model.use_audio=false built before: every part
    new = _model(tmp_path, "model=avsbg", "model.use_audio=false")
    state = old.state_dict()
    with caplog.at_level("INFO", logger="avs.models.segmentor"):
        result = new.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    notes = [r.getMessage() for r in caplog.records if "builds no audio parts" in r.getMessage()]
    assert len(notes) == 1 and "audio_encoder, fusion, projector" in notes[0]
    own = new.state_dict()
    assert all(torch.equal(own[k], state[k]) for k in own)
    # a key of a part that is built is still checked strictly
    state["decoder.path4.resConfUnit2.body.0.weight_extra"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match="weight_extra"):
        new.load_state_dict(state, strict=True)


# ------------------------------------------------------------------ declarations and loss weighting
@pytest.mark.parametrize(
    "overrides,terms,latent,projector",
    [
        (["model=tpavi"], {"seg", "avm"}, False, False),
        (["model=avsbg"], {"seg", "avm", "consistency"}, False, True),
        (["model=avsbg", "model.use_audio=false"], {"seg"}, False, False),
        (["model=ecmvae"], {"seg_post", "seg_prior", "kl", "diff", "sic", "avm"}, True, False),
        (["model=ecmvae", "model.latent.variant=ae"], {"seg_post", "seg_prior", "diff", "sic", "avm"}, True, False),
        (["model=ecmvae", "model.latent.variant=no_factor"], {"seg_post", "seg_prior", "kl", "avm"}, True, False),
        (["model=ecmvae_bg"], {"seg_post", "seg_prior", "kl", "diff", "sic", "avm", "consistency"}, True, True),
    ],
)
def test_classes_declare_the_terms_they_return(tmp_path, overrides, terms, latent, projector):
    """What `capabilities` declares from the config is exactly what the built model returns in training."""
    from avs.models.build import segmentor_class

    cfg = compose_cfg("train", tiny_overrides(tmp_path) + NARROW + overrides)
    caps = segmentor_class(cfg.model).capabilities(cfg.model)
    assert (set(caps.loss_terms), caps.latent, caps.projector) == (terms, latent, projector)
    torch.manual_seed(0)
    assert set(_step(build_model(cfg), _batch(s4=False))) == terms


def test_a_model_config_names_its_class_and_only_its_parameters(tmp_path):
    from avs.config_checks import ConfigError, check_config

    with pytest.raises(ConfigError, match=r"model\.latent: not parameters of avs\.models\.methods\.avsbench"):
        check_config(compose_cfg("train", tiny_overrides(tmp_path) + ["model=tpavi", "+model.latent=null"]))
    with pytest.raises(ConfigError, match=r"model\._target_=avs\.losses\.BCESegLoss: not a subclass of .*Segmentor"):
        check_config(compose_cfg("train", tiny_overrides(tmp_path) + ["model._target_=avs.losses.BCESegLoss"]))


def test_an_unweighted_term_is_refused_by_the_config_check(tmp_path):
    from avs.config_checks import ConfigError, check_config

    cfg = compose_cfg("train", tiny_overrides(tmp_path) + ["model=avsbg", "~model.loss_weights.consistency"])
    with pytest.raises(
        ConfigError,
        match=r"^model returns loss term 'consistency' with no weight: set model\.loss_weights\.consistency$",
    ):
        check_config(cfg)
    # without a projector AVS-BG returns no consistency term: nothing to weight
    check_config(
        compose_cfg(
            "train",
            tiny_overrides(tmp_path) + ["model=avsbg", "~model.loss_weights.consistency", "model.projector=null"],
        )
    )


class _Terms(torch.nn.Module):
    LOSS_TERMS = ("a", "b")
    LOG_ONLY_TERMS = ("note",)


def test_weighted_loss_trains_weighted_terms_logs_log_only_ones_and_refuses_the_rest():
    from avs.engine.build import weighted_loss
    from avs.errors import ConfigError

    a, b = torch.tensor(2.0, requires_grad=True), torch.tensor(3.0, requires_grad=True)
    note = torch.tensor(float("nan"))  # a log-only term never reaches the loss
    loss = weighted_loss({"a": a, "b": b, "note": note}, {"a": 1.0, "b": 0.5}, _Terms())
    assert float(loss.detach()) == 3.5
    with pytest.raises(ConfigError, match=r"^model returns loss term 'b' with no weight: set model\.loss_weights\.b$"):
        weighted_loss({"a": a, "b": b}, {"a": 1.0}, _Terms())
    with pytest.raises(ConfigError, match=r"model returns loss term 'c' that _Terms does not declare"):
        weighted_loss({"a": a, "c": b}, {"a": 1.0, "c": 1.0}, _Terms())
    # a module that declares nothing: every term it returns needs a weight
    with pytest.raises(ConfigError, match=r"loss term 'x' with no weight"):
        weighted_loss({"x": a}, {}, torch.nn.Linear(1, 1))
