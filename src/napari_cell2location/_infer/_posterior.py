"""Posterior summaries of a mean-field AutoNormal guide, in batches of spots.

Each latent site is q = T(Normal(loc, scale)) with T the bijection onto the prior's support.

* quantiles are exact without sampling: T(loc + scale * Phi^-1(q));
* means and standard deviations are computed by Gauss-Hermite quadrature over the standard
  normal (64 nodes; exact to float precision for the smooth transforms used here);
* sampling draws ``num_samples`` values per site, global sites a chunk of their elements at a
  time and obs-plate sites spot batch by spot batch, and :class:`DrawSummaries` reduces each part
  as it comes, so memory stays bounded by the size of one part.
"""

from __future__ import annotations

import math
import re

import numpy as np
import torch
from torch.distributions import biject_to

from ..io import InputError
from ._device import to_numpy

#: summaries computed by ``export_posterior`` from samples, whatever else is asked (the original's)
DEFAULT_SUMMARIES = ("means", "stds", "q05", "q95")
#: values in one part of posterior draws (bounds the memory of ``sample_posterior``)
SAMPLE_BATCH_VALUES = 2_000_000

_QUANTILE = re.compile(r"^q(\d+)$")


def parse_quantile(name: str) -> float | None:
    """'q05' -> 0.05, 'q50' -> 0.5, 'q0001' -> 0.0001; anything else -> None."""
    m = _QUANTILE.match(name)
    if not m:
        return None
    digits = m.group(1)
    return int(digits) / 10 ** len(digits)


