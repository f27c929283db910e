"""AUROC of a latent model's per-pixel errors against its K-sample variance (avs/evaluation/uncertainty.py)."""

from __future__ import annotations

import itertools
import json
import subprocess
from pathlib import Path

import pytest
import torch

from avs.errors import ConfigError, ExitCode
from avs.evaluation.evaluator import EvaluationError
from avs.evaluation.uncertainty import binary_auroc, binary_entropy, uncertainty_record, write_uncertainty
from tests.conftest import compose_cfg, run_script, tiny_overrides

SMALL = {
    "ecmvae": ["model=ecmvae", "model.channels=32", "model.audio_dim=32", "audio.embed_dim=32"],
    "avsbg": ["model=avsbg", "model.channels=32", "model.audio_dim=32", "audio.embed_dim=32"],
}


# ---------------------------------------------------------------- binary_auroc
def _pair_count_auc(scores: list[float], labels: list[int]) -> float:
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize(
    "scores,labels,expected",
    [
        ([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1], 1.0),  # every positive above every negative
        ([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1], 0.0),  # inverted
        ([0.5, 0.5, 0.5, 0.5], [0, 1, 0, 1], 0.5),  # all tied: no information
        ([0.3, 0.7, 0.7, 0.1, 0.7], [0, 1, 0, 0, 1], 5 / 6),  # pairs: (.7>.3, .7=.7, .7>.1) x 2 = 5/6
    ],
)
def test_binary_auroc_hand_cases(scores, labels, expected):
    assert binary_auroc(torch.tensor(scores), torch.tensor(labels)) == pytest.approx(expected, abs=1e-12)


def test_binary_auroc_matches_pair_counting_with_many_ties():
    g = torch.Generator().manual_seed(3)
    scores = torch.randint(0, 6, (60,), generator=g).float() / 5  # six levels: many ties
    labels = (torch.rand(60, generator=g) < scores * 0.8 + 0.1).long()
    expected = _pair_count_auc(scores.tolist(), labels.tolist())
    assert 0.5 < expected < 1.0
    assert binary_auroc(scores.view(6, 10), labels.view(6, 10).bool()) == pytest.approx(expected, abs=1e-12)


def test_binary_auroc_single_class_is_none_and_bad_input_is_refused():
    assert binary_auroc(torch.rand(5), torch.zeros(5)) is None
    assert binary_auroc(torch.rand(5), torch.ones(5, dtype=torch.bool)) is None
    with pytest.raises(ValueError, match="differ in size"):
        binary_auroc(torch.rand(5), torch.ones(4))
    with pytest.raises(ValueError, match="NaN"):
        binary_auroc(torch.tensor([0.1, float("nan")]), torch.tensor([0, 1]))


def test_binary_entropy_by_hand():
    h = binary_entropy(torch.tensor([0.0, 0.5, 1.0, 0.25]))
    expected = [0.0, 0.6931471805599453, 0.0, 0.5623351446188083]
    assert h.tolist() == pytest.approx(expected, abs=1e-12)


# ---------------------------------------------------------------- on a stand-in model (no training)
class _Fixed(torch.nn.Module):
    """Returns preset mean probabilities and variances for a batch of one clip of two frames."""

    latent = object()
    eval_num_samples = 4

    def __init__(self, prob: torch.Tensor, var: torch.Tensor):
        super().__init__()
        self.prob, self.var = prob, var

    def forward(self, batch):
        return {"logits": torch.logit(self.prob), "variance": self.var}


