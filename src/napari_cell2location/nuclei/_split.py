"""Splitting touching and overlapping nuclei that the peak detector sees as one.

Where cells are crowded (lymph node, tumour, brain cell layers) neighbouring nuclei touch or overlap, and
the difference of Gaussians of :mod:`._detect` has one maximum for the pair: the counts fall short in
proportion to how crowded the tissue is (16 % at 15 cells per spot with nuclei overlapping by up to a
fifth of their diameter, at 2, 1 and 0.5 µm/px; 4 % with this module).
The stained *shape* still shows two nuclei: a touching pair is a peanut whose two lobes are each about
one nucleus wide, joined by a narrower waist. The classical way to find the lobes is the distance map
of the stained area, which has one maximum per lobe; here it is done in a way that keeps a tiled run
equal to an untiled one:

1. stained area: the nuclear signal, lightly smoothed (``r / 4``), minus its background (a grey opening
   two nucleus diameters wide, which keeps the stroma level between nuclei even in crowded tissue);
   a pixel is stained when this contrast is at least half that of the strongest nucleus within one
   diameter (half maximum, whatever the stain's darkness);
2. lobes: local maxima of the distance to the edge of the stained area that lie at least half a nucleus
   radius inside it (:func:`blob_seeds`);
3. nuclei of a blob: each lobe stained at least half as much as a typical detected nucleus belongs to its
   nearest detected maximum within one and a half diameters; a blob is its lobes (kept at least one radius
   apart) plus its maximum where no lobe lies within one radius of it. A pair whose maximum sits on one
   nucleus gains the other; a pair whose maximum sits on the waist becomes its two lobes; a blob with a
   single lobe on its maximum is one nucleus and keeps the maximum's position (:func:`split_centres`).

Every length is in units of the nucleus radius ``r`` (``nucleus_diameter_um / 2`` in pixels). Below
three pixels per radius (e.g. a 7 µm nucleus on a 2 µm/px Visium hires image) the distance map is too
coarse, so steps 1-2 run on a grid upsampled (linearly) to at least three pixels per radius: this does
not add resolution, it only gives the distance map room for half-radius steps. How far it goes is
measured by ``benchmarks/nuclei_density.py``: it stops where two nuclei overlap so much (by 40 % of the
diameter) that their union has no waist, and where nuclei are much smaller than ``nucleus_diameter_um``
says (a diameter set too large merges neighbours before and after splitting).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["blob_seeds", "split_centres", "split_halo", "working_factor"]

#: Part of a nucleus' contrast that counts as stained (half maximum).
HALF = 0.5
#: Minimum pixels per nucleus radius of the grid the distance map is computed on.
GRID_PX_PER_RADIUS = 3.0
#: A lobe is at least this many radii deep inside the stained area.
MIN_DEPTH = 0.5
#: Lobes closer than this many radii are one nucleus; so are a lobe and a maximum this close.
MIN_SEPARATION = 1.0
#: A lobe belongs to the blob of a detected maximum within this many radii (1.5 diameters).
MAX_REACH = 3.0


def working_factor(radius_px: float) -> int:
    """Integer upsampling factor that gives at least ``GRID_PX_PER_RADIUS`` pixels per nucleus radius."""
    return max(1, int(math.ceil(GRID_PX_PER_RADIUS / float(radius_px) - 1e-9)))


def _geometry(radius_px: float) -> tuple[int, int, int, int]:
    """Factor ``u``, opening width and half-maximum window (image px), lobe window (working px)."""
    r = float(radius_px)
    u = working_factor(r)
    opening = 2 * int(round(2.0 * r)) + 1  # two diameters
    window = 2 * int(round(2.0 * r)) + 1  # one diameter either side
    lobe = max(1, int(round(0.6 * r * u)))  # as the peak detector's minimum distance
    return u, opening, window, lobe


def split_halo(radius_px: float) -> int:
    """Halo (image pixels) around a tile's core within which :func:`blob_seeds` must see the image.

    The seeds in the core then equal those of the whole image: the sum of the reaches of the smoothing
    (4 sigma), the opening (its width, minimum then maximum), the half-maximum window, the clipped
    distance map (two radii) and the lobe window, plus a pixel for the interpolation.
    """
    u, opening, window, lobe = _geometry(radius_px)
    reach = 4.0 * 0.25 * radius_px + 2 * (opening // 2) + window // 2 + 2.0 * radius_px + lobe / u + 1
    return int(math.ceil(reach)) + 1


def _upsample(a: np.ndarray, u: int) -> np.ndarray:
    """Linear interpolation of ``a`` (H, W) onto a grid ``u`` times finer: ``((H - 1) u + 1, (W - 1) u + 1)``.

    Working pixel ``u * i + j`` sits at image coordinate ``i + j / u``, so grids of two tiles line up, and
    ``lo * (1 - f) + hi * f`` returns the image's own values exactly at its pixels (from either side), so
    an upsampled strip equals the same rows of the upsampled whole.
    """
    if u == 1:
        return a
    out = a
    for axis in (0, 1):
        n = out.shape[axis]
        pos = np.arange((n - 1) * u + 1, dtype=np.float64) / u
        i0 = np.minimum(pos.astype(np.int64), max(n - 2, 0))
        frac = (pos - i0).astype(np.float32)
        frac = frac[:, None] if axis == 0 else frac[None, :]
        lo = np.take(out, i0, axis=axis)
        lo *= 1 - frac
        hi = np.take(out, np.minimum(i0 + 1, n - 1), axis=axis)
        hi *= frac
        lo += hi
        del hi
        out = lo
    return out


def _bilinear(a: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Values of ``a`` (H, W) at fractional (row, col), interpolated as :func:`_upsample` does."""
    h, w = a.shape
    r0 = np.clip(np.floor(rows).astype(np.int64), 0, max(h - 2, 0))
    c0 = np.clip(np.floor(cols).astype(np.int64), 0, max(w - 2, 0))
    r1, c1 = np.minimum(r0 + 1, h - 1), np.minimum(c0 + 1, w - 1)
    fr, fc = (rows - r0).astype(np.float32), (cols - c0).astype(np.float32)
    top = a[r0, c0] * (1 - fc) + a[r0, c1] * fc
    bottom = a[r1, c0] * (1 - fc) + a[r1, c1] * fc
    return top * (1 - fr) + bottom * fr


