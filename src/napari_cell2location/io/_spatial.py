"""Reading spatial counts: which format a path holds, and the one entry point :func:`read_spatial`.

Formats: an AnnData ``.h5ad`` file, a SpatialData (or AnnData) ``.zarr`` store, a Space Ranger
``outs/`` folder and a Visium HD one (its square bins of one size). Nothing here imports Qt or napari;
``anndata``, ``spatialdata`` and ``h5py`` load inside the functions that need them.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from ._files import check_hdf5, read_h5ad, reading
from ._read import _existing_path, _format_suffix
from ._spaceranger import read_spaceranger, spaceranger_lacks, spaceranger_root
from ._validate import InputError
from ._visium_hd import DEFAULT_BIN_SIZE, is_visium_hd, read_visium_hd

if TYPE_CHECKING:  # pragma: no cover
    import anndata
    import spatialdata

logger = logging.getLogger(__name__)

SpatialFormat = Literal["h5ad", "zarr", "spaceranger", "visium_hd"]
_KINDS = {"h5ad": "an .h5ad file", "zarr": "a .zarr store", "spaceranger": "a standard Visium Space Ranger folder"}


def _zarr_encoding_type(path: Path) -> str | None:
    """Return the root group's ``encoding-type`` attribute of a zarr store (``'anndata'`` for AnnData)."""
    import zarr

    with reading(path, "zarr store"):
        group = zarr.open_group(str(path), mode="r")
        return group.attrs.get("encoding-type")


def _looks_like_zarr(path: Path) -> bool:
    return any((path / name).exists() for name in ("zarr.json", ".zgroup", ".zattrs"))


def _h5ad_has_spots(path: Path) -> bool:
    """Whether an .h5ad holds spot positions (``obsm/spatial``); a single-cell reference does not. A file
    that is not readable HDF5 counts as holding them, so that reading it says what is wrong with it."""
    import h5py

    try:
        check_hdf5(path, "an .h5ad")
        with h5py.File(path, "r") as f:
            return "obsm" in f and "spatial" in f["obsm"]
    except (InputError, OSError):
        return True


def spatial_format(path: str | os.PathLike, *, require_spots: bool = False) -> SpatialFormat | None:
    """Which spatial format ``path`` holds, from its name and a look at its contents (nothing is read).

    Parameters
    ----------
    path : str or os.PathLike
        A file or folder.
    require_spots : bool
        Say ``'h5ad'`` only for an ``.h5ad`` holding ``obsm['spatial']``, so a single-cell reference is
        not taken for spatial data (what napari's reader hook needs).

    Returns
    -------
    {'h5ad', 'zarr', 'spaceranger', 'visium_hd'} or None
        ``'zarr'`` for a ``.zarr`` folder or any folder with zarr metadata; ``'visium_hd'`` for a Visium HD
        output (its ``outs/`` or run folder, ``binned_outputs/`` or one ``square_NNNum/`` bin folder);
        ``'spaceranger'`` for a folder (or the parent of an ``outs/`` folder) with ``spatial/`` and a count
        matrix; None otherwise.
    """
    path = Path(path).expanduser()
    suffix = _format_suffix(path)
    if suffix == ".h5ad" and path.is_file():
        return "h5ad" if not require_spots or _h5ad_has_spots(path) else None
    if path.is_dir() and (suffix == ".zarr" or _looks_like_zarr(path)):
        return "zarr"
    if is_visium_hd(path):
        return "visium_hd"
    if spaceranger_root(path) is not None:
        return "spaceranger"
    return None


#: a table of Visium HD bins as spatialdata-io names it (``square_008um``: the bins of 8 µm)
_BIN_TABLE = re.compile(r"square_(\d+)um$")


def bin_tables(sdata: spatialdata.SpatialData) -> dict[int, str]:
    """The tables of Visium HD bins in a SpatialData read by spatialdata-io, by bin size in µm (``{8:
    'square_008um', ...}``); empty for other data."""
    found = {}
    for key in sdata.tables:
        match = _BIN_TABLE.search(str(key))
        if match:
            found[int(match.group(1))] = key
    return dict(sorted(found.items()))


def table_bin_size(sdata: spatialdata.SpatialData, table) -> int | None:
    """The bin size (µm) of a table of ``sdata`` (its key, or the AnnData itself) when it holds Visium HD bins
    (:func:`bin_tables`), else None."""
    for size, key in bin_tables(sdata).items():
        if (key == table) if isinstance(table, str) else (sdata.tables[key] is table):
            return size
    return None


