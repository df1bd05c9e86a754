"""Latent sites written once, run through Pyro or through the fused ELBO.

A model's latent sites are a generator that yields a :class:`Site` (name, Gamma parameters, shape,
plate) and is sent back the value. :func:`sample_sites` runs such a generator through Pyro, so
Pyro's guides, traces and ``Trace_ELBO`` see the usual model; the spatial model's fused ELBO
(``model/_elbo.py``) runs the same generator directly. :func:`gene_background_sites` is the
additive background s_eg that the spatial models and the reference regression share.
"""

from __future__ import annotations

from typing import NamedTuple

import pyro
import pyro.distributions as dist
import torch


class Site(NamedTuple):
    """One latent site of a model, as its ``*_sites`` generator yields it: Gamma(concentration, rate).

    ``exponential`` sites are Exponential(rate) (Gamma with concentration 1); ``local`` sites live
    in the observation plate (their first dimension is the plate's).
    """

    name: str
    concentration: torch.Tensor | None
    rate: torch.Tensor
    shape: tuple
    local: bool = False
    exponential: bool = False


def sample_sites(sites, obs_plate=None) -> dict:
    """Run a ``*_sites`` generator through Pyro: each yielded :class:`Site` becomes a ``pyro.sample``.

    Global sites get ``to_event`` over all their dimensions; local sites are sampled inside
    ``obs_plate``. Returns what the generator returns.
    """
    value = None
    while True:
        try:
            site = sites.send(value)
        except StopIteration as stop:
            return stop.value
        if site.exponential:
            fn = dist.Exponential(site.rate).expand(site.shape)
        else:
            fn = dist.Gamma(site.concentration, site.rate).expand(site.shape)
        if site.local:
            with obs_plate:
                value = pyro.sample(site.name, fn)
        else:
            value = pyro.sample(site.name, fn.to_event(len(site.shape)))


def gene_background_sites(const, n_batch: int, n_vars: int, alpha_hyp: dict, mean_hyp: dict):
    """Sites of the additive background s_eg (free-floating RNA) of each batch and gene.

    s_g_gene_add_alpha_hyp ~ Gamma(alpha_hyp) (1, 1); s_g_gene_add_mean ~ Gamma(mean_hyp) (E, 1);
    s_g_gene_add_alpha_e_inv ~ Exponential(s_g_gene_add_alpha_hyp) (E, 1);
    s_g_gene_add ~ Gamma(a_e, a_e / s_g_gene_add_mean) (E, G) with a_e = 1 / alpha_e_inv^2.
    A generator of :class:`Site` (see :func:`sample_sites`) that returns s_eg; shared by the
    spatial models and the reference regression.

    Parameters
    ----------
    const : callable
        Makes a float tensor of a Python number on the model's device.
    n_batch, n_vars : int
        E and G.
    alpha_hyp, mean_hyp : dict
        ``alpha`` and ``beta`` of the two hyper-priors.
    """
    E, G = n_batch, n_vars
    alpha_hyp_value = yield Site("s_g_gene_add_alpha_hyp", const(alpha_hyp["alpha"]), const(alpha_hyp["beta"]), (1, 1))
    mean = yield Site("s_g_gene_add_mean", const(mean_hyp["alpha"]), const(mean_hyp["beta"]), (E, 1))
    alpha_e_inv = yield Site("s_g_gene_add_alpha_e_inv", None, alpha_hyp_value, (E, 1), exponential=True)
    alpha_e = alpha_e_inv.pow(-2)
    return (yield Site("s_g_gene_add", alpha_e, alpha_e / mean, (E, G)))


def sample_gene_background(const, n_batch: int, n_vars: int, alpha_hyp: dict, mean_hyp: dict) -> torch.Tensor:
    """Sample the additive background s_eg through Pyro (:func:`gene_background_sites`); (E, G)."""
    return sample_sites(gene_background_sites(const, n_batch, n_vars, alpha_hyp, mean_hyp))
