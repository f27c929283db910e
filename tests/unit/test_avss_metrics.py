"""AVSS metrics: the released `avsbench_legacy` reduction bit for bit, and the dataset-level per-class protocol."""

from __future__ import annotations

import math

import pytest
import torch

from avs.metrics_avss import SemanticAccumulator, write_class_table

C = 4  # class 3 never appears: an absent class


def _logits(pred: list[list[int]], c: int = C) -> torch.Tensor:
    """Per-frame predicted classes [T][P] -> one-hot logits [1,T,C,1,P] (10 for the class, 0 elsewhere)."""
    p = torch.tensor(pred)
    return (torch.nn.functional.one_hot(p, c).permute(0, 2, 1).float() * 10.0)[None, :, :, None, :]


# frame A: label [0,1,1,2] pred [0,1,2,2]; frame B: padded; frame C: label 0s, one false-positive class-2 pixel
LABELS = torch.tensor([[0, 1, 1, 2], [0, 0, 0, 0], [0, 0, 0, 0]])[None, :, None, :]  # [1,3,1,4]
PRED = [[0, 1, 2, 2], [3, 3, 1, 1], [0, 0, 0, 2]]  # frame B's prediction must be ignored (padded)
FRAME_VALID = torch.tensor([[True, False, True]])


def _release_port(logits: torch.Tensor, labels: torch.Tensor, batch_frames: list[range]) -> tuple:
    """Independent line-by-line re-computation of the released calc_color_miou_fscore + test.py totals."""
    c = logits.shape[1]
    miou_pc, fs_pc, cls_pc = torch.zeros(c), torch.zeros(c), torch.zeros(c)
    for frames in batch_frames:
        out = torch.softmax(logits[list(frames)], dim=1)
        predict = (torch.argmax(out, 1) + 1).float()
        target = labels[list(frames)].float() + 1
        predict = predict * (target > 0).float()
        intersection = predict * (predict == target).float()
        ious, fscores, cnt = torch.zeros(c).float(), torch.zeros(c).float(), torch.zeros(c).float()
        for i in range(target.shape[0]):
            ai = torch.histc(intersection[i], bins=c, min=1, max=c)
            ap = torch.histc(predict[i], bins=c, min=1, max=c)
            al = torch.histc(target[i], bins=c, min=1, max=c)
            au = ap + al - ai
            ious += 1.0 * ai.float() / (2.220446049250313e-16 + au.float())
            cnt[torch.nonzero(au).squeeze(-1)] += 1
            pr, rc = ai / ap, ai / al
            f = (1 + 0.3) * pr * rc / (0.3 * pr + rc)
            f[torch.isnan(f)] = 0.0
            fscores += f
        miou_pc += ious
        cls_pc += cnt
        fs_pc += fscores
    m = miou_pc / cls_pc
    m[torch.isnan(m)] = 0
    f = fs_pc / cls_pc
    f[torch.isnan(f)] = 0
    return torch.mean(m).item(), torch.mean(f).item(), torch.mean(m[:-1]).item(), torch.mean(f[:-1]).item()


def _fed() -> SemanticAccumulator:
    acc = SemanticAccumulator(C)
    acc.update(_logits(PRED), LABELS, [0], mask_valid=FRAME_VALID, frame_valid=FRAME_VALID)
    return acc


def test_legacy_hand_values():
    res = _fed().compute("avsbench_legacy", legacy_batch_size=1)
    f_a1 = 1.3 * 0.5 / (0.3 + 0.5)
    f_a2 = 1.3 * 0.5 / (0.15 + 1.0)
    f_c0 = 1.3 * 0.75 / (0.3 + 0.75)
    iou = [(1 + 1 + 0.75) / 3, 0.5, (0.5 + 0.0) / 2, 0.0]  # class 2's false-positive frame counts with IoU 0
    fs = [(1 + 1 + f_c0) / 3, f_a1, f_a2 / 2, 0.0]
    assert res["iou_per_class"] == pytest.approx(iou, abs=1e-6)
    assert res["fscore_per_class"] == pytest.approx(fs, abs=1e-6)
    assert res["count_per_class"] == [3, 1, 2, 0]  # padded frame B = one perfect background frame
    assert res["miou"] == pytest.approx(sum(iou) / 4, abs=1e-6)  # absent class 3 enters the mean as 0
    assert res["miou_nobg_legacy"] == pytest.approx(sum(iou[:3]) / 3, abs=1e-6)  # "noBg" drops the LAST class
    assert res["fscore"] == pytest.approx(sum(fs) / 4, abs=1e-6)
    assert res["num_classes_seen"] == 3 and res["num_frames"] == 3


def test_legacy_bit_exact_against_release_port():
    # padded frame B: the released model gives exactly-zero logits there
    logits = _logits(PRED)[0, :, :, 0].clone()  # [3,C,4]
    logits[1] = 0.0
    want = _release_port(logits[:, :, None], LABELS[0], [range(0, 3)])
    res = _fed().compute("avsbench_legacy", legacy_batch_size=1)
    assert (res["miou"], res["fscore"], res["miou_nobg_legacy"], res["fscore_nobg_legacy"]) == want


