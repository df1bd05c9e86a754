"""Visium HD bins of another size, for a spots layer already shown (pure layer data, no napari import).

A Visium HD dataset holds its counts at several bin sizes: a Space Ranger ``outs/`` folder one
``binned_outputs/square_NNNum/`` folder per size, a SpatialData read by spatialdata-io one table per size.
napari's reader opens one (8 µm); the Data tab offers the others through :func:`bin_sizes_of` and
:func:`bin_layer_data`, which reads a size and places its bins where the shown ones are.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ._layers import SpotContext, spatial_layer_data
from .io import InputError, bin_tables, library_scalefactors, read_spatial, table_bin_size, visium_hd_bin_sizes
from .io._visium_hd import BIN_SIZE_KEY


def bin_sizes_of(ctx: SpotContext | None) -> tuple[list[int], int | None]:
    """The bin sizes (µm, smallest first) of the dataset a spots layer shows, and the size it shows.

    ``([], None)`` for round Visium spots, sample data, or a folder no longer there.
    """
    if ctx is None:
        return [], None
    if ctx.sdata is not None:
        current = table_bin_size(ctx.sdata, ctx.adata)
        return (list(bin_tables(ctx.sdata)), current) if current is not None else ([], None)
    sizes = [f[BIN_SIZE_KEY] for f in library_scalefactors(ctx.adata) if f.get(BIN_SIZE_KEY)]
    if not sizes or not ctx.source or not Path(ctx.source).exists():
        return [], None
    try:
        return visium_hd_bin_sizes(ctx.source), int(round(float(sizes[0])))
    except InputError:  # a single bin folder opened on its own, or a folder changed since
        return [], None


#: bins a spots layer may hold when the Data tab reads another bin size; above it napari draws too slowly (a real
#: run's 2 µm bins are about 11 million) and the fit belongs on the command line
MAX_SHOWN_BINS = 1_500_000


def expected_bins(n_shown: int, shown_size: int, size: int) -> int:
    """About how many bins of ``size`` µm cover what ``n_shown`` bins of ``shown_size`` µm cover."""
    return int(round(n_shown * (float(shown_size) / float(size)) ** 2))


def bin_layer_data(shown_yx: np.ndarray, ctx: SpotContext, size: int, name: str) -> tuple:
    """Points layer data of the dataset's bins of ``size`` µm, placed as the shown bins are.

    Parameters
    ----------
    shown_yx : numpy.ndarray
        (n, 2) positions of the shown bins (the layer's data: where napari shows them, e.g. moved beside
        another dataset).
    ctx : SpotContext
        The shown layer's context (its table, SpatialData and source).
    size : int
        Bin size to read (µm); one of :func:`bin_sizes_of`.
    name : str
        Name of the new layer.

    Returns
    -------
    tuple
        ``(yx, kwargs, 'points')`` with its own :class:`SpotContext` (the table of that size; for a SpatialData
        the same object, so results written into it are saved with it).
    """
    if ctx.sdata is not None:
        key = bin_tables(ctx.sdata)[int(size)]
        adata, sdata = ctx.sdata.tables[key], ctx.sdata
    else:
        key, (adata, sdata) = None, read_spatial(ctx.source, bin_size=int(size))
    here = _points(spatial_layer_data(ctx.adata, ctx.sdata, source=ctx.source))[0]
    shift = np.median(np.asarray(shown_yx, dtype=float) - here, axis=0)  # the shown dataset's move, if any
    yx, kwargs, kind = _points(spatial_layer_data(adata, sdata, name=name, source=ctx.source, table_key=key))
    return yx + shift, kwargs, kind


def _points(layers: list[tuple]) -> tuple:
    return next(layer for layer in layers if layer[2] == "points")
