"""Evaluators through the one evaluate() loop give what the former per-feature loops gave.

Each "reference" below is the loop its feature ran before it became an evaluator (the uncertainty
record, the latent KL, the visualisation grids), written out here independently, on a real tiny model
and real batches; the evaluator path must match it.
"""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from avs.errors import ConfigError
from avs.evaluation import DatasetEvaluator, MetricsEvaluator, build_evaluators, evaluate
from tests.conftest import compose_cfg, tiny_overrides

SMALL_ECMVAE = ["model=ecmvae", "model.channels=32", "model.audio_dim=32", "audio.embed_dim=32"]


def _model_and_loader(data_dir, split: str, num_samples: int, batch_size: int = 2):
    from avs.data import build_dataset
    from avs.models.build import build_model

    cfg = compose_cfg("train", tiny_overrides(data_dir, "s4") + SMALL_ECMVAE + [f"eval.num_samples={num_samples}"])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    loader = DataLoader(build_dataset(cfg.data, split, train=False), batch_size=batch_size, shuffle=False)
    return model, loader


# ---------------------------------------------------------------- uncertainty
def _reference_uncertainty(model, loader, threshold=0.5):
    """The loop of the former uncertainty_record, written out."""
    from avs.evaluation.uncertainty import binary_auroc, binary_entropy

    errors, variances, entropies, frames = [], [], [], 0
    with torch.no_grad():
        for batch in loader:
            out = model(batch)
            prob = torch.sigmoid(out["logits"].float()).flatten(0, 1)
            var = out["variance"].float().flatten(0, 1)
            gt = batch["masks"].flatten(0, 1) > 0.5
            keep = batch["mask_valid"].reshape(-1).bool()
            prob, var, gt = prob[keep], var[keep], gt[keep]
            frames += int(prob.shape[0])
            errors.append(((prob > threshold) != gt).reshape(-1))
            variances.append(var.reshape(-1))
            entropies.append(binary_entropy(prob).reshape(-1).float())
    err, var, ent = torch.cat(errors), torch.cat(variances), torch.cat(entropies)
    return {
        "auroc": binary_auroc(var, err),
        "auroc_entropy": binary_auroc(ent, err),
        "frames": frames,
        "pixels": int(err.numel()),
        "error_rate": float(err.double().mean()),
        "mean_variance": float(var.double().mean()),
    }


def test_uncertainty_through_evaluate_equals_the_former_loop(synth_data_dir):
    from avs.evaluation.uncertainty import uncertainty_record

    # S4 train: only frame 0 of each clip is annotated, so the mask_valid filter matters
    model, loader = _model_and_loader(synth_data_dir, "train", num_samples=3)
    torch.manual_seed(5)
    expected = _reference_uncertainty(model, loader)
    torch.manual_seed(5)
    got = uncertainty_record(model, loader)
    assert got["frames"] == 4 and got["pixels"] == 4 * 64 * 64  # 4 clips, frame 0 each, 64 px
    assert got["mean_variance"] > 0  # K = 3 sampled codes differ
    for key, value in expected.items():
        assert got[key] == value, key
    torch.manual_seed(6)
    assert uncertainty_record(model, loader)["mean_variance"] != got["mean_variance"]  # the samples matter


# ---------------------------------------------------------------- latent KL
def _reference_latent_kl(model, loader):
    """The loop of the former latent_kl_per_dimension, written out (the posterior from the GT masks)."""
    from avs.engine.diagnostics import gaussian_kl_per_dim

    sums, frames = {}, 0
    with torch.no_grad():
        for batch in loader:
            x = batch["frames"].flatten(0, 1)
            audio = model.encode_audio(batch["audio"]) if model.use_audio else None
            masks = model._posterior_masks(batch["masks"].flatten(0, 1), batch["mask_valid"])
            state = model.latent.encode(x, audio, masks)
            for key, q in state.posterior.items():
                p = state.prior[key]
                kl = gaussian_kl_per_dim(q.mu, q.logvar, p.mu, p.logvar).sum(0).double()
                sums[key] = sums.get(key, 0) + kl
            frames += x.shape[0]
    return {k: (v / frames).tolist() for k, v in sums.items()}, frames


