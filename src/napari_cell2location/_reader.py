"""npe2 reader: a thin dispatcher into :mod:`napari_cell2location.io`.

Space Ranger ``outs/`` folders, SpatialData ``.zarr`` stores and scanpy-layout ``.h5ad`` files (those with
spot positions; a single-cell reference is left to other readers) are recognised by
:func:`~napari_cell2location.io.spatial_format` and read by :func:`~napari_cell2location.io.read_spatial`.
Each opens as its sections' H&E (Image layers) and its spots (a Points layer) in full-resolution pixel world
coordinates (see :mod:`napari_cell2location._layers`); several datasets opened together sit side by side.

A Visium HD ``outs/`` folder opens its 8 µm bins as squares of their true size; its
``binned_outputs/square_NNNum/`` folder opens the bins of that size instead (a reader takes no options). Its
full-resolution image is found and shown as for standard Visium (below). A SpatialData of Visium HD bins
(spatialdata-io's ``visium_hd``: square polygons, one table per bin size) opens its 8 µm bins the same way.

Full-resolution scans open as multiscale Image layers, read lazily
(:func:`~napari_cell2location.io.open_fullres_image`):

* a Space Ranger folder (standard or HD) shows its full-resolution image in place of the hires PNG when one
  is found (:func:`~napari_cell2location.io.fullres_image_for`: the run's recorded ``--image``, or a TIFF
  beside ``outs/``); opening the folder and a TIFF together makes that TIFF its image;
* a TIFF opened alone (dropped onto a section) lands on the section it belongs to: the shown image whose
  world extent is its size gives its place (:func:`~napari_cell2location.io.place_on_sections`), else the
  identity (full-resolution pixels). Only pyramidal or large TIFFs (and broken ones, to say what is wrong)
  are claimed; small plain TIFFs are left to napari's own reader.

A broken file (an ``.h5ad`` that is not HDF5 or is cut short, a zarr without a table, a Space Ranger folder
without positions, a TIFF that is not one, ...) is claimed too, so that its
:class:`~napari_cell2location.io.InputError` reaches the user as one notification that says what is wrong,
instead of napari's traceback or "no reader found".
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ._layers import place_side_by_side, spatial_layer_data
from .io import (
    InputError,
    Pyramid,
    fullres_image_for,
    is_tiff_name,
    open_fullres_image,
    place_on_sections,
    read_spatial,
    shorten_paths,
    spatial_format,
    table_bin_size,
)
from .io._visium_hd import BIN_SIZE_KEY

#: what a reader returns when it read the file but has no layer to add (npe2's "null layer" value)
NO_LAYERS = [(None,)]
#: a TIFF with a side at least this long (px), or with a pyramid, is a scan this reader claims
CLAIM_TIFF_SIDE = 4096
#: formats whose full-resolution image is found (or given) as Space Ranger's ``--image``
_WITH_FULLRES = ("spaceranger", "visium_hd")


def _paths(path) -> list:
    return [path] if isinstance(path, str | os.PathLike) else list(path)


def _is_scan(path) -> bool:
    """Whether a TIFF-named file is a scan to claim: pyramidal, large, or unreadable (to say why)."""
    if not (is_tiff_name(path) and Path(path).is_file()):
        return False
    try:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            return len(series.levels) > 1 or max(series.shape[:3]) >= CLAIM_TIFF_SIDE
    except Exception:  # noqa: BLE001 - a broken TIFF is claimed so that reading it says what is wrong
        return True


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
    paths = _paths(path)
    if not paths or not all(_is_scan(p) or spatial_format(p) for p in paths):
        return None
    return reader_function


class NotASection(InputError):
    """An ``.h5ad`` without spot positions opened as a section: most likely a single-cell reference."""


def _check_has_spots(path) -> None:
    """Refuse an ``.h5ad`` without ``obsm['spatial']`` with what it is and where it goes instead."""
    if spatial_format(path) != "h5ad" or spatial_format(path, require_spots=True):
        return
    import h5py

    with h5py.File(path, "r") as f:
        n_obs = len(f["obs"][f["obs"].attrs.get("_index", "_index")]) if "obs" in f else 0
    raise NotASection(
        f"{Path(path).name} has no spot positions (obsm['spatial']), so it is not a Visium section; with "
        f"{n_obs} observations it looks like a single-cell reference: open it in the Reference tab "
        "(Plugins > Cell2location) to make signatures from it."
    )


def _with_multiscale(layer: tuple) -> tuple:
    """A layer data tuple whose pyramid image is marked multiscale for napari."""
    data, kwargs, kind = layer
    if kind == "image" and isinstance(data, Pyramid):
        kwargs = dict(kwargs, multiscale=True)
        if data.um_per_px is not None:
            kwargs["metadata"] = {**kwargs.get("metadata", {}), "pixel_size_um": data.um_per_px}
    return data, kwargs, kind


def fullres_layer(pyramid: Pyramid, name: str, affine=None) -> tuple:
    """Layer data tuple of a full-resolution image: multiscale, world = full-resolution pixels."""
    kwargs = {"name": name, "rgb": pyramid.rgb, "affine": np.eye(3) if affine is None else np.asarray(affine)}
    kwargs["metadata"] = {"source": str(pyramid.source) if pyramid.source else ""}
    return _with_multiscale((pyramid, kwargs, "image"))


def _with_fullres(layers: list[tuple], pyramid: Pyramid, name: str) -> list[tuple]:
    """``layers`` with the section's image replaced by its full-resolution one, at the same place."""
    out, placed = [], False
    for data, kwargs, kind in layers:
        if kind == "image" and not placed:
            affine = np.eye(3)
            affine[:2, 2] = np.asarray(kwargs["affine"], dtype=float)[:2, 2]  # the section's shift, if any
            out.append(fullres_layer(pyramid, f"{name} H&E (full resolution)", affine))
            placed = True
            continue
        out.append((data, kwargs, kind))
    if not placed:
        out.insert(0, fullres_layer(pyramid, f"{name} H&E (full resolution)"))
    return out


