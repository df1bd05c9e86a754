"""Reading reference signatures and writing results (spatial data is read in :mod:`._spatial`).

Nothing here imports Qt or napari. ``anndata`` and ``spatialdata`` are imported inside the
functions, so importing this module stays cheap.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ._files import atomic_output, read_h5ad, reading, remove_path, swap_in, temporary_beside
from ._validate import InputError

if TYPE_CHECKING:  # pragma: no cover
    import anndata
    import spatialdata

logger = logging.getLogger(__name__)

#: varm key / column prefix of reference signatures written by the original cell2location
REFERENCE_VARM_KEY = "means_per_cluster_mu_fg"
_REFERENCE_PREFIX = f"{REFERENCE_VARM_KEY}_"

_TABLE_SUFFIXES = {".csv": ",", ".tsv": "\t", ".txt": "\t"}
_COMPRESSION_SUFFIXES = {".gz", ".bz2", ".zip", ".xz", ".zst"}


def _existing_path(path: str | os.PathLike, what: str) -> Path:
    """Return ``path`` as a :class:`~pathlib.Path`, raising :class:`InputError` if nothing is there."""
    path = Path(path).expanduser()
    if not path.exists():
        raise InputError(f"{what} path {str(path)!r} does not exist.")
    return path


def _format_suffix(path: Path) -> str:
    """Return the lower-case format suffix of ``path``, looking through a compression suffix.

    ``sig.csv.gz`` gives ``'.csv'``; ``data.zarr/`` gives ``'.zarr'``.
    """
    suffixes = [s.lower() for s in path.suffixes]
    if len(suffixes) >= 2 and suffixes[-1] in _COMPRESSION_SUFFIXES:
        return suffixes[-2]
    return suffixes[-1] if suffixes else ""


# --------------------------------------------------------------------------------------------
# signatures
# --------------------------------------------------------------------------------------------


def read_signatures(path: str | os.PathLike) -> pd.DataFrame:
    """Read reference expression signatures (genes x cell types).

    Parameters
    ----------
    path : str or os.PathLike
        One of

        - a ``.csv`` / ``.tsv`` / ``.txt`` table (optionally compressed, e.g. ``.csv.gz``) whose
          first column holds gene names and whose other columns hold one cell type each
          (rows are genes);
        - an ``.h5ad`` file written by cell2location's reference model: signatures in
          ``varm['means_per_cluster_mu_fg']`` (a DataFrame with columns
          ``'means_per_cluster_mu_fg_{cell_type}'``, or an array whose column names are
          ``uns['mod']['factor_names']``), or in ``var`` columns with that prefix.

    Returns
    -------
    pandas.DataFrame
        (n_genes, n_cell_types) float64 signatures, indexed by gene name (str), columns are the
        cell-type names (str) without any prefix.

    Raises
    ------
    InputError
        If the path does not exist, has an unknown extension, is broken (the message says how) or holds
        no signatures.
    """
    path = _existing_path(path, "Signatures")
    suffix = _format_suffix(path)
    if path.is_dir():
        raise InputError(
            f"Signatures path {str(path)!r} is a directory; expected a .csv/.tsv table (genes x cell types) "
            f"or a cell2location reference .h5ad."
        )
    if suffix in _TABLE_SUFFIXES:
        df = _read_signature_table(path, sep=_TABLE_SUFFIXES[suffix])
    elif suffix == ".h5ad":
        df = _read_signature_h5ad(path)
    else:
        raise InputError(
            f"Cannot read signatures from {str(path)!r}: unknown extension {suffix or '(none)'!r}. "
            f"Expected one of .csv, .tsv, .txt (genes x cell types, gene names in the first column) "
            f"or .h5ad (cell2location reference with varm[{REFERENCE_VARM_KEY!r}])."
        )
    df.index = df.index.astype(str)
    df.columns = df.columns.astype(str)
    df.index.name = None
    df.columns.name = None
    if df.shape[0] < df.shape[1]:
        logger.warning(
            "Signatures from %s have fewer rows (%d) than columns (%d); rows must be genes and columns "
            "cell types. Transpose the file if it is the other way round.",
            path,
            df.shape[0],
            df.shape[1],
        )
    logger.info("Read signatures of %d genes x %d cell types from %s", df.shape[0], df.shape[1], path)
    return df


def _to_float_frame(df: pd.DataFrame, source: str) -> pd.DataFrame:
    """Coerce every column of ``df`` to float64, naming the columns that are not numeric."""
    if df.shape[0] == 0 or df.shape[1] == 0:
        raise InputError(f"Signatures in {source} are empty (shape {df.shape}); expected genes x cell types.")
    bad = [str(c) for c in df.columns if not pd.api.types.is_numeric_dtype(df[c])]
    if bad:
        shown = ", ".join(repr(c) for c in bad[:5])
        raise InputError(
            f"Signatures in {source} have non-numeric column(s) {shown}{' ...' if len(bad) > 5 else ''}. "
            f"Expected gene names in the first column and one numeric column per cell type."
        )
    df = df.astype(np.float64)
    empty = df.isna().to_numpy()
    if empty.any():
        row, col = (int(v[0]) for v in np.nonzero(empty))
        raise InputError(
            f"Signatures in {source} have {int(empty.sum())} empty value(s), the first for gene "
            f"{str(df.index[row])!r}, cell type {str(df.columns[col])!r}. A table cut short?"
        )
    return df


def _read_signature_table(path: Path, sep: str) -> pd.DataFrame:
    with reading(path, "signatures table (gene names in the first column, one numeric column per cell type)"):
        df = pd.read_csv(path, sep=sep, index_col=0)
    return _to_float_frame(df, repr(str(path)))


def _strip_prefix(names, prefix: str) -> list[str]:
    return [n[len(prefix) :] if n.startswith(prefix) else n for n in map(str, names)]


def _order_by_factor_names(df: pd.DataFrame, factor_names) -> pd.DataFrame:
    """Put columns in ``factor_names`` order when those names match the columns exactly."""
    if factor_names is None:
        return df
    names = [str(n) for n in np.asarray(factor_names).ravel()]
    if sorted(names) == sorted(df.columns) and len(set(names)) == len(names):
        return df[names]
    return df


def _read_signature_h5ad(path: Path) -> pd.DataFrame:
    adata = read_h5ad(path, "cell2location reference .h5ad")
    source = repr(str(path))
    mod = adata.uns.get("mod", {})
    factor_names = mod.get("factor_names") if isinstance(mod, Mapping) else None

    if REFERENCE_VARM_KEY in adata.varm:
        value = adata.varm[REFERENCE_VARM_KEY]
        if isinstance(value, pd.DataFrame):
            df = value.copy()
            df.columns = _strip_prefix(df.columns, _REFERENCE_PREFIX)
        else:
            matrix = np.asarray(value.toarray() if hasattr(value, "toarray") else value)
            if factor_names is None:
                raise InputError(
                    f"{source} holds varm[{REFERENCE_VARM_KEY!r}] as an array but no uns['mod']['factor_names'] "
                    f"to name its columns (cell types)."
                )
            names = [str(n) for n in np.asarray(factor_names).ravel()]
            if len(names) != matrix.shape[1]:
                raise InputError(
                    f"{source}: varm[{REFERENCE_VARM_KEY!r}] has {matrix.shape[1]} columns but "
                    f"uns['mod']['factor_names'] has {len(names)} names."
                )
            df = pd.DataFrame(matrix, columns=_strip_prefix(names, _REFERENCE_PREFIX))
        df.index = adata.var_names
        df = _order_by_factor_names(df, factor_names)
        return _to_float_frame(df, f"{source} varm[{REFERENCE_VARM_KEY!r}]")

    var_columns = [c for c in adata.var.columns if str(c).startswith(_REFERENCE_PREFIX)]
    if var_columns:
        df = adata.var[var_columns].copy()
        df.columns = _strip_prefix(df.columns, _REFERENCE_PREFIX)
        df = _order_by_factor_names(df, factor_names)
        return _to_float_frame(df, f"{source} var[{_REFERENCE_PREFIX}*]")

    labels = [str(c) for c in adata.obs.columns if isinstance(adata.obs[c].dtype, pd.CategoricalDtype)]
    if labels and "spatial" not in adata.obsm:
        raise InputError(
            f"{source} is a single-cell table ({adata.n_obs} cells x {adata.n_vars} genes, labels such as "
            f"obs[{labels[0]!r}]), not signatures: make signatures from it in the Reference tab (or "
            "reference.estimate_signatures / the CLI's reference command), then use those."
        )
    raise InputError(
        f"{source} holds no reference signatures: expected varm[{REFERENCE_VARM_KEY!r}] (columns "
        f"'{_REFERENCE_PREFIX}{{cell_type}}', as written by cell2location's RegressionModel.export_posterior) "
        f"or var columns starting with {_REFERENCE_PREFIX!r}. varm holds {list(adata.varm.keys())}. "
        f"For a plain genes x cell types table, save it as .csv."
    )


# --------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------


def _h5ad_safe(value: Any, where: str = "uns") -> Any:
    """Return ``value`` converted to types that AnnData can write to h5ad and zarr.

    Dicts are converted recursively (keys become str); tuples and lists become numpy arrays
    (str arrays when not all numeric); object arrays become str arrays; dates and paths become
    ISO / plain strings; torch tensors become numpy arrays. ``None``, numbers, strings, numpy
    arrays, DataFrames and sparse matrices are kept as they are.
    """
    if value is None or isinstance(value, (str, bool, int, float, np.generic, pd.DataFrame)):
        return value
    if isinstance(value, Mapping):
        return {str(k): _h5ad_safe(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # torch.Tensor, without importing torch
        return value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            return np.asarray([("" if v is None else str(v)) for v in value.ravel()], dtype=str).reshape(value.shape)
        return value
    if isinstance(value, (list, tuple)):
        if len(value) == 0:
            return np.array([], dtype=str)
        if all(isinstance(v, (bool, int, float, np.number, np.bool_)) for v in value):
            return np.asarray(value)
        if all(isinstance(v, (np.ndarray, list, tuple)) for v in value):
            try:
                arr = np.asarray(value)
            except ValueError:
                arr = None
            if arr is not None and arr.dtype != object:
                return arr
            return {str(i): _h5ad_safe(v, f"{where}[{i}]") for i, v in enumerate(value)}
        if all(isinstance(v, Mapping) for v in value):
            return {str(i): _h5ad_safe(v, f"{where}[{i}]") for i, v in enumerate(value)}
        return np.asarray([("" if v is None else str(v)) for v in value], dtype=str)
    if hasattr(value, "tocsr") or isinstance(value, pd.Series):
        return value if not isinstance(value, pd.Series) else value.to_numpy()
    logger.warning("%s: %s cannot be written to h5ad/zarr; storing its str() instead.", where, type(value).__name__)
    return str(value)


@contextmanager
def _safe_uns(adata: anndata.AnnData):
    """Temporarily replace ``adata.uns`` contents by writable equivalents; restore them afterwards."""
    original = dict(adata.uns)
    # spatialdata's own metadata is written by spatialdata as it is; leave it alone
    safe = {k: v if k == "spatialdata_attrs" else _h5ad_safe(v, f"uns[{k!r}]") for k, v in original.items()}
    try:
        for key, value in safe.items():
            adata.uns[key] = value
        yield adata
    finally:
        for key in list(adata.uns.keys()):
            if key not in original:
                del adata.uns[key]
        for key, value in original.items():
            adata.uns[key] = value


def _table_key_of(sdata: spatialdata.SpatialData, adata: anndata.AnnData, table_key: str | None) -> str:
    if table_key is not None:
        return table_key
    for key, table in sdata.tables.items():
        if table is adata:
            return key
    if "table" in sdata.tables or not sdata.tables:
        return "table"
    if len(sdata.tables) == 1:
        return next(iter(sdata.tables))
    raise InputError(
        f"The SpatialData has several tables {list(sdata.tables.keys())} and adata is none of them; "
        f"pass table_key= to say which one to replace."
    )


def _same_path(a: Path, b: str | os.PathLike | None) -> bool:
    if b is None:
        return False
    try:
        return a.resolve() == Path(b).resolve()
    except OSError:  # pragma: no cover - unresolvable paths are simply not the same
        return False


def write_results(
    adata: anndata.AnnData,
    out: str | os.PathLike,
    sdata: spatialdata.SpatialData | None = None,
    table_key: str | None = None,
) -> Path:
    """Write an AnnData holding cell2location results, alone or inside its SpatialData.

    Parameters
    ----------
    adata : anndata.AnnData
        The (n_obs, n_vars) table with results in ``obsm`` and ``uns['mod']``. Values in
        ``uns`` that h5py/zarr cannot store (dates, tuples, lists of mixed objects, object
        arrays, tensors) are written as equivalent strings/arrays; ``adata`` itself is left
        unchanged.
    out : str or os.PathLike
        Destination. ``*.h5ad``: ``adata.write_h5ad``. ``*.zarr``: with ``sdata``, the whole
        SpatialData with its table replaced by ``adata`` (``SpatialData.write``); without it, an
        AnnData zarr store. Parent folders are created; an existing ``out`` is replaced once the
        new one is complete.
    sdata : spatialdata.SpatialData, optional
        Dataset ``adata`` belongs to. Its table (``table_key``) is set to ``adata``. Ignored for
        ``.h5ad`` output. When ``out`` is the store ``sdata`` was read from, only the table is
        rewritten there.
    table_key : str, optional
        Table of ``sdata`` to replace. ``None``: the table that is ``adata``, else ``'table'``,
        else the only table.

    Returns
    -------
    pathlib.Path
        The path written.

    Raises
    ------
    InputError
        If ``out`` has an unknown extension. The file (or store) is written under a temporary name
        beside ``out`` and renamed over it at the end: a failed or interrupted write leaves an existing
        ``out`` as it was.
    """
    out = Path(out).expanduser()
    suffix = out.suffix.lower()
    if suffix not in (".h5ad", ".zarr"):
        raise InputError(f"Cannot write results to {str(out)!r}: the path must end with .h5ad or .zarr.")
    if suffix == ".h5ad" or sdata is None:
        if sdata is not None:
            logger.info("Writing only the table to %s; images and shapes need a .zarr destination.", out)
        with _safe_uns(adata), atomic_output(out) as tmp:
            adata.write_h5ad(tmp) if suffix == ".h5ad" else adata.write_zarr(tmp)
        logger.info("Wrote results %s to %s", adata.shape, out)
        return out

    key = _table_key_of(sdata, adata, table_key)
    previous = sdata.tables[key] if key in sdata.tables else None
    if previous is not adata:
        attrs_key = "spatialdata_attrs"
        if previous is not None and attrs_key not in adata.uns and attrs_key in previous.uns:
            adata.uns[attrs_key] = previous.uns[attrs_key]
        sdata.tables[key] = adata
    with _safe_uns(adata):
        if _same_path(out, sdata.path) and f"tables/{key}" in sdata.elements_paths_on_disk():
            _replace_table_in_store(sdata, key, out)
            logger.info("Rewrote table %r in place in %s", key, out)
        else:
            with atomic_output(out) as tmp:
                sdata.write(tmp, overwrite=True)
            sdata.path = out  # written to the temporary name, now renamed
            logger.info("Wrote SpatialData with results in table %r to %s", key, out)
    return out


def _replace_table_in_store(sdata: spatialdata.SpatialData, key: str, store: Path) -> None:
    """Rewrite one table of the store ``sdata`` was read from without ever removing the old one first:
    the new table is written as a SpatialData of its own beside the store, then its folder takes the old
    one's place (images and shapes, possibly large, are not copied)."""
    import spatialdata

    tmp = temporary_beside(store, "table")
    try:
        spatialdata.SpatialData(tables={key: sdata.tables[key]}).write(tmp)
        swap_in(tmp / "tables" / key, store / "tables" / key)
    finally:
        remove_path(tmp)
    if sdata.has_consolidated_metadata():
        sdata.write_consolidated_metadata()