def test_legacy_random_batches_bit_exact():
    g = torch.Generator().manual_seed(0)
    b, t, c, h, w = 5, 3, 6, 7, 9
    logits = torch.randn(b, t, c, h, w, generator=g) * 3
    labels = torch.randint(0, c - 1, (b, t, h, w), generator=g)  # class c-1 only ever predicted
    acc = SemanticAccumulator(c)
    acc.update(logits[:3], labels[:3], [0, 1, 2])
    acc.update(logits[3:], labels[3:], [3, 4])
    res = acc.compute("avsbench_legacy", legacy_batch_size=2)
    flat_l, flat_y = logits.reshape(b * t, c, h, w), labels.reshape(b * t, h, w)
    want = _release_port(flat_l, flat_y, [range(0, 6), range(6, 12), range(12, 15)])
    assert (res["miou"], res["fscore"], res["miou_nobg_legacy"], res["fscore_nobg_legacy"]) == want
    assert res["num_batches"] == 3


def test_softmax_tie_goes_to_the_lower_class():
    # logits differ (class 1 larger) but their fp32 softmax values are equal -> class 0, as released
    logits = torch.zeros(1, 1, 2, 1, 1)
    logits[0, 0, 1] = 1e-8
    assert logits[0, 0, 1].item() > logits[0, 0, 0].item()
    acc = SemanticAccumulator(2)
    acc.update(logits, torch.zeros(1, 1, 1, 1, dtype=torch.long), [0])
    assert acc.compute("avsbench_legacy")["iou_per_class"] == [pytest.approx(1.0), 0.0]


def test_per_class_protocol_hand_values():
    res = _fed().compute("per_class")
    assert res["num_frames"] == 2  # padded frame B excluded
    assert res["iou_per_class"][:3] == pytest.approx([4 / 5, 1 / 2, 1 / 3])
    assert math.isnan(res["iou_per_class"][3])  # never predicted nor labelled
    assert res["num_classes_present"] == 2
    assert res["miou"] == pytest.approx((1 / 2 + 1 / 3) / 2)
    f2 = 1.3 * (1 / 3) / (0.3 / 3 + 1.0)
    assert res["fscore"] == pytest.approx((1.3 * 0.5 / 0.8 + f2) / 2)
    assert res["iou_background"] == pytest.approx(0.8)


def test_per_class_ignores_unlabelled_frames_and_duplicate_clips():
    acc = SemanticAccumulator(C)
    mv = torch.tensor([[True, False, False]])  # frames B and C carry no mask
    acc.update(_logits(PRED), LABELS, [0], mask_valid=mv)
    acc.update(_logits([[3, 3, 3, 3]] * 3), LABELS, [0], mask_valid=mv)  # same clip again: ignored
    res = acc.compute("per_class")
    assert res["num_frames"] == 1 and res["iou_per_class"][:3] == pytest.approx([1.0, 0.5, 0.5])


def test_class_table_csv_and_markdown(tmp_path):
    res = _fed().compute("per_class")
    names = ["background", "dog", "car", "piano"]
    csv_text = write_class_table(tmp_path / "t.csv", res, names).read_text().splitlines()
    assert csv_text[0] == "index,name,iou,fscore,label_pixels,pred_pixels"
    assert csv_text[2] == "1,dog,0.500000,0.812500,2,1"
    assert csv_text[4].startswith("3,piano,nan,")
    md = write_class_table(tmp_path / "t.md", _fed().compute("avsbench_legacy"), names).read_text()
    assert "| 2 | car | 0.250000 |" in md
    with pytest.raises(ValueError, match="class names"):
        write_class_table(tmp_path / "t.csv", res, names[:2])


def test_ranks_merge_like_one_accumulator():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 2, 5, 3, 3, generator=g)
    labels = torch.randint(0, 5, (4, 2, 3, 3), generator=g)
    mv = torch.tensor([[True, False], [True, True], [True, True], [False, True]])
    one = SemanticAccumulator(5)
    one.update(logits, labels, [0, 1, 2, 3], mask_valid=mv)
    rank0, rank1 = SemanticAccumulator(5), SemanticAccumulator(5)
    rank0.update(logits[[0, 2]], labels[[0, 2]], [0, 2], mask_valid=mv[[0, 2]])
    rank1.update(logits[[1, 3, 0]], labels[[1, 3, 0]], [1, 3, 0], mask_valid=mv[[1, 3, 0]])  # clip 0 padded in
    table0, table1 = rank0.to_tensor(), rank1.to_tensor()
    merged = SemanticAccumulator.from_tensor(table0, 5).merge(SemanticAccumulator.from_tensor(table1, 5))
    for protocol in ("avsbench_legacy", "per_class"):
        assert merged.compute(protocol, legacy_batch_size=2) == one.compute(protocol, legacy_batch_size=2)
    with pytest.raises(ValueError, match="twice"):
        SemanticAccumulator.from_tensor(torch.cat([table0, table0]), 5)
