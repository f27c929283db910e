"""AVS-BG temporal correlation gate ("implicit volumetric motion"), released and pyramid forms."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["CorrelationPyramidMotion", "AUTO_CHUNK_ELEMENTS", "CPU_CHUNK_ELEMENTS"]

# Upper bound on correlation entries held at once when chunk_size is None (2**26 = 64M entries,
# 256 MiB in fp32, 128 MiB in fp16/bf16).
AUTO_CHUNK_ELEMENTS = 2**26
# On CPU the auto chunk is smaller: 2**21 entries (8 MiB in fp32) stay in the last-level cache between
# the GEMM that writes a chunk and the clamp, mean and mask passes that read it. On the 2-core AMD
# EPYC machine of docs/performance.md this cut the stride-4 correlation's forward + backward by about
# a third against whole-volume chunks (B=1 and B=8 at 224 px, one thread); 2**19..2**22 were timed.
CPU_CHUNK_ELEMENTS = 2**21

_IMPLS = ("released", "pyramid")


def _chunk_plan(
    num_maps: int, num_query: int, num_keys: int, chunk_size: int | None, budget: int = AUTO_CHUNK_ELEMENTS
) -> tuple[int, int]:
    """(maps per chunk, query positions per chunk) so a chunk holds <= `budget` entries (at least one
    position of one map). With AUTO_CHUNK_ELEMENTS all maps go in one chunk when they fit; a smaller
    (cache) budget keeps whole positions rows of one map first (larger GEMMs), then adds maps."""
    if chunk_size is not None:
        return num_maps, min(chunk_size, num_query)
    if budget >= AUTO_CHUNK_ELEMENTS:
        positions = max(1, min(num_query, budget // max(1, num_maps * num_keys)))
    else:
        positions = max(1, min(num_query, budget // max(1, num_keys)))
    maps = max(1, min(num_maps, budget // max(1, positions * num_keys)))
    return maps, positions


def _col_maps(n0: int, n1: int, col_every: int) -> tuple[slice, int, int]:
    """Maps n0 <= n < n1 with n % col_every == col_every - 1, as (slice within the chunk, first and end row
    of `cols`); an empty slice when col_every is 0 or no such map is in the chunk."""
    if col_every <= 0:
        return slice(0, 0), 0, 0
    first = (col_every - 1 - n0) % col_every  # offset of the first such map within the chunk
    c0 = (n0 + first) // col_every
    return slice(first, n1 - n0, col_every), c0, c0 + len(range(first, n1 - n0, col_every))


class _MeanReLUCorrelation(torch.autograd.Function):
    """rows[n,p] = mean_q max(0, <query[n,:,p], key[n,:,q]>), chunked; with `col_every` = k > 0 also
    cols[j,q] = mean_p max(0, <query[n,:,p], key[n,:,q]>) for every map n = j*k + k-1 (the same volume's
    column means: a frame paired back with the frame it was paired with reads the transposed volume).

    The backward needs where each correlation entry is >= 0. With `save_mask` the forward keeps that
    as a bool per entry (1 byte where the volume takes 4) and the backward reads it; without, the
    backward recomputes each chunk's correlation (the memory-bounded path). Both give the same mask,
    so the gradients are the same bits.
    """

    @staticmethod
    def forward(
        ctx,
        query: Tensor,
        key: Tensor,
        maps_per_chunk: int,
        pos_per_chunk: int,
        save_mask: bool = False,
        col_every: int = 0,
    ) -> tuple[Tensor, Tensor]:
        # query [N,C,P], key [N,C,Q] -> rows [N,P], cols [N // col_every, Q]
        num_maps, _, num_query = query.shape
        num_keys = key.shape[-1]
        query_t = query.transpose(1, 2)  # [N,P,C]
        cols = query.new_zeros(num_maps // col_every if col_every > 0 else 0, num_keys)
        rows, masks = [], []
        for n0 in range(0, num_maps, maps_per_chunk):
            n1 = min(n0 + maps_per_chunk, num_maps)
            sel, c0, c1 = _col_maps(n0, n1, col_every)
            parts = []
            for p0 in range(0, num_query, pos_per_chunk):
                p1 = min(p0 + pos_per_chunk, num_query)
                corr = torch.bmm(query_t[n0:n1, p0:p1], key[n0:n1])  # [n,p,Q]
                if save_mask:
                    masks.append(corr.ge(0))  # clamp(min=0) passes the gradient where corr >= 0
                corr.clamp_(min=0)
                if c1 > c0:
                    cols[c0:c1] += corr[sel].sum(1)  # [n_cols,Q]
                parts.append(corr.mean(-1))  # [n,p]
                del corr
            rows.append(torch.cat(parts, dim=1))
        ctx.save_for_backward(query, key)
        ctx.chunks = (maps_per_chunk, pos_per_chunk, col_every)
        ctx.masks = masks if save_mask else None
        return torch.cat(rows, dim=0), cols.div_(num_query)

    @staticmethod
    @once_differentiable
    def backward(
        ctx, grad_out: Tensor, grad_cols: Tensor
    ) -> tuple[Tensor | None, Tensor | None, None, None, None, None]:
        query, key = ctx.saved_tensors
        maps_per_chunk, pos_per_chunk, col_every = ctx.chunks
        masks = iter(ctx.masks) if ctx.masks is not None else None
        need_query, need_key = ctx.needs_input_grad[:2]
        num_maps, _, num_query = query.shape
        num_keys = key.shape[-1]
        # d mean_q / d corr = 1/Q (rows), d mean_p / d corr = 1/P (cols); clamp(min=0) passes the
        # gradient where corr >= 0 (torch semantics)
        grad = grad_out.to(query.dtype) / num_keys  # [N,P]
        grad_c = grad_cols.to(query.dtype) / num_query  # [N // col_every, Q]
        grad_query = torch.zeros_like(query) if need_query else None
        grad_key = torch.zeros_like(key) if need_key else None
        query_t = query.transpose(1, 2)  # [N,P,C]
        for n0 in range(0, num_maps, maps_per_chunk):
            n1 = min(n0 + maps_per_chunk, num_maps)
            sel, c0, c1 = _col_maps(n0, n1, col_every)
            for p0 in range(0, num_query, pos_per_chunk):
                p1 = min(p0 + pos_per_chunk, num_query)
                q_chunk = query_t[n0:n1, p0:p1]  # [n,p,C]
                if masks is not None:
                    weight = next(masks).to(query.dtype)  # [n,p,Q]
                else:
                    weight = torch.bmm(q_chunk, key[n0:n1]).ge_(0)  # [n,p,Q]
                from_cols = weight[sel] * grad_c[c0:c1, None, :] if c1 > c0 else None  # [n_cols,p,Q]
                weight.mul_(grad[n0:n1, p0:p1, None])  # d loss / d corr, in place
                if from_cols is not None:
                    weight[sel] += from_cols
                    del from_cols
                if grad_query is not None:
                    # [n,C,Q] @ [n,Q,p] -> [n,C,p]
                    grad_query[n0:n1, :, p0:p1] = torch.bmm(key[n0:n1], weight.transpose(1, 2))
                if grad_key is not None:
                    # [n,C,p] @ [n,p,Q] -> [n,C,Q]
                    grad_key[n0:n1] += torch.bmm(q_chunk.transpose(1, 2), weight)
                del weight
        ctx.masks = None
        return grad_query, grad_key, None, None, None, None


# the plain functions (attribute access on the class gives the staticmethods' functions)
_correlation_forward = _MeanReLUCorrelation.forward
_correlation_backward = _MeanReLUCorrelation.backward


class _MeanReLUCorrelationCUDA(_MeanReLUCorrelation):
    """`_MeanReLUCorrelation` whose backward runs under the autocast state its forward ran in (CUDA).

    Without the custom_fwd / custom_bwd pair, autocast covers the forward's GEMMs (bf16/fp16) but
    not the backward's recomputation, which then runs full fp32 GEMMs (slow). The decorators take
    the device type as a string: one class per device type.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(
        ctx, query: Tensor, key: Tensor, maps_per_chunk: int, pos_per_chunk: int, save_mask: bool, col_every: int
    ) -> tuple[Tensor, Tensor]:
        return _correlation_forward(ctx, query, key, maps_per_chunk, pos_per_chunk, save_mask, col_every)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_out: Tensor, grad_cols: Tensor):
        return _correlation_backward(ctx, grad_out, grad_cols)


