"""Cheap signatures (per-cluster mean counts) and reading signatures back from an exported reference."""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import sparse

from ..io import InputError
from ._validate import check_reference

#: varm key and column prefix of the signatures written by RegressionModel.export_posterior
VARM_KEY = "means_per_cluster_mu_fg"


def cluster_averages(X, label_index: np.ndarray, n_labels: int) -> np.ndarray:
    """Mean of each column of ``X`` over the rows of each label.

    Parameters
    ----------
    X : numpy.ndarray or scipy.sparse matrix
        (n_cells, n_genes) counts.
    label_index : numpy.ndarray
        (n_cells,) label code of each row, in ``range(n_labels)``.
    n_labels : int
        Number of labels.

    Returns
    -------
    numpy.ndarray
        (n_labels, n_genes) float64 means; rows of labels without cells are zero.
    """
    label_index = np.asarray(label_index).reshape(-1)
    n = len(label_index)
    onehot = sparse.csr_matrix((np.ones(n), (label_index, np.arange(n))), shape=(n_labels, n))
    sums = onehot @ X
    sums = sums.toarray() if sparse.issparse(sums) else np.asarray(sums)
    counts = np.bincount(label_index, minlength=n_labels).astype(np.float64)
    return sums / np.maximum(counts, 1.0)[:, None]


def cluster_average_signatures(adata, labels_key: str, layer: str | None = None) -> pd.DataFrame:
    """Per-cell-type mean counts: the fast alternative to :class:`RegressionModel`.

    Parameters
    ----------
    adata : anndata.AnnData
        Labelled reference, (n_cells, n_genes), raw integer counts.
    labels_key : str
        Column of ``adata.obs`` with the cell type of each cell.
    layer : str, optional
        Layer holding raw counts (default ``adata.X``).

    Returns
    -------
    pandas.DataFrame
        (n_genes, n_cell_types) mean counts per cell, indexed by gene name.
    """
    ref = check_reference(adata, labels_key, layer=layer)
    avg = cluster_averages(ref.X, ref.label_index, len(ref.factor_names))
    return pd.DataFrame(avg.T, index=ref.var_names, columns=pd.Index(ref.factor_names))


def compute_cluster_averages(adata, labels: str, use_raw: bool = False, layer: str | None = None) -> pd.DataFrame:
    """Alias of :func:`cluster_average_signatures` with the original cell2location's argument names.

    Parameters
    ----------
    adata : anndata.AnnData
        Labelled reference.
    labels : str
        Column of ``adata.obs`` with cell types.
    use_raw : bool
        Read counts from ``adata.raw`` (must hold raw counts).
    layer : str, optional
        Layer holding raw counts.
    """
    if use_raw:
        if adata.raw is None:
            raise InputError("use_raw=True but adata.raw is empty; pass use_raw=False or layer=...")
        adata = adata.raw.to_adata()  # keeps the parent's obs
    return cluster_average_signatures(adata, labels, layer=layer)


def signatures_from_adata(adata, summary: str = "means") -> pd.DataFrame:
    """Signatures (genes x cell types) from a reference exported by ``RegressionModel.export_posterior``.

    Reads ``adata.varm['{summary}_per_cluster_mu_fg']`` and strips the column prefix, in the order of
    ``adata.uns['mod']['factor_names']`` when present; the result is the ``cell_state_df`` that
    :class:`~napari_cell2location.Cell2location` takes.

    Parameters
    ----------
    adata : anndata.AnnData
        The exported reference.
    summary : str
        'means' (default), 'stds', 'q05', 'q50', 'q95', ...

    Returns
    -------
    pandas.DataFrame
        (n_genes, n_cell_types) float64.
    """
    key = f"{summary}_per_cluster_mu_fg"
    if key not in adata.varm:
        raise InputError(
            f"adata.varm has no {key!r} (it holds {list(adata.varm.keys())}); "
            "run RegressionModel.export_posterior(adata, add_to_varm=[...]) first."
        )
    value = adata.varm[key]
    prefix = f"{key}_"
    if isinstance(value, pd.DataFrame):
        df = value.copy()
        df.columns = [c[len(prefix) :] if str(c).startswith(prefix) else str(c) for c in df.columns.astype(str)]
    else:
        names = adata.uns.get("mod", {}).get("factor_names")
        if names is None:
            raise InputError(f"adata.varm[{key!r}] is an array and adata.uns['mod'] names no factor_names.")
        df = pd.DataFrame(np.asarray(value), columns=[str(n) for n in np.asarray(names).ravel()])
    df.index = pd.Index(adata.var_names.astype(str))
    names = adata.uns.get("mod", {}).get("factor_names")
    if names is not None:
        names = [str(n) for n in np.asarray(names).ravel()]
        if sorted(names) == sorted(df.columns):
            df = df[names]
    return df.astype(np.float64)
