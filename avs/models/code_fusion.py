"""How a factorised latent fuses its specific code s and shared code c into sc, and regularises them.

Three strategies (picked by `model.latent.divergence`), each a small object that the factorised
latent holds; any weights live on the latent itself under the released names (`sc1_prior`, ...):

- `LinearCodeFusion` (divergence kl | js | js_sampled): sc = Linear([s, c]) per branch (released);
  the "kl" term is KL on each specific code plus the chosen divergence on the shared code.
- `PoECodeFusion` (poe): sc ~ PoE(N(0,I), s, c); KL between the fused posterior and prior (closed form).
- `MoECodeFusion` (moe): sc = s or c with probability 1/2 each; KL between the mixtures (sampled).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from avs.models.divergences import js_divergence, moe_kl, poe, sampled_js_surrogate
from avs.models.latent_parts import Gaussian, free_bits_sum, row_mean

Dists = dict[str, Gaussian]
Draw = Callable[[Gaussian], Tensor]
SPECIFIC = ("s_v", "s_a")


def poe_joint(s: Gaussian, c: Gaussian) -> Gaussian:
    """PoE of N(0,I), the specific and the shared expert -> Gaussian [N,L]."""
    mu, logvar = poe(torch.stack([s.mu, c.mu]), torch.stack([s.logvar, c.logvar]), include_prior_expert=True)
    return Gaussian(mu, logvar)


def coin(ref: Tensor, generator: torch.Generator | None) -> Tensor:
    """Two fair coins per row of ref [N,L] -> bool [2,N,1] on ref's device."""
    n = ref.shape[0]
    if generator is None:
        u = torch.rand(2, n, 1, device=ref.device)
    else:
        u = torch.rand(2, n, 1, generator=generator, device=generator.device).to(ref.device)
    return u < 0.5


def _shared_kl(latent, q: Gaussian, p: Gaussian, rows: Tensor | None = None) -> Tensor:
    return latent.kl(q, p, rows)


def _shared_js(latent, q: Gaussian, p: Gaussian, rows: Tensor | None = None) -> Tensor:
    """Closed-form mmJSD JS between the shared posterior and prior (mean over the batch or the `rows`).

    With the latent's `free_bits` > 0: floored per dimension like the KL terms (the geometric JS of
    diagonal Gaussians is a sum of per-dimension terms, each computed as a 1-wide distribution).
    """
    mus, logvars = torch.stack([q.mu, p.mu]), torch.stack([q.logvar, p.logvar])  # [2,N,L]
    if not latent.free_bits:
        return row_mean(js_divergence(mus, logvars), rows)
    per_dim = js_divergence(mus.reshape(2, -1, 1), logvars.reshape(2, -1, 1)).view_as(q.mu)  # [N*L] -> [N,L]
    return free_bits_sum(per_dim, latent.free_bits, rows)


def _shared_js_sampled(latent, q: Gaussian, p: Gaussian, rows: Tensor | None = None) -> Tensor:
    """The release's compute_js_loss(prior, posterior) (over the `rows` only, when given)."""
    return sampled_js_surrogate(p.mu, p.logvar, q.mu, q.logvar, rows=rows)


SHARED_DIVERGENCES: dict[str, Callable[..., Tensor]] = {
    "kl": _shared_kl,
    "js": _shared_js,
    "js_sampled": _shared_js_sampled,
}


class CodeFusion:
    """A fusion strategy: `build` registers its weights (if any) on the latent; `fuse` -> (sc_v, sc_a) [N,L]
    of one branch (prior | posterior) from its codes `z` (drawn by `draw`, or the means); `kl` -> the
    latent's regulariser between the posterior `q` and prior `p` distributions, a mean over the rows
    (over the True rows of `rows`, bool [N], when given: the real frames of AVSS clips)."""

    def build(self, latent: nn.Module, latent_dim: int) -> None:
        """No weights by default."""

    def fuse(
        self,
        latent,
        dists: Dists,
        z: dict[str, Tensor],
        branch: str,
        draw: Draw,
        use_mean: bool,
        generator: torch.Generator | None,
    ) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def kl(self, latent, q: Dists, p: Dists, rows: Tensor | None = None) -> Tensor:
        raise NotImplementedError


