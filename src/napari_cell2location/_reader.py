"""npe2 reader: a thin dispatcher into :mod:`napari_cell2location.io`.

Space Ranger ``outs/`` folders, SpatialData ``.zarr`` stores and scanpy-layout ``.h5ad`` files (those with
spot positions; a single-cell reference is left to other readers) are recognised by
:func:`~napari_cell2location.io.spatial_format` and read by :func:`~napari_cell2location.io.read_spatial`.
Each opens as its sections' H&E (Image layers) and its spots (a Points layer) in full-resolution pixel world
coordinates (see :mod:`napari_cell2location._layers`); several datasets opened together sit side by side.

A broken file (an ``.h5ad`` that is not HDF5 or is cut short, a zarr without a table, a Space Ranger folder
without positions, ...) is claimed too, so that its :class:`~napari_cell2location.io.InputError` reaches the
user as one notification that says what is wrong, instead of napari's traceback or "no reader found".
"""

from __future__ import annotations

import os
from pathlib import Path

from ._layers import place_side_by_side, spatial_layer_data
from .io import InputError, read_spatial, shorten_paths, spatial_format

#: what a reader returns when it read the file but has no layer to add (npe2's "null layer" value)
NO_LAYERS = [(None,)]


def _paths(path) -> list:
    return [path] if isinstance(path, str | os.PathLike) else list(path)


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
    if not paths or not all(spatial_format(p, require_spots=True) for p in paths):
        return None
    return reader_function


def layer_data_from_path(path: str | os.PathLike) -> list[tuple]:
    """Layer data tuples (H&E images, spots) of the dataset at ``path``."""
    adata, sdata = read_spatial(path)
    name = Path(path).name.removesuffix(".zarr").removesuffix(".h5ad")
    return spatial_layer_data(adata, sdata, name=name or "spots", source=str(path))


def reader_function(path) -> list[tuple]:
    """Read one or more datasets; several open side by side (never overlapped).

    A file that cannot be read is reported as a notification (its one-line reason) and opens nothing.
    """
    try:
        return place_side_by_side([layer_data_from_path(p) for p in _paths(path)])
    except InputError as err:
        from napari.utils.notifications import show_error

        show_error(shorten_paths(str(err)))
        return NO_LAYERS
