"""Negative Binomial log-likelihood of a count matrix, computed where it costs.

For counts x with mean mu and inverse dispersion alpha (variance mu + mu^2 / alpha):

    log p(x) = lgamma(x + alpha) - lgamma(alpha) - lgamma(x + 1)
               + alpha log alpha - (alpha + x) log(alpha + mu) + x log mu

Facts that make this cheap on spatial count matrices:

* ``lgamma(x + 1)`` depends on the data only: computed once per observation and cached;
* ``lgamma(x + alpha) - lgamma(alpha)`` and ``x log mu`` vanish where x = 0: evaluated on the
  non-zero entries only (gathered by flat index);
* alpha depends on (batch, gene) only, so ``lgamma(x + alpha) - lgamma(alpha)`` takes one value
  per distinct (batch, gene, count) triple: with ``grouped=True`` it is evaluated once per
  triple and weighted by how often the triple occurs (several times fewer lgamma/digamma calls
  than non-zero entries on real data);
* ``alpha log alpha`` depends on the batch and gene only: summed per batch, then indexed.

The only dense work left per step is ``(alpha + x) * log(alpha + mu)``. Values equal
``torch.distributions.NegativeBinomial``'s (same ELBO as the original), up to float rounding.
"""

from __future__ import annotations

import torch
from pyro.distributions import TorchDistribution
from torch.distributions import constraints


class _DenseNBTerms(torch.autograd.Function):
    """sum_g [x log mu - (alpha + x) log(alpha + mu)] per observation, with a hand-written backward.

    d/dmu = x / mu - (alpha + x) / (alpha + mu); d/dalpha = -log(alpha + mu) - (alpha + x) / (alpha + mu).
    Two (n_obs, n_vars) passes forward and three backward, instead of autograd's chain of
    element-wise nodes. ``alpha`` may be (1, n_vars) (broadcast) or (n_obs, n_vars).
    """

    @staticmethod
    def forward(ctx, mu, alpha, x):
        log_a_mu = torch.log(alpha + mu)  # (n_obs, n_vars)
        out = (x * torch.log(mu) - (alpha + x) * log_a_mu).sum(-1)  # (n_obs,)
        ctx.save_for_backward(mu, alpha, x, log_a_mu)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        mu, alpha, x, log_a_mu = ctx.saved_tensors
        g = grad_out.unsqueeze(-1)  # (n_obs, 1)
        ratio = (alpha + x) / (alpha + mu)  # (n_obs, n_vars)
        grad_mu = (x / mu - ratio) * g if ctx.needs_input_grad[0] else None
        grad_alpha = None
        if ctx.needs_input_grad[1]:
            grad_alpha = -(log_a_mu + ratio) * g
            if alpha.shape[0] == 1 and mu.shape[0] != 1:
                grad_alpha = grad_alpha.sum(0, keepdim=True)
        return grad_mu, grad_alpha, None


class CountsPattern:
    """Data-only parts of the likelihood of one count matrix.

    Parameters
    ----------
    x : torch.Tensor
        (n_obs, n_vars) float counts.
    batch_index : torch.Tensor, optional
        (n_obs,) batch of each observation; needed for ``grouped``.
    grouped : bool
        Also find the distinct (batch, gene, count) triples of the non-zero entries, so that
        :class:`NegativeBinomialCounts` evaluates the lgamma terms once per triple. Then the
        per-observation split of that term is not kept (only its total, which is what an ELBO
        with a uniformly scaled plate needs).
    """

    def __init__(self, x: torch.Tensor, batch_index: torch.Tensor | None = None, grouped: bool = False):
        n_obs, n_vars = x.shape
        flat = x.reshape(-1)
        self.shape = (n_obs, n_vars)
        self.flat_idx = torch.nonzero(flat, as_tuple=True)[0]  # (nnz,)
        self.values = flat[self.flat_idx]  # (nnz,)
        self.row = torch.div(self.flat_idx, n_vars, rounding_mode="floor")  # (nnz,)
        self.col = self.flat_idx - self.row * n_vars  # (nnz,)
        lgamma_x1 = torch.zeros(n_obs, dtype=x.dtype, device=x.device)
        lgamma_x1.index_add_(0, self.row, torch.lgamma(self.values + 1))
        self.lgamma_x_plus_1 = lgamma_x1  # (n_obs,)
        #: above ~30% non-zero, x log mu is cheaper as one dense pass than gather + scatter
        self.dense_x_log_mu = self.values.numel() > 0.3 * n_obs * n_vars
        self.grouped = bool(grouped)
        if self.grouped:
            batch = torch.zeros(n_obs, dtype=torch.long, device=x.device) if batch_index is None else batch_index
            batch = batch.reshape(-1).long()
            vmax = int(self.values.max().item()) + 1 if self.values.numel() else 1
            key = (batch[self.row] * n_vars + self.col) * vmax + self.values.long()  # (nnz,)
            uniq, counts = torch.unique(key, return_counts=True)
            self.group_value = (uniq % vmax).to(x.dtype)  # (n_groups,)
            eg = torch.div(uniq, vmax, rounding_mode="floor")
            self.group_batch = torch.div(eg, n_vars, rounding_mode="floor")  # (n_groups,)
            self.group_col = eg - self.group_batch * n_vars  # (n_groups,)
            self.group_count = counts.to(x.dtype)  # (n_groups,)


