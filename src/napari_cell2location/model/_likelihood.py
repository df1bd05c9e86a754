"""Negative Binomial log-likelihood of a count matrix, computed where it costs.

For counts x with mean mu and inverse dispersion alpha (variance mu + mu^2 / alpha):

    log p(x) = lgamma(x + alpha) - lgamma(alpha) - lgamma(x + 1)
               + alpha log alpha - (alpha + x) log(alpha + mu) + x log mu

Three facts make this cheap on spatial count matrices, which are mostly zeros:

* ``lgamma(x + 1)`` depends on the data only: computed once per observation and cached;
* ``lgamma(x + alpha) - lgamma(alpha)`` and ``x log mu`` vanish where x = 0: evaluated on the
  non-zero entries only (gathered by flat index);
* ``alpha log alpha`` depends on the batch and gene only: summed per batch, then indexed.

The only dense work left per step is ``(alpha + x) * log(alpha + mu)``. The value equals
``torch.distributions.NegativeBinomial``'s (same ELBO as the original), up to float rounding.
"""

from __future__ import annotations

import torch
from pyro.distributions import TorchDistribution
from torch.distributions import constraints


class CountsPattern:
    """Data-only parts of the likelihood of one count matrix (non-zero pattern, ``lgamma(x+1)``).

    Parameters
    ----------
    x : torch.Tensor
        (n_obs, n_vars) float counts.
    """

    def __init__(self, x: torch.Tensor):
        flat = x.reshape(-1)
        self.shape = tuple(x.shape)
        self.flat_idx = torch.nonzero(flat, as_tuple=True)[0]  # (nnz,)
        self.values = flat[self.flat_idx]  # (nnz,)
        self.row = torch.div(self.flat_idx, x.shape[-1], rounding_mode="floor")  # (nnz,)
        self.col = self.flat_idx - self.row * x.shape[-1]  # (nnz,)
        lgamma_x1 = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        lgamma_x1.index_add_(0, self.row, torch.lgamma(self.values + 1))
        self.lgamma_x_plus_1 = lgamma_x1  # (n_obs,)
        self.totals = x.sum(-1)  # (n_obs,)


class NegativeBinomialCounts(TorchDistribution):
    """NB over a whole (n_obs, n_vars) count matrix; ``log_prob`` returns one value per observation.

    batch_shape is ``(n_obs, 1)`` (so the observation plate at dim -2 scales it) and event_shape
    ``(n_vars,)``.

    Parameters
    ----------
    mu : torch.Tensor
        (n_obs, n_vars) mean.
    alpha : torch.Tensor
        (n_obs, n_vars) or (1, n_vars) inverse dispersion; or (n_batch, n_vars) with ``batch_index``.
    batch_index : torch.Tensor, optional
        (n_obs,) batch of each observation, to index ``alpha`` rows.
    pattern : CountsPattern, optional
        Precomputed data terms of the value that ``log_prob`` will be called with.
    """

    arg_constraints = {}
    support = constraints.nonnegative
    has_rsample = False

    def __init__(self, mu, alpha, batch_index=None, pattern: CountsPattern | None = None, validate_args=False):
        self.mu = mu
        self.alpha = alpha
        self.batch_index = batch_index
        self.pattern = pattern
        n_obs, n_vars = mu.shape
        super().__init__(torch.Size((n_obs, 1)), torch.Size((n_vars,)), validate_args=False)

    def expand(self, batch_shape, _instance=None):  # pragma: no cover - plates never expand this site
        if tuple(batch_shape) != tuple(self.batch_shape):
            raise NotImplementedError("NegativeBinomialCounts cannot be expanded")
        return self

    def _alpha_rows(self):
        """Alpha broadcastable to (n_obs, n_vars), and the per-observation sum of alpha*log(alpha)."""
        alpha, n_obs = self.alpha, self.mu.shape[0]
        a_log_a = (alpha * torch.log(alpha)).sum(-1)  # (rows of alpha,)
        if alpha.shape[0] == 1:
            return alpha, a_log_a.expand(n_obs)
        if self.batch_index is not None:
            return alpha[self.batch_index], a_log_a[self.batch_index]
        return alpha, a_log_a

    def log_prob(self, value):
        pattern = self.pattern if self.pattern is not None else CountsPattern(value)
        mu = self.mu
        n_obs, n_vars = mu.shape
        alpha, a_log_a = self._alpha_rows()
        # dense part: - sum_g (alpha + x) log(alpha + mu)
        dense = -((alpha + value) * torch.log(alpha + mu)).sum(-1)  # (n_obs,)
        # sparse part on non-zero counts: lgamma(x + alpha) - lgamma(alpha) + x log mu
        x = pattern.values
        mu_nz = mu.reshape(-1)[pattern.flat_idx]
        a_nz = alpha[0, pattern.col] if alpha.shape[0] == 1 else alpha.reshape(-1)[pattern.flat_idx]
        sparse_terms = torch.lgamma(x + a_nz) - torch.lgamma(a_nz) + x * torch.log(mu_nz)
        per_obs = torch.zeros(n_obs, dtype=mu.dtype, device=mu.device).index_add_(0, pattern.row, sparse_terms)
        total = per_obs + dense + a_log_a - pattern.lgamma_x_plus_1
        return total.unsqueeze(-1)  # (n_obs, 1)

    def sample(self, sample_shape=()):
        alpha, _ = self._alpha_rows()
        rate = torch.distributions.Gamma(alpha.expand_as(self.mu), alpha / self.mu).sample(torch.Size(sample_shape))
        return torch.poisson(rate)
