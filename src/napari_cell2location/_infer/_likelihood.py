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

Two ways in: :class:`NegativeBinomialCounts`, a Pyro distribution of a given mu (the model's
``data_target`` site), and :func:`nb_log_likelihood`, used in training (the fused ELBO), which
forms mu from its factors a chunk of rows at a time so no (spots, genes) intermediate outlives a
chunk on large data.
"""

from __future__ import annotations

import torch
from pyro.distributions import TorchDistribution
from torch.distributions import constraints

#: largest inverse dispersion alpha used (variance mu + mu^2 / alpha is Poisson's to 1e-5 relative):
#: beyond it float32 cannot represent the alpha terms of the likelihood, and a draw of
#: ``alpha_g_inverse`` near zero (alpha = 1 / inverse^2 overflowing) turned the loss into NaN
MAX_ALPHA = 1e5


def overdispersion(alpha_g_inverse):
    """The NB's inverse dispersion alpha = 1 / alpha_g_inverse^2, at most :data:`MAX_ALPHA` (tensor or array).

    The bound is applied to ``alpha_g_inverse`` (at least ``MAX_ALPHA ** -0.5``), so no infinite
    derivative of the power is ever formed (0 x inf would still be NaN).
    """
    floor = MAX_ALPHA**-0.5
    if isinstance(alpha_g_inverse, torch.Tensor):
        return alpha_g_inverse.clamp(min=floor).pow(-2)
    import numpy as np

    return 1.0 / np.maximum(np.asarray(alpha_g_inverse, dtype=np.float64), floor) ** 2


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


#: elements of the (rows, genes) temporaries :func:`nb_log_likelihood` works on at a time
FUSED_CHUNK_ELEMENTS = 1 << 23
#: up to this many count entries, the forward's intermediates are kept for backward (faster);
#: above, backward recomputes them chunk by chunk (memory stays a few chunks, whatever the data)
FUSED_KEEP_ELEMENTS = 1 << 23


def _fused_chunk(w, m, s_add, y, alpha, g, x, ob):
    """One row chunk: expected = w g, inner = expected * m + s, mu = inner * y, alpha + x,
    alpha + mu and log(alpha + mu), each (n, G)."""
    expected = w @ g
    s_rows = s_add if ob is None else ob @ s_add  # (n or 1, G)
    a_rows = alpha if ob is None else ob @ alpha  # (n or 1, G)
    inner = torch.addcmul(s_rows, expected, m) if m is not None else expected + s_rows
    mu = inner * y
    a_mu = a_rows + mu
    return expected, inner, mu, a_rows + x, a_mu, torch.log(a_mu)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum(a * b) of two contiguous tensors of one shape, without the product as a temporary."""
    return torch.dot(a.reshape(-1), b.reshape(-1))


