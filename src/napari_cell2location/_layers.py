"""Spatial data and Cell2location results -> napari layer data (pure functions, no napari import).

Coordinate convention (written once, used by the reader, the sample data and the widgets):

* napari world coordinates are **full-resolution pixels** as ``(row, col) = (y, x)``;
* Visium ``obsm['spatial']`` is ``(x, y)`` in full-resolution pixels, so a spot's napari position is
  ``obsm['spatial'][:, ::-1]``;
* an image stored at ``hires`` / ``lowres`` scale has image pixel ``(r, c) = (y, x) * scalef``; its layer
  gets ``scale = 1 / scalef`` (pixel centres at integer indices, as in napari and Space Ranger), so pixel
  ``(r, c)`` sits at world ``(r, c) / scalef`` and spots land exactly on the tissue;
* several sections (libraries) whose frames overlap are placed side by side in x, never overlapped; so are
  several datasets opened together (one rule: :func:`napari_cell2location.io._sections.side_by_side_shifts`);
* Visium spots are discs of ``spot_diameter_fullres``; Visium HD bins are squares (``symbol='square'``) of
  their true side, ``bin_size_um / microns_per_pixel`` full-resolution pixels
  (:func:`napari_cell2location.io.bin_side`), and so are the results drawn over them.

Sections are parsed from the scanpy layout or SpatialData in :mod:`napari_cell2location.io._sections`.

Everything here returns plain numpy / pandas objects or napari ``LayerDataTuple`` s
(``(data, kwargs, layer_type)``), so it runs and is tested without Qt.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from ._contract import EXPORTED_SUMMARIES, QC_KEY, abundance_key
from .io._sections import (
    bounding_box,
    estimate_spot_diameter,
    layout_side_by_side,
    scanpy_sections,
    side_by_side_shifts,
    spatialdata_sections,
)
from .io._spatial import table_bin_size
from .io._visium_hd import BIN_SIZE_KEY, bin_side

logger = logging.getLogger(__name__)

#: metadata key on a spots layer holding the :class:`SpotContext`
CONTEXT_KEY = "cell2location"
#: key of :attr:`SpotContext.extra` saying the spots are ``'square'`` bins (a SpatialData's Visium HD bins; the
#: scanpy layout says it in its scale factors); ``extra[BIN_SIZE_KEY]`` is then their size in µm when known
SHAPE_KEY = "spot_shape"
#: metadata key of a layer's whole feature table, when its ``features`` hold only what hovering shows
FEATURE_TABLE_KEY = "cell2location_features"
#: features hovering a spot always shows, when the table has them (besides what colours the layer)
HOVER_ALWAYS = ("barcode", "total_counts", "total_cells", "reconstruction_r")
#: colours of the composite view (up to this many cell types at once)
COMPOSITE_COLORS = (
    (1.0, 0.2, 0.2),
    (0.2, 1.0, 0.2),
    (0.25, 0.45, 1.0),
    (1.0, 0.9, 0.1),
    (1.0, 0.2, 1.0),
    (0.1, 0.95, 0.95),
)


def feature_name(stat: str, cell_type: str) -> str:
    """Name of the layer feature holding ``stat`` of ``cell_type`` (e.g. ``'q05 B_cell'``)."""
    return f"{stat} {cell_type}"


@dataclass
class SpotContext:
    """What a spots layer needs to find its counts again; stored in ``layer.metadata['cell2location']``.

    Parameters
    ----------
    adata : anndata.AnnData
        The (n_obs, n_vars) counts table the layer's points are the rows of (same order).
    sdata : spatialdata.SpatialData or None
        The whole dataset when it came from SpatialData (results written there are saved with it).
    signatures : pandas.DataFrame or None
        Reference signatures (n_genes, n_cell_types) that came with the data (sample data), if any.
    source : str
        Where the data came from (a path or ``'sample'``).
    """

    adata: Any
    sdata: Any = None
    signatures: pd.DataFrame | None = None
    source: str = ""
    extra: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------
# features
# ------------------------------------------------------------------------------------------------


def cell_types(adata) -> list[str]:
    """Cell types with exported abundances in ``adata`` (from ``uns['mod']`` or the obsm columns)."""
    mod = adata.uns.get("mod", {})
    if hasattr(mod, "get") and mod.get("factor_names") is not None:
        return [str(n) for n in np.asarray(mod["factor_names"]).ravel()]
    for stat in EXPORTED_SUMMARIES:
        if abundance_key(stat) in adata.obsm:
            prefix = f"{stat}cell_abundance_w_sf_"
            return [
                str(c)[len(prefix) :] if str(c).startswith(prefix) else str(c) for c in adata.obsm[abundance_key(stat)]
            ]
    return []


def abundance_features(adata) -> pd.DataFrame:
    """Every exported statistic of every cell type as columns ``'{stat} {cell_type}'``.

    Parameters
    ----------
    adata : anndata.AnnData
        With ``obsm['{stat}_cell_abundance_w_sf']`` DataFrames (cell2location's keys).

    Returns
    -------
    pandas.DataFrame
        (n_obs, n_stats * n_cell_types), float32, on a RangeIndex.
    """
    types = cell_types(adata)
    cols = {}
    for stat in EXPORTED_SUMMARIES:
        key = abundance_key(stat)
        if key not in adata.obsm:
            continue
        values = np.asarray(adata.obsm[key], dtype=np.float32)
        for j, ct in enumerate(types[: values.shape[1]]):
            cols[feature_name(stat, ct)] = values[:, j]
    return pd.DataFrame(cols)


def spot_features(adata) -> pd.DataFrame:
    """Features of a spots layer: barcode, total counts, numeric obs columns, any abundances and the fit's
    per-spot QC (``obsm['cell2location_qc']``).

    Parameters
    ----------
    adata : anndata.AnnData
        (n_obs, n_vars) counts.

    Returns
    -------
    pandas.DataFrame
        n_obs rows on a RangeIndex.
    """
    x = adata.X
    total = np.asarray(x.sum(axis=1)).ravel().astype(np.float32)
    df = pd.DataFrame({"barcode": adata.obs_names.astype(str).to_numpy(), "total_counts": total})
    for col in adata.obs.columns:
        s = adata.obs[col]
        if col in df or col in ("spot_id", "region"):
            continue
        if pd.api.types.is_numeric_dtype(s) or isinstance(s.dtype, pd.CategoricalDtype):
            df[str(col)] = s.to_numpy()
    ab = abundance_features(adata)
    if ab.shape[1]:
        df = pd.concat([df, ab], axis=1)
    qc = adata.obsm.get(QC_KEY)
    if isinstance(qc, pd.DataFrame) and len(qc) == len(df):  # a fit's per-spot QC, saved with the results
        extra = [c for c in qc.columns if c not in df]
        df = pd.concat([df, qc[extra].reset_index(drop=True).astype(np.float32)], axis=1)
    return df


# ------------------------------------------------------------------------------------------------
# colours
# ------------------------------------------------------------------------------------------------


def robust_limits(values: np.ndarray, percentiles: tuple[float, float] = (1.0, 99.0)) -> tuple[float, float]:
    """Contrast limits from percentiles of the finite values, never empty (hi > lo)."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(v, percentiles)
    if not hi > lo:
        hi = lo + (abs(lo) * 1e-3 or 1.0)
    return float(lo), float(hi)


def value_colors(values: np.ndarray, cmap: str = "magma", limits: tuple[float, float] | None = None) -> np.ndarray:
    """RGBA colours (n, 4) float32 of ``values`` (n,) through a matplotlib colormap and contrast limits."""
    from matplotlib import colormaps

    v = np.asarray(values, dtype=float)
    lo, hi = robust_limits(v) if limits is None else limits
    t = np.clip((v - lo) / (hi - lo), 0.0, 1.0)
    t[~np.isfinite(t)] = 0.0
    return colormaps[cmap](t).astype(np.float32)


def composite_colors(values: np.ndarray, colors=COMPOSITE_COLORS, limits=None) -> np.ndarray:
    """Several cell types at once: each scaled to [0, 1] by its own limits, coloured, added and clipped.

    Parameters
    ----------
    values : numpy.ndarray
        (n_spots, k) abundances of k <= len(colors) cell types.
    colors : sequence of RGB tuples
        One colour per column.
    limits : sequence of (lo, hi), optional
        Per-column limits (default :func:`robust_limits` with (1, 99) percentiles).

    Returns
    -------
    numpy.ndarray
        (n_spots, 4) float32 RGBA; alpha grows with the strongest type so empty spots are faint.
    """
    v = np.atleast_2d(np.asarray(values, dtype=float))
    if v.shape[1] > len(colors):
        raise ValueError(f"at most {len(colors)} cell types at once, got {v.shape[1]}")
    limits = [robust_limits(v[:, j]) for j in range(v.shape[1])] if limits is None else limits
    rgb = np.zeros((v.shape[0], 3))
    strength = np.zeros(v.shape[0])
    for j in range(v.shape[1]):
        lo, hi = limits[j]
        t = np.nan_to_num(np.clip((v[:, j] - lo) / (hi - lo), 0.0, 1.0))
        rgb += t[:, None] * np.asarray(colors[j])[None, :]
        strength = np.maximum(strength, t)
    rgba = np.concatenate([np.clip(rgb, 0, 1), (0.25 + 0.75 * strength)[:, None]], axis=1)
    return rgba.astype(np.float32)


# ------------------------------------------------------------------------------------------------
# layer data
# ------------------------------------------------------------------------------------------------


def spatial_layer_data(
    adata,
    sdata=None,
    *,
    name: str = "spots",
    signatures: pd.DataFrame | None = None,
    source: str = "",
    table_key: str | None = None,
) -> list[tuple]:
    """Layer data tuples of a spatial dataset: one Image per section image, one Points layer of spots.

    Parameters
    ----------
    adata : anndata.AnnData
        (n_obs, n_vars) counts; scanpy Visium layout when ``sdata`` is None.
    sdata : spatialdata.SpatialData, optional
        The dataset ``adata`` is a table of.
    name : str
        Base name of the layers.
    signatures : pandas.DataFrame, optional
        Reference signatures to attach (sample data).
    source : str
        Where the data came from.
    table_key : str, optional
        SpatialData table to use.

    Returns
    -------
    list of tuple
        ``(data, kwargs, 'image' | 'points')``; images first. The points layer's ``metadata``
        holds a :class:`SpotContext` under ``'cell2location'``.
    """
    shape = "circle"
    if sdata is not None:
        if table_key is None:  # the table read (a Visium HD store has one per bin size)
            table_key = next((k for k, t in sdata.tables.items() if t is adata), None)
        sections, yx, diameter, table_key, shape = spatialdata_sections(sdata, table_key)
    else:
        sections, yx, diameter = scanpy_sections(adata)
    missing = ~np.isfinite(yx).all(1)
    if missing.any():
        logger.warning("%d spots have no position and are placed at the origin", int(missing.sum()))
        yx[missing] = 0.0
    yx = layout_side_by_side(sections, yx)
    if diameter is None:
        diameter = estimate_spot_diameter(yx)
    layers: list[tuple] = []
    for sec in sections:
        if sec.image is None:
            continue
        from .io import Pyramid

        img = sec.image
        image_kwargs = {"name": f"{sec.name} H&E" if len(sections) > 1 else f"{name} H&E", "affine": sec.image_affine}
        if isinstance(img, Pyramid):  # a multiscale image (a SpatialData image with several scales)
            image_kwargs.update(rgb=img.rgb, multiscale=True)
        else:
            image_kwargs["rgb"] = img.ndim == 3 and img.shape[-1] in (3, 4)
        layers.append((img, image_kwargs, "image"))
    ctx = SpotContext(adata=adata, sdata=sdata, signatures=signatures, source=source)
    kwargs = {"name": name, "size": float(diameter), "border_width": 0.0, "opacity": 0.85}
    kwargs.update(_bin_kwargs(adata if sdata is None else None))
    if shape == "square":  # a SpatialData's square bins (spatialdata-io's Visium HD)
        kwargs["symbol"] = ctx.extra[SHAPE_KEY] = "square"
        size_um = table_bin_size(sdata, table_key)
        if size_um is not None:
            ctx.extra[BIN_SIZE_KEY] = float(size_um)
    kwargs.update(_table_kwargs(spot_features(adata)))
    kwargs["metadata"][CONTEXT_KEY] = ctx
    layers.append((yx, kwargs, "points"))
    return layers


def place_side_by_side(datasets: list[list[tuple]], shown=None) -> list[tuple]:
    """Layer data of several datasets opened together, moved in x so that no two overlap.

    The sections' rule (:func:`~napari_cell2location.io._sections.side_by_side_shifts`) applied to whole
    datasets: nothing moves unless two datasets overlap; then the first stays and the others follow
    to its right, the same gap apart as the sections of one dataset. ``shown`` is what the viewer already
    shows: it stays, and it comes first (napari opens the files of one *Open* one by one).

    Parameters
    ----------
    datasets : list of list of tuple
        The layer data tuples of each dataset (:func:`spatial_layer_data`), in order.
    shown : array-like, optional
        ``(row_min, col_min, row_max, col_max)`` of the layers already in the viewer.

    Returns
    -------
    list of tuple
        All layer data tuples; shifted ones are copies (points data and image affines).
    """
    boxes = [
        bounding_box(
            [data for data, _, kind in layers if kind == "points"],
            [(data, kwargs["affine"]) for data, kwargs, kind in layers if kind == "image"],
        )
        for layers in datasets
    ]
    shifts = side_by_side_shifts([None if shown is None else np.asarray(shown, dtype=float), *boxes])[1:]
    out: list[tuple] = []
    for layers, shift in zip(datasets, shifts, strict=True):
        for data, kwargs, kind in layers:
            if shift and kind == "points":
                data = np.asarray(data, dtype=float) + [0.0, shift]
            elif shift and kind == "image":
                affine = np.array(kwargs["affine"], dtype=float)
                affine[1, 2] += shift
                kwargs = dict(kwargs, affine=affine)
            out.append((data, kwargs, kind))
    return out


# ------------------------------------------------------------------------------------------------
# hover: a layer's features hold what hovering a spot shows; its whole table sits in its metadata
# ------------------------------------------------------------------------------------------------


def feature_table(layer) -> pd.DataFrame:
    """Every feature of a spots layer: the table in its metadata, or its features (a user's layer)."""
    table = layer.metadata.get(FEATURE_TABLE_KEY)
    return table if isinstance(table, pd.DataFrame) else layer.features


def hover_columns(table: pd.DataFrame, shown) -> list[str]:
    """Columns hovering shows: the barcode, the feature(s) the layer is coloured by, then :data:`HOVER_ALWAYS`.

    Parameters
    ----------
    table : pandas.DataFrame
        The layer's whole feature table.
    shown : tuple
        What colours the layer: ``(stat, cell_type)``, ``(stat, (cell_type, ...))`` for a composite,
        or ``('qc', column)``.
    """
    names = ["barcode"]
    stat, what = shown
    if stat == "qc":
        names.append(what)
    else:
        names.extend(feature_name(stat, ct) for ct in (what if isinstance(what, tuple) else (what,)))
    names += [n for n in HOVER_ALWAYS if n not in names]
    return [n for n in dict.fromkeys(names) if n in table]


def show_on_hover(layer, shown) -> None:
    """Record what colours ``layer`` (``metadata['shown']``) and make it, with a few QC values, the
    layer's features: napari's status bar and tooltip then show that, not every feature."""
    table = feature_table(layer)
    if FEATURE_TABLE_KEY not in layer.metadata:
        layer.metadata[FEATURE_TABLE_KEY] = table
    layer.metadata["shown"] = shown
    layer.features = table[hover_columns(table, shown)]


def _table_kwargs(table: pd.DataFrame) -> dict:
    """``features``, ``face_color`` and ``metadata`` of a layer showing ``table``.

    With abundances, the layer is coloured by the first cell type's q05 (or means), its whole table goes
    into its metadata and its features hold what hovering shows; otherwise it is coloured by total
    counts and its features are the table.
    """
    stats = [s for s in EXPORTED_SUMMARIES if any(c.startswith(f"{s} ") for c in table.columns)]
    if not stats:
        return {
            "features": table,
            "face_color": value_colors(table["total_counts"].to_numpy(), "viridis"),
            "metadata": {},
        }
    stat = "q05" if "q05" in stats else stats[0]
    first = next(c for c in table.columns if c.startswith(f"{stat} "))
    shown = (stat, first[len(stat) + 1 :])
    return {
        "features": table[hover_columns(table, shown)],
        "face_color": value_colors(table[first].to_numpy(), "magma"),
        "metadata": {FEATURE_TABLE_KEY: table, "shown": shown},
    }


def _bin_kwargs(adata) -> dict:
    """``symbol`` and ``size`` of the Points of Visium HD bins (squares of their true side); {} for spots."""
    side = bin_side(adata) if adata is not None else None
    return {} if side is None else {"symbol": "square", "size": side}


def results_layer_data(yx: np.ndarray, size, adata, ctx: SpotContext, qc=None, name: str = "cell abundance") -> tuple:
    """Points layer data of fitted abundances: its table holds every statistic of every cell type.

    Parameters
    ----------
    yx : numpy.ndarray
        (n_obs, 2) spot centres in world coordinates (those of the spots layer).
    size : float or numpy.ndarray
        Spot diameter(s), or the side of Visium HD bins (drawn as squares, as the bins' layer).
    adata : anndata.AnnData
        Table with exported posterior (``obsm['{stat}_cell_abundance_w_sf']``).
    ctx : SpotContext
        Context to keep with the layer.
    qc : pandas.DataFrame, optional
        Per-spot QC of the fit (same rows), added to the table.
    name : str
        Layer name.

    Returns
    -------
    tuple
        ``(yx, kwargs, 'points')`` coloured by the first cell type's q05 (or means); the whole table in
        ``metadata['cell2location_features']``, what hovering shows in ``features``.
    """
    table = spot_features(adata)
    if qc is not None:
        table = pd.concat([table, qc[[c for c in qc.columns if c not in table]].reset_index(drop=True)], axis=1)
    kwargs = {"name": name, "size": size, "border_width": 0.0, **_table_kwargs(table)}
    if _bin_kwargs(adata if ctx.sdata is None else None) or ctx.extra.get(SHAPE_KEY) == "square":  # HD bins
        kwargs["symbol"] = "square"
    kwargs["metadata"][CONTEXT_KEY] = ctx
    return np.asarray(yx, dtype=float), kwargs, "points"
