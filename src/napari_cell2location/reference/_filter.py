"""Gene selection for a single-cell reference, with the original cell2location's rule.

A gene is kept if it is detected in more than ``cell_percentage_cutoff2`` of the cells, or in more
than ``cell_count_cutoff`` cells with a mean non-zero count above ``nonz_mean_cutoff``. The 2D
histogram of (log10 mean non-zero count, log10 cells detected) with the cut-offs drawn on it is
how users judge the thresholds.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import sparse

from ..io import count_matrix


def gene_filter_stats(adata, layer: str | None = None) -> pd.DataFrame:
    """Cells detecting each gene and its mean non-zero count.

    Parameters
    ----------
    adata : anndata.AnnData
        Reference, (n_cells, n_genes).
    layer : str, optional
        Layer holding raw counts (default ``adata.X``).

    Returns
    -------
    pandas.DataFrame
        (n_genes, 2): ``n_cells`` (int) and ``nonz_mean`` (float; 0 where ``n_cells`` is 0).
    """
    X = count_matrix(adata, layer)
    if sparse.issparse(X):
        X = sparse.csr_matrix(X)
        n_cells = np.asarray((X > 0).sum(axis=0)).ravel()
        totals = np.asarray(X.sum(axis=0, dtype=np.float64)).ravel()
    else:
        X = np.asarray(X)
        n_cells = (X > 0).sum(axis=0)
        totals = X.sum(axis=0, dtype=np.float64)
    nonz_mean = np.divide(totals, n_cells, out=np.zeros_like(totals), where=n_cells > 0)
    return pd.DataFrame(
        {"n_cells": n_cells.astype(np.int64), "nonz_mean": nonz_mean}, index=pd.Index(adata.var_names.astype(str))
    )


def genes_kept(stats: pd.DataFrame, n_obs: int, cell_count_cutoff, cell_percentage_cutoff2, nonz_mean_cutoff):
    """Mask of the genes :func:`filter_genes`'s rule keeps, from :func:`gene_filter_stats` of ``n_obs`` cells."""
    n_cells = stats["n_cells"].to_numpy()
    nonz = stats["nonz_mean"].to_numpy()
    return (n_cells > n_obs * float(cell_percentage_cutoff2)) | (
        (n_cells > float(cell_count_cutoff)) & (nonz > float(nonz_mean_cutoff))
    )


def filter_genes(
    adata,
    cell_count_cutoff: float = 15,
    cell_percentage_cutoff2: float = 0.05,
    nonz_mean_cutoff: float = 1.12,
    layer: str | None = None,
    plot: bool = False,
    ax=None,
) -> pd.Index:
    """Select genes worth modelling in a single-cell reference (the original cell2location's rule).

    Keep a gene if it is detected in more than ``cell_percentage_cutoff2 * n_cells`` cells, or in
    more than ``cell_count_cutoff`` cells with a mean non-zero count above ``nonz_mean_cutoff``
    (the tutorial uses 5, 0.03, 1.12). ``adata`` is not modified and nothing is shown.

    Parameters
    ----------
    adata : anndata.AnnData
        Reference, (n_cells, n_genes), raw counts.
    cell_count_cutoff : float
        Minimum cells detecting a gene, for genes with a high non-zero mean.
    cell_percentage_cutoff2 : float
        Fraction of cells above which a gene is always kept.
    nonz_mean_cutoff : float
        Minimum mean non-zero count, for genes detected in few cells.
    layer : str, optional
        Layer holding raw counts (default ``adata.X``).
    plot : bool
        Draw the 2D histogram with the cut-offs (:func:`plot_filter_genes`) on ``ax``.
    ax : matplotlib.axes.Axes, optional
        Where to draw when ``plot`` is True (default: a new pyplot figure; ``plt.show()`` is not called).

    Returns
    -------
    pandas.Index
        Names of the genes kept, in ``adata.var_names`` order; use ``adata[:, genes]``.
    """
    stats = gene_filter_stats(adata, layer)
    keep = genes_kept(stats, adata.n_obs, cell_count_cutoff, cell_percentage_cutoff2, nonz_mean_cutoff)
    if plot:
        plot_filter_genes(
            stats,
            n_obs=adata.n_obs,
            cell_count_cutoff=cell_count_cutoff,
            cell_percentage_cutoff2=cell_percentage_cutoff2,
            nonz_mean_cutoff=nonz_mean_cutoff,
            ax=ax,
        )
    return stats.index[keep]


def plot_filter_genes(
    stats: pd.DataFrame,
    n_obs: int,
    cell_count_cutoff: float = 15,
    cell_percentage_cutoff2: float = 0.05,
    nonz_mean_cutoff: float = 1.12,
    ax=None,
    bins: int = 60,
):
    """2D histogram of the gene filter: log10 mean non-zero count vs log10 cells detecting the gene.

    The vertical line is ``nonz_mean_cutoff``; the horizontal lines are ``cell_count_cutoff`` and
    ``cell_percentage_cutoff2 * n_obs``. Genes detected in no cell are left out of the plot.

    Parameters
    ----------
    stats : pandas.DataFrame
        Output of :func:`gene_filter_stats`.
    n_obs : int
        Number of cells.
    cell_count_cutoff, cell_percentage_cutoff2, nonz_mean_cutoff : float
        The cut-offs (see :func:`filter_genes`).
    ax : matplotlib.axes.Axes, optional
        Where to draw (default: a new pyplot figure; ``plt.show()`` is not called).
    bins : int
        Bins per axis.

    Returns
    -------
    matplotlib.axes.Axes
    """
    from matplotlib.colors import LogNorm

    if ax is None:  # a pyplot figure, so notebooks display it; never plt.show()
        import matplotlib.pyplot as plt

        _, ax = plt.subplots(figsize=(5, 4))
    keep = genes_kept(stats, n_obs, cell_count_cutoff, cell_percentage_cutoff2, nonz_mean_cutoff)
    detected = stats["n_cells"].to_numpy() > 0
    x = np.log10(stats["nonz_mean"].to_numpy()[detected])
    y = np.log10(stats["n_cells"].to_numpy()[detected])
    if len(x):
        x_rng = [min(x.min(), np.log10(nonz_mean_cutoff)) - 0.02, max(x.max(), np.log10(nonz_mean_cutoff)) + 0.02]
        y_rng = [-0.05, max(y.max(), np.log10(max(n_obs, 1))) + 0.05]
        ax.hist2d(x, y, bins=bins, norm=LogNorm(), range=[x_rng, y_rng], cmap="viridis")
    ax.axvline(np.log10(nonz_mean_cutoff), color="red", lw=1)
    ax.axhline(np.log10(max(cell_count_cutoff, 1e-12)), color="red", lw=1)
    ax.axhline(np.log10(max(n_obs * cell_percentage_cutoff2, 1e-12)), color="red", lw=1, ls="--")
    ax.set_xlabel("mean non-zero count of gene (log10)")
    ax.set_ylabel("cells expressing gene (log10)")
    ax.set_title(f"gene filter: {n_obs} cells x {int(keep.sum())} of {len(keep)} genes kept")
    return ax
