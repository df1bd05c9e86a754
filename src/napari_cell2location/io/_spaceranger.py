"""Reading a Space Ranger ``outs/`` folder into an AnnData in the scanpy Visium layout.

Nothing here imports Qt or napari; ``anndata``, ``h5py``, ``scipy.io`` and ``skimage`` load inside the
functions that need them.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ._files import check_hdf5, reading
from ._validate import InputError

if TYPE_CHECKING:  # pragma: no cover
    import anndata

logger = logging.getLogger(__name__)

#: count matrices of Space Ranger, in order of preference: HDF5 files, then Matrix Market folders
MATRIX_H5 = ("filtered_feature_bc_matrix.h5", "raw_feature_bc_matrix.h5")
MATRIX_DIRS = ("filtered_feature_bc_matrix", "raw_feature_bc_matrix")
#: tissue positions files, newest layout first (the last one has no header)
POSITIONS = ("tissue_positions.parquet", "tissue_positions.csv", "tissue_positions_list.csv")
_POSITION_COLUMNS = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]


def _has_matrix(folder: Path) -> bool:
    return any((folder / n).is_file() for n in MATRIX_H5) or any((folder / n).is_dir() for n in MATRIX_DIRS)


def spaceranger_root(path: str | os.PathLike) -> Path | None:
    """The folder holding ``spatial/`` and a count matrix (``path`` itself or its ``outs/``), else None.

    Parameters
    ----------
    path : str or os.PathLike
        A Space Ranger ``outs/`` folder or its parent.

    Returns
    -------
    pathlib.Path or None
    """
    path = Path(path)
    if not path.is_dir():
        return None
    for root in (path, path / "outs"):
        if _has_matrix(root) and (root / "spatial").is_dir():
            return root
    return None


def spaceranger_lacks(path: str | os.PathLike) -> str | None:
    """What a folder that looks like Space Ranger output lacks (``'a count matrix'``, ...), else None.

    A folder with neither ``spatial/`` nor a count matrix (in itself or its ``outs/``) does not look like
    Space Ranger output and gives None, as does a complete one.
    """
    path = Path(path)
    if not path.is_dir() or spaceranger_root(path) is not None:
        return None
    for root in (path, path / "outs"):
        matrix, spatial = _has_matrix(root), (root / "spatial").is_dir()
        if spatial and not matrix:
            return f"a count matrix ({' or '.join(MATRIX_H5[:1] + MATRIX_DIRS[:1])}/) next to spatial/"
        if matrix and not spatial:
            return "the spatial/ folder (tissue positions, scale factors, images) next to the count matrix"
    return None


def _read_10x_h5(path: Path) -> anndata.AnnData:
    """(n_spots, n_genes) counts of a Space Ranger v3+ feature-barcode matrix ``.h5``."""
    import anndata
    import h5py
    from scipy import sparse

    check_hdf5(path, "a feature-barcode matrix .h5")
    with h5py.File(path, "r") as f, reading(path, "Space Ranger feature-barcode matrix (.h5)"):
        if "matrix" not in f:
            raise InputError(f"{str(path)!r} is not a Space Ranger v3+ feature-barcode matrix (no 'matrix' group).")
        m = f["matrix"]
        n_genes, n_spots = (int(v) for v in m["shape"][:])
        x = sparse.csc_matrix((m["data"][:], m["indices"][:], m["indptr"][:]), shape=(n_genes, n_spots))
        barcodes = [b.decode() for b in m["barcodes"][:]]
        feats = m["features"]
        names = [b.decode() for b in feats["name"][:]]
        ids = [b.decode() for b in feats["id"][:]]
        types = (
            [b.decode() for b in feats["feature_type"][:]]
            if "feature_type" in feats
            else ["Gene Expression"] * len(ids)
        )
    var = pd.DataFrame({"gene_ids": ids, "feature_types": types}, index=_unique(pd.Index(names)))
    return anndata.AnnData(X=x.T.tocsr().astype(np.float32), obs=pd.DataFrame(index=pd.Index(barcodes)), var=var)


def _read_10x_mtx(folder: Path) -> anndata.AnnData:
    """(n_spots, n_genes) counts of a Space Ranger ``*_feature_bc_matrix/`` Matrix Market folder."""
    import anndata
    from scipy import io as sio

    def find(stem):
        for name in (f"{stem}.gz", stem):
            if (folder / name).exists():
                return folder / name
        raise InputError(f"Space Ranger matrix folder {str(folder)!r} has no {stem}(.gz).")

    matrix = find("matrix.mtx")
    with reading(matrix, "Matrix Market count matrix"):
        x = sio.mmread(matrix).tocsr().T.tocsr().astype(np.float32)  # (n_spots, n_genes)
    with reading(find("barcodes.tsv"), "barcodes file (one barcode per line)"):
        barcodes = pd.read_csv(find("barcodes.tsv"), sep="\t", header=None)[0].astype(str)
    features = find("features.tsv") if any(folder.glob("features.tsv*")) else find("genes.tsv")
    with reading(features, "features file (id, name, type per line)"):
        feats = pd.read_csv(features, sep="\t", header=None)
    names = feats[1] if feats.shape[1] > 1 else feats[0]
    var = pd.DataFrame({"gene_ids": feats[0].astype(str).to_numpy()}, index=pd.Index(names.astype(str).to_numpy()))
    if feats.shape[1] > 2:
        var["feature_types"] = feats[2].astype(str).to_numpy()
    if x.shape != (len(barcodes), len(var)):
        raise InputError(
            f"{str(folder)!r}: matrix is {x.shape} but there are {len(barcodes)} barcodes, {len(var)} genes."
        )
    var.index = _unique(var.index)
    return anndata.AnnData(X=x, obs=pd.DataFrame(index=pd.Index(barcodes.to_numpy())), var=var)


def _unique(index: pd.Index) -> pd.Index:
    """Gene symbols made unique as anndata's ``var_names_make_unique`` does (``name``, ``name-1``, ...)."""
    names = index.astype(str).to_numpy().copy()
    seen: dict[str, int] = {}
    dup = pd.Index(names).duplicated()
    for i in np.flatnonzero(dup):
        n = seen.get(names[i], 0) + 1
        while f"{names[i]}-{n}" in set(names):
            n += 1
        seen[names[i]] = n
        names[i] = f"{names[i]}-{n}"
    return pd.Index(names)