def test_uncertainty_record_counts_only_annotated_frames_and_splits_variance_by_error():
    # one clip, T=2, 1x2 pixels; frame 1 is not annotated (its pixels must not count)
    prob = torch.tensor([0.9, 0.2, 0.6, 0.6]).view(1, 2, 1, 1, 2)
    var = torch.tensor([0.01, 0.30, 0.9, 0.9]).view(1, 2, 1, 1, 2)
    masks = torch.tensor([1.0, 1.0, 0.0, 0.0]).view(1, 2, 1, 1, 2)
    batch = {"frames": torch.zeros(1, 2, 3, 1, 2), "masks": masks, "mask_valid": torch.tensor([[True, False]])}
    rec = uncertainty_record(_Fixed(prob, var), [batch, {"skipped": ["x"]}])
    # frame 0: pixel 0 right (0.9 vs 1), pixel 1 wrong (0.2 vs 1) with the larger variance
    assert rec["frames"] == 1 and rec["pixels"] == 2 and rec["num_samples"] == 4
    assert rec["auroc"] == 1.0 and rec["error_rate"] == 0.5
    assert rec["mean_variance_error"] == pytest.approx(0.30) and rec["mean_variance_correct"] == pytest.approx(0.01)
    assert rec["auroc_entropy"] == 1.0  # 0.2 is nearer 0.5 than 0.9: larger entropy on the wrong pixel
    batch["mask_valid"] = torch.tensor([[True, True]])
    rec = uncertainty_record(_Fixed(prob, var), [batch])
    assert rec["pixels"] == 4 and rec["error_rate"] == 0.75
    with pytest.raises(EvaluationError, match="no annotated frame"):
        uncertainty_record(_Fixed(prob, var), [{"skipped": ["x"]}])


def test_avss_class_logits_score_the_foreground_and_skip_padded_frames():
    from avs.evaluation.uncertainty import UncertaintyEvaluator

    # one clip, T=3, 3 classes, 1x2 pixels: frame 0 real and labelled, frame 1 real without a mask, frame 2
    # padded (marked labelled here on purpose: frame_valid alone must leave it out)
    p_bg = torch.tensor([[0.8, 0.3], [0.5, 0.5], [0.1, 0.1]])  # softmax(l)_0 per frame and pixel
    probs = torch.stack([p_bg, (1 - p_bg) / 4, 3 * (1 - p_bg) / 4], dim=1)  # [T,C,2]; the other classes share 1-p0
    logits = probs.log().view(1, 3, 3, 1, 2)
    var = torch.tensor([0.05, 0.40, 0.9, 0.9, 0.7, 0.7]).view(1, 3, 1, 1, 2)
    masks = torch.tensor([[[[2, 0]], [[0, 0]], [[0, 0]]]])  # [1,3,1,2] class ids
    batch = {
        "masks": masks,
        "mask_valid": torch.tensor([[True, False, True]]),
        "frame_valid": torch.tensor([[True, True, False]]),
    }
    ev = UncertaintyEvaluator(4)
    ev.reset()
    ev.process(batch, {"logits": logits, "variance": var})
    rec = ev.summarize()
    # frame 0: pixel 0 P(fg)=0.2 vs label 2 (foreground) -> wrong; pixel 1 P(fg)=0.7 vs label 0 -> wrong
    assert rec["frames"] == 1 and rec["pixels"] == 2 and rec["error_rate"] == 1.0
    assert rec["mean_variance"] == pytest.approx(0.225) and rec["auroc"] is None
    batch["masks"] = torch.tensor([[[[2, 1]], [[0, 0]], [[0, 0]]]])  # pixel 1 foreground too: now right
    ev.reset()
    ev.process(batch, {"logits": logits, "variance": var})
    rec = ev.summarize()
    assert rec["error_rate"] == 0.5 and rec["auroc"] == 0.0  # the wrong pixel has the smaller variance
    assert rec["mean_variance_error"] == pytest.approx(0.05)


def test_uncertainty_record_refuses_a_deterministic_model_or_one_sample():
    model = _Fixed(torch.full((1, 1, 1, 1, 1), 0.5), torch.zeros(1, 1, 1, 1, 1))
    model.eval_num_samples = 1
    with pytest.raises(ConfigError, match="K >= 2"):
        uncertainty_record(model, [])
    model.latent = None
    with pytest.raises(ConfigError, match="no latent part"):
        uncertainty_record(model, [])


# ---------------------------------------------------------------- tiny trained checkpoints
def _checkpoint(data_dir: Path, run: Path, model: str) -> Path:
    from avs.engine.trainer import Trainer

    overrides = tiny_overrides(data_dir, "s4") + SMALL[model] + ["trainer.max_steps=1", "trainer.test_at_end=false"]
    Trainer(compose_cfg("train", overrides), run).fit()
    return run / "checkpoints" / "best.ckpt"


