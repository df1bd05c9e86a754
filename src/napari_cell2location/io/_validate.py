"""Validation of the model's inputs, before any tensor is built.

Every check raises :class:`InputError` (a ``ValueError``) whose message names the offending
value and says what to do. Nothing in the user's objects is modified.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import sparse

logger = logging.getLogger(__name__)

#: below this many genes shared between spatial data and signatures the fit is refused
MIN_SHARED_GENES = 20
#: below this many shared genes a fit runs but is logged as unreliable
WARN_SHARED_GENES = 200


class InputError(ValueError):
    """Bad input to the model: the message says what is wrong and how to fix it."""


#: entries checked at a time by :func:`validate_counts` (bounds its temporaries to ~100 MB)
_CHECK_CHUNK = 1 << 24


def preview(values, n: int = 5) -> str:
    """The first ``n`` values and how many there are, for messages: ``['a', 'b', ...] (7 in all)``."""
    values = list(values)
    shown = ", ".join(repr(str(v)) for v in values[:n])
    return f"[{shown}{', ...' if len(values) > n else ''}] ({len(values)} in all)"


def duplicated_names(index: pd.Index) -> list:
    """Names that occur more than once in ``index`` (each listed once)."""
    return index[index.duplicated()].unique().tolist()


def count_matrix(adata, layer: str | None = None):
    """Return the raw count matrix of ``adata`` (``X`` or ``layers[layer]``), unmodified.

    Parameters
    ----------
    adata : anndata.AnnData
        Spatial (or single-cell) data, (n_obs, n_vars).
    layer : str, optional
        Key in ``adata.layers`` holding raw counts; ``None`` uses ``adata.X``.

    Returns
    -------
    numpy.ndarray or scipy.sparse.spmatrix
        The (n_obs, n_vars) matrix.
    """
    if layer is None:
        if adata.X is None:
            raise InputError("adata.X is empty; pass layer= naming the layer that holds raw counts.")
        return adata.X
    if layer not in adata.layers:
        raise InputError(f"layer {layer!r} is not in adata.layers; layers present: {list(adata.layers.keys())}.")
    return adata.layers[layer]


def validate_counts(X, obs_names=None, var_names=None, what: str = "adata.X") -> None:
    """Check that ``X`` holds raw counts: finite, non-negative integers.

    Parameters
    ----------
    X : numpy.ndarray or scipy.sparse.spmatrix
        (n_obs, n_vars) count matrix.
    obs_names, var_names : sequence of str, optional
        Names used to point at the first offending entry.
    what : str
        How to call the matrix in messages.
    """
    sparse_x = sparse.issparse(X)
    if sparse_x:
        if X.format not in ("csr", "csc", "coo"):
            X = X.tocsr()
        data = np.asarray(X.data)  # checked in place: no COO copy of a large matrix
    else:
        arr = np.asarray(X)
        if arr.ndim != 2:
            raise InputError(f"{what} must be 2-dimensional (n_obs, n_vars), got shape {arr.shape}.")
        data = arr.ravel()
    if not np.issubdtype(data.dtype, np.number):
        raise InputError(f"{what} has non-numeric dtype {data.dtype}; cell2location needs raw integer counts.")

    def where(i: int) -> str:
        if not sparse_x:
            r, c = np.unravel_index(i, np.shape(X))
        elif X.format == "coo":
            r, c = X.row[i], X.col[i]
        else:  # position i of data in a compressed matrix: find its row (csr) or column (csc)
            outer = int(np.searchsorted(X.indptr, i, side="right") - 1)
            inner = int(X.indices[i])
            r, c = (outer, inner) if X.format == "csr" else (inner, outer)
        obs = obs_names[r] if obs_names is not None else r
        var = var_names[c] if var_names is not None else c
        return f"(observation {obs!r}, gene {var!r})"

    floating = np.issubdtype(data.dtype, np.floating)
    for start in range(0, data.size, _CHECK_CHUNK):  # in chunks: temporaries stay small on large data
        chunk = data[start : start + _CHECK_CHUNK]
        bad = np.flatnonzero(~np.isfinite(chunk)) if floating else np.array([], int)
        if bad.size:
            n_bad = sum(int(np.count_nonzero(~np.isfinite(c))) for c in _chunks(data))
            raise InputError(
                f"{what} contains {n_bad} NaN or infinite values, first at {where(start + bad[0])}. "
                "Cell2location needs raw counts: fill or remove the missing values, or use the raw count matrix."
            )
        bad = np.flatnonzero(chunk < 0)
        if bad.size:
            n_bad = sum(int(np.count_nonzero(c < 0)) for c in _chunks(data))
            raise InputError(
                f"{what} contains {n_bad} negative values (e.g. {chunk[bad[0]]:g} at {where(start + bad[0])}); "
                "this looks like scaled or log-normalised data. Pass the raw UMI counts (e.g. layer='counts')."
            )
        if floating:
            frac = np.flatnonzero(chunk != np.round(chunk))
            if frac.size:
                n_frac = sum(int(np.count_nonzero(c != np.round(c))) for c in _chunks(data))
                raise InputError(
                    f"{what} contains {n_frac} non-integer values (e.g. {chunk[frac[0]]:g} at "
                    f"{where(start + frac[0])}); cell2location models raw UMI counts, not normalised data. "
                    "Pass the raw count matrix (adata.raw, or a layer such as layer='counts')."
                )


def _chunks(data: np.ndarray):
    for start in range(0, data.size, _CHECK_CHUNK):
        yield data[start : start + _CHECK_CHUNK]


def validate_signatures(cell_state_df) -> pd.DataFrame:
    """Check reference signatures (genes x cell types) and return them as float64.

    Parameters
    ----------
    cell_state_df : pandas.DataFrame
        (n_genes, n_cell_types) expression signature of each cell type.

    Returns
    -------
    pandas.DataFrame
        The same values as float64 (a copy).
    """
    if not isinstance(cell_state_df, pd.DataFrame):
        raise InputError(
            f"cell_state_df must be a pandas DataFrame (genes x cell types), got {type(cell_state_df).__name__}."
        )
    if cell_state_df.shape[0] == 0 or cell_state_df.shape[1] == 0:
        raise InputError(f"cell_state_df is empty (shape {cell_state_df.shape}); it needs genes x cell types.")
    dup = duplicated_names(cell_state_df.index.astype(str))
    if dup:
        raise InputError(f"cell_state_df has duplicate gene names {preview(dup)}; make its index unique.")
    dup = duplicated_names(cell_state_df.columns.astype(str))
    if dup:
        raise InputError(f"cell_state_df has duplicate cell type names {preview(dup)}; make its columns unique.")
    non_numeric = [c for c in cell_state_df.columns if not pd.api.types.is_numeric_dtype(cell_state_df[c])]
    if non_numeric:
        raise InputError(f"cell_state_df columns {preview(non_numeric)} are not numeric.")
    values = cell_state_df.to_numpy(dtype=np.float64)
    nan_cols = cell_state_df.columns[~np.isfinite(values).all(axis=0)].tolist()
    if nan_cols:
        raise InputError(
            f"cell_state_df has NaN or infinite values in cell types {preview(nan_cols)}; "
            "re-export the reference signatures or drop those cell types."
        )
    neg_cols = cell_state_df.columns[(values < 0).any(axis=0)].tolist()
    if neg_cols:
        raise InputError(
            f"cell_state_df has negative values in cell types {preview(neg_cols)}; signatures must be "
            "non-negative expression levels (counts per cell), not scaled or log data."
        )
    zero_cols = cell_state_df.columns[(values == 0).all(axis=0)].tolist()
    if zero_cols:
        raise InputError(
            f"cell_state_df has all-zero signatures for cell types {preview(zero_cols)}; drop those cell types."
        )
    return pd.DataFrame(values, index=cell_state_df.index.astype(str), columns=cell_state_df.columns.astype(str))


@dataclass
class PreparedInputs:
    """Validated, aligned inputs of one fit.

    Attributes
    ----------
    X : numpy.ndarray or scipy.sparse.csr_matrix
        (n_obs, n_vars) float32 counts of the genes kept, in ``var_names`` order.
    obs_names : pandas.Index
        Spot names (all spots of the input, in order).
    var_names : pandas.Index
        Genes kept: shared by data and signatures, not all-zero in the data.
    var_idx : numpy.ndarray
        Positions of ``var_names`` in the input ``adata.var_names``.
    batch_index : numpy.ndarray
        (n_obs,) int64 batch code of each spot.
    batch_names : list of str
        Batch category of each code.
    cell_state : numpy.ndarray
        (n_vars, n_factors) float32 signatures of the genes kept.
    factor_names : list of str
        Cell type names.
    report : dict
        Counts of genes at each step (for the log and the GUI).
    """

    X: object
    obs_names: pd.Index
    var_names: pd.Index
    var_idx: np.ndarray
    batch_index: np.ndarray
    batch_names: list
    cell_state: np.ndarray
    factor_names: list
    report: dict = field(default_factory=dict)


def batch_codes(adata, batch_key: str | None, categories: list | None = None) -> tuple[np.ndarray, list]:
    """Integer batch code per observation and the batch names, checking ``batch_key``.

    Parameters
    ----------
    adata : anndata.AnnData
        Data with ``obs``.
    batch_key : str or None
        Column of ``adata.obs``; ``None`` puts every observation in one batch.
    categories : list of str, optional
        The batch names to code by (e.g. a whole section's, for a part of it that lacks some);
        default: the values present, sorted.

    Returns
    -------
    codes : numpy.ndarray
        (n_obs,) int64.
    names : list of str
        Category of each code.
    """
    if batch_key is None:
        return np.zeros(adata.n_obs, dtype=np.int64), ["0"]
    if batch_key not in adata.obs.columns:
        raise InputError(
            f"batch_key {batch_key!r} is not a column of adata.obs; columns present: {list(adata.obs.columns)}."
        )
    col = adata.obs[batch_key]
    if col.isna().any():
        raise InputError(
            f"adata.obs[{batch_key!r}] has {int(col.isna().sum())} missing values; give every observation a batch."
        )
    cat = pd.Categorical(col.astype(str), categories=None if categories is None else [str(c) for c in categories])
    if (cat.codes < 0).any():
        raise InputError(f"adata.obs[{batch_key!r}] has values outside the batches given ({preview(categories, 3)})")
    return np.asarray(cat.codes, dtype=np.int64), [str(c) for c in cat.categories]


def _check_table(adata) -> tuple[pd.Index, pd.Index]:
    """Spot and gene names of a non-empty AnnData, both unique (as str)."""
    try:
        import anndata
    except ImportError:  # pragma: no cover - anndata is a hard dependency
        anndata = None
    if anndata is not None and not isinstance(adata, anndata.AnnData):
        raise InputError(f"adata must be an AnnData with spots as rows, got {type(adata).__name__}.")
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise InputError(f"adata is empty (shape {adata.shape}).")
    obs_names = pd.Index(adata.obs_names.astype(str))
    var_names = pd.Index(adata.var_names.astype(str))
    dup = duplicated_names(obs_names)
    if dup:
        raise InputError(f"adata has duplicate spot names {preview(dup)}; call adata.obs_names_make_unique().")
    dup = duplicated_names(var_names)
    if dup:
        raise InputError(f"adata has duplicate gene names {preview(dup)}; call adata.var_names_make_unique().")
    return obs_names, var_names


def _shared_genes(var_names: pd.Index, sig: pd.DataFrame, min_shared_genes: int) -> np.ndarray:
    """Positions in ``var_names`` of the genes the signatures also have; refused below ``min_shared_genes``."""
    var_idx = np.flatnonzero(var_names.isin(sig.index))
    if len(var_idx) < min_shared_genes:
        raise InputError(
            f"only {len(var_idx)} genes are shared between the spatial data ({len(var_names)} genes, e.g. "
            f"{preview(var_names, 3)}) and the signatures ({sig.shape[0]} genes, e.g. {preview(sig.index, 3)}); "
            f"at least {min_shared_genes} are needed. Check that both use the same gene identifiers "
            "(symbols vs Ensembl IDs) and the same species."
        )
    return var_idx


def _shared_counts(adata, layer: str | None, var_idx: np.ndarray, obs_names: pd.Index, var_names: pd.Index):
    """(n_obs, len(var_idx)) float32 counts of the shared genes (CSR when sparse), checked to be raw counts."""
    X = count_matrix(adata, layer)
    if len(var_idx) < adata.n_vars:  # a column subset copies the matrix: only when genes are dropped
        X = X[:, var_idx]
    what = "adata.X" if layer is None else f"adata.layers[{layer!r}]"
    validate_counts(X, obs_names, var_names[var_idx], what=what)
    if sparse.issparse(X):
        return sparse.csr_matrix(X, dtype=np.float32)
    return np.asarray(X, dtype=np.float32)


def _drop_zero_genes(X, var_idx: np.ndarray, var_names: pd.Index, min_shared_genes: int):
    """``X`` and ``var_idx`` without the genes that have no counts in any spot, and how many were dropped."""
    totals = np.asarray(X.sum(axis=0)).ravel()
    nonzero_genes = totals > 0
    n_zero = int((~nonzero_genes).sum())
    if n_zero:
        logger.info(
            "dropping %d genes with zero counts in every spot: %s", n_zero, preview(var_names[var_idx][~nonzero_genes])
        )
        var_idx = var_idx[nonzero_genes]
        X = X[:, nonzero_genes]
    if len(var_idx) < min_shared_genes:
        raise InputError(
            f"only {len(var_idx)} shared genes have any counts in the spatial data; at least {min_shared_genes} "
            "are needed. Check that the count matrix is not empty."
        )
    return X, var_idx, n_zero


def _count_empty_spots(X) -> int:
    """Spots with zero counts over the genes kept (warned about; all of them is refused)."""
    spot_totals = np.asarray(X.sum(axis=1)).ravel()
    n_empty = int((spot_totals == 0).sum())
    if n_empty == X.shape[0]:
        raise InputError("every spot has zero counts over the shared genes; check the count matrix.")
    if n_empty:
        logger.warning("%d spots have zero counts over the shared genes", n_empty)
    return n_empty


def _signatures_of(sig: pd.DataFrame, kept: pd.Index) -> np.ndarray:
    """(len(kept), n_factors) float32 signatures of the genes kept; every cell type must express some."""
    cell_state = sig.loc[kept].to_numpy(dtype=np.float32)
    empty_types = sig.columns[cell_state.sum(axis=0) == 0].tolist()
    if empty_types:
        raise InputError(
            f"cell types {preview(empty_types)} have zero expression over the {len(kept)} shared genes; "
            "drop them from the signatures or use a reference with more genes in common."
        )
    return cell_state


def prepare_inputs(
    adata,
    cell_state_df: pd.DataFrame,
    layer: str | None = None,
    batch_key: str | None = None,
    min_shared_genes: int = MIN_SHARED_GENES,
    genes: list | None = None,
    batch_names: list | None = None,
) -> PreparedInputs:
    """Validate spatial counts and signatures, intersect and order their genes.

    Genes present in both are kept in the spatial data's order; genes with zero counts in every
    spot are dropped. What was kept and dropped is logged and returned in ``report``.

    Parameters
    ----------
    adata : anndata.AnnData
        Spatial counts, (n_obs, n_vars).
    cell_state_df : pandas.DataFrame
        Signatures, (n_genes, n_factors).
    layer : str, optional
        Layer with raw counts; ``None`` uses ``adata.X``.
    batch_key : str, optional
        Column of ``adata.obs`` with the batch (section / sample) of each spot.
    min_shared_genes : int
        Refuse to fit with fewer usable genes than this.
    genes, batch_names : list of str, optional
        Use exactly these genes (in this order; none is dropped for having no counts here) and code
        the batches by these names: a shard of a data-parallel fit takes the whole section's.

    Returns
    -------
    PreparedInputs
    """
    obs_names, var_names = _check_table(adata)
    sig = validate_signatures(cell_state_df)
    codes, names = batch_codes(adata, batch_key, batch_names)

    var_idx = _shared_genes(var_names, sig, min_shared_genes)
    n_shared = len(var_idx)
    if genes is not None:
        var_idx = var_names.get_indexer(pd.Index([str(g) for g in genes]))
        if (var_idx < 0).any() or not pd.Index(genes).isin(sig.index).all():
            raise InputError("the genes given are not all in both the spatial data and the signatures")
    X = _shared_counts(adata, layer, var_idx, obs_names, var_names)
    n_zero = 0
    if genes is None:
        X, var_idx, n_zero = _drop_zero_genes(X, var_idx, var_names, min_shared_genes)
    kept = var_names[var_idx]
    logger.info(
        "genes: %d in spatial data, %d in signatures, %d shared, %d all-zero dropped, %d used",
        adata.n_vars,
        sig.shape[0],
        n_shared,
        n_zero,
        len(kept),
    )
    if len(kept) < WARN_SHARED_GENES:
        logger.warning("only %d genes are used; abundance estimates from so few genes are unreliable", len(kept))
    n_empty = _count_empty_spots(X)
    cell_state = _signatures_of(sig, kept)
    report = {
        "n_obs": adata.n_obs,
        "n_genes_data": adata.n_vars,
        "n_genes_signatures": sig.shape[0],
        "n_genes_shared": n_shared,
        "n_genes_zero_dropped": n_zero,
        "n_genes_used": len(kept),
        "n_obs_empty": n_empty,
    }
    return PreparedInputs(
        X=X,
        obs_names=obs_names,
        var_names=kept,
        var_idx=var_idx,
        batch_index=codes,
        batch_names=names,
        cell_state=cell_state,
        factor_names=[str(c) for c in sig.columns],
        report=report,
    )
