"""Nuclei per spot and the ``N_cells_per_location`` prior derived from them.

Coordinates (DESIGN.md rule 7): nuclei come in image pixels as (row, col) = (y, x), as napari shows them;
Visium spot centres ``adata.obsm['spatial']`` are (x, y) in full-resolution pixels. An image stored at
``hires`` / ``lowres`` scale sees a spot at (row, col) = (y, x) * scalef with radius
``spot_diameter_fullres / 2 * scalef``; :func:`spots_in_image` does that conversion, once.

Round spots and square bins
---------------------------
A standard Visium spot is a 55 µm disc: a nucleus is counted in a spot when its centre lies in the circle.
A Visium HD bin is an axis-aligned square ``bin_size_um`` on a side (``scalefactors['bin_side_fullres']``
full-resolution pixels; :func:`spot_shape` tells which from the scale factors): counted in a circle of the
bin's width, a bin would lose its corners (the inscribed circle is pi / 4 = 79 % of the square), so squares
are counted as squares (``shape='square'``, with half the side where a circle has its radius). Bins tile the
tissue and are smaller than or about as large as a nucleus (2, 8 µm), so each nucleus goes to one bin only:
the bin whose centre is nearest (in the max-norm, the squares' own distance) among those whose square holds
its centre; on a shared edge the tie goes to one of the two. Summed over the bins, the counts are the nuclei
centred in the bins, each once.

From nuclei inside the spot to cells that give RNA
---------------------------------------------------
A nucleus is counted in a spot when its centre lies inside the 55 µm circle. The cells whose RNA the spot
captures are those whose bodies overlap the circle, which also includes cells centred just outside it.
With nuclei spread evenly and a cell of radius ``c`` (µm) contributing when its centre lies within
``R + c`` of the spot centre (``R`` = 27.5 µm), the expected number of contributing cells is the count
times ``((R + c) / R) ** 2``: 1.0 for ``c = 0`` (count centres only; the default, and how the synthetic
data are built), 1.39 for ``c = 5`` µm. Pass ``cell_radius_um`` to apply it. For a square bin of side ``s``
the cells reaching in are those centred within ``c`` of the square, an area of ``s² + 4 s c + pi c²``
(the square grown by ``c``, with rounded corners): the factor is that over ``s²``, large for small bins
(2 µm, c = 5 µm: 31; 8 µm: 4.7), since a cell body spans several bins. A single 2-D section also
misses nuclei cut outside the section plane and shows fragments of others; those effects are not
corrected here.

The tissue-level value
----------------------
Cells per spot are skewed (a few crowded spots, many ordinary ones). Winsorising a fixed 5 % at each tail
of a skewed distribution takes more from the long upper tail than it gives to the lower one, so the mean
came out low, the more so the sparser the tissue: -3.5 % at 2 cells per spot, -1 % at 15, with every
nucleus counted exactly. The default now clips only outliers: counts beyond Tukey's far fences (three
interquartile ranges outside the quartiles) on the square-root scale, where counts of any density have
about the same spread. Clean counts are not touched and the mean is unbiased at every density; a fold or
a bubble far from the rest is still clipped. ``trim=0.05`` gives the former winsorised mean.

The interquartile range on the square-root scale is taken at least as large as a Poisson count's (0.674):
small bins hold 0-3 nuclei, often with both quartiles at 0 (or 1), and a range of 0 would make every
other count an outlier and clip the mean to the quartile. No quantity here divides by the spot's area, so
counts per square bin and per round spot go through the same estimate.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..io import library_scalefactors
from ..io._visium_hd import BIN_SIDE_KEY, BIN_SIZE_KEY

logger = logging.getLogger(__name__)

__all__ = [
    "NCellsEstimate",
    "count_nuclei_per_spot",
    "estimate_n_cells_per_location",
    "outlier_fences",
    "overlap_scaling",
    "spot_shape",
    "spots_in_image",
]

#: Visium spot diameter (µm).
VISIUM_SPOT_DIAMETER_UM = 55.0
#: the shapes counted: round Visium spots, square Visium HD bins
SPOT_SHAPES = ("circle", "square")
#: interquartile range of a Poisson count on the square-root scale (sd 1/2): the least spread of counts
_POISSON_ROOT_IQR = 1.349 * 0.5


def _check_shape(shape: str) -> str:
    if shape not in SPOT_SHAPES:
        raise ValueError(f"shape must be one of {SPOT_SHAPES}, got {shape!r}")
    return shape


def spot_shape(scalefactors) -> str:
    """``'square'`` for the bins of a Visium HD table, ``'circle'`` for round Visium spots.

    Parameters
    ----------
    scalefactors : mapping or anndata.AnnData
        A library's scale factors (``uns['spatial'][library]['scalefactors']``), or a scanpy-layout table
        whose libraries are looked at. Visium HD bins carry ``'bin_size_um'`` (or ``'bin_side_fullres'``).

    Returns
    -------
    str
    """
    if hasattr(scalefactors, "uns"):
        found = library_scalefactors(scalefactors)
        return "square" if any(spot_shape(f) == "square" for f in found) else "circle"
    if not hasattr(scalefactors, "get"):
        return "circle"
    for key in (BIN_SIZE_KEY, BIN_SIDE_KEY):
        value = scalefactors.get(key)
        try:
            if value is not None and float(value) > 0:
                return "square"
        except (TypeError, ValueError):
            continue
    return "circle"


def _as_points(points, name: str) -> np.ndarray:
    if isinstance(points, pd.DataFrame):
        if {"row", "col"}.issubset(points.columns):
            arr = points[["row", "col"]].to_numpy(dtype=np.float64)
        else:
            arr = points.to_numpy(dtype=np.float64)
    else:
        arr = np.asarray(points, dtype=np.float64)
    if arr.size == 0:
        return np.zeros((0, 2))
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"{name} must have shape (n, 2) as (row, col), got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains non-finite coordinates")
    return arr


def spots_in_image(spatial_xy, scalef: float, spot_diameter_fullres: float) -> tuple[np.ndarray, float]:
    """Spot centres and radius in the pixels of an image stored at scale ``scalef``.

    Parameters
    ----------
    spatial_xy : array-like
        (n_obs, 2) spot centres as (x, y) in full-resolution pixels (``adata.obsm['spatial']``).
    scalef : float
        Full-resolution -> image scale factor (``tissue_hires_scalef``, ``tissue_lowres_scalef``, or 1).
    spot_diameter_fullres : float
        Spot diameter in full-resolution pixels (``scalefactors['spot_diameter_fullres']``).

    Returns
    -------
    centres : numpy.ndarray
        (n_obs, 2) as (row, col) = (y, x) * scalef, image pixels.
    radius : float
        Spot radius in image pixels.
    """
    xy = np.asarray(spatial_xy, dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] != 2:
        raise ValueError(f"spatial_xy must have shape (n_obs, 2) as (x, y), got {xy.shape}")
    if not float(scalef) > 0 or not float(spot_diameter_fullres) > 0:
        raise ValueError(f"scalef and spot_diameter_fullres must be positive, got {scalef}, {spot_diameter_fullres}")
    return xy[:, ::-1] * float(scalef), 0.5 * float(spot_diameter_fullres) * float(scalef)


def count_nuclei_per_spot(nuclei, spots, radius, *, shape: str = "circle") -> np.ndarray:
    """Number of nuclei centres inside each spot's circle, or each bin's square.

    Parameters
    ----------
    nuclei : array-like or pandas.DataFrame
        (n_nuclei, 2) nuclei centres as (row, col), or a table with ``row`` and ``col`` columns
        (as :func:`detect_nuclei` returns or a napari Points layer holds).
    spots : array-like
        (n_obs, 2) spot centres as (row, col) in the same frame and units as ``nuclei``
        (see :func:`spots_in_image`).
    radius : float or array-like
        Spot radius in the same units, one value or (n_obs,); for square bins, half the side.
    shape : {'circle', 'square'}
        ``'circle'``: round Visium spots, a nucleus counts in every circle holding its centre (KD-tree ball
        query). ``'square'``: Visium HD bins, axis-aligned squares of side ``2 * radius``; a nucleus counts
        once, in the bin whose centre is nearest (max-norm) among those whose square holds its centre (see
        the module's notes; :func:`spot_shape` tells which a table has).

    Returns
    -------
    numpy.ndarray
        (n_obs,) int64 counts. A nucleus on the boundary (distance == radius; on a square's edge) counts.
    """
    from scipy.spatial import cKDTree

    _check_shape(shape)
    pts = _as_points(nuclei, "nuclei")
    ctr = _as_points(spots, "spots")
    rad = np.broadcast_to(np.asarray(radius, dtype=np.float64), (len(ctr),))
    if np.any(~np.isfinite(rad)) or np.any(rad <= 0):
        raise ValueError("radius must be positive and finite")
    if len(pts) == 0 or len(ctr) == 0:
        return np.zeros(len(ctr), dtype=np.int64)
    if shape == "square":
        return _count_in_squares(pts, ctr, rad)
    tree = cKDTree(pts)
    if np.all(rad == rad[0]):
        return np.asarray(tree.query_ball_point(ctr, rad[0], return_length=True), dtype=np.int64)
    return np.asarray(
        [tree.query_ball_point(c, r, return_length=True) for c, r in zip(ctr, rad, strict=True)], dtype=np.int64
    )


def _count_in_squares(pts: np.ndarray, ctr: np.ndarray, half: np.ndarray) -> np.ndarray:
    """Nuclei per axis-aligned square (centres ``ctr``, half sides ``half``), each nucleus in one square at most:
    the one whose centre is nearest in the max-norm among those holding it."""
    from scipy.spatial import cKDTree

    tree = cKDTree(ctr)
    reach = float(half.max()) * (1.0 + 1e-9)
    uniform = bool(np.all(half == half[0]))
    k = 1 if uniform else min(len(ctr), 9)  # bins of several sizes: the nearest few, the first that holds it
    dist, idx = tree.query(pts, k=k, p=np.inf, distance_upper_bound=reach)
    dist, idx = dist.reshape(len(pts), k), idx.reshape(len(pts), k)
    found = idx < len(ctr)
    holds = np.zeros_like(found)
    holds[found] = dist[found] <= half[idx[found]] * (1.0 + 1e-9)
    first = np.argmax(holds, axis=1)
    counted = holds[np.arange(len(pts)), first]
    return np.bincount(idx[counted, first[counted]], minlength=len(ctr)).astype(np.int64)


def overlap_scaling(
    cell_radius_um: float, spot_diameter_um: float = VISIUM_SPOT_DIAMETER_UM, shape: str = "circle"
) -> float:
    """Factor from nuclei centred in the spot to cells overlapping it.

    A circle of radius ``R``: ``((R + c) / R) ** 2``. A square of side ``s``: ``(s² + 4 s c + pi c²) / s²``,
    the square grown by ``c`` over the square.

    Parameters
    ----------
    cell_radius_um : float
        Radius ``c`` of the part of a cell that contributes RNA beyond its centre (µm); 0 counts centres only.
    spot_diameter_um : float
        Spot diameter (µm), ``R`` is half of it; for a square bin, its side ``s``.
    shape : {'circle', 'square'}
        Round Visium spots or square Visium HD bins.

    Returns
    -------
    float
    """
    _check_shape(shape)
    if cell_radius_um < 0 or not spot_diameter_um > 0:
        raise ValueError(f"need cell_radius_um >= 0 and spot_diameter_um > 0, got {cell_radius_um}, {spot_diameter_um}")
    if shape == "square":
        s, c = float(spot_diameter_um), float(cell_radius_um)
        return (s * s + 4.0 * s * c + math.pi * c * c) / (s * s)
    r = 0.5 * spot_diameter_um
    return ((r + cell_radius_um) / r) ** 2


@dataclass
class NCellsEstimate:
    """A tissue-level ``N_cells_per_location`` and the per-spot prior behind it.

    Attributes
    ----------
    value : float
        Tissue-level cells per spot (mean of the in-tissue spots with outliers clipped, times ``scaling``;
        see the module's notes): the scalar to pass as ``N_cells_per_location``.
    spread : float
        Robust standard deviation of the scaled counts (interquartile range / 1.349).
    median, q05, q95 : float
        Quantiles of the scaled in-tissue counts.
    n_spots : int
        In-tissue spots used.
    scaling : float
        Multiplier from counted nuclei to contributing cells (see :func:`overlap_scaling`).
    per_spot : numpy.ndarray
        (n_obs,) per-spot prior means, ``max(count * scaling, min_cells)``; spots outside the tissue get
        ``value``. Pass as ``N_cells_per_location`` for a per-spot prior.
    """

    value: float
    spread: float
    median: float
    q05: float
    q95: float
    n_spots: int
    scaling: float
    per_spot: np.ndarray = field(repr=False)

    def summary(self) -> str:
        """One line for a log or a label."""
        return (
            f"N_cells_per_location ≈ {self.value:.1f} (robust sd {self.spread:.1f}, median {self.median:.1f}, "
            f"5–95% {self.q05:.1f}–{self.q95:.1f}; {self.n_spots} in-tissue spots, scaling {self.scaling:.2f})"
        )


def outlier_fences(values, k: float = 3.0) -> tuple[float, float]:
    """Tukey's fences of non-negative counts on the square-root scale: values outside them are outliers.

    ``sqrt`` makes the spread of counts about the same at every density (for Poisson counts its variance
    is 1/4 whatever the mean), so one ``k`` serves sparse and crowded tissue alike. With ``k = 3`` ("far
    out") clean counts, however skewed by the tissue's layout, lie inside. The interquartile range is taken
    at least a Poisson count's (0.674 on this scale), so counts of small bins, mostly 0 or 1, keep their
    spread.

    Parameters
    ----------
    values : array-like
        Non-negative counts (or scaled counts).
    k : float
        Interquartile ranges beyond the quartiles.

    Returns
    -------
    tuple of float
        (low, high) on the original scale.
    """
    root = np.sqrt(np.asarray(values, dtype=np.float64))
    q1, q3 = np.quantile(root, [0.25, 0.75])
    iqr = max(q3 - q1, _POISSON_ROOT_IQR)  # never narrower than a Poisson count's (see the module's notes)
    low, high = max(q1 - k * iqr, 0.0), q3 + k * iqr
    return float(low**2), float(high**2)


def estimate_n_cells_per_location(
    counts,
    in_tissue=None,
    *,
    cell_radius_um: float = 0.0,
    spot_diameter_um: float | None = None,
    spot_shape: str = "circle",
    scaling: float | None = None,
    trim: float | None = None,
    min_cells: float | None = None,
) -> NCellsEstimate:
    """Estimate ``N_cells_per_location`` (tissue level and per spot) from nuclei counted per spot.

    Parameters
    ----------
    counts : array-like
        (n_obs,) nuclei per spot (:func:`count_nuclei_per_spot`).
    in_tissue : array-like of bool, optional
        (n_obs,) which spots lie on tissue (``adata.obs['in_tissue']``); default all.
    cell_radius_um : float
        Reach of a cell beyond its nucleus centre (µm) for :func:`overlap_scaling`; 0 (default) counts
        nuclei centres in the spot only.
    spot_diameter_um : float, optional
        Spot diameter (µm) for the scaling, or the side of a square bin; default 55 µm for round spots (a
        bin's side must be given when ``cell_radius_um`` > 0).
    spot_shape : {'circle', 'square'}
        Round Visium spots or square Visium HD bins, for the scaling only: counts of either go through
        the same mean and fences, nothing is divided by an area.
    scaling : float, optional
        Explicit multiplier; overrides ``cell_radius_um``.
    trim : float, optional
        Fraction winsorised at each tail before the mean. Default (None): clip only outliers, counts
        beyond Tukey's far fences on the square-root scale (:func:`outlier_fences`), which leaves the mean
        of clean counts unbiased at every density while a fold or bubble is still clipped.
    min_cells : float, optional
        Floor of the per-spot prior (the model needs positive values). Default: 1 cell, or the tissue's
        mean where that is lower (Visium HD's 2 µm bins hold ~0.1 cells each: a floor of 1 would put
        ten times too many cells in every empty bin).

    Returns
    -------
    NCellsEstimate

    Raises
    ------
    ValueError
        On negative counts, mismatched lengths, no in-tissue spots or invalid options.
    """
    c = np.asarray(counts, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(c)) or np.any(c < 0):
        raise ValueError("counts must be finite and non-negative")
    mask = np.ones(len(c), dtype=bool) if in_tissue is None else np.asarray(in_tissue).astype(bool).reshape(-1)
    if mask.shape != c.shape:
        raise ValueError(f"in_tissue has {mask.size} values but counts has {c.size}")
    if not mask.any():
        raise ValueError("no in-tissue spots to estimate from")
    if trim is not None and not 0 <= trim < 0.5:
        raise ValueError(f"trim must be None or in [0, 0.5), got {trim}")
    if min_cells is not None and not min_cells > 0:
        raise ValueError(f"min_cells must be positive, got {min_cells}")
    _check_shape(spot_shape)
    if spot_diameter_um is None:
        if spot_shape == "square" and scaling is None and cell_radius_um > 0:
            raise ValueError("give the bin side (spot_diameter_um, µm) to scale counts of square bins")
        spot_diameter_um = VISIUM_SPOT_DIAMETER_UM
    factor = overlap_scaling(cell_radius_um, spot_diameter_um, spot_shape) if scaling is None else float(scaling)
    if not (factor > 0 and math.isfinite(factor)):
        raise ValueError(f"scaling must be positive, got {scaling}")
    x = c[mask] * factor
    if trim is None:
        lo, hi = outlier_fences(x)
    else:
        lo, hi = np.quantile(x, [trim, 1.0 - trim]) if trim > 0 else (x.min(), x.max())
    value = float(np.clip(x, lo, hi).mean())
    if min_cells is None:
        min_cells = min(1.0, value) if value > 0 else 1.0
    q05, q25, q50, q75, q95 = np.quantile(x, [0.05, 0.25, 0.5, 0.75, 0.95])
    per_spot = np.where(mask, np.maximum(c * factor, min_cells), max(value, min_cells))
    if value <= 0:
        logger.warning("no nuclei counted in the in-tissue spots; the estimate is 0")
    return NCellsEstimate(
        value=value,
        spread=float((q75 - q25) / 1.349),
        median=float(q50),
        q05=float(q05),
        q95=float(q95),
        n_spots=int(mask.sum()),
        scaling=float(factor),
        per_spot=per_spot,
    )