def layer_data_from_path(path: str | os.PathLike, image: str | os.PathLike | None = None) -> list[tuple]:
    """Layer data tuples (H&E images, spots) of the dataset at ``path``.

    Parameters
    ----------
    path : str or os.PathLike
        A Space Ranger folder (standard or Visium HD), SpatialData ``.zarr`` or ``.h5ad``.
    image : str or os.PathLike, optional
        A Space Ranger folder's full-resolution image (its ``--image``); default: found by the rule of
        :func:`~napari_cell2location.io.fullres_image_for`.
    """
    adata, sdata = read_spatial(path)
    name = Path(path).name.removesuffix(".zarr").removesuffix(".h5ad")
    fmt = spatial_format(path)
    if fmt == "visium_hd":  # 'run 8 µm bins': the run's name and the bin size read
        lib, entry = next(iter(adata.uns["spatial"].items()))
        name = f"{lib} {entry['scalefactors'][BIN_SIZE_KEY]:g} µm bins"
    elif sdata is not None:  # spatialdata-io's Visium HD: the table read is that of one bin size
        size = table_bin_size(sdata, adata)
        name = name if size is None else f"{name} {size:g} µm bins"
    layers = spatial_layer_data(adata, sdata, name=name or "spots", source=str(path))
    if fmt in _WITH_FULLRES:
        pyramid = fullres_image_for(path, image, adata=adata)
        if pyramid is not None:
            layers = _with_fullres(layers, pyramid, name or "spots")
    elif image is not None:
        raise InputError(f"a full-resolution image goes with a Space Ranger folder; {str(path)!r} is not one.")
    return [_with_multiscale(layer) for layer in layers]


def _shown_images() -> list[tuple[tuple, np.ndarray]]:
    """(shape, affine to world) of the 2-D Image layers of the current viewer (none without a viewer)."""
    import napari
    from napari.utils.transforms import CompositeAffine

    viewer = napari.current_viewer()
    if viewer is None:
        return []
    out = []
    for layer in viewer.layers:
        if not isinstance(layer, napari.layers.Image) or layer.ndim != 2:
            continue
        inner = CompositeAffine(
            scale=layer.scale, translate=layer.translate, rotate=layer.rotate, shear=layer.shear, ndim=2
        ).affine_matrix
        out.append((tuple(layer.data.shape), np.asarray(layer.affine.affine_matrix) @ np.asarray(inner)))
    return out


def _shown_box() -> np.ndarray | None:
    """``(row_min, col_min, row_max, col_max)`` of the 2-D layers the current viewer shows (None when it
    shows none, or there is no viewer)."""
    import napari

    viewer = napari.current_viewer()
    if viewer is None:
        return None
    extents = [np.asarray(layer.extent.world, dtype=float) for layer in viewer.layers if layer.ndim == 2]
    extents = [e for e in extents if np.isfinite(e).all() and (e[1] > e[0]).any()]
    if not extents:
        return None
    return np.r_[np.min([e[0] for e in extents], axis=0), np.max([e[1] for e in extents], axis=0)]


def tiff_layer_data(path: str | os.PathLike) -> tuple:
    """Layer data tuple of a full-resolution TIFF opened on its own, placed on its section when one is shown."""
    pyramid = open_fullres_image(path)
    return fullres_layer(pyramid, Path(path).name, place_on_sections(pyramid.shape, _shown_images()))


def read_paths(paths: list) -> list[tuple]:
    """Layer data of the datasets and scans at ``paths``: a Space Ranger folder opened with one TIFF gets it
    as its full-resolution image; other TIFFs open on their own; datasets sit side by side, and beside
    what the viewer already shows."""
    tiffs = [p for p in paths if is_tiff_name(p) and Path(p).is_file()]
    datasets = [p for p in paths if p not in tiffs]
    image = None
    if len(tiffs) == 1 and len(datasets) == 1 and spatial_format(datasets[0]) in _WITH_FULLRES:
        image, tiffs = tiffs[0], []
    layers = []
    if datasets:  # beside what the viewer shows: napari opens the files of one Open one call at a time
        layers = place_side_by_side([layer_data_from_path(p, image) for p in datasets], shown=_shown_box())
    return layers + [tiff_layer_data(t) for t in tiffs]


def reader_function(path) -> list[tuple]:
    """Read one or more datasets and scans; several datasets open side by side (never overlapped).

    A file that cannot be read is reported as a notification (its one-line reason) and opens nothing.
    """
    try:
        paths = _paths(path)
        for p in paths:
            _check_has_spots(p)
        return read_paths(paths) or NO_LAYERS
    except InputError as err:
        from napari.utils.notifications import show_error

        headline = "Not a section: a single-cell table?" if isinstance(err, NotASection) else "Cannot open this."
        show_error(f"{headline}\n{shorten_paths(str(err))}")  # napari's toast shows the first line
        return NO_LAYERS