def pick_table(
    sdata: spatialdata.SpatialData, table_key: str | None = None, source=None, bin_size: int | None = None
) -> str:
    """Return the name of the table to use from ``sdata``.

    Parameters
    ----------
    sdata : spatialdata.SpatialData
        The spatial dataset.
    table_key : str, optional
        Name of the table. ``None`` picks ``'table'`` if present, else the only table, else for Visium HD
        (one table per bin size, :func:`bin_tables`) that of ``bin_size``.
    source : str or os.PathLike, optional
        Where ``sdata`` was read from (named in messages).
    bin_size : int, optional
        Visium HD: the bin size in µm whose table to use (default 8, as for a Space Ranger folder, else the
        smallest there is).

    Returns
    -------
    str
        A key of ``sdata.tables``.

    Raises
    ------
    InputError
        If ``table_key`` is not a table, no table can be chosen unambiguously, or there is no table of
        ``bin_size`` (the message lists the sizes there are).
    """
    keys = list(sdata.tables.keys())
    where = f" ({str(source)!r})" if source is not None else ""
    bins = bin_tables(sdata)
    if bin_size is not None and table_key is None:
        if not bins:
            raise InputError(
                f"a bin size ({bin_size}) is for Visium HD bins; this SpatialData{where} has no table of bins "
                f"(square_NNNum), only {keys}: leave it out."
            )
        if int(bin_size) not in bins:
            sizes = ", ".join(f"{b} µm" for b in bins)
            raise InputError(f"This SpatialData{where} has no bins of {bin_size} µm; it has bins of {sizes}.")
        return bins[int(bin_size)]
    if table_key is not None:
        if table_key not in sdata.tables:
            raise InputError(
                f"table_key {table_key!r} is not a table of this SpatialData{where}; tables present: {keys}."
            )
        return table_key
    if not keys:
        raise InputError(f"This SpatialData{where} has no table (AnnData of counts); nothing to fit.")
    if "table" in sdata.tables:
        return "table"
    if len(keys) == 1:
        return keys[0]
    if bins:
        size = DEFAULT_BIN_SIZE if DEFAULT_BIN_SIZE in bins else next(iter(bins))
        logger.info("Visium HD bins of %s µm: using those of %d µm (choose with bin_size)", list(bins), size)
        return bins[size]
    raise InputError(f"This SpatialData{where} has several tables {keys}; pass table_key= to choose one.")


def _read_zarr(
    path: Path, table_key: str | None, bin_size: int | None = None
) -> tuple[anndata.AnnData, spatialdata.SpatialData | None]:
    """An AnnData zarr store as ``(adata, None)``, a SpatialData one as ``(its table, sdata)``."""
    if _zarr_encoding_type(path) == "anndata":
        if bin_size is not None:
            raise InputError(f"a bin size ({bin_size}) is for Visium HD bins; {str(path)!r} is an AnnData store.")
        import anndata

        with reading(path, "AnnData zarr store"):
            adata = anndata.read_zarr(path)
        logger.info("Read AnnData %s from zarr store %s", adata.shape, path)
        return adata, None

    import spatialdata

    with reading(path, "SpatialData zarr store"):
        sdata = spatialdata.read_zarr(path)
    key = pick_table(sdata, table_key, source=path, bin_size=bin_size)
    adata = sdata.tables[key]
    logger.info("Read SpatialData from %s; using table %r %s", path, key, adata.shape)
    return adata, sdata


def read_spatial(
    path: str | os.PathLike, table_key: str | None = None, bin_size: int | None = None
) -> tuple[anndata.AnnData, spatialdata.SpatialData | None]:
    """Read spatial counts from an ``.h5ad`` file, a ``.zarr`` store, a Space Ranger or Visium HD folder.

    Parameters
    ----------
    path : str or os.PathLike
        An AnnData ``.h5ad`` file, a SpatialData ``.zarr`` directory, an AnnData ``.zarr``
        directory (as written by :func:`write_results` without ``sdata``), or a Space Ranger
        ``outs/`` folder or its parent (read by :func:`read_spaceranger`), or a Visium HD ``outs/`` folder,
        its ``binned_outputs/`` or one bin's folder (read by :func:`read_visium_hd`).
    table_key : str, optional
        For SpatialData: the table holding the counts. ``None`` picks ``'table'`` if present,
        else the only table, else the bins of ``bin_size`` (:func:`pick_table`).
    bin_size : int, optional
        For Visium HD: the bin size in µm (2, 8, 16, ...); default 8, or the bin folder's own. A SpatialData
        of Visium HD bins (spatialdata-io's ``visium_hd``: one table per size, ``square_008um``, ...) takes
        it too. Given for another format, it is an error.

    Returns
    -------
    adata : anndata.AnnData
        The (n_obs, n_vars) counts table. For SpatialData it is the table object itself, so
        results written into it land in ``sdata``. For Space Ranger it is in the scanpy Visium
        layout (``obsm['spatial']``, ``uns['spatial'][library]``); Visium HD bins too, with the bin size in
        the library's scale factors.
    sdata : spatialdata.SpatialData or None
        The whole dataset (images, shapes, tables), or ``None`` for AnnData and Space Ranger inputs.

    Raises
    ------
    InputError
        If the path does not exist, its format is unknown, a file is broken (not HDF5, cut short, no
        counts: the message names the file and says what is wrong) (the message says what a folder that looks
        like Space Ranger output lacks), a file in it is unreadable, no table can be chosen, or a Visium HD
        folder lacks the bin size asked for (the message lists those it has).
    """
    path = _existing_path(path, "Spatial data")
    fmt = spatial_format(path)
    if fmt == "visium_hd":
        return read_visium_hd(path, bin_size), None
    if bin_size is not None and fmt not in (None, "zarr"):
        raise InputError(
            f"a bin size ({bin_size}) is for Visium HD output (outs/binned_outputs/square_NNNum/); "
            f"{str(path)!r} is {_KINDS[fmt]}: leave it out."
        )
    if fmt == "h5ad":
        adata = read_h5ad(path, "spatial counts .h5ad")
        logger.info("Read AnnData %s from %s", adata.shape, path)
        return adata, None
    if fmt == "zarr":
        return _read_zarr(path, table_key, bin_size)
    if fmt == "spaceranger":
        return read_spaceranger(path), None
    lacks = spaceranger_lacks(path)
    hint = f" It looks like a Space Ranger output folder but it lacks {lacks}." if lacks else ""
    raise InputError(
        f"Cannot read spatial data from {str(path)!r}: unknown format. Expected an AnnData .h5ad file, "
        f"a SpatialData (or AnnData) .zarr directory or a Space Ranger (or Visium HD) outs/ folder.{hint}"
    )