def test_latent_kl_through_evaluate_equals_the_former_loop(synth_data_dir):
    from avs.engine.diagnostics import latent_kl_per_dimension

    model, loader = _model_and_loader(synth_data_dir, "train", num_samples=1, batch_size=3)  # batches of 3 and 1
    expected, frames = _reference_latent_kl(model, loader)
    got = latent_kl_per_dimension(model, loader)
    assert got["frames"] == frames == 4 * 3
    assert set(got) - {"frames"} == set(expected) == {"c", "s_a", "s_v"}
    for key, values in expected.items():
        np.testing.assert_allclose(got[key], values, rtol=1e-6, atol=1e-9)
        assert max(values) > 0  # an untrained posterior differs from the prior


# ---------------------------------------------------------------- visualisation
def test_visualize_evaluator_writes_the_grids_and_codes_of_the_former_loop(synth_data_dir, tmp_path):
    from avs.inference.visualize import VisualizeEvaluator, _clip_grid

    model, loader = _model_and_loader(synth_data_dir, "val", num_samples=2, batch_size=1)
    # the former loop: frames and audio only, a grid per clip, the codes of every clip
    torch.manual_seed(3)
    codes, ref_grids = {}, []
    with torch.no_grad():
        for batch in loader:
            out = model({"frames": batch["frames"], "audio": batch["audio"]})
            probs = torch.sigmoid(out["logits"].float())
            for name, value in out["latents"].items():
                codes.setdefault(name, []).append(value.float().numpy())
            for b in range(probs.shape[0]):
                ref_grids.append(_clip_grid(tmp_path / "ref", batch, b, probs[b], out["variance"][b], 0.5, 64))
    torch.manual_seed(3)
    summary = evaluate(model, loader, [VisualizeEvaluator(tmp_path / "new", num_clips=5, tile_height=64)])["visualize"]
    assert [p.name for p in summary["grids"]] == [p.name for p in ref_grids] and len(ref_grids) == 2
    for new, ref in zip(summary["grids"], ref_grids):
        assert new.read_bytes() == ref.read_bytes()  # frame / GT / prediction / variance rows
    assert set(summary["codes"]) == set(codes) == {"c", "s_a", "s_v"}
    for name in codes:
        np.testing.assert_array_equal(np.concatenate(summary["codes"][name]), np.concatenate(codes[name]))


# ---------------------------------------------------------------- the user's evaluators
class FrameCounter(DatasetEvaluator):
    """A user's evaluator: counts the frames and clips it is handed and the output keys it saw."""

    def __init__(self, label: str = "") -> None:
        self.label = label

    def reset(self) -> None:
        self.frames, self.clips, self.keys = 0, set(), set()

    def process(self, batch, output):
        assert output["logits"].shape[:2] == batch["frames"].shape[:2]
        self.frames += int(batch["mask_valid"].sum())
        self.clips |= {int(i) for i in batch["index"]}
        self.keys |= set(output)

    def summarize(self):
        return {"label": self.label, "frames": self.frames, "clips": len(self.clips), "keys": sorted(self.keys)}


def test_evaluate_hands_every_evaluator_each_batch_and_the_whole_output(synth_data_dir):
    model, loader = _model_and_loader(synth_data_dir, "val", num_samples=2)
    results = evaluate(model, loader, [MetricsEvaluator(["per_frame"], 2), FrameCounter()])
    assert results["metrics"]["per_frame"]["num_frames"] == 2 * 3
    keys = ["latents", "logits", "samples", "variance"]  # the whole eval output of a K-sample latent model
    assert results["evaluator"] == {"label": "", "frames": 6, "clips": 2, "keys": keys}
    with pytest.raises(ConfigError, match="distinct names"):
        evaluate(model, loader, [FrameCounter(), FrameCounter()])


