"""npe2 reader: Space Ranger ``outs/`` folders, SpatialData ``.zarr`` stores and scanpy-layout ``.h5ad`` files.

Each opens as the section's H&E (Image layer, at its own hires/lowres scale) and its spots (Points layer)
in full-resolution pixel world coordinates; see :mod:`napari_cell2location._layers` for the convention.
Heavy libraries are imported inside the functions, so napari's start-up stays fast.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

_MATRIX_H5 = ("filtered_feature_bc_matrix.h5", "raw_feature_bc_matrix.h5")
_MATRIX_DIRS = ("filtered_feature_bc_matrix", "raw_feature_bc_matrix")
_POSITIONS = ("tissue_positions.parquet", "tissue_positions.csv", "tissue_positions_list.csv")
_POSITION_COLUMNS = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]


# ------------------------------------------------------------------------------------------------
# Space Ranger
# ------------------------------------------------------------------------------------------------


def spaceranger_root(path: str | os.PathLike) -> Path | None:
    """The folder holding ``spatial/`` and a count matrix (``path`` itself or its ``outs/``), else None."""
    path = Path(path)
    if not path.is_dir():
        return None
    for root in (path, path / "outs"):
        has_matrix = any((root / n).is_file() for n in _MATRIX_H5) or any((root / n).is_dir() for n in _MATRIX_DIRS)
        if has_matrix and (root / "spatial").is_dir():
            return root
    return None


def _read_10x_h5(path: Path):
    import anndata
    import h5py
    from scipy import sparse

    with h5py.File(path, "r") as f:
        if "matrix" not in f:
            raise ValueError(f"{str(path)!r} is not a Space Ranger v3+ feature-barcode matrix (no 'matrix' group).")
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


def _read_10x_mtx(folder: Path):
    import anndata
    from scipy import io as sio

    def find(stem):
        for name in (f"{stem}.gz", stem):
            if (folder / name).exists():
                return folder / name
        raise ValueError(f"Space Ranger matrix folder {str(folder)!r} has no {stem}(.gz).")

    x = sio.mmread(find("matrix.mtx")).tocsr().T.tocsr().astype(np.float32)  # (n_spots, n_genes)
    barcodes = pd.read_csv(find("barcodes.tsv"), sep="\t", header=None)[0].astype(str)
    feats = pd.read_csv(find("features.tsv") if any(folder.glob("features.tsv*")) else find("genes.tsv"), sep="\t",
                        header=None)  # fmt: skip
    names = feats[1] if feats.shape[1] > 1 else feats[0]
    var = pd.DataFrame({"gene_ids": feats[0].astype(str).to_numpy()}, index=pd.Index(names.astype(str).to_numpy()))
    if feats.shape[1] > 2:
        var["feature_types"] = feats[2].astype(str).to_numpy()
    if x.shape != (len(barcodes), len(var)):
        raise ValueError(
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
    for name in _POSITIONS:
        p = spatial / name
        if not p.exists():
            continue
        if p.suffix == ".parquet":
            df = pd.read_parquet(p)
        elif name == "tissue_positions_list.csv":
            df = pd.read_csv(p, header=None, names=_POSITION_COLUMNS)
        else:
            df = pd.read_csv(p)
        missing = [c for c in _POSITION_COLUMNS if c not in df.columns]
        if missing:
            raise ValueError(f"{str(p)!r} lacks columns {missing}")
        return df.set_index(df["barcode"].astype(str))
    raise ValueError(f"{str(spatial)!r} has no tissue positions file (one of {', '.join(_POSITIONS)}).")


def read_spaceranger(path: str | os.PathLike, library_id: str | None = None):
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
    """
    root = spaceranger_root(path)
    if root is None:
        raise ValueError(f"{str(path)!r} is not a Space Ranger output folder (needs spatial/ and a count matrix).")
    h5 = next((root / n for n in _MATRIX_H5 if (root / n).is_file()), None)
    adata = (
        _read_10x_h5(h5)
        if h5 is not None
        else _read_10x_mtx(next(root / n for n in _MATRIX_DIRS if (root / n).is_dir()))
    )
    spatial = root / "spatial"
    pos = _read_positions(spatial)
    missing = adata.obs_names.difference(pos.index)
    if len(missing):
        raise ValueError(f"{len(missing)} barcodes of the matrix have no tissue position, e.g. {missing[0]!r}.")
    pos = pos.loc[adata.obs_names]
    for col in ("in_tissue", "array_row", "array_col"):
        adata.obs[col] = pos[col].to_numpy().astype(int)
    adata.obsm["spatial"] = pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(dtype=np.float64)
    scalefactors = {}
    if (spatial / "scalefactors_json.json").exists():
        scalefactors = json.loads((spatial / "scalefactors_json.json").read_text())
    images = {}
    for key in ("hires", "lowres"):
        p = spatial / f"tissue_{key}_image.png"
        if p.exists():
            from skimage.io import imread

            img = imread(p)
            if img.dtype != np.uint8:  # 16-bit PNGs -> 8-bit for display
                img = (img / max(float(img.max()), 1.0) * 255).astype(np.uint8)
            images[key] = img[..., :3] if img.ndim == 3 else img
    lib = library_id or (root.parent.name if root.name == "outs" else root.name)
    adata.uns["spatial"] = {lib: {"images": images, "scalefactors": scalefactors}}
    logger.info("Read Space Ranger folder %s: %d spots x %d genes", root, adata.n_obs, adata.n_vars)
    return adata