class _FusedNBTerms(torch.autograd.Function):
    """sum_g [x log mu - (alpha + x) log(alpha + mu)] over all observations, with
    mu = (m_g * (w g) + s_e(s)) * y_s formed inside, a chunk of rows at a time.

    On large data backward recomputes each chunk instead of keeping (n_obs, n_vars)
    intermediates, so memory beyond the counts is a few chunk-sized temporaries
    (:data:`FUSED_CHUNK_ELEMENTS`), whatever the number of observations. The gradients are
    written out (d/dmu = x / mu - (alpha + x) / (alpha + mu), d/dalpha = -log(alpha + mu) -
    (alpha + x) / (alpha + mu)) and chained by hand, with as few (n, G) passes as possible:
    whole-chunk sums of products as dot products, m_g folded into the signatures, updates in place.
    """

    @staticmethod
    def forward(ctx, w, m, s_add, y, alpha, g, x, obs2batch):
        n_obs, n_vars = x.shape
        rows = max(1, FUSED_CHUNK_ELEMENTS // max(n_vars, 1))
        keep = [] if x.numel() <= FUSED_KEEP_ELEMENTS else None
        total = x.new_zeros(())
        for r0 in range(0, n_obs, rows):
            r = slice(r0, r0 + rows)
            ob = None if obs2batch is None else obs2batch[r]
            xr = x[r]
            chunk = _fused_chunk(w[r], m, s_add, y[r], alpha, g, xr, ob)
            _, _, mu, a_x, _, log_a_mu = chunk
            total = total + _dot(xr, torch.log(mu)) - _dot(a_x, log_a_mu)
            if keep is not None:
                keep.append(chunk)
        ctx.save_for_backward(w, m, s_add, y, alpha, g, x, obs2batch)
        ctx.rows, ctx.keep = rows, keep
        return total

    @staticmethod
    def backward(ctx, grad_out):
        w, m, s_add, y, alpha, g, x, obs2batch = ctx.saved_tensors
        need = ctx.needs_input_grad
        # minus the gradients are accumulated; the sign and grad_out are applied at the end
        neg_w = torch.empty_like(w) if need[0] else None
        neg_m = torch.zeros_like(m) if (m is not None and need[1]) else None
        neg_s = torch.zeros_like(s_add) if need[2] else None
        neg_y = torch.empty_like(y) if need[3] else None
        neg_alpha = torch.zeros_like(alpha) if need[4] else None
        gm_t = (g * m if m is not None else g).T  # (G, F): (d * m) @ g.T == d @ (g * m).T

        def to_rows_of(per_obs, ob):
            """Sum per-observation (n, G) values into (1, G) or per-batch (E, G) rows."""
            return per_obs.sum(0, keepdim=True) if ob is None else ob.T @ per_obs

        for i, r0 in enumerate(range(0, x.shape[0], ctx.rows)):
            r = slice(r0, r0 + ctx.rows)
            ob = None if obs2batch is None else obs2batch[r]
            xr = x[r]
            if ctx.keep is not None:
                expected, inner, mu, a_x, a_mu, log_a_mu = ctx.keep[i]
            else:
                expected, inner, mu, a_x, a_mu, log_a_mu = _fused_chunk(w[r], m, s_add, y[r], alpha, g, xr, ob)
            neg_d = a_x / a_mu  # (alpha + x) / (alpha + mu), (n, G)
            if neg_alpha is not None:
                neg_alpha += to_rows_of(log_a_mu, ob) + to_rows_of(neg_d, ob)
            neg_d.addcdiv_(xr, mu, value=-1.0)  # now -d/dmu
            if neg_y is not None:
                neg_y[r] = (neg_d * inner).sum(-1, keepdim=True)
            neg_d.mul_(y[r])  # now -d/dinner
            if neg_s is not None:
                neg_s += to_rows_of(neg_d, ob)
            if neg_m is not None:
                neg_m += (neg_d * expected).sum(0, keepdim=True)
            if neg_w is not None:
                neg_w[r] = neg_d @ gm_t
        ctx.keep = None
        scale = -grad_out
        grads = [None if t is None else t * scale for t in (neg_w, neg_m, neg_s, neg_y, neg_alpha)]
        return (*grads, None, None, None)


def nb_log_likelihood(w, m, s_add, y, alpha, g, x, batch, pattern: CountsPattern) -> torch.Tensor:
    """Total NB log-likelihood of counts x (n_obs, n_vars) with mu = (m_g * (w g) + s_eg) * y_s.

    The same value as ``NegativeBinomialCounts(mu, alpha, ...).log_prob(x).sum()`` with mu formed
    first, but mu is never stored: the mean and its terms are computed a chunk of rows at a time
    (:class:`_FusedNBTerms`), and the data-only and per-(batch, gene) terms come from ``pattern``.

    Parameters
    ----------
    w : torch.Tensor
        (n_obs, F) abundances.
    m : torch.Tensor or None
        (1, n_vars) platform effect (None: none).
    s_add, alpha : torch.Tensor
        (E, n_vars) additive background and inverse dispersion per batch.
    y : torch.Tensor
        (n_obs, 1) detection efficiency.
    g : torch.Tensor
        (F, n_vars) signatures.
    x : torch.Tensor
        (n_obs, n_vars) dense counts.
    batch : torch.Tensor
        (n_obs,) batch of each observation.
    pattern : CountsPattern
        Data terms of ``x`` (with ``batch``).
    """
    n_batch = alpha.shape[0]
    obs2batch = None
    if n_batch > 1:
        obs2batch = torch.nn.functional.one_hot(batch, n_batch).to(x.dtype)  # (n_obs, E)
        per_batch = obs2batch.sum(0)  # observations of each batch
    else:
        per_batch = x.new_full((1,), float(x.shape[0]))
    total = _FusedNBTerms.apply(w, m, s_add, y, alpha, g, x, obs2batch)
    total = total + (per_batch * (alpha * torch.log(alpha)).sum(-1)).sum() - pattern.lgamma_x_plus_1.sum()
    return total + pattern.lgamma_total(alpha)


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
        with a uniformly scaled plate needs). Found a chunk of rows at a time.
    entries : bool
        Keep the per-entry arrays of the non-zero counts (``flat_idx``, ``values``, ``row``,
        ``col``: 28 bytes per non-zero), which :class:`NegativeBinomialCounts` and the ungrouped
        :meth:`lgamma_total` need. The fused likelihood with ``grouped`` does without them, which
        on large full-data fits saves more memory than the count matrix itself takes.
    """

    def __init__(
        self, x: torch.Tensor, batch_index: torch.Tensor | None = None, grouped: bool = False, entries: bool = True
    ):
        n_obs, n_vars = x.shape
        self.shape = (n_obs, n_vars)
        self.grouped = bool(grouped)
        self.entries = bool(entries) or not self.grouped
        batch = None if batch_index is None else batch_index.reshape(-1).long()
        rows = max(1, FUSED_CHUNK_ELEMENTS // max(n_vars, 1))
        lgamma_x1, nnz, uniq, counts = [], 0, [], []
        vmax = int(x.max().item()) + 1 if x.numel() else 1
        for r0 in range(0, n_obs, rows):
            xc = x[r0 : r0 + rows]
            lgamma_x1.append(torch.lgamma(xc + 1).sum(-1))  # zero where x = 0
            row, col = torch.nonzero(xc, as_tuple=True)
            nnz += row.numel()
            if self.grouped:
                b = 0 if batch is None else batch[r0 : r0 + rows][row]
                key = (b * n_vars + col) * vmax + xc[row, col].long()  # (nnz in chunk,)
                u, c = torch.unique(key, return_counts=True)
                uniq.append(u)
                counts.append(c)
        self.lgamma_x_plus_1 = torch.cat(lgamma_x1) if lgamma_x1 else x.new_zeros(0)  # (n_obs,)
        self.nnz = nnz
        #: above ~30% non-zero, x log mu is cheaper as one dense pass than gather + scatter
        self.dense_x_log_mu = nnz > 0.3 * n_obs * n_vars
        if self.entries:
            flat = x.reshape(-1)
            self.flat_idx = torch.nonzero(flat, as_tuple=True)[0]  # (nnz,)
            self.values = flat[self.flat_idx]  # (nnz,)
            self.row = torch.div(self.flat_idx, n_vars, rounding_mode="floor")  # (nnz,)
            self.col = self.flat_idx - self.row * n_vars  # (nnz,)
            self.nz_batch = None if batch is None else batch[self.row]  # (nnz,)
        if self.grouped:  # merge the chunks' distinct triples, adding their counts
            keys = torch.cat(uniq) if uniq else torch.zeros(0, dtype=torch.long, device=x.device)
            cnt = torch.cat(counts) if counts else torch.zeros(0, dtype=torch.long, device=x.device)
            key, inverse = torch.unique(keys, return_inverse=True)
            total = torch.zeros(key.shape, dtype=cnt.dtype, device=x.device).index_add_(0, inverse, cnt)
            self.group_value = (key % vmax).to(x.dtype)  # (n_groups,)
            eg = torch.div(key, vmax, rounding_mode="floor")
            self.group_batch = torch.div(eg, n_vars, rounding_mode="floor")  # (n_groups,)
            self.group_col = eg - self.group_batch * n_vars  # (n_groups,)
            self.group_count = total.to(x.dtype)  # (n_groups,)

    def lgamma_total(self, alpha: torch.Tensor) -> torch.Tensor:
        """sum over non-zero counts of lgamma(x + alpha) - lgamma(alpha), alpha (E, n_vars) or (1, n_vars)."""
        if self.grouped:
            rows = self.group_batch if alpha.shape[0] > 1 else torch.zeros_like(self.group_batch)
            a = alpha[rows, self.group_col]
            return (self.group_count * (torch.lgamma(self.group_value + a) - torch.lgamma(a))).sum()
        rows = self.nz_batch if (alpha.shape[0] > 1 and self.nz_batch is not None) else torch.zeros_like(self.col)
        a = alpha[rows, self.col]
        return (torch.lgamma(self.values + a) - torch.lgamma(a)).sum()


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