class _MeanReLUCorrelationCPU(_MeanReLUCorrelation):
    """`_MeanReLUCorrelationCUDA` for CPU autocast."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")
    def forward(
        ctx, query: Tensor, key: Tensor, maps_per_chunk: int, pos_per_chunk: int, save_mask: bool, col_every: int
    ) -> tuple[Tensor, Tensor]:
        return _correlation_forward(ctx, query, key, maps_per_chunk, pos_per_chunk, save_mask, col_every)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, grad_out: Tensor, grad_cols: Tensor):
        return _correlation_backward(ctx, grad_out, grad_cols)


_AUTOCAST_FUNCTIONS = {"cuda": _MeanReLUCorrelationCUDA, "cpu": _MeanReLUCorrelationCPU}


def _mean_relu_correlation(
    query: Tensor, key: Tensor, chunk_size: int | None, col_every: int = 0
) -> Tensor | tuple[Tensor, Tensor]:
    """[N,C,P], [N,C,Q] -> [N,P]: mean over q of ReLU(<query_p, key_q>), memory-bounded.

    With `col_every` = k > 0: (that, [N // k, Q]), the second the mean over p of the same ReLU'd volume
    for the maps n = j*k + k-1 (`_MeanReLUCorrelation`).
    """
    key = key.to(query.dtype)
    budget = CPU_CHUNK_ELEMENTS if query.device.type == "cpu" else AUTO_CHUNK_ELEMENTS
    maps, positions = _chunk_plan(query.shape[0], query.shape[2], key.shape[2], chunk_size, budget)
    # keep the >= 0 mask for the backward (no recomputed correlation) when the whole volume's mask fits
    # the chunk budget in bytes: a bool per entry, at most AUTO_CHUNK_ELEMENTS bytes
    entries = query.shape[0] * query.shape[2] * key.shape[2]
    wants_grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad)
    save_mask = wants_grad and chunk_size is None and entries <= AUTO_CHUNK_ELEMENTS
    fn = _AUTOCAST_FUNCTIONS.get(query.device.type, _MeanReLUCorrelation)  # other devices: no autocast pairing
    rows, cols = fn.apply(query.contiguous(), key.contiguous(), maps, positions, save_mask, int(col_every))
    return (rows, cols) if col_every else rows


class CorrelationPyramidMotion(nn.Module):
    """Temporal correlation gate F <- F*(1+sigmoid(conv(m))) per scale; list of [B*T,C,h,w] -> same.

    Frames are paired with their successor, the last frame with its predecessor:
    pair(t) = t+1 for t < T-1 and pair(T-1) = T-2 (T >= 2, taken from `num_frames`).
    With f = F (or F / ||F||_c when ``normalize=True``) and p, q positions of the h x w grid:

    ``impl="released"`` (the AVS-BG code)::

        m_t(p) = 1/(hw) * sum_q max(0, <f_t(p), f_pair(t)(q)>)          # [B*T,1,h,w]
        att    = sigmoid(w_s * m + b_s)                                   # Conv2d(1,1,1) per scale
        out    = F + F*att

    ``impl="pyramid"`` (the paper's correlation pyramid taken literally): the all-pairs volume
    V(p,q) = <f_t(p), f_pair(t)(q)> is average-pooled over the paired frame's positions q to L
    levels, level k having the grid (ceil(h/2^k), ceil(w/2^k)) (k = 0..L-1; adaptive average
    pooling, so odd sizes such as 7 -> 4 -> 2 -> 1 are covered). Each level is reduced to one
    value per query position by the released statistic (ReLU, then mean over the level's cells)::

        m_t^k(p) = mean_{q'} max(0, V_k(p,q')),  V_k = avgpool_k over q of V       # [B*T,1,h,w]
        att      = sigmoid(Conv2d(L,1,1)(concat_k m^k))                            # L+1 params
        out      = F + F*att

    Pooling over q is linear, so V_k(p,q') = <f_t(p), avgpool_k(f_pair)(q')>: the coarse levels
    are computed from pooled partner features and never need the full volume. Level 0 equals
    the released statistic, so ``levels=1`` is the released module.

    Work: the last frame's level-0 volume is the transpose of frame T-2's (V_{T-1}(p,q) =
    V_{T-2}(q,p)), so level 0 computes the T-1 volumes of the pairs (t, t+1) once each and reads
    m_{T-1} as the column mean of the last one: (T-1)/T of the GEMMs, forward and backward (4/5 at
    T=5), same maths up to float rounding.

    Memory: the ReLU sits between the correlation and the mean, so the [hw, hw] volume cannot be
    factorised away; it is computed in chunks of query positions (``chunk_size`` positions for all
    B*(T-1) maps at once, or, when None, chunks of at most AUTO_CHUNK_ELEMENTS = 2**26 entries, on CPU
    of at most CPU_CHUNK_ELEMENTS = 2**21, a size that stays in the cache), and
    the backward pass recomputes each chunk instead of storing the volume. Autograd keeps only the
    features, and, when the volume has at most AUTO_CHUNK_ELEMENTS entries and `chunk_size` is None
    (B=1 at 224: 4*3136^2 = 39M), a bool mask of its signs (39 MB) so the backward skips the
    recomputation (one GEMM of three; same gradients, bit for bit). Footprint at 224^2 input, T=5,
    B=8 (B*(T-1)=32 volumes), C=128, largest scale 56^2 (hw=3136):
    the full volume is 32*3136^2 = 315M entries (1.26 GB fp32) per copy; the auto chunk is
    668 query positions x 32 maps x 3136 = 67M entries = 268 MB fp32 (134 MB fp16), one buffer
    in forward and one in backward, whatever B. Outputs equal the unchunked computation up to
    float rounding (< 1e-5).
    """

    def __init__(
        self,
        num_stages: int = 4,
        stages: Sequence[int] | None = None,
        impl: str = "released",
        chunk_size: int | None = None,
        levels: int = 4,
        normalize: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(num_stages, int) or num_stages < 1:
            raise ValueError(f"motion.num_stages must be a positive int, got {num_stages!r}")
        if stages is None:
            stages = list(range(num_stages))
        stages = [int(s) for s in stages]
        bad = [s for s in stages if not 0 <= s < num_stages]
        if bad or len(set(stages)) != len(stages):
            raise ValueError(
                f"motion.stages must be distinct indices in [0, {num_stages}) (motion.num_stages), got {stages}"
            )
        if impl not in _IMPLS:
            raise ValueError(f"motion.impl must be one of {_IMPLS}, got {impl!r}")
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"motion.chunk_size must be null or a positive int, got {chunk_size!r}")
        if not isinstance(levels, int) or levels < 1:
            raise ValueError(f"motion.levels must be a positive int, got {levels!r}")
        self.num_stages = num_stages
        self.stages = sorted(stages)
        self.impl = impl
        self.chunk_size = chunk_size
        self.levels = levels if impl == "pyramid" else 1
        self.normalize = normalize
        # one gate per active stage; keys "0".."3" give the same state-dict names as a ModuleList
        self.gates = nn.ModuleDict({str(s): nn.Conv2d(self.levels, 1, kernel_size=1) for s in self.stages})

    def extra_repr(self) -> str:
        return (
            f"impl={self.impl!r}, stages={self.stages}, levels={self.levels}, "
            f"chunk_size={self.chunk_size}, normalize={self.normalize}"
        )

    def correlation_statistic(self, feat: Tensor, num_frames: int) -> Tensor:
        """Per-position motion statistic m: [B*T,C,h,w] -> [B*T,L,h,w] (L = 1 for released)."""
        self._check_frames(feat, num_frames)
        bt, c, h, w = feat.shape
        b = bt // num_frames
        f = F.normalize(feat, dim=1) if self.normalize else feat
        f = f.reshape(b, num_frames, c, h, w)
        # frames 1..T-1, then T-2 (the last frame looks backward): slices, no index tensor, so a
        # TorchScript trace holds no device constant and the export runs on any device
        # level 0: frame T-1's volume against frame T-2 is frame T-2's volume against frame T-1
        # transposed, so the T-1 volumes (t, t+1) of a clip give all T rows: frame t's statistic is
        # the row mean of volume t, the last frame's the column mean of volume T-2
        pairs = b * (num_frames - 1)
        rows, cols = _mean_relu_correlation(
            f[:, :-1].reshape(pairs, c, h * w), f[:, 1:].reshape(pairs, c, h * w), self.chunk_size, num_frames - 1
        )  # [B*(T-1),hw], [B,hw]
        stats = [torch.cat([rows.reshape(b, num_frames - 1, h * w), cols[:, None]], dim=1).reshape(bt, h * w)]
        if self.levels > 1:
            partner = torch.cat([f[:, 1:], f[:, num_frames - 2 : num_frames - 1]], dim=1)
            partner = partner.reshape(bt, c, h, w)  # [B,T,C,h,w] -> [B*T,C,h,w]
            query = f.reshape(bt, c, h * w)  # [B*T,C,hw]
        for k in range(1, self.levels):
            size = (max(1, math.ceil(h / 2**k)), max(1, math.ceil(w / 2**k)))
            key = F.adaptive_avg_pool2d(partner, size).reshape(bt, c, -1)  # [B*T,C,h_k*w_k]
            stats.append(_mean_relu_correlation(query, key, self.chunk_size))  # [B*T,hw]
        return torch.stack(stats, dim=1).reshape(bt, self.levels, h, w)

    def forward(self, feats: Sequence[Tensor], num_frames: int) -> list[Tensor]:
        """Gate the active stages: list of num_stages [B*T,C,h_i,w_i] -> list of the same shapes."""
        if len(feats) != self.num_stages:
            raise ValueError(
                f"CorrelationPyramidMotion expected {self.num_stages} feature maps (motion.num_stages), "
                f"got {len(feats)}"
            )
        out = list(feats)
        for s in self.stages:
            feat = feats[s]
            att = torch.sigmoid(self.gates[str(s)](self.correlation_statistic(feat, num_frames)))  # [B*T,1,h,w]
            out[s] = feat + feat * att
        return out

    @staticmethod
    def _check_frames(feat: Tensor, num_frames: int) -> None:
        if feat.dim() != 4:
            raise ValueError(f"CorrelationPyramidMotion expects [B*T,C,h,w] features, got shape {tuple(feat.shape)}")
        if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 2:
            raise ValueError(
                f"CorrelationPyramidMotion needs num_frames >= 2 (each frame is correlated with a "
                f"neighbouring frame), got {num_frames!r}; disable the motion part for single-frame clips"
            )
        if feat.shape[0] % num_frames != 0:
            raise ValueError(
                f"CorrelationPyramidMotion: batch dimension {feat.shape[0]} is not a multiple of "
                f"num_frames={num_frames}"
            )