class LinearCodeFusion(CodeFusion):
    """sc_v = f_v([s_v, c]), sc_a = f_a([s_a, c]) with one Linear(2L -> L) pair per branch (released)."""

    def __init__(self, shared: str = "js") -> None:
        self.shared = SHARED_DIVERGENCES[shared]

    def build(self, latent: nn.Module, latent_dim: int) -> None:
        """Register the fusion layers on the latent under the released checkpoint names."""
        for name in ("sc1_prior", "sc2_prior", "sc1_posterior", "sc2_posterior"):
            setattr(latent, name, nn.Linear(2 * latent_dim, latent_dim))

    def fuse(
        self,
        latent,
        dists: Dists,
        z: dict[str, Tensor],
        branch: str,
        draw: Draw,
        use_mean: bool,
        generator: torch.Generator | None,
    ) -> tuple[Tensor, Tensor]:
        f_v, f_a = getattr(latent, f"sc1_{branch}"), getattr(latent, f"sc2_{branch}")
        sc_v = f_v(torch.cat([z["s_v"], z["c"]], dim=1))  # [N,2L] -> [N,L]
        sc_a = f_a(torch.cat([z["s_a"], z["c"]], dim=1))
        return sc_v, sc_a

    def kl(self, latent, q: Dists, p: Dists, rows: Tensor | None = None) -> Tensor:
        specific = latent.kl(q["s_v"], p["s_v"], rows) + latent.kl(q["s_a"], p["s_a"], rows)
        return specific + self.shared(latent, q["c"], p["c"], rows)


class PoECodeFusion(CodeFusion):
    """sc ~ PoE(N(0,I), s, c): no weights; the fused posterior is pulled to the fused prior."""

    def fuse(
        self,
        latent,
        dists: Dists,
        z: dict[str, Tensor],
        branch: str,
        draw: Draw,
        use_mean: bool,
        generator: torch.Generator | None,
    ) -> tuple[Tensor, Tensor]:
        return draw(poe_joint(dists["s_v"], dists["c"])), draw(poe_joint(dists["s_a"], dists["c"]))

    def kl(self, latent, q: Dists, p: Dists, rows: Tensor | None = None) -> Tensor:
        kl_v = latent.kl(poe_joint(q["s_v"], q["c"]), poe_joint(p["s_v"], p["c"]), rows)
        return kl_v + latent.kl(poe_joint(q["s_a"], q["c"]), poe_joint(p["s_a"], p["c"]), rows)


class MoECodeFusion(CodeFusion):
    """sc = s or c (a fair coin per item; the mean code averages them); sampled mixture KL."""

    def fuse(
        self,
        latent,
        dists: Dists,
        z: dict[str, Tensor],
        branch: str,
        draw: Draw,
        use_mean: bool,
        generator: torch.Generator | None,
    ) -> tuple[Tensor, Tensor]:
        if use_mean:
            return 0.5 * (z["s_v"] + z["c"]), 0.5 * (z["s_a"] + z["c"])
        pick = coin(z["c"], generator)  # [2,N,1] bool
        return torch.where(pick[0], z["s_v"], z["c"]), torch.where(pick[1], z["s_a"], z["c"])

    def kl(self, latent, q: Dists, p: Dists, rows: Tensor | None = None) -> Tensor:
        total = q["c"].mu.new_zeros(())
        for s in SPECIFIC:
            per_row = moe_kl(
                torch.stack([q[s].mu, q["c"].mu]),
                torch.stack([q[s].logvar, q["c"].logvar]),
                torch.stack([p[s].mu, p["c"].mu]),
                torch.stack([p[s].logvar, p["c"].logvar]),
            )  # [N]
            total = total + row_mean(per_row, rows)
        return total


def make_code_fusion(divergence: str) -> CodeFusion:
    """The strategy for `model.latent.divergence` (kl | js | js_sampled: Linear; poe; moe)."""
    if divergence == "poe":
        return PoECodeFusion()
    if divergence == "moe":
        return MoECodeFusion()
    return LinearCodeFusion(divergence)


DIVERGENCES: tuple[str, ...] = ("kl", "poe", "moe", "js", "js_sampled")
