"""Reading a Space Ranger Visium HD ``outs/`` folder: the square bins of one bin size, in the scanpy Visium
layout that :func:`~napari_cell2location.io.read_spaceranger` returns.

The layout (Space Ranger 3 and later; spatialdata-io's ``visium_hd`` reader names the same files)::

    outs/
      binned_outputs/
        square_002um/  square_008um/  square_016um/     one folder per bin size (custom sizes: square_NNNum/)
          filtered_feature_bc_matrix.h5                 counts, 10x HDF5 as in standard Visium (in-tissue bins)
          spatial/
            tissue_positions.parquet                    every bin of the slide: barcode, in_tissue, array_row,
                                                        array_col, pxl_row_in_fullres, pxl_col_in_fullres
            scalefactors_json.json                      tissue_hires_scalef, tissue_lowres_scalef,
                                                        spot_diameter_fullres, bin_size_um, microns_per_pixel
            tissue_hires_image.png  tissue_lowres_image.png
      spatial/                                          the same images (and the 2 µm scale factors)

Bins are squares ``bin_size_um`` on a side, ``bin_size_um / microns_per_pixel`` full-resolution pixels: the
reader records both in the library's scale factors (``'bin_size_um'``, ``'bin_side_fullres'``), which is how
the layers know to draw squares of the true size (:func:`bin_side`).

At 8 µm a section has 100k-700k bins (2 µm: millions): the positions are read with pyarrow, in-tissue rows
first, and the counts stay sparse. Nothing here imports Qt or napari.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ._files import reading
from ._spaceranger import _POSITION_COLUMNS, _has_matrix, _read_images, _read_scalefactors, read_count_matrix
from ._validate import InputError

if TYPE_CHECKING:  # pragma: no cover
    import anndata

logger = logging.getLogger(__name__)

#: the folder of ``outs/`` holding one folder per bin size
BINNED_OUTPUTS = "binned_outputs"
#: the bin size read when none is asked for (µm), Space Ranger's own default for analysis
DEFAULT_BIN_SIZE = 8
#: tissue positions of a bin folder's ``spatial/`` (a CSV copy is accepted too)
POSITIONS_FILE = "tissue_positions.parquet"
#: scale factors keys the reader sets: the bin size (µm) and the side of a bin in full-resolution pixels
BIN_SIZE_KEY = "bin_size_um"
BIN_SIDE_KEY = "bin_side_fullres"

_BIN_FOLDER = re.compile(r"^square_(\d+)um$")
_LAYOUT_HINT = "outs/binned_outputs/square_002um|square_008um|square_016um/"


def bin_folder_name(bin_size: int) -> str:
    """Name of the folder of ``bin_size`` µm bins (``8`` -> ``'square_008um'``)."""
    return f"square_{int(bin_size):03d}um"


@dataclass(frozen=True)
class _Run:
    """Where the parts of a Visium HD output are: ``outs`` (holding ``spatial/``), ``binned`` (its
    ``binned_outputs/``, None when absent), and the bin size of the folder given when it was one bin's."""

    outs: Path
    binned: Path | None
    own_bin: int | None = None


def _lost_its_bins(root: Path) -> bool:
    """Whether ``root`` is a Visium HD ``outs/`` without ``binned_outputs/``: no count matrix of its own, and
    HD's ``feature_slice.h5`` or scale factors with ``bin_size_um`` in ``spatial/``."""
    if _has_matrix(root):
        return False
    if (root / "feature_slice.h5").is_file():
        return True
    scalefactors = root / "spatial" / "scalefactors_json.json"
    try:
        return scalefactors.is_file() and f'"{BIN_SIZE_KEY}"' in scalefactors.read_text(errors="replace")[:20000]
    except OSError:
        return False


