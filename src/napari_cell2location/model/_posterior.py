"""Posterior summaries of a mean-field AutoNormal guide, in batches of spots.

Each latent site is q = T(Normal(loc, scale)) with T the bijection onto the prior's support.

* quantiles are exact without sampling: T(loc + scale * Phi^-1(q));
* means and standard deviations are computed by Gauss-Hermite quadrature over the standard
  normal (64 nodes; exact to float precision for the smooth transforms used here);
* sampling draws ``num_samples`` values per site, globals once and obs-plate sites spot batch by
  spot batch, so memory stays bounded by ``num_samples x batch_size x width``.
"""

from __future__ import annotations

import math
import re

import numpy as np
import torch
from torch.distributions import biject_to

_QUANTILE = re.compile(r"^q(\d+)$")


def parse_quantile(name: str) -> float | None:
    """'q05' -> 0.05, 'q50' -> 0.5, 'q0001' -> 0.0001; anything else -> None."""
    m = _QUANTILE.match(name)
    if not m:
        return None
    digits = m.group(1)
    return int(digits) / 10 ** len(digits)


def sorted_quantile(sorted_samples: torch.Tensor, q: float) -> torch.Tensor:
    """Quantile q (linear interpolation, as numpy's default) of draws sorted along dim 0."""
    n = sorted_samples.shape[0]
    pos = q * (n - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, n - 1)
    frac = pos - lo
    return sorted_samples[lo] * (1 - frac) + sorted_samples[hi] * frac


class GuideSummary:
    """Summaries of an AutoNormal guide's sites.

    Parameters
    ----------
    guide : pyro.infer.autoguide.AutoNormal
        A guide whose prototype is set up.
    obs_sites : iterable of str
        Names of the sites in the observation plate (dim -2 of their value is spots).
    """

    def __init__(self, guide, obs_sites):
        self.guide = guide
        self.obs_sites = set(obs_sites)
        self.sites = {}
        for name, site in guide.prototype_trace.iter_stochastic_nodes():
            self.sites[name] = biject_to(site["fn"].support)

    def loc_scale(self, name: str, ind=None):
        loc, scale = self.guide._get_loc_and_scale(name)
        if ind is not None and name in self.obs_sites:
            loc, scale = loc[ind], scale[ind]
        return loc.detach(), scale.detach()

    @torch.no_grad()
    def quantile(self, name: str, q: float, ind=None) -> torch.Tensor:
        loc, scale = self.loc_scale(name, ind)
        z = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(q, dtype=loc.dtype))
        return self.sites[name](loc + scale * z.to(loc.device))

    @torch.no_grad()
    def moments(self, name: str, ind=None, n_nodes: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and standard deviation of the site's marginal by Gauss-Hermite quadrature."""
        loc, scale = self.loc_scale(name, ind)
        nodes, weights = np.polynomial.hermite_e.hermegauss(n_nodes)
        weights = weights / weights.sum()
        transform = self.sites[name]
        m1 = torch.zeros_like(loc, dtype=torch.float64)
        m2 = torch.zeros_like(loc, dtype=torch.float64)
        loc64, scale64 = loc.double(), scale.double()
        for x, w in zip(nodes, weights, strict=True):
            v = transform(loc64 + scale64 * float(x))
            m1 += w * v
            m2 += w * v * v
        var = (m2 - m1 * m1).clamp_min(0)
        return m1.to(loc.dtype), var.sqrt().to(loc.dtype)

    @torch.no_grad()
    def sample(self, name: str, num_samples: int, ind=None) -> torch.Tensor:
        loc, scale = self.loc_scale(name, ind)
        draws = torch.randn((num_samples, *loc.shape), dtype=loc.dtype, device=loc.device)
        draws.mul_(scale).add_(loc)  # in place: one (num_samples, ...) buffer, not three
        transform = self.sites[name]
        if isinstance(transform, torch.distributions.transforms.ExpTransform):
            return draws.exp_()
        return transform(draws)

    @torch.no_grad()
    def summaries(self, names, obs_batches=None) -> dict:
        """Summaries of every site without sampling: ``{'post_sample_{name}': {site: numpy array}}``.

        Parameters
        ----------
        names : sequence of str
            'means', 'stds' (quadrature) and quantiles such as 'q05' (exact).
        obs_batches : sequence of index tensors, optional
            Batches of observations for the obs-plate sites (bounded memory); default all at once.
        """
        out = {f"post_sample_{k}": {} for k in names}
        for site in self.sites:
            inds = list(obs_batches) if (obs_batches is not None and site in self.obs_sites) else [None]
            parts = {k: [] for k in names}
            for ind in inds:
                if "means" in names or "stds" in names:
                    m, s = self.moments(site, ind)
                    if "means" in names:
                        parts["means"].append(m.cpu().numpy())
                    if "stds" in names:
                        parts["stds"].append(s.cpu().numpy())
                for k in names:
                    q = parse_quantile(k)
                    if q is not None:
                        parts[k].append(self.quantile(site, q, ind).cpu().numpy())
                    elif k not in ("means", "stds"):
                        raise ValueError(f"unknown posterior summary {k!r}")
            for k in names:
                out[f"post_sample_{k}"][site] = np.concatenate(parts[k], axis=0)
        return out