def _read_positions(spatial: Path) -> pd.DataFrame:
    """Tissue positions indexed by barcode (``_POSITION_COLUMNS``), from the first file of ``POSITIONS``."""
    for name in POSITIONS:
        p = spatial / name
        if not p.exists():
            continue
        with reading(p, "tissue positions file"):
            if p.suffix == ".parquet":
                df = pd.read_parquet(p)
            elif name == "tissue_positions_list.csv":
                df = pd.read_csv(p, header=None, names=_POSITION_COLUMNS)
            else:
                df = pd.read_csv(p)
        missing = [c for c in _POSITION_COLUMNS if c not in df.columns]
        if missing:
            raise InputError(f"{str(p)!r} lacks columns {missing}")
        return df.set_index(df["barcode"].astype(str))
    raise InputError(f"{str(spatial)!r} has no tissue positions file (one of {', '.join(POSITIONS)}).")


def _read_images(spatial: Path) -> dict[str, np.ndarray]:
    """``hires`` / ``lowres`` tissue images of ``spatial/`` as 8-bit (H, W, 3) (or (H, W)) arrays."""
    images = {}
    for key in ("hires", "lowres"):
        p = spatial / f"tissue_{key}_image.png"
        if p.exists():
            from skimage.io import imread

            try:
                img = imread(p)
            except Exception as err:  # noqa: BLE001 - a broken image must not cost the user the spots
                logger.warning("%s is not a readable image (%s): the spots open without it", p, err)
                continue
            if img.dtype != np.uint8:  # 16-bit PNGs -> 8-bit for display
                img = (img / max(float(img.max()), 1.0) * 255).astype(np.uint8)
            images[key] = img[..., :3] if img.ndim == 3 else img
    if not images:
        logger.warning("%s has no readable tissue image: the spots open without the H&E", spatial)
    return images


