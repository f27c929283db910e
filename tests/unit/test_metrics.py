"""Tests for avs.metrics: per-frame counts, the three protocols, merging and reference parity."""

from __future__ import annotations

import math

import pytest
import torch

import avs.metrics as metrics
from avs.metrics import PROTOCOLS, MetricAccumulator, frame_stats, fscore_thresholds

HI, MID, LO = 10.0, 1.0, -10.0  # sigmoid: 0.99995 (>= th[1..253]), 0.7311 (>= th[1..185]), 4.5e-5 (th[0])


def _fb(prec: float, rec: float) -> float:
    return 0.0 if prec == 0 and rec == 0 else 1.3 * prec * rec / (0.3 * prec + rec)


# ----------------------------------------------------------------------------- golden data
def _golden() -> tuple[torch.Tensor, torch.Tensor]:
    """3 clips x T=2 frames of 4x4: logits, masks [3,2,1,4,4] (see comments for every frame)."""
    lg = torch.full((3, 2, 4, 4), LO)
    gt = torch.zeros(3, 2, 4, 4)
    # f0 (clip 0, t 0): GT = top-left 2x2 (4 px); HI on 2 GT px, MID on 2 GT px + 2 background px
    gt[0, 0, :2, :2] = 1
    lg[0, 0, 0, :2] = HI
    lg[0, 0, 1, :2] = MID
    lg[0, 0, 3, :2] = MID
    # f1: empty GT, one MID pixel
    lg[0, 1, 2, 2] = MID
    # f2 (clip 1): GT = top half (8 px); HI on those 8 and on 2 background px
    gt[1, 0, :2] = 1
    lg[1, 0, :2] = HI
    lg[1, 0, 2, :2] = HI
    # f3: GT = 2 px, both MID
    gt[1, 1, 3, 2:] = 1
    lg[1, 1, 3, 2:] = MID
    # f4 (clip 2): empty GT, nothing predicted; f5: empty GT, HI on 4 px
    lg[2, 1, 0] = HI
    return lg.unsqueeze(2), gt.unsqueeze(2)


# Per-frame values by hand. p > 0.5 for HI and MID. F-curves are piecewise constant:
# k = 0 -> every pixel predicted; k = 1..185 -> HI and MID; k = 186..253 -> HI only; k = 254 -> none.
IOU = [4 / 6, 15 / 16, 8 / 10, 2 / 2, 16 / 16, 12 / 16]  # f1, f4, f5: empty GT -> TN / 16
F_ALL = {0: _fb(4 / 16, 1), 2: _fb(8 / 16, 1), 3: _fb(2 / 16, 1)}  # 0.3023, 0.5652, 0.1566
F_HM = {0: _fb(4 / 6, 1), 2: _fb(8 / 10, 1), 3: _fb(1, 1)}  # 0.7222, 0.8387, 1.0
F_H = {0: _fb(1, 2 / 4), 2: _fb(8 / 10, 1), 3: 0.0}  # 0.8125, 0.8387, 0 (nothing predicted)


def _batch_f(frames: list[int]) -> float:
    """Max over the 4 segments of the mean F-curve of the batch's non-empty-GT frames."""
    ne = [f for f in frames if f in F_ALL]
    if not ne:
        return 0.0  # all-empty batch
    return max(sum(d[f] for f in ne) / len(ne) for d in (F_ALL, F_HM, F_H))


def _golden_acc(**kw) -> MetricAccumulator:
    lg, gt = _golden()
    acc = MetricAccumulator(**kw)
    acc.update(lg, gt, indices=[0, 1, 2])
    return acc