def _locate(path: str | os.PathLike) -> _Run | None:
    """The Visium HD output ``path`` is part of (its ``outs/`` or run folder, ``binned_outputs/`` or one bin's
    folder), else None."""
    path = Path(path).expanduser()
    if not path.is_dir():
        return None
    match = _BIN_FOLDER.match(path.name)
    if match and path.parent.name == BINNED_OUTPUTS:
        return _Run(path.parent.parent, path.parent, int(match.group(1)))
    if match and ((path / "spatial").is_dir() or _has_matrix(path)):  # one bin's folder copied on its own
        return _Run(path, None, int(match.group(1)))
    if path.name == BINNED_OUTPUTS:
        return _Run(path.parent, path)
    for root in (path, path / "outs"):
        if (root / BINNED_OUTPUTS).is_dir():
            return _Run(root, root / BINNED_OUTPUTS)
    for root in (path, path / "outs"):
        if _lost_its_bins(root):
            return _Run(root, None)
    return None


def is_visium_hd(path: str | os.PathLike) -> bool:
    """Whether ``path`` is (part of) a Space Ranger Visium HD output: its ``outs/`` or run folder,
    ``binned_outputs/`` or one ``square_NNNum/`` bin folder. Nothing is read.

    An ``outs/`` that lost ``binned_outputs/`` counts too, so that reading it says what is missing.
    """
    return _locate(path) is not None


def _bin_folders(run: _Run) -> dict[int, Path]:
    """Bin size (µm) -> its folder, smallest first."""
    if run.binned is None:
        return {run.own_bin: run.outs} if run.own_bin is not None else {}
    found = {}
    for folder in run.binned.iterdir():
        match = _BIN_FOLDER.match(folder.name)
        if match and folder.is_dir():
            found[int(match.group(1))] = folder
    return dict(sorted(found.items()))


def visium_hd_bin_sizes(path: str | os.PathLike) -> list[int]:
    """Bin sizes (µm) a Visium HD output holds, smallest first (``[2, 8, 16]`` for Space Ranger's defaults).

    Parameters
    ----------
    path : str or os.PathLike
        Its ``outs/`` (or run) folder, ``binned_outputs/`` or one bin's folder.

    Returns
    -------
    list of int
        Empty when it has no bin folder.

    Raises
    ------
    InputError
        If ``path`` is not Visium HD output.
    """
    run = _locate(path)
    if run is None:
        raise InputError(f"{str(path)!r} is not a Visium HD output folder (it has no {_LAYOUT_HINT}).")
    return list(_bin_folders(run))


def _sizes_text(sizes) -> str:
    return ", ".join(f"{s} µm" for s in sizes)


def _parse_bin_size(bin_size) -> int:
    """``bin_size`` as whole µm: 8, 8.0, '8', '8um', 'square_008um' -> 8."""
    value = bin_size
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(?:square_)?0*(\d+(?:\.0*)?)\s*(?:um|µm)?\s*", value)
        value = float(match.group(1)) if match else None
    try:
        ok = value is not None and not isinstance(value, bool) and float(value) == int(value) and int(value) > 0
    except (TypeError, ValueError, OverflowError):
        ok = False
    if not ok:
        raise InputError(f"bin_size must be a whole number of µm such as 2, 8 or 16; got {bin_size!r}.")
    return int(value)


def _pick_bin(bin_size, run: _Run, bins: dict[int, Path]) -> int:
    """The bin size to read: the one asked for, else the folder's own, else :data:`DEFAULT_BIN_SIZE`."""
    where = run.binned if run.binned is not None else run.outs
    if not bins:
        if run.binned is None:
            raise InputError(
                f"{str(run.outs)!r} is Visium HD output without its {BINNED_OUTPUTS}/ folder, which holds the "
                f"counts and positions of the bins ({_LAYOUT_HINT}): copy the whole outs/ folder of Space Ranger."
            )
        raise InputError(
            f"{str(where)!r} holds no bin folder (square_002um/, square_008um/, square_016um/, ...): copy them "
            "from Space Ranger's outs/binned_outputs/."
        )
    size = _parse_bin_size(bin_size) if bin_size is not None else run.own_bin or DEFAULT_BIN_SIZE
    if size not in bins:
        raise InputError(
            f"{str(where)!r} has no {size} µm bins ({bin_folder_name(size)}/); it has {_sizes_text(bins)}. Pick "
            "one of those with bin_size= (the command line's --bin-size), or open its bin folder in napari."
        )
    return size