def _read_scalefactors(spatial: Path) -> dict:
    """``scalefactors_json.json`` of ``spatial/`` ({} when absent); a broken one is an :class:`InputError`."""
    p = spatial / "scalefactors_json.json"
    if not p.exists():
        logger.warning("%s has no scalefactors_json.json: images are placed at full resolution", spatial)
        return {}
    with reading(p, "scale factors file (JSON)"):
        scalefactors = json.loads(p.read_text())
    if not isinstance(scalefactors, dict) or not all(
        isinstance(v, int | float) for k, v in scalefactors.items() if k.endswith(("scalef", "fullres"))
    ):
        raise InputError(f"{str(p)!r} is not a Space Ranger scale factors file (a JSON object of numbers).")
    return scalefactors


def read_count_matrix(folder: Path) -> anndata.AnnData:
    """The (n_barcodes, n_genes) counts (CSR) of a Space Ranger folder or Visium HD bin folder: its
    10x HDF5 matrix, else its mtx folder (filtered before raw)."""
    for name in MATRIX_H5:
        if (folder / name).is_file():
            return _read_10x_h5(folder / name)
    for name in MATRIX_DIRS:
        if (folder / name).is_dir():
            return _read_10x_mtx(folder / name)
    raise InputError(  # read_spaceranger finds a matrix before it reads: this is a Visium HD bin folder's
        f"{str(folder)!r} has no count matrix ({MATRIX_H5[0]}): Space Ranger writes one in every bin folder; "
        "copy it along with spatial/."
    )


def read_spaceranger(path: str | os.PathLike, library_id: str | None = None) -> anndata.AnnData:
    """Read a Space Ranger ``outs/`` folder into an AnnData in the scanpy Visium layout.

    Parameters
    ----------
    path : str or os.PathLike
        The ``outs/`` folder (or its parent): ``filtered_feature_bc_matrix.h5`` or the
        ``filtered_feature_bc_matrix/`` mtx folder, and ``spatial/`` with ``tissue_positions.csv`` (or
        ``.parquet``, or the old header-less ``tissue_positions_list.csv``), ``scalefactors_json.json``
        and ``tissue_hires_image.png`` / ``tissue_lowres_image.png``.
    library_id : str, optional
        Key of ``uns['spatial']``; default the folder's name.

    Returns
    -------
    anndata.AnnData
        (n_spots, n_genes) raw counts (CSR float32) of the barcodes in the matrix; ``obs`` has
        ``in_tissue``, ``array_row``, ``array_col``; ``obsm['spatial']`` is (x, y) full-resolution
        pixels; ``uns['spatial'][library_id]`` holds ``images`` and ``scalefactors``.

    Raises
    ------
    InputError
        If ``path`` is not a Space Ranger folder, or a file in it is missing or unreadable (the message
        names the file). A missing or unreadable image is only a warning: the spots open without it.
    """
    root = spaceranger_root(path)
    if root is None:
        raise InputError(f"{str(path)!r} is not a Space Ranger output folder (needs spatial/ and a count matrix).")
    adata = read_count_matrix(root)
    spatial = root / "spatial"
    pos = _read_positions(spatial)
    missing = adata.obs_names.difference(pos.index)
    if len(missing):
        raise InputError(
            f"{str(root)!r}: {len(missing)} barcodes of the matrix have no tissue position in spatial/, "
            f"e.g. {missing[0]!r}."
        )
    pos = pos.loc[adata.obs_names]
    for col in ("in_tissue", "array_row", "array_col"):
        adata.obs[col] = pos[col].to_numpy().astype(int)
    adata.obsm["spatial"] = pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(dtype=np.float64)
    scalefactors = _read_scalefactors(spatial)
    lib = library_id or (root.parent.name if root.name == "outs" else root.name)
    adata.uns["spatial"] = {lib: {"images": _read_images(spatial), "scalefactors": scalefactors}}
    logger.info("Read Space Ranger folder %s: %d spots x %d genes", root, adata.n_obs, adata.n_vars)
    return adata