def test_golden_frame_stats():
    lg, gt = _golden()
    s = frame_stats(lg.flatten(0, 1), gt.flatten(0, 1))
    assert s.gt_area.tolist() == [4, 0, 8, 2, 0, 0]
    assert s.pred_area.tolist() == [6, 1, 10, 2, 0, 4]
    assert s.fg_inter.tolist() == [4, 0, 8, 2, 0, 0]
    assert s.fg_union.tolist() == [6, 1, 10, 2, 0, 4]
    assert s.inter.tolist() == [4, 15, 8, 2, 16, 12]  # empty GT: true negatives
    assert s.union.tolist() == [6, 16, 10, 2, 16, 16]  # empty GT: H*W
    assert s.pred_pos[:, 0].tolist() == [16] * 6  # th[0] = 0: every pixel
    assert s.pred_pos[:, 1].tolist() == [6, 1, 10, 2, 0, 4]  # HI + MID
    assert s.pred_pos[:, 186].tolist() == [2, 0, 10, 0, 0, 4]  # HI only
    assert s.pred_pos[:, 254].tolist() == [0] * 6  # th[254] = 1.0
    assert s.tp[:, 185].tolist() == [4, 0, 8, 2, 0, 0]
    assert s.tp[:, 186].tolist() == [2, 0, 8, 0, 0, 0]


@pytest.mark.parametrize(
    "bs, batches",
    [
        (1, [[0, 1], [2, 3], [4, 5]]),  # one clip (2 frames) per batch; the last is all-empty -> F 0
        (2, [[0, 1, 2, 3], [4, 5]]),  # smaller last batch, all-empty
        (3, [[0, 1, 2, 3, 4, 5]]),
    ],
)
def test_golden_legacy(bs, batches):
    r = _golden_acc().compute("avsbench_legacy", legacy_batch_size=bs)
    miou = sum(sum(IOU[f] for f in b) / len(b) for b in batches) / len(batches)
    fscore = sum(_batch_f(b) for b in batches) / len(batches)
    assert r["miou"] == pytest.approx(miou, abs=1e-6)
    assert r["fscore"] == pytest.approx(fscore, abs=1e-6)
    assert (r["num_batches"], r["eval_batch_size"], r["num_frames"], r["num_clips"]) == (len(batches), bs, 6, 3)
    assert r["num_empty_fscore_batches"] == sum(_batch_f(b) == 0 for b in batches)


def test_golden_legacy_numbers_written_out():
    # bs 1: mIoU = ((4/6 + 15/16)/2 + (0.8 + 1)/2 + (1 + 0.75)/2) / 3 = 0.859028
    #       F    = (max(.3023,.7222,.8125) + max(.3609,.9194,.4194) + 0) / 3 = (0.8125 + 0.919355) / 3
    r1 = _golden_acc().compute("avsbench_legacy", legacy_batch_size=1)
    assert r1["miou"] == pytest.approx(0.8590278, abs=1e-6)
    assert r1["fscore"] == pytest.approx((0.8125 + 0.9193548) / 3, abs=1e-6)
    # bs 2: batches {f0..f3}, {f4,f5}: mIoU = (3.4041667/4 + 0.875)/2; F = (0.853644 + 0)/2
    r2 = _golden_acc().compute("avsbench_legacy", legacy_batch_size=2)
    assert r2["miou"] == pytest.approx(0.8630208, abs=1e-6)
    assert r2["fscore"] == pytest.approx(0.4268219, abs=1e-6)


def test_golden_per_frame():
    r = _golden_acc().compute("per_frame")
    assert r["miou"] == pytest.approx(sum(IOU) / 6, abs=1e-12)  # 0.859028
    best = (F_HM[0] + F_HM[2] + F_HM[3]) / 3  # 0.853644: HI+MID segment, first reached at k = 1
    assert r["fscore_max"] == pytest.approx(best, abs=1e-12)
    assert r["fscore"] == r["fscore_max"]
    assert r["fscore_max_threshold"] == pytest.approx(1 / 254, rel=1e-6)
    assert r["fscore_at_0.5"] == pytest.approx(best, abs=1e-12)  # p > 0.5 is the same mask here
    assert (r["num_frames"], r["num_fscore_frames"], r["protocol"]) == (6, 3, "per_frame")