def _match(df: pd.DataFrame, barcodes: pd.Index, path: Path) -> tuple[pd.DataFrame, np.ndarray]:
    """``df`` and the row of each of ``barcodes`` in it (-1 when absent); repeated barcodes are an error."""
    index = pd.Index(df["barcode"].astype(str))
    if not index.is_unique:
        raise InputError(f"{str(path)!r} lists some barcodes more than once, e.g. {index[index.duplicated()][0]!r}.")
    return df, index.get_indexer(barcodes)


def _read_positions(spatial: Path, barcodes: pd.Index) -> pd.DataFrame:
    """Positions of ``barcodes`` (in their order) from ``spatial/tissue_positions.parquet``: in-tissue rows
    are read first (a filtered matrix holds only those), every row only when some barcode is not among them."""
    path = spatial / POSITIONS_FILE
    if not path.is_file() and (spatial / "tissue_positions.csv").is_file():
        path = spatial / "tissue_positions.csv"
    if not path.is_file():
        raise InputError(
            f"{str(spatial / POSITIONS_FILE)!r} is missing: it holds where each bin is (columns "
            f"{', '.join(_POSITION_COLUMNS)}); copy it from the same folder of Space Ranger's outs/binned_outputs/."
        )
    what = "Visium HD tissue positions file (Parquet)" if path.suffix == ".parquet" else "tissue positions file"
    with reading(path, what):
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            columns = pq.read_schema(path).names
        else:
            columns = list(pd.read_csv(path, nrows=0).columns)
        missing = [c for c in _POSITION_COLUMNS if c not in columns]
        if missing:
            raise InputError(f"{str(path)!r} lacks the column(s) {missing} of a tissue positions file.")
        if path.suffix == ".parquet":
            df, at = _match(
                pd.read_parquet(path, columns=_POSITION_COLUMNS, filters=[("in_tissue", "==", 1)]), barcodes, path
            )
            if (at < 0).any():  # a raw matrix, or in_tissue not set: every row
                df, at = _match(pd.read_parquet(path, columns=_POSITION_COLUMNS), barcodes, path)
        else:
            df, at = _match(pd.read_csv(path, usecols=_POSITION_COLUMNS), barcodes, path)
    lost = np.flatnonzero(at < 0)
    if len(lost):
        raise InputError(
            f"{str(path)!r}: {len(lost):,} bins of the count matrix have no position there, e.g. "
            f"{barcodes[lost[0]]!r}; are the matrix and the positions from the same bin folder?"
        )
    return df.iloc[at].reset_index(drop=True)


def _bin_side(size: int, scalefactors: dict, xy: np.ndarray, source: Path) -> float:
    """Side of a bin in full-resolution pixels: ``bin_size_um / microns_per_pixel``, else Space Ranger's
    ``spot_diameter_fullres`` (the same for square bins), else the bins' spacing."""
    for key in (BIN_SIZE_KEY, "microns_per_pixel"):
        value = scalefactors.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float) or not value > 0):
            raise InputError(
                f"{str(source)!r}: {key} is {value!r}; a Visium HD scale factors file has a positive number."
            )
    recorded = scalefactors.get(BIN_SIZE_KEY)
    if recorded is not None and abs(float(recorded) - size) > 1e-6:
        logger.warning("%s says bin_size_um %s in the folder of %d µm bins; using %d µm", source, recorded, size, size)
    if scalefactors.get("microns_per_pixel"):
        return size / float(scalefactors["microns_per_pixel"])
    if scalefactors.get("spot_diameter_fullres"):
        return float(scalefactors["spot_diameter_fullres"])
    from scipy.spatial import cKDTree

    if len(xy) < 2:
        return 1.0
    dist, _ = cKDTree(xy).query(xy, k=2)
    logger.warning("%s gives no microns_per_pixel: the bin side is taken from the bins' spacing", source)
    return float(np.median(dist[:, 1])) or 1.0


def _images(folder: Path, outs: Path) -> dict[str, np.ndarray]:
    """The tissue images of the bin folder's ``spatial/``, else of ``outs/spatial/`` (the same images)."""
    names = ("tissue_hires_image.png", "tissue_lowres_image.png")
    for spatial in (folder / "spatial", outs / "spatial"):
        if any((spatial / n).is_file() for n in names):
            return _read_images(spatial)
    logger.warning("%s has no tissue image (%s): the bins open without the H&E", folder / "spatial", " or ".join(names))
    return {}