# ------------------------------------------------------------------------------------------------
# any format -> (adata, sdata)
# ------------------------------------------------------------------------------------------------


def read_section(path: str | os.PathLike):
    """Read a Space Ranger folder, a SpatialData ``.zarr`` or an ``.h5ad``; returns ``(adata, sdata or None)``."""
    if spaceranger_root(path) is not None:
        return read_spaceranger(path), None
    from .io import read_spatial

    return read_spatial(path)


def layer_data_from_path(path: str | os.PathLike) -> list[tuple]:
    """Layer data tuples (H&E images, spots) of the dataset at ``path``."""
    from ._layers import spatial_layer_data

    adata, sdata = read_section(path)
    name = Path(path).name
    for suffix in (".zarr", ".h5ad"):
        name = name.removesuffix(suffix)
    return spatial_layer_data(adata, sdata, name=name or "spots", source=str(path))


def _h5ad_has_spots(path: Path) -> bool:
    """Whether an .h5ad holds spot positions (``obsm/spatial``); a single-cell reference does not."""
    try:
        import h5py

        with h5py.File(path, "r") as f:
            return "obsm" in f and "spatial" in f["obsm"]
    except OSError:
        return False


def _claims(path: str) -> bool:
    p = Path(path)
    if p.suffix.lower() == ".h5ad" and p.is_file():
        return _h5ad_has_spots(p)
    if p.is_dir() and (p.suffix.lower() == ".zarr" or (p / "zarr.json").exists() or (p / ".zgroup").exists()):
        return True
    return spaceranger_root(p) is not None


def napari_get_reader(path):
    """npe2 reader hook: a reader function when ``path`` is a format we read, else None.

    Parameters
    ----------
    path : str or list of str
        Path(s) napari asks about.

    Returns
    -------
    callable or None
    """
    paths = [path] if isinstance(path, str | os.PathLike) else list(path)
    if not paths or not all(_claims(str(p)) for p in paths):
        return None
    return reader_function


def reader_function(path) -> list[tuple]:
    """Read one or more datasets; several sections open side by side (never overlapped)."""
    paths = [path] if isinstance(path, str | os.PathLike) else list(path)
    layers: list[tuple] = []
    offset = 0.0
    for p in paths:
        data = layer_data_from_path(p)
        if len(paths) > 1:
            data, width = _shift(data, offset)
            offset += width * 1.05
        layers.extend(data)
    return layers


def _shift(layers: list[tuple], offset: float) -> tuple[list[tuple], float]:
    """Shift layer data right by ``offset`` world units; returns the shifted layers and their width."""
    lo, hi, out = np.inf, -np.inf, []
    for data, kwargs, kind in layers:
        if kind == "points":
            lo, hi = min(lo, float(np.min(data[:, 1]))), max(hi, float(np.max(data[:, 1])))
        else:
            aff = kwargs["affine"]
            lo, hi = min(lo, aff[1, 2]), max(hi, aff[1, 2] + data.shape[1] * aff[1, 1])
    for data, kwargs, kind in layers:
        kwargs = dict(kwargs)
        if kind == "points":
            data = data.copy()
            data[:, 1] += offset - lo
        else:
            kwargs["affine"] = kwargs["affine"].copy()
            kwargs["affine"][1, 2] += offset - lo
        out.append((data, kwargs, kind))
    return out, hi - lo