def test_golden_dataset_level():
    r = _golden_acc().compute("dataset_level")
    # sum I = 4+0+8+2+0+0 = 14; sum U = 6+1+10+2+0+4 = 23 (empty GT frames add their false positives)
    assert r["miou"] == pytest.approx(14 / 23, abs=1e-12)
    # background: TN = 96 - 23 = 73, union = 96 - 14 = 82
    assert r["iou_bg"] == pytest.approx(73 / 82, abs=1e-12)
    assert r["miou_fg_bg"] == pytest.approx((14 / 23 + 73 / 82) / 2, abs=1e-12)
    # tp 14, predicted 23, gt 14: P = 14/23, R = 1, F = 1.3 P / (0.3 P + 1) = 18.2 / 27.2
    assert r["precision"] == pytest.approx(14 / 23)
    assert r["recall"] == pytest.approx(1.0)
    assert r["fscore"] == pytest.approx(18.2 / 27.2, abs=1e-12)


def test_compute_several_protocols_and_unknown():
    acc = _golden_acc()
    out = acc.compute(list(PROTOCOLS), legacy_batch_size=2)
    assert set(out) == set(PROTOCOLS)
    assert out["per_frame"] == acc.compute("per_frame")
    assert out["avsbench_legacy"] == acc.compute("avsbench_legacy", legacy_batch_size=2)
    with pytest.raises(ValueError, match="avsbench_legacy, per_frame, dataset_level"):
        acc.compute("miou")
    with pytest.raises(ValueError, match="legacy_batch_size"):
        acc.compute("avsbench_legacy", legacy_batch_size=0)
    with pytest.raises(ValueError, match="no frames"):
        MetricAccumulator().compute()


