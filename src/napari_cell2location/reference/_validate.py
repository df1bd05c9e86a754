"""Checks of a labelled single-cell reference before signatures are estimated.

Every hard failure raises :class:`~napari_cell2location.io.InputError` naming the offending value;
soft problems (rare labels, genes without counts) are logged as warnings and returned in the report,
so a GUI can show them. Nothing in the user's AnnData is modified.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import sparse

from ..io import InputError, batch_codes, count_matrix, duplicated_names, preview, validate_counts

logger = logging.getLogger(__name__)

#: labels with fewer cells than this give noisy signatures: warned about, with their counts
MIN_CELLS_PER_LABEL = 10


@dataclass
class ReferenceInputs:
    """A validated reference, ready for signature estimation.

    Attributes
    ----------
    X : scipy.sparse.csr_matrix
        (n_cells, n_genes) float32 raw counts.
    obs_names, var_names : pandas.Index
        Cell and gene names.
    label_index : numpy.ndarray
        (n_cells,) int64 code of each cell's label, indexing ``factor_names``.
    factor_names : list of str
        Cell types (labels present in the data, in category order).
    label_counts : pandas.Series
        Cells per label, indexed by ``factor_names``.
    batch_index : numpy.ndarray
        (n_cells,) int64 batch code.
    batch_names : list of str
        Batch of each code.
    small_labels : dict
        Labels with fewer than ``min_cells`` cells -> their cell count.
    report : dict
        Counts for the log and the GUI (cells, genes, all-zero genes and cells).
    """

    X: sparse.csr_matrix
    obs_names: pd.Index
    var_names: pd.Index
    label_index: np.ndarray
    factor_names: list
    label_counts: pd.Series
    batch_index: np.ndarray
    batch_names: list
    small_labels: dict = field(default_factory=dict)
    report: dict = field(default_factory=dict)


def label_codes(adata, labels_key: str | None) -> tuple[np.ndarray, list]:
    """Integer label code per cell and the label names, checking ``labels_key``.

    Categories with no cells are dropped; order follows the categorical's categories (or sorted
    values for a plain column).

    Parameters
    ----------
    adata : anndata.AnnData
        Reference with ``obs``.
    labels_key : str
        Column of ``adata.obs`` holding the cell type of each cell.

    Returns
    -------
    codes : numpy.ndarray
        (n_cells,) int64.
    names : list of str
    """
    if labels_key is None:
        raise InputError(
            "labels_key is required: name the column of adata.obs that holds cell types; "
            f"columns present: {list(adata.obs.columns)}."
        )
    if labels_key not in adata.obs.columns:
        raise InputError(
            f"labels_key {labels_key!r} is not a column of adata.obs; columns present: {list(adata.obs.columns)}."
        )
    col = adata.obs[labels_key]
    if col.isna().any():
        missing = adata.obs_names[col.isna().to_numpy()]
        raise InputError(
            f"adata.obs[{labels_key!r}] has {int(col.isna().sum())} missing labels (cells {preview(missing, 3)}); "
            "label every cell or drop the unlabelled ones."
        )
    if isinstance(col.dtype, pd.CategoricalDtype):
        cat = col.cat.remove_unused_categories()
        cat = pd.Categorical(cat.astype(str), categories=[str(c) for c in cat.cat.categories])
    else:
        cat = pd.Categorical(col.astype(str))
    return np.asarray(cat.codes, dtype=np.int64), [str(c) for c in cat.categories]


def check_reference(
    adata,
    labels_key: str | None,
    batch_key: str | None = None,
    layer: str | None = None,
    min_cells: int = MIN_CELLS_PER_LABEL,
) -> ReferenceInputs:
    """Validate a labelled single-cell reference and return its counts and codes.

    Parameters
    ----------
    adata : anndata.AnnData
        Reference, (n_cells, n_genes), raw integer counts.
    labels_key : str
        Column of ``adata.obs`` with the cell type of each cell.
    batch_key : str, optional
        Column of ``adata.obs`` with the batch (sample) of each cell.
    layer : str, optional
        Layer holding raw counts (default ``adata.X``).
    min_cells : int
        Labels with fewer cells are warned about (with their counts).

    Returns
    -------
    ReferenceInputs

    Raises
    ------
    InputError
        Not an AnnData, empty, duplicate gene names, missing or incomplete labels or batch
        column, counts that are not raw integers, or no counts at all.
    """
    import anndata

    if not isinstance(adata, anndata.AnnData):
        raise InputError(f"the reference must be an AnnData with cells as rows, got {type(adata).__name__}.")
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise InputError(f"the reference is empty (shape {adata.shape}).")
    var_names = pd.Index(adata.var_names.astype(str))
    dup = duplicated_names(var_names)
    if dup:
        raise InputError(f"the reference has duplicate gene names {preview(dup)}; call adata.var_names_make_unique().")
    codes, names = label_codes(adata, labels_key)
    b_codes, b_names = batch_codes(adata, batch_key)
    X = count_matrix(adata, layer)
    what = "reference adata.X" if layer is None else f"reference adata.layers[{layer!r}]"
    validate_counts(X, adata.obs_names, var_names, what=what)
    X = sparse.csr_matrix(X, dtype=np.float32)
    counts = pd.Series(np.bincount(codes, minlength=len(names)), index=names, name="n_cells")
    small = _small_labels(counts, int(min_cells))
    report = {
        "n_cells": adata.n_obs,
        "n_genes": adata.n_vars,
        "n_labels": len(names),
        "n_batches": len(b_names),
        **_empty_genes_and_cells(X, var_names, what),
    }
    logger.info(
        "reference: %d cells x %d genes, %d labels, %d batch(es)", adata.n_obs, adata.n_vars, len(names), len(b_names)
    )
    return ReferenceInputs(
        X=X,
        obs_names=pd.Index(adata.obs_names.astype(str)),
        var_names=var_names,
        label_index=codes,
        factor_names=names,
        label_counts=counts,
        batch_index=b_codes,
        batch_names=b_names,
        small_labels=small,
        report=report,
    )


def _small_labels(counts: pd.Series, min_cells: int) -> dict:
    """Labels with fewer than ``min_cells`` cells -> their count (warned about: noisy signatures)."""
    small = {k: int(v) for k, v in counts.items() if v < min_cells}
    if small:
        shown = ", ".join(f"{k!r}: {v}" for k, v in sorted(small.items(), key=lambda kv: kv[1]))
        logger.warning(
            "%d label(s) have fewer than %d cells, so their signatures will be noisy: %s. "
            "Merge or drop them if you can.",
            len(small),
            min_cells,
            shown,
        )
    return small


def _empty_genes_and_cells(X: sparse.csr_matrix, var_names: pd.Index, what: str) -> dict:
    """Genes and cells without any count (warned about); no count at all is an :class:`InputError`."""
    gene_totals = np.asarray(X.sum(axis=0)).ravel()
    cell_totals = np.asarray(X.sum(axis=1)).ravel()
    if not gene_totals.any():
        raise InputError(f"{what} holds no counts at all (every entry is zero).")
    n_empty_genes = int((gene_totals == 0).sum())
    n_empty_cells = int((cell_totals == 0).sum())
    if n_empty_genes:
        logger.info(  # not a problem: the gene filter (filter_genes) drops them, and the regression ignores them
            "%d of %d genes have zero counts in every cell (e.g. %s); the gene filter drops them.",
            n_empty_genes,
            len(var_names),
            preview(var_names[gene_totals == 0], 3),
        )
    if n_empty_cells:
        logger.warning("%d cells have zero counts over all genes", n_empty_cells)
    return {"n_genes_empty": n_empty_genes, "n_cells_empty": n_empty_cells}