def check_summaries(names, where: str) -> list[str]:
    """``names`` as a list, refusing any that is not 'means', 'stds' or a quantile such as 'q05'.

    Parameters
    ----------
    names : sequence of str
        Posterior summaries asked for.
    where : str
        The argument they came in (named in the message).
    """
    names = list(names)
    for k in names:
        if k not in ("means", "stds") and parse_quantile(k) is None:
            raise InputError(f"unknown summary {k!r} in {where}; use 'means', 'stds', 'q05', 'q50', ...")
    return names


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
        self.sites = {}
        for name, site in guide.prototype_trace.iter_stochastic_nodes():
            self.sites[name] = biject_to(site["fn"].support)
        # in the model's order, not a set's: draws are made site by site from one random stream, and a
        # set's order of strings changes from process to process (PYTHONHASHSEED), and with it the answer
        obs_sites = set(obs_sites)
        self.obs_sites = tuple(name for name in self.sites if name in obs_sites)

    def loc_scale(self, name: str, ind=None):
        """The guide's loc and (positive) scale of a site, rows ``ind`` of an obs-plate site."""
        loc, scale = getattr(self.guide.locs, name), getattr(self.guide.scales, name)
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
    def sample_chunks(self, name: str, num_samples: int, max_values: int):
        """Draws of a site a chunk of its elements at a time: yields (num_samples, chunk) tensors that
        together cover the site's elements in row-major order, each at most ``max_values`` values."""
        loc, scale = self.loc_scale(name)
        flat_loc, flat_scale = loc.reshape(-1), scale.reshape(-1)
        chunk = max(1, int(max_values // num_samples))
        transform = self.sites[name]
        for i in range(0, flat_loc.numel(), chunk):
            lo, sc = flat_loc[i : i + chunk], flat_scale[i : i + chunk]
            eps = torch.randn((num_samples, lo.numel()), dtype=lo.dtype, device=lo.device)
            yield transform(eps.mul_(sc).add_(lo))

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
        names = check_summaries(names, "summaries")
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
            for k in names:
                out[f"post_sample_{k}"][site] = np.concatenate(parts[k], axis=0)
        return out


class DrawSummaries:
    """Posterior summaries of draws that arrive in parts (spot batches, chunks of a site's elements).

    Parameters
    ----------
    summaries : sequence of str
        'means', 'stds' (ddof 1) and quantiles such as 'q05' (linear interpolation).
    keep_draws : bool
        Also keep the raw draws (memory: num_samples x every site's size).
    """

    def __init__(self, summaries, keep_draws: bool = False):
        self.summaries = check_summaries(summaries, "summaries")
        self.quantiles = {k: parse_quantile(k) for k in self.summaries if parse_quantile(k) is not None}
        self.parts: dict = {k: {} for k in self.summaries}
        self.draws: dict | None = {} if keep_draws else None

    def add(self, site: str, draws) -> None:
        """Reduce one part: ``draws`` (num_samples, ...) along dim 0. The draws are sorted in place
        (on the CPU the tensor's memory too): pass draws that are not used again."""
        arr = to_numpy(draws)  # on the CPU a view, not a copy
        if self.draws is not None:
            self.draws.setdefault(site, []).append(arr.copy())
        if "means" in self.parts:
            self.parts["means"].setdefault(site, []).append(arr.mean(0))
        if "stds" in self.parts:
            self.parts["stds"].setdefault(site, []).append(arr.std(0, ddof=1))
        if self.quantiles:
            arr.sort(axis=0)  # one sort serves every quantile
            for k, q in self.quantiles.items():
                self.parts[k].setdefault(site, []).append(sorted_quantile(arr, q))

    def result(self, shapes: dict | None = None) -> dict:
        """``{'post_sample_{summary}': {site: array}}`` (and ``'posterior_samples'`` with ``keep_draws``).

        Parts are joined along their first axis; a site in ``shapes`` is then reshaped to its shape
        (its parts were flat chunks).
        """
        shapes = shapes or {}

        def join(parts, axis):
            return np.concatenate(parts, axis=axis) if len(parts) > 1 else parts[0]

        out = {}
        for k, sites in self.parts.items():
            out[f"post_sample_{k}"] = {
                s: join(v, 0).reshape(shapes[s]) if s in shapes else join(v, 0) for s, v in sites.items()
            }
        if self.draws is not None:
            out["posterior_samples"] = {
                s: join(v, 1).reshape((v[0].shape[0], *shapes[s])) if s in shapes else join(v, 1)
                for s, v in self.draws.items()
            }
        return out


class PosteriorMixin:
    """Posterior summaries of an estimator's guide: exact quantiles, quadrature means, sampled summaries.

    Mixed into :class:`~napari_cell2location._infer.PyroEstimator` (which provides ``module``, ``guide``,
    ``device``, ``n_obs``, ``n_factors``, ``samples`` and ``_summary``).
    """

    #: global sites whose whole draws :meth:`_deterministic_draws` needs (sampled jointly with the locals)
    _DETERMINISTIC_INPUTS: tuple[str, ...] = ()

    def _guide_summary(self) -> GuideSummary:
        if self.guide.prototype_trace is None:
            raise RuntimeError("the model has not been trained yet: call train() first")
        if self._summary is None:
            self._summary = GuideSummary(self.guide, self.module.list_obs_plate_vars()["sites"])
        return self._summary

    def _spot_batches(self, batch_size: int | None):
        """Index tensors of consecutive observations, ``batch_size`` at a time (all at once for None)."""
        size = self.n_obs if batch_size is None else max(1, int(batch_size))
        for i in range(0, self.n_obs, size):
            yield torch.arange(i, min(i + size, self.n_obs), device=self.device)

    def _deterministic_draws(self, draws: dict) -> tuple[dict, dict]:
        """Deterministic sites from draws of the latent ones (leading sample dimension): those in the
        observation plate, and the global ones. ``draws`` holds one spot batch of the local sites and
        the :attr:`_DETERMINISTIC_INPUTS`. None by default."""
        return {}, {}

    def posterior_quantile(
        self, q: float = 0.5, batch_size: int | None = None, use_median: bool = False, exclude_vars: list | None = None
    ) -> dict:
        """Quantile ``q`` of every latent site, exactly from the guide (no sampling).

        Parameters
        ----------
        q : float
            Quantile in (0, 1).
        batch_size : int, optional
            Observations per batch for observation-plate sites (bounded memory).
        use_median : bool
            Same as ``q=0.5`` (API compatibility).
        exclude_vars : list of str, optional
            Sites to leave out.

        Returns
        -------
        dict
            site -> numpy array of the site's shape.
        """
        q = 0.5 if use_median else float(q)
        if not 0 < q < 1:
            raise ValueError(f"q must be in (0, 1), got {q}")
        summary = self._guide_summary()
        out = {}
        for name in summary.sites:
            if exclude_vars and name in exclude_vars:
                continue
            if name in summary.obs_sites:
                parts = [to_numpy(summary.quantile(name, q, ind)) for ind in self._spot_batches(batch_size)]
                out[name] = np.concatenate(parts, axis=0)
            else:
                out[name] = to_numpy(summary.quantile(name, q))
        return out

    def _summaries_from_guide(self, names, batch_size: int | None = None) -> dict:
        """Means, stds (quadrature) and quantiles (exact) of the latent sites, without sampling; the
        means of the observation-plate deterministic sites too (product of independent means)."""
        out = self._guide_summary().summaries(names, obs_batches=list(self._spot_batches(batch_size)))
        if "means" in names:
            means = {k: torch.as_tensor(v, device=self.device)[None] for k, v in out["post_sample_means"].items()}
            local, _ = self._deterministic_draws(means)
            out["post_sample_means"].update({k: to_numpy(v[0]) for k, v in local.items()})
        return out

    def posterior_means(self) -> dict:
        """Posterior means of every site (site -> array): those of the last export, else from the guide."""
        if "post_sample_means" in self.samples:
            return self.samples["post_sample_means"]
        return self._summaries_from_guide(["means"])["post_sample_means"]

    @torch.no_grad()
    def sample_posterior(
        self,
        num_samples: int = 1000,
        batch_size: int | None = None,
        return_sites: list | None = None,
        return_samples: bool = False,
        summaries=DEFAULT_SUMMARIES,
        max_values: int = SAMPLE_BATCH_VALUES,
    ) -> dict:
        """Draw posterior samples and summarise them part by part (bounded memory).

        Global sites are drawn a chunk of their elements at a time, observation-plate sites a batch
        of observations at a time, each part at most about ``max_values`` values.

        Parameters
        ----------
        num_samples : int
            Draws per site.
        batch_size : int, optional
            Observations per batch (default: as many as keep a batch of draws of the widest site
            under ``max_values``).
        return_sites : list of str, optional
            Sites to return (default all latent and deterministic sites).
        return_samples : bool
            Also return the raw draws under ``'posterior_samples'`` (memory: num_samples x site size).
        summaries : sequence of str
            Summaries to compute: 'means', 'stds', quantiles such as 'q05'.
        max_values : int
            Values in one part of the draws.

        Returns
        -------
        dict
            ``post_sample_{summary}`` -> {site: numpy array}, and ``posterior_samples`` if asked.
        """
        summary = self._guide_summary()
        num_samples = int(num_samples)
        acc = DrawSummaries(summaries, keep_draws=return_samples)
        wanted = set(return_sites) if return_sites else None

        def keep(site):
            return wanted is None or site in wanted

        shapes, joint = {}, {}
        for site in summary.sites:
            if site in summary.obs_sites:
                continue
            if site in self._DETERMINISTIC_INPUTS:
                joint[site] = summary.sample(site, num_samples)  # summarised once the locals have used it
            elif keep(site):
                shapes[site] = tuple(summary.loc_scale(site)[0].shape)
                for part in summary.sample_chunks(site, num_samples, max_values):
                    acc.add(site, part)
        det_globals: dict = {}
        if summary.obs_sites:
            widths = self.module.list_obs_plate_vars()["sites"]
            widest = max([*(widths.get(s, 1) for s in summary.obs_sites), self.n_factors])
            if batch_size is None:
                batch_size = max(1, min(self.n_obs, int(max_values // (num_samples * widest))))
            for ind in self._spot_batches(batch_size):
                local = {s: summary.sample(s, num_samples, ind) for s in summary.obs_sites}
                det_local, det_globals = self._deterministic_draws({**joint, **local})
                for site, draws in {**local, **det_local}.items():
                    if keep(site):
                        acc.add(site, draws)
        for site, draws in {**joint, **det_globals}.items():
            if keep(site):
                acc.add(site, draws)
        return acc.result(shapes)