# ----------------------------------------------------------------------------- reference port
def _ref_mask_iou(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """AVSBench utility.mask_iou, ported line by line (float32)."""
    n = pred.size(0)
    num_pixels = pred.size(-1) * pred.size(-2)
    no_obj_flag = target.sum(2).sum(1) == 0
    p = (torch.sigmoid(pred) > 0.5).int()
    inter = (p * target).sum(2).sum(1)
    union = torch.max(p, target).sum(2).sum(1)
    inter_no_obj = ((1 - target) * (1 - p)).sum(2).sum(1)
    inter[no_obj_flag] = inter_no_obj[no_obj_flag]
    union[no_obj_flag] = num_pixels
    return torch.sum(inter / (union + eps)) / n


def _ref_eval_pr(y_pred, y, num):
    prec, recall = torch.zeros(num), torch.zeros(num)
    thlist = torch.linspace(0, 1 - 1e-10, num)
    for i in range(num):  # the reference's loop over thresholds
        y_temp = (y_pred >= thlist[i]).float()
        tp = (y_temp * y).sum()
        prec[i], recall[i] = tp / (y_temp.sum() + 1e-20), tp / (y.sum() + 1e-20)
    return prec, recall


def _ref_eval_fmeasure(pred, gt, pr_num=255):
    pred = torch.sigmoid(pred)
    beta2 = 0.3
    avg_f, img_num = 0.0, 0
    score = torch.zeros(pr_num)
    for img_id in range(pred.size(0)):
        if torch.mean(gt[img_id]) == 0.0:
            continue
        prec, recall = _ref_eval_pr(pred[img_id], gt[img_id], pr_num)
        f_score = (1 + beta2) * prec * recall / (beta2 * prec + recall)
        f_score[f_score != f_score] = 0
        avg_f += f_score
        img_num += 1
        score = avg_f / img_num
    return score.max().item()


def _ref_test_loop(logits, masks, bs, pr_num=255):
    """test.py: batches of `bs` clips in order, AverageMeter over batches."""
    miou_sum, miou_n, f_sum, f_n = 0.0, 0, 0.0, 0
    for i in range(0, logits.shape[0], bs):
        out = logits[i : i + bs].flatten(0, 1).squeeze(1)  # [bs*T,H,W]
        m = masks[i : i + bs].flatten(0, 1).squeeze(1)
        miou_sum += _ref_mask_iou(out, m)  # tensor accumulation, as AverageMeter does
        miou_n += 1
        f_sum += _ref_eval_fmeasure(out, m, pr_num)
        f_n += 1
    return (miou_sum / miou_n).item(), f_sum / f_n


def _random_clips(seed, clips=7, t=3, size=12):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(clips, t, 1, size, size, generator=g) * 2
    logits[logits.abs() < 0.05] = 0.0  # some p == 0.5 exactly
    logits[0, 0, 0, 0, :4] = 40.0  # p == 1.0 (== the last threshold)
    blobs = torch.randn(clips, t, 1, size, size, generator=g) + logits * 0.4
    masks = (blobs > 0.6).float()
    masks[1, 1] = 0  # an empty-GT frame
    masks[3] = 0  # an all-empty clip
    masks[5, :, :, :1, :1] = 1
    masks[5, :, :, 1:] = 0  # one-pixel GT (union can be 1)
    return logits, masks


@pytest.mark.parametrize("seed", [0, 1])
def test_legacy_matches_reference_port(seed):
    logits, masks = _random_clips(seed)
    acc = MetricAccumulator()
    for i in range(0, 7, 2):  # feeding batches differ from the legacy batches
        acc.update(logits[i : i + 2], masks[i : i + 2], indices=range(i, min(i + 2, 7)))
    for bs in (1, 2, 3, 7):
        ref_miou, ref_f = _ref_test_loop(logits, masks, bs)
        r = acc.compute("avsbench_legacy", legacy_batch_size=bs)
        assert r["miou"] == pytest.approx(ref_miou, abs=1e-6)  # torch.sum order: last float32 bit
        assert r["fscore"] == ref_f  # bit for bit


def test_legacy_f_depends_on_batch_size_per_frame_does_not():
    logits, masks = _random_clips(3)
    legacy = {}
    per_frame = []
    for feed in (1, 3, 7):  # how the frames are fed must not matter either
        acc = MetricAccumulator()
        for i in range(0, 7, feed):
            acc.update(logits[i : i + feed], masks[i : i + feed], indices=range(i, min(i + feed, 7)))
        per_frame.append(acc.compute(["per_frame", "dataset_level"]))
        for bs in (1, 4):
            legacy[(feed, bs)] = acc.compute("avsbench_legacy", legacy_batch_size=bs)["fscore"]
    assert per_frame[0] == per_frame[1] == per_frame[2]
    assert legacy[(1, 1)] == legacy[(3, 1)] == legacy[(7, 1)]
    assert abs(legacy[(1, 1)] - legacy[(1, 4)]) > 1e-3
    # a single legacy batch holding every clip is the per-frame set-level max-F
    one_batch = acc.compute("avsbench_legacy", legacy_batch_size=7)["fscore"]
    assert one_batch == pytest.approx(per_frame[0]["per_frame"]["fscore_max"], abs=1e-6)


# ----------------------------------------------------------------------------- threshold counts
def _naive_counts(logits, masks, k=255):
    p = torch.sigmoid(logits.float()).flatten(1)  # [N,HW]
    y = masks.flatten(1)
    th = torch.linspace(0, 1 - 1e-10, k)
    ge = (p[:, :, None] >= th).float()  # [N,HW,K]
    return (ge * y[:, :, None]).sum(1).long(), ge.sum(1).long()


def _tie_logits() -> torch.Tensor:
    """Float32 logits whose sigmoid is exactly some threshold value (searched around logit(th))."""
    th = fscore_thresholds(255)
    found = []
    for k in range(1, 254, 3):
        x = torch.tensor(math.log(th[k].item() / (1 - th[k].item())), dtype=torch.float32)
        cands = [x]
        up, down = x, x
        for _ in range(40):
            up = torch.nextafter(up, torch.tensor(math.inf))
            down = torch.nextafter(down, torch.tensor(-math.inf))
            cands += [up, down]
        for c in cands:
            if torch.sigmoid(c) == th[k]:
                found.append(c.item())
                break
    return torch.tensor(found)


def test_threshold_counts_equal_naive_with_ties():
    ties = _tie_logits()
    assert len(ties) > 40  # most thresholds are hit exactly by some logit
    g = torch.Generator().manual_seed(0)
    n, side = 6, 16
    logits = torch.randn(n, side * side, generator=g) * 3
    logits[:, : len(ties)] = ties  # exact ties with thresholds
    logits[0, :50] = 0.0  # p == 0.5 == th[127]
    logits[1, :50] = 60.0  # p == 1.0 == th[254]
    logits[2, :50] = -200.0  # p == 0 == th[0]
    logits[3, 7] = float("nan")  # counted nowhere, like the reference's comparisons
    masks = (torch.rand(n, side * side, generator=g) > 0.5).float()
    masks[4] = 0
    logits, masks = logits.view(n, 1, side, side), masks.view(n, 1, side, side)
    s = frame_stats(logits, masks)
    tp, pp = _naive_counts(logits.view(n, -1), masks.view(n, -1))
    assert torch.equal(s.tp, tp)
    assert torch.equal(s.pred_pos, pp)
    p = torch.sigmoid(logits).view(n, -1)
    assert torch.equal(s.pred_area, (p > 0.5).sum(1))
    assert torch.equal(s.fg_inter, ((p > 0.5) & (masks.view(n, -1) > 0)).sum(1))
    assert s.pred_pos[0, 127] - s.pred_area[0] >= 50  # p == 0.5 is >= th[127] but not > 0.5


@pytest.mark.parametrize("k", [2, 3, 17, 255, 1000])
def test_bucket_exact_around_every_threshold(k):
    th = fscore_thresholds(k)
    near = (th.view(torch.int32)[:, None] + torch.arange(-8, 9, dtype=torch.int32)).view(-1).view(torch.float32)
    p = torch.cat([near[(near >= 0) & (near <= 1)], torch.rand(5000), torch.tensor([0.0, 1.0, 0.5])])
    table = metrics._threshold_table(k, torch.device("cpu"))
    expected = (p[:, None] >= th).sum(1)
    assert torch.equal(metrics._bucket(p.clone(), table).long(), expected)
    assert metrics._bucket(torch.tensor([-math.inf]), table).item() == 0


def test_frame_stats_shapes_dtypes_and_errors():
    lg = torch.randn(5, 1, 8, 8, dtype=torch.float64)
    m = (torch.rand(5, 8, 8) > 0.5).bool()
    s = frame_stats(lg, m, num_thresholds=17)  # float64 logits, bool masks, mixed layouts
    assert len(s) == 5 and s.tp.shape == (5, 17) and s.tp.dtype == torch.int64
    assert s.num_pixels.tolist() == [64] * 5
    assert torch.equal(s.fg_union, s.pred_area + s.gt_area - s.fg_inter)
    with pytest.raises(ValueError, match="binary"):
        frame_stats(lg, torch.full((5, 1, 8, 8), 0.5))
    with pytest.raises(ValueError, match="same frames"):
        frame_stats(lg, torch.zeros(5, 1, 8, 9))
    with pytest.raises(ValueError, match="one channel"):
        frame_stats(torch.zeros(5, 2, 8, 8), torch.zeros(5, 2, 8, 8))
    with pytest.raises(ValueError, match="num_thresholds"):
        frame_stats(lg, m, num_thresholds=1)


# ----------------------------------------------------------------------------- accumulator
def test_flat_input_and_valid_frames():
    lg, gt = _golden()
    a = _golden_acc()
    b = MetricAccumulator()
    b.update(lg.flatten(0, 1), gt.flatten(0, 1), batch_size_clips=3, indices=torch.tensor([0, 1, 2]))
    assert a.compute(list(PROTOCOLS)) == b.compute(list(PROTOCOLS))
    c = MetricAccumulator()
    valid = torch.tensor([[True, False], [True, True], [True, True]])  # drop f1
    c.update(lg, gt, indices=[0, 1, 2], valid=valid)
    r = c.compute("per_frame")
    assert r["num_frames"] == 5
    assert r["miou"] == pytest.approx((sum(IOU) - IOU[1]) / 5)
    with pytest.raises(ValueError, match="batch_size_clips"):
        MetricAccumulator().update(lg.flatten(0, 1), gt.flatten(0, 1), batch_size_clips=4)
    with pytest.raises(ValueError, match="indices"):
        MetricAccumulator().update(lg, gt, indices=[0, 1])


def _split_accumulators(logits, masks):
    """Rank 0 gets clips 0,2,4,6 and rank 1 gets 1,3,5 plus clip 0 again (sampler padding)."""
    r0, r1 = MetricAccumulator(), MetricAccumulator()
    for ids in ([0, 2], [4, 6]):
        r0.update(logits[ids], masks[ids], indices=ids)
    for ids in ([1, 3], [5, 0]):
        r1.update(logits[ids], masks[ids], indices=ids)
    return r0, r1


def test_merge_equals_single_accumulator_and_drops_duplicates():
    logits, masks = _random_clips(5)
    single = MetricAccumulator()
    single.update(logits, masks, indices=range(7))
    r0, r1 = _split_accumulators(logits, masks)
    r1.update(logits[[3]] + 5.0, masks[[3]], indices=[3])  # a later duplicate is ignored too
    merged = r0.merge(r1)
    assert len(merged) == 7 * 3 + 2 * 3  # stored, before dropping duplicates
    for bs in (1, 2, 4):
        want = single.compute(list(PROTOCOLS), legacy_batch_size=bs)
        assert merged.compute(list(PROTOCOLS), legacy_batch_size=bs) == want
    # all_gather-friendly round trips
    table = merged.to_tensor()
    assert table.shape == (21, 9 + 2 * 255) and table.dtype == torch.int64
    assert torch.equal(table, single.to_tensor())
    again = MetricAccumulator.from_tensor(torch.cat([r1.to_tensor(), r0.to_tensor()]))
    assert again.compute("dataset_level") == single.compute("dataset_level")
    restored = MetricAccumulator()
    restored.load_state_dict(merged.state_dict())
    assert restored.compute(list(PROTOCOLS)) == single.compute(list(PROTOCOLS))


def test_merge_refuses_auto_indexed_and_self_merge_is_a_no_op():
    logits, masks = _random_clips(6)
    a, b = MetricAccumulator(), MetricAccumulator()
    a.update(logits[:2], masks[:2])
    b.update(logits[2:4], masks[2:4])
    with pytest.raises(ValueError, match="indices"):
        a.merge(b)
    with pytest.raises(ValueError, match="indices"):
        a.update(logits[4:], masks[4:], indices=[4, 5, 6])  # mixing numbering schemes
    c = MetricAccumulator()
    c.update(logits, masks, indices=range(7))
    before = c.compute(list(PROTOCOLS))
    assert c.merge(c).compute(list(PROTOCOLS)) == before  # every clip is a duplicate of itself


def test_empty_gt_everywhere_and_empty_batch():
    acc = MetricAccumulator()
    lg = torch.full((2, 3, 1, 4, 4), -5.0)
    lg[1, 0, 0, 0, 0] = 5.0  # one false positive
    acc.update(lg, torch.zeros_like(lg), indices=[0, 1])
    acc.update(torch.zeros(0, 1, 4, 4), torch.zeros(0, 1, 4, 4), indices=[])  # no frames: ignored
    r = acc.compute(list(PROTOCOLS), legacy_batch_size=1)
    assert r["avsbench_legacy"]["fscore"] == 0.0  # every batch all-empty -> 0, still averaged
    assert r["avsbench_legacy"]["num_empty_fscore_batches"] == 2
    assert r["avsbench_legacy"]["miou"] == pytest.approx((1.0 + (15 / 16 + 2) / 3) / 2, abs=1e-6)
    assert r["per_frame"]["fscore_max"] == 0.0 and r["per_frame"]["fscore_max_threshold"] is None
    assert r["dataset_level"]["miou"] == 0.0  # sum I = 0, sum U = 1
    assert r["dataset_level"]["iou_bg"] == pytest.approx(95 / 96)


def test_all_gather_with_simulated_two_ranks(monkeypatch):
    logits, masks = _random_clips(7)
    single = MetricAccumulator()
    single.update(logits, masks, indices=range(7))
    ranks = _split_accumulators(logits, masks)
    calls = {"n": 0}
    dist = torch.distributed

    def fake_all_gather(outputs, tensor):
        # call 1: row counts; call 2: padded tables (this process plays rank 0)
        i = calls["n"]
        calls["n"] += 1
        for r, out in enumerate(outputs):
            t = ranks[r].to_tensor()
            if i == 0:
                out.copy_(torch.tensor([t.shape[0]]))
            else:
                out.zero_()
                out[: t.shape[0]] = t
        if i == 1:
            assert tensor.shape[0] == max(len(r.to_tensor()) for r in ranks)  # padded to the max

    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *a, **k: 2)
    monkeypatch.setattr(dist, "get_backend", lambda *a, **k: "gloo")
    monkeypatch.setattr(dist, "all_gather", fake_all_gather)
    gathered = ranks[0].all_gather()
    assert gathered.compute(list(PROTOCOLS), legacy_batch_size=3) == single.compute(
        list(PROTOCOLS), legacy_batch_size=3
    )


