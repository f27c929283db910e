"""Audio-visual fusion: TPAVI (AVSBench / ECMVAE), AVCorr einsum fusion (AVS-BG), per-stage wrapper.

Every fusion block works on one clip-batched stage map and the per-frame audio of the same clips:
``forward(x [B,C,T,H,W], audio [B,T,A] | None) -> (z [B,C,T,H,W], a_fea [B,T,C] | None)``.
`a_fea` is the audio vector the block actually used (aligned and/or L2-normalised); the A-V
mapping loss (`avs.losses.av_mapping_loss`) compares it with mask-pooled visual features.
`MultiStageFusion` applies one block per selected backbone stage to frame-batched maps
``[B*T,C,h,w]`` and handles the reshapes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

__all__ = ["TPAVIFusion", "EinsumFusion", "MultiStageFusion"]

_L2_EPS = 1e-6

# TPAVI non-local modes (the reference TPAVIModule's `mode`): dot (the released runs; no softmax),
# embedded (softmax of theta.phi), gaussian (softmax of raw x.key), concatenate (ReLU(W_f[theta;phi])/N)
TPAVI_SIMILARITIES: tuple[str, ...] = ("dot", "embedded", "gaussian", "concatenate")


def _l2n(x: Tensor, dim: int) -> Tensor:
    """L2-normalise along `dim` with the eps inside the root: x / sqrt(sum x^2 + 1e-6) (same shape)."""
    return x / torch.sqrt(x.pow(2).sum(dim=dim, keepdim=True) + _L2_EPS)


def _hw_sum(g: Tensor, scale: float) -> Tensor:
    """scale * sum of g [B,C,T,H,W] over H, W -> [B,C,T].

    In float16 / bfloat16 the scale is applied before the sum: a `.half()` model or an fp16 export has
    no autocast running the sum in fp32, and the raw sum over H x W overflows fp16 (at stage 1 of a
    352 px input it adds 7,744 positions). In fp32 / fp64 the order stays sum-then-scale, bit for bit
    what the recorded runs computed.
    """
    if g.dtype in (torch.float16, torch.bfloat16):
        return (g * scale).sum(dim=(3, 4))
    return g.sum(dim=(3, 4)) * scale


def _check_clip_inputs(owner: str, x: Tensor, audio: Tensor | None, channels: int, audio_dim: int) -> None:
    """Raise ValueError unless x is [B,channels,T,H,W] and audio is None or [B,T,audio_dim]."""
    if x.dim() != 5 or x.shape[1] != channels:
        raise ValueError(f"{owner}: visual input must be [B,{channels},T,H,W], got {tuple(x.shape)}")
    if audio is None:
        return
    b, _, t = x.shape[:3]
    if audio.dim() != 3 or tuple(audio.shape) != (b, t, audio_dim):
        raise ValueError(
            f"{owner}: audio must be [B,T,audio_dim]=[{b},{t},{audio_dim}] to match the visual "
            f"input {tuple(x.shape)}, got {tuple(audio.shape)}"
        )


class TPAVIFusion(nn.Module):
    """Temporal pixel-wise audio-visual interaction (non-local "dot" block, no softmax).

    AVSBench flavour: ``align_audio=True, normalize=False`` (Linear audio_dim->C).
    ECMVAE / AVS-BG flavour: ``align_audio=False, normalize=True`` (needs C == audio_dim; visual and
    audio are L2-normalised along channels and the residual uses the normalised visual).

    ``impl="factorised"`` computes f·g as theta·(phi^T g)/N (exact by associativity since there is
    no softmax; O(THW·C'^2), no THW x THW matrix). ``impl="dense"`` builds the literal
    [B,THW,THW] matrix like the reference (optionally in query chunks of ``chunk_size``; chunking
    lowers the peak only without autograd, because each chunk's matrix is kept for backward).

    ``legacy_align_without_bias=True``: ``align_channel`` is built without a bias, as in the released
    AVSS (AVSBench-semantic) TPAVI; the S4/MS3 release and the default have one.

    ``mode``: "va" key = audio; "vv" key = visual (space-time self-attention, audio ignored);
    "both" = mean of the va and vv outputs of this same block (AVSBench va+vv flags).
    ``audio=None`` in forward always gives the vv computation and ``a_fea=None``, as the reference
    module does when called without audio.
    """

    def __init__(
        self,
        channels: int,
        audio_dim: int | None = 128,
        inter_channels: int | None = None,
        impl: str = "factorised",
        mode: str = "va",
        align_audio: bool = True,
        normalize: bool = False,
        chunk_size: int | None = None,
        similarity: str = "dot",
        legacy_align_without_bias: bool = False,
    ) -> None:
        super().__init__()
        if channels < 1:
            raise ValueError(f"TPAVIFusion: channels must be >= 1, got {channels}")
        if similarity not in TPAVI_SIMILARITIES:
            raise ValueError(f"TPAVIFusion: similarity must be one of {list(TPAVI_SIMILARITIES)}, got {similarity!r}")
        if impl not in ("factorised", "dense"):
            raise ValueError(f"TPAVIFusion: impl must be 'factorised' or 'dense', got {impl!r}")
        if mode not in ("va", "vv", "both"):
            raise ValueError(f"TPAVIFusion: mode must be 'va', 'vv' or 'both', got {mode!r}")
        if audio_dim is not None and not align_audio and mode != "vv" and channels != audio_dim:
            raise ValueError(
                f"TPAVIFusion: align_audio=False feeds the audio unprojected, so channels must "
                f"equal audio_dim; got channels={channels}, audio_dim={audio_dim}"
            )
        inter = channels // 2 if inter_channels is None else inter_channels
        if inter < 1:
            raise ValueError(f"TPAVIFusion: inter_channels must be >= 1, got {inter}")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"TPAVIFusion: chunk_size must be >= 1 or None, got {chunk_size}")
        self.channels = channels
        self.audio_dim = audio_dim
        self.inter_channels = inter
        self.impl = impl
        self.mode = mode
        self.normalize = normalize
        self.chunk_size = chunk_size
        # Attribute names follow the AVSBench / ECMVAE TPAVIModule so released weights map 1:1.
        # legacy_align_without_bias: the released AVSS TPAVI's align_channel has no bias (S4/MS3 have one).
        self.align_channel = None
        if align_audio and audio_dim is not None:
            self.align_channel = nn.Linear(audio_dim, channels, bias=not legacy_align_without_bias)
        self.norm_layer = nn.LayerNorm(channels)
        self.g = nn.Conv3d(channels, inter, kernel_size=1)
        self.theta = nn.Conv3d(channels, inter, kernel_size=1)
        self.phi = nn.Conv3d(channels, inter, kernel_size=1)
        self.W_z = nn.Sequential(nn.Conv3d(inter, channels, kernel_size=1), nn.BatchNorm3d(channels))
        nn.init.zeros_(self.W_z[1].weight)
        nn.init.zeros_(self.W_z[1].bias)
        self.similarity = similarity
        if similarity == "gaussian":  # raw features as query/key: no theta / phi (as the reference)
            self.theta = None
            self.phi = None
        if similarity == "concatenate":  # f = ReLU(W_f [theta_q; phi_k]) / N
            self.W_f = nn.Conv2d(2 * inter, 1, kernel_size=1)

    def forward(self, x: Tensor, audio: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """x [B,C,T,H,W], audio [B,T,audio_dim] | None -> (z [B,C,T,H,W], a_fea [B,T,C] | None)."""
        _check_clip_inputs("TPAVIFusion", x, audio, self.channels, self.audio_dim)
        if self.normalize:
            x = _l2n(x, dim=1)
        a_fea = None
        if audio is not None and self.mode != "vv":
            a_fea = _l2n(audio, dim=-1) if self.normalize else audio
            if self.align_channel is not None:
                a_fea = self.align_channel(a_fea)  # [B,T,A] -> [B,T,C]
        if a_fea is None:
            z = self._block(x, None)
        elif self.mode == "va":
            z = self._block(x, a_fea)
        else:  # "both"
            z = 0.5 * (self._block(x, a_fea) + self._block(x, None))
        return z, a_fea

    def _block(self, x: Tensor, key_audio: Tensor | None) -> Tensor:
        """One non-local pass: x [B,C,T,H,W], key audio [B,T,C] | None (visual key) -> [B,C,T,H,W]."""
        if self.similarity != "dot":
            return self._block_similarity(x, key_audio)
        b, _, t, h, w = x.shape
        n = t * h * w
        theta = self.theta(x).flatten(2)  # [B,C',T,H,W] -> [B,C',N]
        g = self.g(x)  # [B,C',T,H,W]
        audio_map = None
        if key_audio is not None:
            audio_map = key_audio.transpose(1, 2)[..., None, None]  # [B,T,C] -> [B,C,T,1,1]
        if self.impl == "factorised":
            # the 1/N of the attention is applied before the second einsum, split as 1/sqrt(N) on each
            # factor of kv: in fp16/bf16 neither kv (a sum over N) nor y grows with N (N = 15,680 at stage 1)
            s = n**-0.5
            if audio_map is None:
                # kv[c,d] = 1/N sum_j phi_j[c] g_j[d] over all N positions
                kv = torch.einsum("bcn,bdn->bcd", self.phi(x).flatten(2) * s, g.flatten(2) * s)
            else:
                # phi of the broadcast audio is constant over each frame's HxW positions,
                # so kv = 1/N sum_t phi(a_t) (x) sum_hw g_t.
                phi_t = self.phi(audio_map).flatten(2)  # [B,C,T,1,1] -> [B,C',T]
                kv = torch.einsum("bct,bdt->bcd", phi_t * s, _hw_sum(g, s))  # [B,C',C']
            y = torch.einsum("bcn,bcd->bdn", theta, kv)  # [B,C',N]
        else:
            if audio_map is None:
                phi = self.phi(x).flatten(2)  # [B,C',N]
            else:
                phi = self.phi(audio_map.expand(-1, -1, -1, h, w)).flatten(2)  # [B,C',N]
            g_flat = g.flatten(2)  # [B,C',N]
            step = n if self.chunk_size is None else self.chunk_size
            parts = []
            for q0 in range(0, n, step):
                f = torch.einsum("bcq,bck->bqk", theta[:, :, q0 : q0 + step], phi) / n  # [B,q,N]
                parts.append(torch.einsum("bqk,bdk->bdq", f, g_flat))  # [B,C',q]
            y = torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]  # [B,C',N]
        y = y.reshape(b, self.inter_channels, t, h, w)  # [B,C',N] -> [B,C',T,H,W]
        z = self.W_z(y) + x
        # LayerNorm over channels: [B,C,T,H,W] -> [B,T,H,W,C] -> back
        return self.norm_layer(z.permute(0, 2, 3, 4, 1)).permute(0, 4, 1, 2, 3)

    def _scores(self, q: Tensor, k: Tensor) -> Tensor:
        """Pairwise similarities for the non-dot modes: q [B,D,Q], k [B,D,K] (after theta/phi) -> [B,Q,K]."""
        if self.similarity == "concatenate":
            d = q.shape[1]
            w = self.W_f.weight.view(2 * d)
            sq = torch.einsum("bdq,d->bq", q, w[:d])
            sk = torch.einsum("bdk,d->bk", k, w[d:])
            return torch.relu(sq[:, :, None] + sk[:, None, :] + self.W_f.bias)  # [B,Q,K]
        return torch.einsum("bdq,bdk->bqk", q, k)

    def _block_similarity(self, x: Tensor, key_audio: Tensor | None) -> Tensor:
        """The reference's other non-local modes (x [B,C,T,H,W] -> [B,C,T,H,W]).

        ``embedded``: softmax_k(theta_q . phi_k); ``gaussian``: softmax_k(x_q . key_k) on the raw
        features; ``concatenate``: ReLU(W_f [theta_q; phi_k]) / N. An audio key is constant over each
        frame's H x W positions, so with audio the N keys collapse exactly to T frame keys
        (softmax: weights per frame times the frame-mean of g; /N: the frame-sum of g).
        """
        b, _, t, h, w = x.shape
        n = t * h * w
        query = (x if self.theta is None else self.theta(x)).flatten(2)  # [B,D,N]
        g = self.g(x)  # [B,C',T,H,W]
        softmax = self.similarity in ("gaussian", "embedded")
        if key_audio is not None:
            audio_map = key_audio.transpose(1, 2)[..., None, None]  # [B,T,C] -> [B,C,T,1,1]
            keys = (audio_map if self.phi is None else self.phi(audio_map)).flatten(2)  # [B,D,T]
            s = self._scores(query, keys)  # [B,N,T]
            if softmax:
                y = torch.einsum("bnt,bdt->bdn", torch.softmax(s, dim=-1), g.mean(dim=(3, 4)))
            elif g.dtype in (torch.float16, torch.bfloat16):  # the 1/N inside the frame sum (_hw_sum)
                y = torch.einsum("bnt,bdt->bdn", s, _hw_sum(g, 1.0 / n))
            else:
                y = torch.einsum("bnt,bdt->bdn", s, g.sum(dim=(3, 4))) / n
        else:
            keys = (x if self.phi is None else self.phi(x)).flatten(2)  # [B,D,N]
            g_flat = g.flatten(2)  # [B,C',N]
            step = n if self.chunk_size is None else self.chunk_size
            parts = []
            for q0 in range(0, n, step):
                f = self._scores(query[:, :, q0 : q0 + step], keys)  # [B,q,N]
                f = torch.softmax(f, dim=-1) if softmax else f / n
                parts.append(torch.einsum("bqk,bdk->bdq", f, g_flat))
            y = torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]
        y = y.reshape(b, self.inter_channels, t, h, w)
        z = self.W_z(y) + x
        return self.norm_layer(z.permute(0, 2, 3, 4, 1)).permute(0, 4, 1, 2, 3)


class EinsumFusion(nn.Module):
    """AVS-BG AVCorr: V^ = L2n(V), a^ = L2n(a), corr = einsum(V^, a^) (per-channel product),
    A = sigmoid(conv3(conv2(conv1(corr)))), out = V^ + V^*A = V^(1+A).

    Defaults give the AVS-BG module (hidden C//4, 7x7, one attention channel, no bias, no BN, no
    activation; 54,304 params at C=128). ``kernel_size=3, attention_channels=channels`` gives the
    ECMVAE ``av_corr`` alternative (17,408 params at C=128).

    ``audio=None`` ("w/o audio" ablation): ``without_audio="identity"`` (default) returns the input
    features unchanged, i.e. AVCorr is bypassed and the neck features go on, which is the ablation
    the AVS-BG paper describes (no audio -> no fusion block); ``"normalize"`` returns V^ so that the
    feature scale downstream matches the audio runs. ``a_fea`` is None in both cases.
    """

    def __init__(
        self,
        channels: int,
        audio_dim: int | None = 128,
        hidden_channels: int | None = None,
        kernel_size: int = 7,
        attention_channels: int = 1,
        without_audio: str = "identity",
    ) -> None:
        super().__init__()
        if audio_dim is not None and audio_dim != channels:
            raise ValueError(
                f"EinsumFusion: the audio is used unprojected, so audio_dim must equal channels; "
                f"got channels={channels}, audio_dim={audio_dim}"
            )
        hidden = channels // 4 if hidden_channels is None else hidden_channels
        if hidden < 1:
            raise ValueError(f"EinsumFusion: hidden_channels must be >= 1, got {hidden}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"EinsumFusion: kernel_size must be odd and >= 1, got {kernel_size}")
        if attention_channels not in (1, channels):
            raise ValueError(
                f"EinsumFusion: attention_channels must be 1 or channels ({channels}), got {attention_channels}"
            )
        if without_audio not in ("identity", "normalize"):
            raise ValueError(f"EinsumFusion: without_audio must be 'identity' or 'normalize', got {without_audio!r}")
        self.channels = channels
        self.audio_dim = audio_dim
        self.without_audio = without_audio
        self.conv1 = self.conv2 = self.conv3 = None
        if audio_dim is not None:  # the attention convs see only the audio correlation
            self.conv1 = nn.Conv2d(channels, hidden, 1, bias=False)
            self.conv2 = nn.Conv2d(hidden, hidden, kernel_size, padding=kernel_size // 2, bias=False)
            self.conv3 = nn.Conv2d(hidden, attention_channels, 1, bias=False)

    def forward(self, x: Tensor, audio: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """x [B,C,T,H,W], audio [B,T,C] | None -> (out [B,C,T,H,W], a_fea = L2n(audio) [B,T,C] | None)."""
        _check_clip_inputs("EinsumFusion", x, audio, self.channels, self.audio_dim)
        if audio is None:
            return (x if self.without_audio == "identity" else _l2n(x, dim=1)), None
        if self.conv1 is None:
            raise ValueError("EinsumFusion: built without audio (audio_dim=None) but given audio")
        b, c, t, h, w = x.shape
        v = _l2n(x, dim=1)  # per-pixel unit vectors over C
        a = _l2n(audio, dim=-1)  # [B,T,C]
        corr = torch.einsum("bcthw,btc->bcthw", v, a)  # element-wise channel modulation
        corr = corr.transpose(1, 2).reshape(b * t, c, h, w)  # [B,C,T,H,W] -> [B*T,C,H,W]
        att = torch.sigmoid(self.conv3(self.conv2(self.conv1(corr))))  # [B*T,K,H,W], K in {1,C}
        att = att.reshape(b, t, -1, h, w).transpose(1, 2)  # [B*T,K,H,W] -> [B,K,T,H,W]
        return v + v * att, a


class MultiStageFusion(nn.Module):
    """One fusion block per selected backbone stage on frame-batched maps [B*T,C,h,w].

    ``block(channels=..., audio_dim=...)`` builds one stage module (a hydra ``_partial_`` node or
    any callable; default `TPAVIFusion`). Stages not in ``stages`` pass through unchanged and
    get ``None`` audio features. ``audio_dim=None`` (``model.use_audio=false``) builds the blocks
    without their audio-only weights (TPAVI's ``align_channel``, the AVCorr attention convs).

    ``legacy_window=w`` (the released AVSS TPAVI: 5): each block sees the clip as consecutive windows of
    w frames that attend separately (frames 0-4 and 5-9 of a 10-frame clip); ``None`` (default) = the
    whole clip. T must be a multiple of w.
    """

    def __init__(
        self,
        channels: int,
        audio_dim: int | None = 128,
        stages: Sequence[int] = (0, 1, 2, 3),
        block: Callable[..., nn.Module] | None = None,
        num_stages: int = 4,
        legacy_window: int | None = None,
    ) -> None:
        super().__init__()
        if legacy_window is not None and (isinstance(legacy_window, bool) or int(legacy_window) < 1):
            raise ValueError(f"fusion.legacy_window must be null or an int >= 1, got {legacy_window!r}")
        self.legacy_window = None if legacy_window is None else int(legacy_window)
        stages = [int(s) for s in stages]
        if len(set(stages)) != len(stages):
            raise ValueError(f"fusion.stages has duplicates: {stages}")
        bad = [s for s in stages if not 0 <= s < num_stages]
        if bad:
            raise ValueError(f"fusion.stages must lie in [0, {num_stages - 1}] (num_stages={num_stages}), got {stages}")
        if block is None:
            block = functools.partial(TPAVIFusion)
        self.channels = channels
        self.audio_dim = audio_dim
        self.stages = sorted(stages)
        self.num_stages = num_stages
        # blocks[k] serves stage self.stages[k] (ECMVAE checkpoint layout: fusion_modules.{k}).
        self.blocks = nn.ModuleList(block(channels=channels, audio_dim=audio_dim) for _ in self.stages)

    def forward(
        self, feats: Sequence[Tensor], audio: Tensor | None, num_frames: int
    ) -> tuple[list[Tensor], list[Tensor | None]]:
        """feats: num_stages x [B*T,C,h,w], audio [B*T,A] | None, T -> (feats list, num_stages x [B*T,C] | None)."""
        if len(feats) != self.num_stages:
            raise ValueError(
                f"MultiStageFusion: expected {self.num_stages} stage maps (fusion.num_stages), got {len(feats)}"
            )
        if num_frames < 1:
            raise ValueError(f"MultiStageFusion: num_frames must be >= 1, got {num_frames}")
        if self.legacy_window is not None:  # windows of consecutive frames attend as separate clips
            if num_frames % self.legacy_window != 0:
                raise ValueError(
                    f"model.fusion.legacy_window={self.legacy_window} needs clips of a multiple of "
                    f"{self.legacy_window} frames, got {num_frames}"
                )
            num_frames = self.legacy_window
        out: list[Tensor] = list(feats)
        audio_feats: list[Tensor | None] = [None] * self.num_stages
        for stage, blk in zip(self.stages, self.blocks):
            x = feats[stage]
            if x.dim() != 4:
                raise ValueError(f"MultiStageFusion: stage {stage} map must be [B*T,C,h,w], got {tuple(x.shape)}")
            bt, c, h, w = x.shape
            if bt % num_frames != 0:
                raise ValueError(
                    f"MultiStageFusion: frame batch {bt} at stage {stage} is not divisible by "
                    f"num_frames={num_frames} (clips must not be split across devices or batches)"
                )
            b = bt // num_frames
            x5 = x.reshape(b, num_frames, c, h, w).transpose(1, 2)  # [B*T,C,h,w] -> [B,C,T,h,w]
            a3 = None
            if audio is not None:
                if audio.dim() != 2 or audio.shape[0] != bt:
                    raise ValueError(
                        f"MultiStageFusion: audio must be [B*T,audio_dim]=[{bt},{self.audio_dim}], "
                        f"got {tuple(audio.shape)}"
                    )
                a3 = audio.reshape(b, num_frames, audio.shape[1])  # [B*T,A] -> [B,T,A]
            z, a_fea = blk(x5, a3)
            out[stage] = z.transpose(1, 2).reshape(bt, z.shape[1], h, w)  # [B,C,T,h,w] -> [B*T,C,h,w]
            if a_fea is not None:
                audio_feats[stage] = a_fea.reshape(bt, a_fea.shape[-1])  # [B,T,C] -> [B*T,C]
        return out, audio_feats