def _stained(contrast: np.ndarray, half: np.ndarray, u: int, rows: int = 64) -> np.ndarray:
    """Stained pixels, ``contrast >= half > 0``, on the grid ``u`` times finer, computed in strips of rows."""
    if u == 1:
        return (contrast >= half) & (half > 0)
    h, w = contrast.shape
    out = np.empty(((h - 1) * u + 1, (w - 1) * u + 1), dtype=bool)
    for i0 in range(0, max(h - 1, 1), rows):
        i1 = min(i0 + rows, h - 1)
        c, m = _upsample(contrast[i0 : i1 + 1], u), _upsample(half[i0 : i1 + 1], u)
        out[u * i0 : u * i1 + 1] = (c >= m) & (m > 0)
    return out


def _clipped_distance(stained: np.ndarray, clip: float, rows: int = 64) -> np.ndarray:
    """Euclidean distance (float32) of each stained pixel to the nearest unstained one, clipped at ``clip``.

    Computed in strips of ``rows`` rows padded by ``clip``: a distance below ``clip`` is reached within the
    padding, so the result equals the whole array's (clipped) while the transform's own buffers (16 bytes
    a pixel) stay the size of a strip.
    """
    from scipy import ndimage

    h = stained.shape[0]
    pad = int(math.ceil(clip)) + 1
    out = np.empty(stained.shape, dtype=np.float32)
    for r0 in range(0, h, rows):
        r1 = min(r0 + rows, h)
        a0, a1 = max(r0 - pad, 0), min(r1 + pad, h)
        dist = ndimage.distance_transform_edt(stained[a0:a1])
        out[r0:r1] = np.minimum(dist[r0 - a0 : r1 - a0], clip)
    return out