@pytest.fixture(scope="module")
def ecmvae_ckpt(synth_data_dir, tmp_path_factory) -> Path:
    return _checkpoint(synth_data_dir, tmp_path_factory.mktemp("ecmvae"), "ecmvae")


def test_write_uncertainty_on_a_tiny_ecmvae_is_seeded(ecmvae_ckpt, tmp_path):
    first = write_uncertainty(ecmvae_ckpt, split="test", num_samples=3)
    default_out = ecmvae_ckpt.parent.parent / "uncertainty.json"
    assert json.loads(default_out.read_text()) == first
    assert first["method"] == "ecmvae" and first["num_samples"] == 3 and first["split"] == "test"
    assert first["frames"] == 2 * 3 and first["pixels"] == 2 * 3 * 64 * 64  # 2 test clips x 3 frames, 64 px
    assert first["auroc"] is None or 0.0 <= first["auroc"] <= 1.0
    assert first["mean_variance"] > 0  # K sampled codes give different masks
    again = write_uncertainty(ecmvae_ckpt, split="test", num_samples=3, out=tmp_path / "u.json")
    assert again == first
    other = write_uncertainty(ecmvae_ckpt, split="test", num_samples=3, out=tmp_path / "v.json", seed=1)
    assert other["mean_variance"] != first["mean_variance"]


def test_a_deterministic_checkpoint_is_refused_plainly(synth_data_dir, tmp_path):
    ckpt = _checkpoint(synth_data_dir, tmp_path / "run", "avsbg")
    with pytest.raises(ConfigError, match="'avsbg' has no latent part"):
        write_uncertainty(ckpt, out=tmp_path / "u.json")
    assert not (tmp_path / "u.json").exists()


def test_config_defaults_to_k_8_and_the_command_line_overrides_it():
    cfg = compose_cfg("uncertainty", ["checkpoint=x.ckpt"])
    assert cfg.eval.num_samples == 8 and cfg.seed == 0 and cfg.out is None and cfg.split == "test"
    assert list(cfg.eval.protocols)  # the rest of the eval group is kept
    assert compose_cfg("uncertainty", ["checkpoint=x.ckpt", "eval.num_samples=16"]).eval.num_samples == 16
    with pytest.raises(ConfigError, match="num_samples=1"):
        write_uncertainty("x.ckpt", num_samples=1)


def _script(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return run_script("uncertainty.py", args, cwd)


def test_cli_default_k_is_8_and_a_missing_checkpoint_is_a_plain_error(ecmvae_ckpt, tmp_path):
    out = tmp_path / "u.json"
    args = [f"checkpoint={ecmvae_ckpt}", f"out={out}", "data.eval_batch_size=1", f"hydra.run.dir={tmp_path}/h"]
    ok = _script(args, tmp_path)
    assert ok.returncode == 0, ok.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["num_samples"] == 8 and record["split"] == "test" and record["frames"] == 2 * 3
    assert ok.stdout.strip().splitlines()[-1].startswith("ecmvae test: AUROC(variance) ")
    missing = _script([f"checkpoint={tmp_path}/none.ckpt", f"hydra.run.dir={tmp_path}/h2"], tmp_path)
    assert missing.returncode == ExitCode.CHECKPOINT
    lines = [ln for ln in missing.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in missing.stderr and len(lines) <= 2
    assert lines[0] == f"error: checkpoint not found: {tmp_path}/none.ckpt"


def test_uncertainty_hook_refuses_what_has_no_uncertainty_map(tmp_path):
    from types import SimpleNamespace

    from avs.evaluation.uncertainty import UncertaintyHook

    with pytest.raises(ConfigError, match="K >= 2"):
        UncertaintyHook(str(tmp_path / "u.json"), num_samples=1)
    hook = UncertaintyHook(str(tmp_path / "u.json"), num_samples=4)
    hook.name = "uncertainty"
    hook.loop = SimpleNamespace(model=torch.nn.Linear(2, 2), dist=SimpleNamespace(enabled=False))
    with pytest.raises(ConfigError, match="hooks.uncertainty: Linear has no latent part"):
        hook.before_train()
    hook.loop.dist.enabled = True
    with pytest.raises(ConfigError, match="not under DDP"):
        hook.before_train()