def read_visium_hd(
    path: str | os.PathLike, bin_size: int | None = None, library_id: str | None = None
) -> anndata.AnnData:
    """Read the square bins of one bin size of a Space Ranger Visium HD output.

    Parameters
    ----------
    path : str or os.PathLike
        The ``outs/`` folder (or its run folder), its ``binned_outputs/``, or one bin's folder
        (``binned_outputs/square_016um/``, whose bins are then the default). The layout is in the module
        docstring.
    bin_size : int, optional
        Bin size in µm (2, 8, 16 or a custom size Space Ranger wrote). Default: the bin folder's own when
        ``path`` is one, else 8.
    library_id : str, optional
        Key of ``uns['spatial']``; default the run's name (the folder holding ``outs/``).

    Returns
    -------
    anndata.AnnData
        (n_bins, n_genes) raw counts (CSR float32) of the bins in the matrix, as
        :func:`~napari_cell2location.io.read_spaceranger` returns: ``obs`` has ``in_tissue``, ``array_row``,
        ``array_col``; ``obsm['spatial']`` is (x, y) of the bin centres in full-resolution pixels;
        ``uns['spatial'][library_id]`` holds ``images`` and ``scalefactors``, the latter with
        ``'bin_size_um'`` and ``'bin_side_fullres'`` (the side of a square bin in full-resolution pixels).

    Raises
    ------
    InputError
        If ``path`` is not Visium HD output, has no ``binned_outputs/`` (or no bin folder in it), lacks the
        bin size asked for (the message lists those it has), or a file of the bin folder is missing or
        broken (the message names it). A missing or unreadable image is only a warning: the bins open
        without it.
    """
    run = _locate(path)
    if run is None:
        raise InputError(f"{str(path)!r} is not a Visium HD output folder (it has no {_LAYOUT_HINT}).")
    bins = _bin_folders(run)
    size = _pick_bin(bin_size, run, bins)
    folder = bins[size]
    adata = read_count_matrix(folder)
    spatial = folder / "spatial"
    pos = _read_positions(spatial, adata.obs_names)
    for col in ("in_tissue", "array_row", "array_col"):
        adata.obs[col] = pos[col].to_numpy().astype(np.int64)
    adata.obsm["spatial"] = pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(dtype=np.float64)
    scalefactors = _read_scalefactors(spatial)
    side = _bin_side(size, scalefactors, adata.obsm["spatial"], spatial / "scalefactors_json.json")
    scalefactors.update({BIN_SIZE_KEY: float(size), BIN_SIDE_KEY: side})
    if run.binned is not None:
        run_folder = run.outs.parent if run.outs.name == "outs" else run.outs
    else:
        run_folder = run.outs
    lib = library_id or run_folder.name
    adata.uns["spatial"] = {lib: {"images": _images(folder, run.outs), "scalefactors": scalefactors}}
    logger.info(
        "Read Visium HD %s: %d bins of %d µm (%.1f px) x %d genes", folder, adata.n_obs, size, side, adata.n_vars
    )
    return adata


def library_scalefactors(adata) -> list[dict]:
    """The scale factors of each library of a scanpy-layout table (``uns['spatial'][library]['scalefactors']``),
    in library order; empty when it has none."""
    spatial = adata.uns.get("spatial", {}) if hasattr(adata, "uns") else {}
    entries = spatial.values() if hasattr(spatial, "values") else []
    return [dict(e.get("scalefactors", {}) or {}) for e in entries if hasattr(e, "get")]


def bin_side(adata) -> float | None:
    """Side of the square bins of a Visium HD table in full-resolution pixels, None for round spots.

    Parameters
    ----------
    adata : anndata.AnnData
        A table in the scanpy layout; Visium HD bins (:func:`read_visium_hd`) carry ``'bin_side_fullres'``
        in the scale factors of their library.

    Returns
    -------
    float or None
    """
    for scalefactors in library_scalefactors(adata):
        value = scalefactors.get(BIN_SIDE_KEY)
        if value is not None and np.isfinite(float(value)) and float(value) > 0:
            return float(value)
    return None