def blob_seeds(
    signal: np.ndarray, radius_px: float, peaks: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Lobes of the stained area of a tile: candidate centres of nuclei that touch a neighbour.

    Parameters
    ----------
    signal : numpy.ndarray
        (H, W) float32 nuclear signal of the tile and its halo (:func:`~._detect.nuclear_signal`).
    radius_px : float
        Nucleus radius in image pixels.
    peaks : numpy.ndarray
        (n, 2) integer (row, col) of the peak detector's maxima in the tile, where the contrast is read.

    Returns
    -------
    seeds : numpy.ndarray
        (m, 2) float64 (row, col) of the lobes in tile pixels (fractions of a pixel when upsampled).
    depth : numpy.ndarray
        (m,) distance of each lobe to the edge of the stained area, in nucleus radii.
    seed_contrast : numpy.ndarray
        (m,) contrast (signal above its background) at each lobe.
    peak_contrast : numpy.ndarray
        (n,) contrast at each of ``peaks``.
    """
    from scipy import ndimage

    from ._detect import _local_maxima

    u, opening, window, lobe = _geometry(radius_px)
    r_w = float(radius_px) * u
    # contrast and its local half maximum on the image's grid (smooth at the pixel scale) ...
    contrast = ndimage.gaussian_filter(np.asarray(signal, dtype=np.float32), 0.25 * radius_px, truncate=4.0)
    background = ndimage.minimum_filter(contrast, size=opening, mode="nearest")
    ndimage.maximum_filter(background, size=opening, output=background, mode="nearest")
    contrast -= background
    del background
    peak_contrast = contrast[np.asarray(peaks[:, 0]), np.asarray(peaks[:, 1])].astype(np.float32)
    half = ndimage.maximum_filter(contrast, size=window, mode="nearest")
    half *= HALF
    # ... the stained area and its distance map on the working grid
    stained = _stained(contrast, half, u)
    del half
    depth = _clipped_distance(stained, 2.0 * r_w)
    del stained
    # depths of two radii and more are not nucleus-shaped (and are clipped, so not exact near a tile's edge)
    depth[(depth < MIN_DEPTH * r_w) | (depth >= 2.0 * r_w)] = 0.0
    found = _local_maxima(depth, lobe)
    d = depth[found[:, 0], found[:, 1]] / np.float32(r_w)
    seeds = found.astype(np.float64) / u
    c = _bilinear(contrast, seeds[:, 0], seeds[:, 1])
    return seeds, d.astype(np.float32), c.astype(np.float32), peak_contrast


def _greedy_apart(points: np.ndarray, distance: float) -> np.ndarray:
    """Mask of ``points`` (in priority order) kept when each suppresses the later ones within ``distance``."""
    from scipy.spatial import cKDTree

    pairs = cKDTree(points).query_pairs(distance, output_type="ndarray")  # (m, 2), i < j
    taken = np.ones(len(points), dtype=bool)
    if len(pairs) == 0:
        return taken
    pairs = pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]
    starts = np.searchsorted(pairs[:, 0], np.arange(len(points) + 1))
    for i in np.unique(pairs[:, 0]).tolist():  # only points with a later neighbour can suppress
        if taken[i]:
            taken[pairs[starts[i] : starts[i + 1], 1]] = False
    return taken


def split_centres(
    centres: np.ndarray,
    centre_contrast: np.ndarray,
    seeds: np.ndarray,
    depth: np.ndarray,
    seed_contrast: np.ndarray,
    radius_px: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The nuclei of each detected blob: its lobes, and its peak where no lobe is on it.

    1. Lobes stained at least half as much as the median detected centre; of lobes closer than
       ``MIN_SEPARATION`` radii only the deepest is kept (ties by position, so the result does not depend on
       the order of ``seeds``).
    2. Each lobe belongs to its nearest detected centre (peak) when within ``MAX_REACH`` radii.
    3. A blob is its peak plus its lobes, the peak dropped when a lobe lies within ``MIN_SEPARATION``
       radii of it (the same nucleus). A blob that is one nucleus keeps the peak's position, so isolated
       nuclei are found exactly where the peak detector puts them.

    Parameters
    ----------
    centres : numpy.ndarray
        (n, 2) detected centres (row, col), image pixels.
    centre_contrast : numpy.ndarray
        (n,) contrast at each centre (:func:`blob_seeds`).
    seeds, depth, seed_contrast : numpy.ndarray
        Lobes of the whole image, their depth (radii) and contrast (:func:`blob_seeds`).
    radius_px : float
        Nucleus radius in image pixels.

    Returns
    -------
    keep : numpy.ndarray
        (n,) bool, the detected centres that stay.
    added : numpy.ndarray
        (k, 2) centres that replace or join them (row, col), sorted by row then column.
    parent : numpy.ndarray
        (k,) index into ``centres`` of the blob each added centre belongs to.
    """
    from scipy.spatial import cKDTree

    centres = np.asarray(centres, dtype=np.float64).reshape(-1, 2)
    seeds = np.asarray(seeds, dtype=np.float64).reshape(-1, 2)
    keep = np.ones(len(centres), dtype=bool)
    none = (keep, np.zeros((0, 2)), np.zeros(0, dtype=np.int64))
    if len(seeds) == 0 or len(centres) == 0:
        return none
    level = HALF * float(np.median(centre_contrast))
    idx = np.flatnonzero(np.asarray(seed_contrast) >= level)
    if idx.size == 0:
        return none
    # centres in (row, col) order, so that ties between equally near centres do not depend on their order
    rank = np.lexsort((centres[:, 1], centres[:, 0]))
    # lobes at least MIN_SEPARATION radii apart, deepest first
    order = idx[np.lexsort((seeds[idx, 1], seeds[idx, 0], -np.asarray(depth)[idx]))]
    lobes = seeds[order[_greedy_apart(seeds[order], MIN_SEPARATION * radius_px)]]
    dist, parent = cKDTree(centres[rank]).query(lobes)
    parent = rank[parent]
    near = dist <= MAX_REACH * radius_px
    lobes, dist, parent = lobes[near], dist[near], parent[near]
    n_lobes = np.bincount(parent, minlength=len(centres))
    on_peak = np.bincount(parent[dist <= MIN_SEPARATION * radius_px], minlength=len(centres)) > 0
    # one nucleus (a single lobe on the peak): the peak stays where it is
    alone = (n_lobes == 1) & on_peak
    use = ~alone[parent]
    keep = ~(on_peak & ~alone)
    added, parent = lobes[use], parent[use]
    order = np.lexsort((added[:, 1], added[:, 0]))
    return keep, added[order], parent[order].astype(np.int64)