def test_binary_frame_iou_is_the_per_frame_rule():
    g = torch.Generator().manual_seed(0)
    pred = torch.rand(6, 9, 11, generator=g) > 0.5
    gt = torch.rand(6, 9, 11, generator=g) > 0.6
    gt[2] = False  # empty GT: the fraction of pixels predicted background
    got = metrics.binary_frame_iou(pred, gt)
    assert got.dtype == torch.float64
    for i in range(6):
        if gt[i].any():
            want = float((pred[i] & gt[i]).sum()) / float((pred[i] | gt[i]).sum())
        else:
            want = float((~pred[i]).double().mean())
        assert float(got[i]) == want


def test_per_frame_standard_error_is_the_clip_level_one():
    """Equal frames per clip: the SE is sd(clip mean IoU) / sqrt(clips); a lone clip has none."""
    from avs.metric_protocols import clip_standard_error

    torch.manual_seed(0)
    masks = (torch.rand(4, 3, 1, 8, 8) > 0.5).float()
    logits = torch.randn(4, 3, 1, 8, 8) * 3
    acc = MetricAccumulator()
    acc.update(logits, masks, indices=[0, 1, 2, 3])
    r = acc.compute("per_frame")
    iou = torch.stack([metrics.binary_frame_iou((logits[c] > 0).float(), masks[c]) for c in range(4)])  # [4,3]
    clip_means = iou.double().mean(1)
    expected = float(clip_means.std(unbiased=True) / 2.0)
    assert r["miou"] == pytest.approx(float(iou.double().mean()), abs=1e-6)
    assert r["miou_se"] == pytest.approx(expected, rel=1e-6)
    one = MetricAccumulator()
    one.update(logits[:1], masks[:1], indices=[0])
    assert one.compute("per_frame")["miou_se"] is None
    clip, _, stats = one._consolidated()
    assert clip_standard_error(clip, stats) is None
