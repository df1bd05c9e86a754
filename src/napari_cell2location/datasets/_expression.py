"""Expression: true signatures ``g_fg``, spatial counts of the Cell2location model and reference single cells."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import sparse

from ._constants import _PER_GENE_COUNTS_PER_CELL

#: Batches of the reference single cells.
_REF_BATCH_NAMES = ("ref_batch_0", "ref_batch_1")


def _signatures(rng: np.random.Generator, n_genes: int, n_cell_types: int) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """Draw expected counts per cell ``g_fg`` (n_genes, n_cell_types) and marker gene indices per type.

    Shared log-normal baseline + family programme + type-specific noise + several-fold marker genes, each
    type scaled to a per-cell total of about ``_PER_GENE_COUNTS_PER_CELL * n_genes``.
    """
    base = rng.normal(0.0, 1.0, n_genes)
    n_families = max(1, int(round(np.sqrt(n_cell_types))))
    family = rng.integers(0, n_families, n_cell_types)
    family_effect = rng.normal(0.0, 0.5, (n_families, n_genes))
    log_g = base[:, None] + family_effect[family].T + rng.normal(0.0, 0.3, (n_genes, n_cell_types))
    n_markers = max(3, int(0.02 * n_genes))
    markers = {}
    if n_markers * n_cell_types <= n_genes:
        perm = rng.permutation(n_genes)
        for f in range(n_cell_types):
            markers[f] = np.sort(perm[f * n_markers : (f + 1) * n_markers])
    else:
        for f in range(n_cell_types):
            markers[f] = np.sort(rng.choice(n_genes, size=min(n_markers, n_genes), replace=False))
    for f, genes in markers.items():
        log_g[genes, f] += np.log(rng.uniform(3.0, 10.0, len(genes)))
    g = np.exp(log_g)
    totals = _PER_GENE_COUNTS_PER_CELL * n_genes * np.exp(rng.normal(0.0, 0.25, n_cell_types))
    g *= totals[None, :] / g.sum(axis=0, keepdims=True)
    return g, markers


def _neg_binomial(rng: np.random.Generator, mu: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Negative binomial draws with mean ``mu`` and variance ``mu + mu**2 / alpha`` (Gamma-Poisson)."""
    lam = rng.gamma(shape=alpha, scale=mu / alpha)
    return rng.poisson(lam)


def _to_csr(counts: np.ndarray) -> sparse.csr_matrix:
    return sparse.csr_matrix(counts.astype(np.float32))


@dataclass
class _SpatialCounts:
    """Spatial counts ``D_sg`` and the model parameters behind them."""

    m_g: np.ndarray  # (n_genes,) gene-wise platform effect
    y_e: np.ndarray  # (n_batches,) mean detection efficiency per batch
    y_s: np.ndarray  # (n_spots,) detection efficiency per spot
    s_eg: np.ndarray  # (n_batches, n_genes) additive background
    alpha_eg: np.ndarray  # (n_batches, n_genes) NB overdispersion
    counts: np.ndarray  # (n_spots, n_genes) integer counts


def _spatial_counts(
    rng: np.random.Generator, g_gf: np.ndarray, w_sf: np.ndarray, batch_idx: np.ndarray, n_batches: int
) -> _SpatialCounts:
    """Draw ``D_sg ~ NB(mu_sg, alpha_eg)`` with ``mu_sg = (m_g * sum_f w_sf g_fg + s_eg) * y_s`` from ``g_gf``."""
    n_genes = g_gf.shape[0]
    m_g = np.exp(rng.normal(0.0, 0.3, n_genes))
    y_e = rng.uniform(0.12, 0.3, n_batches)
    y_s = rng.gamma(shape=20.0, scale=y_e[batch_idx] / 20.0)
    bg_cells = rng.uniform(0.02, 0.06, n_batches)  # background, in cells' worth of mean expression
    s_eg = bg_cells[:, None] * g_gf.mean(axis=1)[None, :] * rng.gamma(4.0, 0.25, (n_batches, n_genes))
    alpha_g = np.exp(rng.uniform(np.log(5.0), np.log(50.0), n_genes))
    alpha_eg = np.clip(alpha_g[None, :] * np.exp(rng.normal(0.0, 0.1, (n_batches, n_genes))), 5.0, 50.0)
    mu = (m_g[None, :] * (w_sf @ g_gf.T) + s_eg[batch_idx]) * y_s[:, None]
    counts = _neg_binomial(rng, mu, alpha_eg[batch_idx])
    return _SpatialCounts(m_g=m_g, y_e=y_e, y_s=y_s, s_eg=s_eg, alpha_eg=alpha_eg, counts=counts)


@dataclass
class _ReferenceCounts:
    """Labelled single-cell counts drawn from the true signatures, in two batches."""

    cell_type: np.ndarray  # (n_cells,) type index of each cell
    batch: np.ndarray  # (n_cells,) batch index of each cell
    batch_effect: np.ndarray  # (n_batches, n_genes) gene-wise multiplicative effects
    alpha_g: np.ndarray  # (n_genes,) NB overdispersion
    counts: np.ndarray  # (n_cells, n_genes) integer counts


def _reference_counts(rng: np.random.Generator, g_gf: np.ndarray, n_cells_per_type: int) -> _ReferenceCounts:
    """Draw about ``n_cells_per_type`` cells per type (varying by about 25 %) with NB counts around ``g_gf``."""
    n_genes, n_cell_types = g_gf.shape
    n_batches = len(_REF_BATCH_NAMES)
    n_ref = np.maximum(3, np.rint(n_cells_per_type * np.exp(rng.normal(0.0, 0.25, n_cell_types)))).astype(int)
    cell_type = np.repeat(np.arange(n_cell_types), n_ref)
    batch = rng.integers(0, n_batches, len(cell_type))
    batch_effect = np.exp(rng.normal(0.0, 0.2, (n_batches, n_genes)))
    alpha_g = np.exp(rng.uniform(np.log(3.0), np.log(30.0), n_genes))
    lib_size = np.exp(rng.normal(-0.5 * 0.35**2, 0.35, len(cell_type)))
    mu = g_gf.T[cell_type] * batch_effect[batch] * lib_size[:, None]
    counts = _neg_binomial(rng, mu, alpha_g[None, :])
    return _ReferenceCounts(cell_type=cell_type, batch=batch, batch_effect=batch_effect, alpha_g=alpha_g, counts=counts)
