"""The mean-field ELBO of a spatial model and its AutoNormal guide, computed without Pyro's tracing.

Pyro's ``Trace_ELBO`` runs the model and guide through effect handlers at every step: a trace
of every site, distribution objects, plate broadcasting, a Delta site per latent. On a section-
sized data set that bookkeeping costs more than the arithmetic. Here the same quantity is computed
directly, for the fixed structure these models have:

* every latent site is Gamma(a, b) (Exponential(b) = Gamma(1, b)) on the positive reals, and
  AutoNormal's guide is u ~ Normal(loc, softplus(raw_scale)), z = exp(u);
* so with u = loc + scale * eps, one site contributes
  ``log p(z) + log|dz/du| - log N(u; loc, scale)``
  ``= a log b + a u - b e^u - lgamma(a) + log scale + eps^2 / 2 + log(2 pi) / 2``;
* observation-plate sites and the likelihood are scaled by n_obs / batch size, global sites
  are not; this is what ``Trace_ELBO`` gives, as a single-sample estimate (``num_particles``
  averaged).

The sites come from the module's ``_latent_sites`` generator, the same definition its Pyro
``forward`` runs, and the likelihood from ``module.log_likelihood``; tests compare value and
gradients with ``Trace_ELBO`` for the same draws.

With ``analytic=True`` each site's own prior and entropy terms are replaced by their expectation
under the site's own q, given its parents' draws: ``u -> loc``, ``e^u -> exp(loc + scale^2 / 2)``,
``eps^2 / 2 -> 1 / 2``. q is mean-field, so the expectation is that of the same ELBO (unbiased);
only the draws that reach the children and the likelihood stay random. The single-draw estimate of
``b e^u`` is heavy-tailed (a log-normal), which made training at high learning rates unstable;
the expectation is not (tests: same mean as the sampled estimate, less variance).
"""

from __future__ import annotations

import math

import pyro
import torch

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


class MeanFieldELBO:
    """Negative ELBO of ``module`` under an AutoNormal ``guide``; call it with the model's arguments.

    Parameters
    ----------
    module : LocationModelBase
        A spatial model (has ``_latent_sites`` and ``log_likelihood``).
    guide : pyro.infer.autoguide.AutoNormal
        Its guide, already set up (``prototype_trace`` present).
    num_particles : int
        Draws averaged per step.
    analytic : bool
        Exact expectations of each site's own prior and entropy terms (see the module docstring).
    global_weight : float
        Weight of the global sites' terms: 1 / N in each of N processes of a data-parallel fit, whose
        losses then sum to one process's (``_infer/_distributed.py``).
    """

    def __init__(self, module, guide, num_particles: int = 1, analytic: bool = False, global_weight: float = 1.0):
        if guide.prototype_trace is None:
            raise RuntimeError("set the guide up before building its ELBO")
        self.module = module
        self.guide = guide
        self.num_particles = int(num_particles)
        self.analytic = bool(analytic)
        self.global_weight = float(global_weight)

    def _loc_and_raw_scale(self, name):
        """The guide's loc and unconstrained scale of a site (plain leaf tensors, no transforms)."""
        raw = name + "_unconstrained"  # PyroParam's leaf tensor
        return getattr(self.guide.locs, raw), getattr(self.guide.scales, raw)

    def __call__(self, x_data, idx, batch_index, unconstrained: dict | None = None) -> torch.Tensor:
        """The loss (negative ELBO) of one step.

        Parameters
        ----------
        x_data, idx, batch_index
            The model's arguments (``idx`` None: all observations, no subsampling).
        unconstrained : dict, optional
            Site name -> unconstrained draw u to use instead of fresh noise (for tests that
            compare with Pyro on the same draw); needs ``num_particles`` 1.
        """
        total = 0.0
        for _ in range(self.num_particles):
            total = total + self._elbo(x_data, idx, batch_index, unconstrained)
        return -total / self.num_particles

    def _elbo(self, x_data, idx, batch_index, unconstrained):
        module = self.module
        batch = module._batch(batch_index)
        n_local = len(batch)
        plate_scale = module.n_obs / n_local
        sites = module._latent_sites(idx, batch)
        local_sum, global_sum = 0.0, 0.0
        value = None
        while True:
            try:
                site = sites.send(value)
            except StopIteration as stop:
                values = stop.value
                break
            loc, raw = self._loc_and_raw_scale(site.name)
            if site.local and idx is not None:
                loc, raw = loc[idx], raw[idx]
            scale = torch.nn.functional.softplus(raw)
            if unconstrained is None:
                eps = torch.randn_like(loc)
            else:
                eps = ((unconstrained[site.name] - loc) / scale).detach()
            u = loc + scale * eps
            value = torch.exp(u)
            rate = site.rate
            if self.analytic:  # E over this site's own q, given its parents' draws: u -> loc, e^u -> e^(loc + s^2/2)
                u_term, e_term, q_term = loc, torch.exp(loc + 0.5 * scale.square()), 0.5
            else:
                u_term, e_term, q_term = u, value, 0.5 * eps.square()
            if site.exponential:  # Gamma(1, b): a log b - lgamma(a) = log b
                terms = torch.log(rate) + u_term - rate * e_term
            else:
                a = site.concentration
                terms = a * torch.log(rate) - torch.lgamma(a) + a * u_term - rate * e_term
            terms = terms + torch.log(scale) + q_term  # - log q(u), less log(2 pi) / 2
            site_sum = terms.sum() + _HALF_LOG_2PI * u.numel()
            if site.local:
                local_sum = local_sum + site_sum
            else:
                global_sum = global_sum + site_sum
        if x_data is None:
            raise ValueError("the ELBO needs the counts")
        with pyro.validation_enabled(False):
            loglik = module.log_likelihood(values, x_data, idx, batch)
        return self.global_weight * global_sum + plate_scale * (local_sum + loglik)