def test_user_evaluators_come_from_config_in_training_and_in_scripts_eval(synth_data_dir, tmp_path):
    from avs.engine.trainer import Trainer
    from avs.evaluation.checkpoint import evaluate_checkpoint

    node = "{_target_: tests.unit.test_evaluators.FrameCounter, label: mine}"
    overrides = tiny_overrides(synth_data_dir) + ["model.channels=32", f"+eval.evaluators.count={node}"]
    trainer = Trainer(compose_cfg("train", overrides), tmp_path / "run")
    trainer.fit()  # max_steps=2: one validation, then test at the end
    for split in ("val", "test"):
        summary = trainer.loop.evaluations[split]["count"]
        assert summary == {"label": "mine", "frames": 6, "clips": 2, "keys": ["logits"]}
    ckpt = tmp_path / "run" / "checkpoints" / "best.ckpt"
    cfg = compose_cfg("eval", [f"checkpoint={ckpt}", "split=val", "device=cpu", f"+eval.evaluators.count={node}"])
    evaluate_checkpoint(cfg, tmp_path / "eval")
    record = json.loads((tmp_path / "eval" / "metrics_val.json").read_text())
    assert record["evaluators"]["count"]["frames"] == 6 and record["metrics"]["per_frame"]["num_frames"] == 6


def test_a_config_evaluator_that_is_not_one_is_refused_by_name():
    with pytest.raises(ConfigError, match=r"eval\.evaluators\.bad: OrderedDict is not an avs\.evaluation"):
        build_evaluators({"bad": {"_target_": "collections.OrderedDict"}})
    with pytest.raises(ConfigError, match=r"eval\.evaluators\.gone: could not be built"):
        build_evaluators({"gone": {"_target_": "no_such_module.Evaluator"}})
    assert build_evaluators({"off": None}) == []


# ---------------------------------------------------------------- DDP: the latent KL covers the whole split
class _Gauss:
    def __init__(self, mu, logvar):
        self.mu, self.logvar = mu, logvar


class _StandInLatent(torch.nn.Module):
    """Posterior N(mean of the frame, 1), prior N(0, 1) for one 2-dim code: KL = mean^2 / 2 per dimension."""

    def encode(self, x, audio, masks):
        mu = x.mean((1, 2, 3))[:, None].repeat(1, 2)  # [N,2]
        zero = torch.zeros_like(mu)
        return types.SimpleNamespace(posterior={"c": _Gauss(mu, zero)}, prior={"c": _Gauss(zero, zero)})


class _StandInNet(torch.nn.Module):
    use_audio = False

    def __init__(self):
        super().__init__()
        self.latent = _StandInLatent()

    def _posterior_masks(self, masks, valid):
        return masks

    def forward(self, batch):
        return {"logits": torch.zeros_like(batch["masks"])}


def _clips(indices):
    g = [torch.Generator().manual_seed(int(i)) for i in indices]
    frames = torch.stack([torch.randn(3, 3, 4, 4, generator=x) for x in g])  # [B,T=3,3,4,4]
    n = len(indices)
    return {
        "frames": frames,
        "masks": torch.zeros(n, 3, 1, 4, 4),
        "mask_valid": torch.ones(n, 3, dtype=torch.bool),
        "index": torch.tensor(indices),
    }


def _shard_latent_kl(rank, world, store, out):
    import torch.distributed as dist

    from avs.engine.sampler import ResumableSampler
    from avs.evaluation import LatentKLEvaluator

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        shard = list(ResumableSampler(5, shuffle=False, num_replicas=world, rank=rank))  # 3 per rank: one repeat
        batches = [_clips(shard[i : i + 2]) for i in range(0, len(shard), 2)]
        result = evaluate(_StandInNet(), batches, [LatentKLEvaluator()])["latent_kl"]
        torch.save(result, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_latent_kl_under_ddp_gathers_every_rank_and_drops_padded_repeats(tmp_path):
    import torch.multiprocessing as mp

    from avs.evaluation import LatentKLEvaluator

    single = evaluate(_StandInNet(), [_clips([0, 1]), _clips([2, 3]), _clips([4])], [LatentKLEvaluator()])
    mp.spawn(_shard_latent_kl, args=(2, str(tmp_path / "store"), str(tmp_path / "kl")), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(tmp_path / f"kl.{rank}", weights_only=True)
        assert got["frames"] == 5 * 3  # 5 clips, not the 6 the padded shards hold
        np.testing.assert_allclose(got["c"], single["latent_kl"]["c"], rtol=1e-6)
    means = torch.cat([_clips([i])["frames"].mean((2, 3, 4)).flatten() for i in range(5)]).double()
    np.testing.assert_allclose(single["latent_kl"]["c"], [float((means**2 / 2).mean())] * 2, rtol=1e-5)