class NegativeBinomialCounts(TorchDistribution):
    """NB over a whole (n_obs, n_vars) count matrix; ``log_prob`` returns one value per observation.

    batch_shape is ``(n_obs, 1)`` (so the observation plate at dim -2 scales it) and event_shape
    ``(n_vars,)``.

    Parameters
    ----------
    mu : torch.Tensor
        (n_obs, n_vars) mean.
    alpha : torch.Tensor
        (n_batch, n_vars) inverse dispersion per batch (or (1, n_vars) shared, or (n_obs, n_vars)).
    batch_index : torch.Tensor, optional
        (n_obs,) batch of each observation, to pick rows of ``alpha``.
    pattern : CountsPattern, optional
        Precomputed data terms of the value that ``log_prob`` will be called with. With a grouped
        pattern the lgamma term's total is spread evenly over the observations.
    obs2batch : torch.Tensor, optional
        (n_obs, n_batch) one-hot batch membership; when given, per-observation alpha is formed by
        a matrix product (cheaper to differentiate than indexing).
    """

    arg_constraints = {}
    support = constraints.nonnegative
    has_rsample = False

    def __init__(
        self, mu, alpha, batch_index=None, pattern: CountsPattern | None = None, obs2batch=None, validate_args=False
    ):
        self.mu = mu
        self.alpha = alpha
        self.batch_index = batch_index
        self.pattern = pattern
        self.obs2batch = obs2batch
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
        if alpha.shape[0] == n_obs and self.batch_index is None:
            return alpha, a_log_a
        if self.obs2batch is not None:
            return self.obs2batch @ alpha, self.obs2batch @ a_log_a
        return alpha[self.batch_index], a_log_a[self.batch_index]

    def log_prob(self, value):
        pattern = self.pattern if self.pattern is not None else CountsPattern(value)
        mu = self.mu
        n_obs = mu.shape[0]
        alpha, a_log_a = self._alpha_rows()
        # dense part: - sum_g (alpha + x) log(alpha + mu)   [+ x log mu when the counts are dense]
        if pattern.dense_x_log_mu:
            dense = _DenseNBTerms.apply(mu, alpha, value)  # (n_obs,); mu > 0 everywhere
        else:
            dense = -((alpha + value) * torch.log(alpha + mu)).sum(-1)  # (n_obs,)
        x = pattern.values
        terms = None  # per non-zero entry, added to its observation
        if not pattern.dense_x_log_mu:  # x log mu on the non-zero counts only
            terms = x * torch.log(mu.reshape(-1)[pattern.flat_idx])  # (nnz,)
        total = dense + a_log_a - pattern.lgamma_x_plus_1
        if pattern.grouped:
            # lgamma(x + alpha) - lgamma(alpha), once per distinct (batch, gene, count)
            if self.alpha.shape[0] > 1:
                a_grp = self.alpha[pattern.group_batch, pattern.group_col]
            else:
                a_grp = self.alpha[0, pattern.group_col]
            lg = (pattern.group_count * (torch.lgamma(pattern.group_value + a_grp) - torch.lgamma(a_grp))).sum()
            total = total + lg / n_obs
        else:
            a_nz = alpha[0, pattern.col] if alpha.shape[0] == 1 else alpha.reshape(-1)[pattern.flat_idx]
            lg = torch.lgamma(x + a_nz) - torch.lgamma(a_nz)
            terms = lg if terms is None else terms + lg
        if terms is not None:
            total = total.index_add(0, pattern.row, terms)
        return total.unsqueeze(-1)  # (n_obs, 1)

    def sample(self, sample_shape=()):
        alpha, _ = self._alpha_rows()
        rate = torch.distributions.Gamma(alpha.expand_as(self.mu), alpha / self.mu).sample(torch.Size(sample_shape))
        return torch.poisson(rate)
