"""A fast starting point for cell abundances: non-negative regression of counts on signatures.

Each spot's counts are fitted as ``x_s ~ sum_f a_sf g_f + b_s`` with ``a >= 0`` by multiplicative
updates that maximise the Poisson likelihood (KL-divergence NMF with the signatures held fixed;
a flat per-spot background ``b_s`` soaks up counts no signature explains). Abundances in cells are
``a_sf / detection_mean``. All spots are updated at once, in chunks of spots so memory stays
bounded on large data. A few hundred updates take well under a second at 600 x 1,000.

The update needs the fitted values only where a count is non-zero (x / fit is zero elsewhere),
so sparse input below :data:`SPARSE_BELOW` density is updated on its non-zero entries alone
(a sampled matrix product, then a sparse one): measured 3.3x faster per update than dense at
10 % non-zero, 4,096 spots x 2,000 genes x 16.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from scipy import sparse

#: sparse chunks with fewer non-zero entries than this fraction are updated on the non-zeros alone
SPARSE_BELOW = 0.25


def _dense_update(x: torch.Tensor, g_aug: torch.Tensor):
    """One multiplicative update a -> a * ((x / (a g)) g^T) / sum_g g, dense counts (n, G)."""
    denom = g_aug.sum(1)

    def update(a):
        ratio = x / (a @ g_aug).clamp_min(1e-8)  # (n, G)
        return a * (ratio @ g_aug.T) / denom

    return update


def _sparse_update(xc: sparse.csr_matrix, g_aug: torch.Tensor):
    """The same update computed on the non-zero counts of a CSR chunk only."""
    dev = g_aug.device
    denom = g_aug.sum(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's "sparse CSR support is in beta"
        x = torch.sparse_csr_tensor(
            torch.as_tensor(xc.indptr.astype(np.int64), device=dev),
            torch.as_tensor(xc.indices.astype(np.int64), device=dev),
            torch.as_tensor(xc.data.astype(np.float32), device=dev),
            size=xc.shape,
        )
    values = x.values()

    def update(a):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            fit = torch.sparse.sampled_addmm(x, a, g_aug, beta=0.0).values().clamp_min(1e-8)  # (nnz,)
            ratio = torch.sparse_csr_tensor(x.crow_indices(), x.col_indices(), values / fit, size=x.shape)
            return a * (ratio @ g_aug.T) / denom

    return update


@torch.no_grad()
def nnls_abundance(
    X,
    cell_state: np.ndarray,
    detection_mean,
    batch_index: np.ndarray | None = None,
    n_iter: int = 300,
    chunk_size: int = 4096,
    min_value: float = 1e-2,
    device: str | torch.device = "cpu",
    tol: float = 1e-4,
) -> np.ndarray:
    """Non-negative abundances (cells) of each cell type in each spot.

    Parameters
    ----------
    X : numpy.ndarray or scipy.sparse matrix
        (n_obs, n_vars) counts.
    cell_state : numpy.ndarray
        (n_vars, n_factors) signatures.
    detection_mean : float or numpy.ndarray
        Detection efficiency (scalar, or (n_batch,) per batch with ``batch_index``).
    batch_index : numpy.ndarray, optional
        (n_obs,) batch of each spot.
    n_iter : int
        Multiplicative updates at most.
    chunk_size : int
        Spots per chunk.
    min_value : float
        Floor of the returned abundances (the model's Gamma sites need positive values).
    device : str or torch.device
        Where to compute.
    tol : float
        Stop a chunk's updates early once they change the abundances by less than this (relative L1).

    Returns
    -------
    numpy.ndarray
        (n_obs, n_factors) float32 abundances.
    """
    dev = torch.device(device)
    g = torch.as_tensor(np.asarray(cell_state, dtype=np.float32).T, device=dev)  # (F, G)
    n_factors, n_vars = g.shape
    # background direction: the mean signature, at a small weight
    g_aug = torch.cat([g, g.mean(0, keepdim=True)], 0)  # (F + 1, G)
    denom = g_aug.sum(1)  # (F + 1,)
    det = np.atleast_1d(np.asarray(detection_mean, dtype=np.float32)).reshape(-1)
    n_obs = X.shape[0]
    out = np.empty((n_obs, n_factors), dtype=np.float32)
    for start in range(0, n_obs, chunk_size):
        stop = min(start + chunk_size, n_obs)
        xc = X[start:stop]
        if sparse.issparse(xc) and xc.nnz < SPARSE_BELOW * xc.shape[0] * xc.shape[1]:
            xc = sparse.csr_matrix(xc)
            update = _sparse_update(xc, g_aug)
            totals = torch.as_tensor(np.asarray(xc.sum(axis=1), dtype=np.float32).reshape(-1, 1), device=dev)
        else:
            xc = xc.toarray() if sparse.issparse(xc) else np.asarray(xc)
            x = torch.as_tensor(np.ascontiguousarray(xc, dtype=np.float32), device=dev)  # (n, G)
            update = _dense_update(x, g_aug)
            totals = x.sum(1, keepdim=True)
        a = (totals / denom.sum()).expand(-1, n_factors + 1).clone()  # flat start
        a[:, -1] *= 0.1
        for it in range(int(n_iter)):
            new = update(a)
            if it % 10 == 9 and ((new - a).abs().sum() / a.abs().sum().clamp_min(1e-12)) < tol:
                a = new
                break  # converged: large data need not pay for every update
            a = new
        d = det[batch_index[start:stop]] if (batch_index is not None and det.size > 1) else det[0]
        d = torch.as_tensor(np.asarray(d, dtype=np.float32), device=dev).reshape(-1, 1)
        out[start:stop] = (a[:, :n_factors] / d).clamp_min(min_value).cpu().numpy()
    return out
