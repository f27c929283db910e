"""Tests for avs.models.motion.CorrelationPyramidMotion (released and pyramid forms)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from avs.models.motion import AUTO_CHUNK_ELEMENTS, CorrelationPyramidMotion, _chunk_plan, _mean_relu_correlation


def _numpy_released(feat: np.ndarray, num_frames: int, weight: float, bias: float) -> tuple[np.ndarray, np.ndarray]:
    """Spec section 6 with explicit loops: returns (m [BT,1,h,w], out [BT,C,h,w])."""
    bt, c, h, w = feat.shape
    f = feat.reshape(bt // num_frames, num_frames, c, h, w)
    m = np.zeros((bt // num_frames, num_frames, 1, h, w))
    for b in range(f.shape[0]):
        for t in range(num_frames):
            pair = t + 1 if t < num_frames - 1 else t - 1
            for y in range(h):
                for x in range(w):
                    total = 0.0
                    for v in range(h):
                        for u in range(w):
                            dot = sum(f[b, t, k, y, x] * f[b, pair, k, v, u] for k in range(c))
                            total += max(dot, 0.0)
                    m[b, t, 0, y, x] = total / (h * w)
    m = m.reshape(bt, 1, h, w)
    att = 1.0 / (1.0 + np.exp(-(weight * m + bias)))
    return m, feat + feat * att


def _torch_reference(feat: torch.Tensor, num_frames: int, levels: int) -> torch.Tensor:
    """Unchunked all-pairs volume, pooled over the partner's positions: [BT,C,h,w] -> [BT,L,h,w]."""
    bt, c, h, w = feat.shape
    f = feat.reshape(bt // num_frames, num_frames, c, h * w)
    pair = [t + 1 for t in range(num_frames - 1)] + [num_frames - 2]
    vol = torch.einsum("btcp,btcq->btpq", f, f[:, pair]).reshape(bt * h * w, 1, h, w)  # q as a grid
    stats = []
    for k in range(levels):
        size = (-(-h // 2**k), -(-w // 2**k))
        pooled = F.adaptive_avg_pool2d(vol, size)  # pool the volume itself over q
        stats.append(pooled.clamp(min=0).mean(dim=(1, 2, 3)).reshape(bt, 1, h, w))
    return torch.cat(stats, dim=1)


def _set_gate(module: CorrelationPyramidMotion, stage: int, weight: float, bias: float) -> None:
    with torch.no_grad():
        module.gates[str(stage)].weight.fill_(weight)
        module.gates[str(stage)].bias.fill_(bias)


def test_released_matches_numpy_loops_two_frames() -> None:
    # hand-made 2-frame clip, C=2, 2x3 grid; some dot products are negative (ReLU matters)
    frame0 = np.array([[[1.0, -1.0, 0.5], [0.0, 2.0, -0.5]], [[0.5, 1.0, -1.0], [1.5, -2.0, 0.0]]])
    frame1 = np.array([[[-1.0, 0.5, 1.0], [2.0, 0.0, -1.5]], [[1.0, -0.5, 0.0], [0.5, 1.0, 1.0]]])
    feat_np = np.stack([frame0, frame1])  # [2,2,2,3] = [B*T,C,h,w], B=1, T=2
    motion = CorrelationPyramidMotion(num_stages=1, impl="released").double()
    _set_gate(motion, 0, 0.7, -0.2)
    feat = torch.tensor(feat_np, dtype=torch.float64)
    m_ref, out_ref = _numpy_released(feat_np, 2, 0.7, -0.2)
    m = motion.correlation_statistic(feat, 2)
    out = motion([feat], num_frames=2)[0]
    np.testing.assert_allclose(m.numpy(), m_ref, rtol=0, atol=1e-12)
    np.testing.assert_allclose(out.detach().numpy(), out_ref, rtol=0, atol=1e-12)
    # frame 1 pairs backward with frame 0: m_1(p) uses frame 0 as partner
    assert m_ref[1, 0, 0, 0] == pytest.approx(
        np.mean([max(float(frame1[:, 0, 0] @ frame0[:, v, u]), 0) for v in range(2) for u in range(3)])
    )


def test_released_matches_numpy_loops_three_frames_batch_two() -> None:
    rng = np.random.default_rng(0)
    feat_np = rng.standard_normal((6, 3, 3, 2))  # B=2, T=3
    motion = CorrelationPyramidMotion(num_stages=1).double()
    _set_gate(motion, 0, -0.4, 0.3)
    _, out_ref = _numpy_released(feat_np, 3, -0.4, 0.3)
    out = motion([torch.tensor(feat_np)], num_frames=3)[0]
    np.testing.assert_allclose(out.detach().numpy(), out_ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("size", [(7, 7), (6, 5)])
def test_pyramid_statistic_equals_pooled_volume(size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    feat = torch.randn(4, 8, *size, dtype=torch.float64)  # B=2, T=2
    motion = CorrelationPyramidMotion(num_stages=1, impl="pyramid", levels=4).double()
    stat = motion.correlation_statistic(feat, 2)
    assert stat.shape == (4, 4, *size)
    torch.testing.assert_close(stat, _torch_reference(feat, 2, 4), rtol=0, atol=1e-10)
    # coarser pooling mixes positive and negative correlations before the ReLU: levels differ
    assert not torch.allclose(stat[:, 0], stat[:, 3])


def test_pyramid_with_one_level_is_released() -> None:
    torch.manual_seed(1)
    feat = torch.randn(6, 5, 4, 4)
    released = CorrelationPyramidMotion(num_stages=1, impl="released")
    pyramid = CorrelationPyramidMotion(num_stages=1, impl="pyramid", levels=1)
    pyramid.load_state_dict(released.state_dict())
    torch.testing.assert_close(pyramid([feat], 3)[0], released([feat], 3)[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("impl", ["released", "pyramid"])
def test_shapes_and_gradients_reach_input_and_convs(impl: str) -> None:
    torch.manual_seed(2)
    shapes = [(8, 16, 16), (8, 8, 8), (8, 4, 4), (8, 2, 2)]
    feats = [torch.randn(6, *s, requires_grad=True) for s in shapes]  # B=2, T=3
    motion = CorrelationPyramidMotion(impl=impl, chunk_size=5)
    out = motion(feats, num_frames=3)
    assert [o.shape for o in out] == [f.shape for f in feats]
    sum(o.square().sum() for o in out).backward()
    for f in feats:
        assert f.grad is not None and f.grad.abs().sum() > 0
    for gate in motion.gates.values():
        assert gate.weight.grad is not None and gate.weight.grad.abs().sum() > 0
        assert gate.bias.grad is not None and gate.bias.grad.abs() > 0
    n_params = sum(p.numel() for p in motion.parameters())
    assert n_params == (8 if impl == "released" else 4 * 5)


@pytest.mark.parametrize("impl", ["released", "pyramid"])
def test_chunked_equals_unchunked_values_and_grads(impl: str) -> None:
    torch.manual_seed(3)
    base = torch.randn(6, 16, 7, 5)  # B=2, T=3, hw=35
    results = []
    for chunk in (1, 8, None, 10_000):
        motion = CorrelationPyramidMotion(num_stages=1, impl=impl, chunk_size=chunk)
        torch.manual_seed(4)
        for p in motion.parameters():
            torch.nn.init.normal_(p)
        feat = base.clone().requires_grad_(True)
        out = motion([feat], 3)[0]
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        results.append((out.detach(), feat.grad, motion.gates["0"].weight.grad))
    ref = results[-1]
    for res in results[:-1]:
        for a, b in zip(res, ref):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_custom_backward_matches_autograd_and_gradcheck() -> None:
    torch.manual_seed(5)
    query = torch.randn(3, 4, 10, dtype=torch.float64, requires_grad=True)
    key = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k: _mean_relu_correlation(q, k, 3), (query, key))
    out = _mean_relu_correlation(query, key, 4)
    naive = torch.bmm(query.transpose(1, 2), key).clamp(min=0).mean(-1)
    torch.testing.assert_close(out, naive, rtol=0, atol=1e-12)
    weights = torch.randn_like(out)
    g_custom = torch.autograd.grad((out * weights).sum(), (query, key))
    g_naive = torch.autograd.grad((naive * weights).sum(), (query, key))
    for a, b in zip(g_custom, g_naive):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_auto_chunk_plan_is_bounded() -> None:
    maps, positions = _chunk_plan(40, 3136, 3136, None)  # B=8, T=5 at the 56x56 scale
    assert maps * positions * 3136 <= AUTO_CHUNK_ELEMENTS
    assert (maps, positions) == (40, AUTO_CHUNK_ELEMENTS // (40 * 3136))
    maps, positions = _chunk_plan(100_000, 3136, 3136, None)  # even one position for all maps is too big
    assert positions == 1 and maps * 3136 <= AUTO_CHUNK_ELEMENTS
    assert _chunk_plan(5, 49, 49, 8) == (5, 8)


def test_cpu_chunk_plan_keeps_chunks_cache_sized() -> None:
    from avs.models.motion import CPU_CHUNK_ELEMENTS

    maps, positions = _chunk_plan(4, 3136, 3136, None, CPU_CHUNK_ELEMENTS)  # B=1 at the 56x56 scale
    assert (maps, positions) == (1, CPU_CHUNK_ELEMENTS // 3136)
    maps, positions = _chunk_plan(4, 784, 784, None, CPU_CHUNK_ELEMENTS)  # 28x28: whole maps, several at once
    assert positions == 784 and maps == min(4, CPU_CHUNK_ELEMENTS // 784**2) and maps * 784**2 <= CPU_CHUNK_ELEMENTS
    assert _chunk_plan(32, 49, 49, None, CPU_CHUNK_ELEMENTS) == (32, 49)  # 7x7: one chunk
    assert _chunk_plan(2, 10**7, 10**7, None, CPU_CHUNK_ELEMENTS) == (1, 1)  # at least one position of one map


def test_cpu_chunks_give_the_whole_volume_result(monkeypatch) -> None:
    """The CPU plan's small chunks and the whole-volume plan agree (values and gradients, float64)."""
    from avs.models import motion as motion_mod

    gen = torch.Generator().manual_seed(9)
    q0 = torch.randn(4, 6, 40, generator=gen, dtype=torch.float64)
    k0 = torch.randn(4, 6, 40, generator=gen, dtype=torch.float64)
    results = []
    for budget in (motion_mod.CPU_CHUNK_ELEMENTS, 100):  # 100 entries: 2 positions x 1 map per chunk
        monkeypatch.setattr(motion_mod, "CPU_CHUNK_ELEMENTS", budget)
        q, k = q0.clone().requires_grad_(), k0.clone().requires_grad_()
        rows, cols = _mean_relu_correlation(q, k, None, 2)
        (rows.square().sum() + cols.square().sum()).backward()
        results.append((rows.detach(), cols.detach(), q.grad, k.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_num_frames_from_argument_and_validation() -> None:
    motion = CorrelationPyramidMotion(num_stages=2, stages=[1])
    feats = [torch.randn(6, 4, 4, 4), torch.randn(6, 4, 2, 2)]
    out = motion(feats, num_frames=3)
    assert out[0] is feats[0]  # inactive stage passes through
    assert not torch.equal(out[1], feats[1])
    assert list(motion.gates.keys()) == ["1"]
    with pytest.raises(ValueError, match="num_frames >= 2"):
        motion([torch.randn(3, 4, 4, 4), torch.randn(3, 4, 2, 2)], num_frames=1)
    with pytest.raises(ValueError, match="not a multiple"):
        motion(feats, num_frames=4)
    with pytest.raises(ValueError, match="expected 2 feature maps"):
        motion(feats[:1], num_frames=3)
    with pytest.raises(ValueError, match="motion.impl"):
        CorrelationPyramidMotion(impl="raft")
    with pytest.raises(ValueError, match="motion.stages"):
        CorrelationPyramidMotion(num_stages=4, stages=[4])
    with pytest.raises(ValueError, match="motion.chunk_size"):
        CorrelationPyramidMotion(chunk_size=0)


def test_normalize_uses_cosine_correlation() -> None:
    torch.manual_seed(6)
    feat = torch.randn(4, 8, 3, 3, dtype=torch.float64)
    motion = CorrelationPyramidMotion(num_stages=1, normalize=True).double()
    # scaling the features changes nothing in the statistic when normalised
    torch.testing.assert_close(
        motion.correlation_statistic(feat, 2), motion.correlation_statistic(7.0 * feat, 2), rtol=0, atol=1e-12
    )
    stat = motion.correlation_statistic(feat, 2)
    assert stat.max() <= 1.0 and stat.min() >= 0.0


@pytest.mark.parametrize("pos_per_chunk", [7, 50])
def test_saved_mask_backward_gives_the_same_bits_as_recomputing(pos_per_chunk) -> None:
    """The backward reads the forward's >= 0 mask instead of recomputing the correlation: same gradients,
    bit for bit (the mask comes from the same GEMM on the same chunk)."""
    from avs.models.motion import _MeanReLUCorrelation

    gen = torch.Generator().manual_seed(5)
    q0, k0 = torch.randn(3, 8, 50, generator=gen), torch.randn(3, 8, 40, generator=gen)
    grad_out = torch.randn(3, 50, generator=gen)
    grads = []
    for save in (False, True):
        q, k = q0.clone().requires_grad_(), k0.clone().requires_grad_()
        out, _ = _MeanReLUCorrelation.apply(q, k, 2, pos_per_chunk, save, 0)
        out.backward(grad_out)
        grads.append((out.detach(), q.grad, k.grad))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_mask_is_saved_only_for_a_backward_within_the_budget(monkeypatch) -> None:
    from avs.models import motion as motion_mod

    seen = []

    class Spy(motion_mod._MeanReLUCorrelation):
        @staticmethod
        def forward(ctx, query, key, maps, positions, save_mask=False, col_every=0):
            seen.append(save_mask)
            return motion_mod._correlation_forward(ctx, query, key, maps, positions, save_mask, col_every)

    monkeypatch.setitem(motion_mod._AUTOCAST_FUNCTIONS, "cpu", Spy)
    q, k = torch.randn(2, 4, 9, requires_grad=True), torch.randn(2, 4, 9)
    _mean_relu_correlation(q, k, None).sum().backward()
    with torch.no_grad():
        _mean_relu_correlation(q, k, None)
    _mean_relu_correlation(q, k, 4)  # an explicit chunk size asks for the memory-bounded path
    _mean_relu_correlation(q.detach(), k, None)  # nothing needs a gradient
    monkeypatch.setattr(motion_mod, "AUTO_CHUNK_ELEMENTS", 2 * 9 * 9 - 1)  # the volume's mask over budget
    _mean_relu_correlation(q, k, None)
    assert seen == [True, False, False, False, False]


@pytest.mark.parametrize("col_every", [1, 2, 4])
@pytest.mark.parametrize("chunks", [(1, 3), (3, 4), (5, 7), (8, 50)])
@pytest.mark.parametrize("save", [False, True])
def test_column_means_and_their_gradient_match_the_transposed_volume(col_every, chunks, save) -> None:
    """cols[j] is the mean over p of the ReLU'd volume of map j*k + k-1, for every chunking; the gradients
    of rows and cols together equal autograd's through the explicit volume (float64)."""
    from avs.models.motion import _MeanReLUCorrelation

    gen = torch.Generator().manual_seed(7)
    n = 8
    q0 = torch.randn(n, 5, 11, generator=gen, dtype=torch.float64)
    k0 = torch.randn(n, 5, 9, generator=gen, dtype=torch.float64)
    g_rows = torch.randn(n, 11, generator=gen, dtype=torch.float64)
    g_cols = torch.randn(n // col_every, 9, generator=gen, dtype=torch.float64)
    q, k = q0.clone().requires_grad_(), k0.clone().requires_grad_()
    rows, cols = _MeanReLUCorrelation.apply(q, k, chunks[0], chunks[1], save, col_every)
    ((rows * g_rows).sum() + (cols * g_cols).sum()).backward()
    qr, kr = q0.clone().requires_grad_(), k0.clone().requires_grad_()
    vol = torch.bmm(qr.transpose(1, 2), kr).clamp(min=0)  # [n,P,Q]
    rows_ref, cols_ref = vol.mean(-1), vol[col_every - 1 :: col_every].mean(1)
    ((rows_ref * g_rows).sum() + (cols_ref * g_cols).sum()).backward()
    assert cols.shape == (n // col_every, 9)
    for a, b in ((rows, rows_ref), (cols, cols_ref), (q.grad, qr.grad), (k.grad, kr.grad)):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("num_frames", [2, 3, 5])
@pytest.mark.parametrize("impl", ["released", "pyramid"])
def test_last_frame_read_from_the_transposed_volume_matches_its_own_volume(num_frames, impl) -> None:
    """The statistic and the gradients equal the T-volume computation (every frame against its partner)."""
    gen = torch.Generator().manual_seed(8)
    feat0 = torch.randn(2 * num_frames, 6, 5, 4, generator=gen, dtype=torch.float64)
    motion = CorrelationPyramidMotion(num_stages=1, impl=impl, levels=3).double()
    weights = torch.randn(2 * num_frames, motion.levels, 5, 4, generator=gen, dtype=torch.float64)
    feat = feat0.clone().requires_grad_()
    stat = motion.correlation_statistic(feat, num_frames)
    (stat * weights).sum().backward()
    ref_feat = feat0.clone().requires_grad_()
    ref = _torch_reference(ref_feat, num_frames, motion.levels)
    (ref * weights).sum().backward()
    torch.testing.assert_close(stat.detach(), ref.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(feat.grad, ref_feat.grad, rtol=0, atol=1e-12)
