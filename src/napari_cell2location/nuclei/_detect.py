"""Nuclei detection on histology images (H&E or a nuclear fluorescence stain), tile by tile.

The default detector needs only scipy and scikit-image:

1. nuclear signal: for H&E, the hematoxylin optical density from colour deconvolution (Ruifrok & Johnston
   stain vectors, the matrix of :func:`skimage.color.rgb2hed`); for fluorescence, the intensity scaled
   to [0, 1] by the dtype's range;
2. a difference of Gaussians matched to the nucleus size (``sigma = r / 2`` minus a background at
   ``3 r``, ``r`` the nucleus radius in pixels), which keeps blobs of nucleus size and removes the slowly
   varying tissue stain; the small inner sigma keeps touching nuclei apart;
3. local maxima of windows ``0.6 r`` in half-width (as :func:`skimage.feature.peak_local_max`) whose response
   exceeds a threshold; ``threshold='auto'`` picks it from all candidate maxima of the image, above a floor
   set by the image's pixel noise (see :func:`auto_threshold` and :mod:`._signal`);
4. nuclei that touch or overlap a neighbour give one maximum for the pair; with ``split_touching`` (the
   default) the lobes of each blob's stained area (maxima of its distance map, :mod:`._split`) become its
   nuclei, so a pair counts two. Without it the counts fall short in crowded tissue (16 % at 15 cells per
   spot with overlapping nuclei); isolated nuclei are found at the same place either way.

Large images are read in square tiles with a halo wide enough that every filter and the maximum search
see the same neighbourhood as on the whole image, and each tile keeps the maxima inside its own core, so
a tiled run finds the same nuclei as an untiled one while holding only one tile (plus halo) in memory.
Any array-like that supports 2-D slicing works: numpy, dask (e.g. a SpatialData image), zarr, memmap.

StarDist or Cellpose are used per tile when asked for (``method='stardist'`` / ``'cellpose'``) and
installed; they are never required.
"""

from __future__ import annotations

import inspect
import logging
import math
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from .._jobs import run_to_end
from . import _split
from ._signal import (
    _NOISE_BINS,
    NOISE_K,
    _diff_histogram,
    auto_threshold,
    dog_noise_factor,
    nuclear_signal,
    pixel_noise_from_histogram,
)

logger = logging.getLogger(__name__)

__all__ = ["DetectProgress", "auto_threshold", "detect_nuclei", "iter_detect_nuclei", "nuclear_signal"]

_KINDS = ("he", "fluorescence")
_METHODS = ("peaks", "stardist", "cellpose")


class DetectProgress(NamedTuple):
    """Progress record yielded by :func:`iter_detect_nuclei` after each tile."""

    tile: int  #: tiles done so far (1-based)
    total: int  #: number of tiles
    n_candidates: int  #: candidate maxima found so far
    elapsed_s: float  #: seconds since the start


def _tiles(shape: tuple[int, int], chunk: int, regions=None) -> list[tuple[int, int, int, int]]:
    """Square tiles (r0, r1, c0, c1) covering the image; with ``regions`` ((n, 4) boxes r0, r1, c0, c1 in
    pixels) only the tiles that meet a box."""
    h, w = shape
    tiles = [(r, min(r + chunk, h), c, min(c + chunk, w)) for r in range(0, h, chunk) for c in range(0, w, chunk)]
    if regions is None:
        return tiles
    boxes = np.asarray(regions, dtype=np.float64).reshape(-1, 4)
    if not np.all(np.isfinite(boxes)):
        raise ValueError("regions must be finite (r0, r1, c0, c1) boxes in image pixels")
    # tile i of an axis spans [starts[i], ends[i]) and meets [b0, b1] when starts[i] < b1 and b0 < ends[i]: the
    # tiles from the first whose end passes b0 to the last that starts before b1. Marked on the tile grid
    # through a 2-D difference array: linear in the boxes (a Visium HD section has 10^5-10^6 bins).
    row_starts, col_starts = np.arange(0, h, chunk), np.arange(0, w, chunk)
    row_ends, col_ends = np.minimum(row_starts + chunk, h), np.minimum(col_starts + chunk, w)
    i0 = np.searchsorted(row_ends, boxes[:, 0], side="right")
    i1 = np.searchsorted(row_starts, boxes[:, 1], side="left")  # one past the last
    j0 = np.searchsorted(col_ends, boxes[:, 2], side="right")
    j1 = np.searchsorted(col_starts, boxes[:, 3], side="left")
    some = (i0 < i1) & (j0 < j1)
    i0, i1, j0, j1 = i0[some], i1[some], j0[some], j1[some]
    diff = np.zeros((len(row_starts) + 1, len(col_starts) + 1), dtype=np.int64)
    for rows, cols, sign in ((i0, j0, 1), (i0, j1, -1), (i1, j0, -1), (i1, j1, 1)):
        np.add.at(diff, (rows, cols), sign)
    meets = np.cumsum(np.cumsum(diff, axis=0), axis=1)[:-1, :-1] > 0
    return [tile for tile, keep in zip(tiles, meets.ravel(), strict=True) if keep]


def _local_maxima(response: np.ndarray, min_distance: int) -> np.ndarray:
    """(row, col) of positive local maxima: equal to the maximum of their (2 d + 1)² window.

    A plateau of equal maxima (touching pixels) gives one point, its pixel nearest to its centroid (the
    first in row-major order on a tie; distances are compared in exact integer arithmetic, so the choice
    does not depend on where a tile starts). This is :func:`skimage.feature.peak_local_max`'s rule without
    its pairwise spacing pass, which is a Python loop over all candidates and dominated the run time.
    """
    from scipy import ndimage

    size = 2 * int(min_distance) + 1
    is_max = (response == ndimage.maximum_filter(response, size=size, mode="nearest")) & (response > 0)
    rr, cc = np.nonzero(is_max)
    if rr.size == 0:
        return np.zeros((0, 2), dtype=np.int64)
    labels, n = ndimage.label(is_max, structure=np.ones((3, 3), dtype=bool))
    if n == rr.size:  # no plateaus: every maximum is a single pixel
        return np.stack([rr, cc], axis=1)
    lab = labels[rr, cc]
    # squared distance to the centroid times count²: (count * r - sum r)² + (count * c - sum c)², integers
    count = np.bincount(lab, minlength=n + 1).astype(np.int64)[lab]
    sr = np.bincount(lab, rr, minlength=n + 1).astype(np.int64)[lab]
    sc = np.bincount(lab, cc, minlength=n + 1).astype(np.int64)[lab]
    dist = (count * rr - sr) ** 2 + (count * cc - sc) ** 2
    order = np.lexsort((dist, lab))
    first = order[np.r_[True, lab[order][1:] != lab[order][:-1]]]
    return np.stack([rr[first], cc[first]], axis=1)


def _dog_peaks(signal: np.ndarray, radius_px: float, min_distance: int) -> tuple[np.ndarray, np.ndarray]:
    """Local maxima (row, col) of the nucleus-sized difference of Gaussians, and their responses."""
    from scipy import ndimage

    fine = ndimage.gaussian_filter(signal, 0.5 * radius_px, truncate=4.0)
    fine -= ndimage.gaussian_filter(signal, 3.0 * radius_px, truncate=4.0)
    peaks = _local_maxima(fine, min_distance)
    return peaks, fine[peaks[:, 0], peaks[:, 1]]


def _model_centres(signal_tile: np.ndarray, method: str, model: Any, radius_px: float) -> tuple[np.ndarray, np.ndarray]:
    """Nuclei centres from a StarDist / Cellpose model on one tile (label image -> centroids)."""
    from scipy import ndimage

    if method == "stardist":
        from csbdeep.utils import normalize

        labels, _ = model.predict_instances(normalize(signal_tile, 1, 99.8, axis=(0, 1)))
    else:
        out = model.eval(signal_tile, diameter=2.0 * radius_px)
        labels = out[0]
    ids = np.unique(labels)
    ids = ids[ids > 0]
    if ids.size == 0:
        return np.zeros((0, 2), dtype=np.int64), np.zeros(0, dtype=np.float32)
    centres = np.asarray(ndimage.center_of_mass(np.ones_like(labels), labels, ids), dtype=np.float64)
    return centres, np.ones(len(ids), dtype=np.float32)


def _load_model(method: str, kind: str):
    if method == "stardist":
        try:
            from stardist.models import StarDist2D
        except ImportError as err:
            raise ImportError("method='stardist' needs the optional package stardist (pip install stardist)") from err
        return StarDist2D.from_pretrained("2D_versatile_he" if kind == "he" else "2D_versatile_fluo")
    try:
        from cellpose import models
    except ImportError as err:
        raise ImportError("method='cellpose' needs the optional package cellpose (pip install cellpose)") from err
    return models.CellposeModel(model_type="nuclei")


def _check(image, pixel_size_um, kind, nucleus_diameter_um, chunk_size, method, channel_axis, threshold):
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    if pixel_size_um is None or not (float(pixel_size_um) > 0 and math.isfinite(float(pixel_size_um))):
        raise ValueError(f"pixel_size_um must be a positive number (µm per image pixel), got {pixel_size_um!r}")
    if not float(nucleus_diameter_um) > 0:
        raise ValueError(f"nucleus_diameter_um must be positive, got {nucleus_diameter_um!r}")
    if int(chunk_size) < 64:
        raise ValueError(f"chunk_size must be at least 64 pixels, got {chunk_size!r}")
    if not (threshold == "auto" or (isinstance(threshold, int | float) and threshold >= 0)):
        raise ValueError(f"threshold must be 'auto' or a non-negative number, got {threshold!r}")
    ndim = len(image.shape)
    if kind == "he" and ndim != 3:
        raise ValueError(f"an H&E image must be (H, W, 3), got shape {tuple(image.shape)}")
    if ndim not in (2, 3):
        raise ValueError(f"the image must be 2-D or 2-D with channels, got shape {tuple(image.shape)}")
    if ndim == 2:
        return None, tuple(int(s) for s in image.shape)
    axis = -1 if channel_axis is None else int(channel_axis)
    axis %= 3
    spatial = tuple(int(s) for i, s in enumerate(image.shape) if i != axis)
    return axis, spatial


def _halo(radius_px: float, min_distance: int, method: str, split: bool) -> int:
    """Pixels read around each tile so that what its core holds is found as on the whole image."""
    halo = int(math.ceil(4.0 * 3.0 * radius_px)) + min_distance + 2
    if method != "peaks":
        halo = max(halo, int(math.ceil(4 * radius_px)) + 2)  # whole nuclei at the core's edge
    if split:
        halo = max(halo, _split.split_halo(radius_px))
    return halo


def _read_block(image, axis: int | None, a0: int, a1: int, b0: int, b1: int) -> np.ndarray:
    """Rows ``a0:a1`` and columns ``b0:b1`` of ``image`` (all channels, on ``axis``), read into memory."""
    if axis is None:
        block = image[a0:a1, b0:b1]
    else:
        index = [slice(a0, a1), slice(b0, b1)]
        index.insert(axis, slice(None))
        block = image[tuple(index)]
    return np.asarray(block.compute() if hasattr(block, "compute") else block)


class _Candidates:
    """What the tiles found: the maxima each tile's core owns (every maximum is owned by exactly one tile)
    and, when splitting touching nuclei, the lobes of their blobs."""

    def __init__(self, split: bool):
        self.splitting = split
        self.rows, self.cols, self.resp, self.contrast = [], [], [], []
        self.seeds, self.depths, self.seed_contrast = [], [], []
        self.n = 0

    def add(self, signal: np.ndarray, peaks: np.ndarray, values: np.ndarray, origin, core, radius_px: float):
        """Keep the maxima ``peaks`` (block pixels; the block starts at ``origin`` = (row, col) of the image)
        that lie in ``core`` = (r0, r1, c0, c1)."""
        (a0, b0), (r0, r1, c0, c1) = origin, core

        def inside(r, c):
            return (r >= r0 - 0.5) & (r < r1 - 0.5) & (c >= c0 - 0.5) & (c < c1 - 0.5)

        pr, pc = peaks[:, 0] + a0, peaks[:, 1] + b0
        own = inside(pr, pc)
        if self.splitting:
            lobes, depth, lobe_contrast, peak_contrast = _split.blob_seeds(signal, radius_px, peaks[own])
            lr, lc = lobes[:, 0] + a0, lobes[:, 1] + b0
            mine = inside(lr, lc)
            self.seeds.append(np.stack([lr[mine], lc[mine]], axis=1))
            self.depths.append(depth[mine])
            self.seed_contrast.append(lobe_contrast[mine])
            self.contrast.append(peak_contrast)
        self.rows.append(pr[own].astype(np.float32))
        self.cols.append(pc[own].astype(np.float32))
        self.resp.append(values[own].astype(np.float32))
        self.n += int(own.sum())

    def maxima(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows, columns and responses of every maximum kept."""
        return tuple(np.concatenate(x) if x else np.zeros(0, np.float32) for x in (self.rows, self.cols, self.resp))

    def split(self, out: pd.DataFrame, keep: np.ndarray, radius_px: float) -> tuple[pd.DataFrame, int]:
        """``out`` (the maxima ``keep`` selects) with touching nuclei split: centres added in the lobes of a
        blob (``split`` True), and the number split off."""
        stays, extra, parent = _split.split_centres(
            out[["row", "col"]].to_numpy(),
            np.concatenate(self.contrast)[keep],
            np.concatenate(self.seeds),
            np.concatenate(self.depths),
            np.concatenate(self.seed_contrast),
            radius_px,
        )
        n_split = len(extra) - int((~stays).sum())
        if len(extra):
            added = pd.DataFrame(
                {"row": extra[:, 0], "col": extra[:, 1], "response": out["response"].to_numpy()[parent], "split": True}
            )
            out = pd.concat([out[stays], added], ignore_index=True)
        return out, n_split


def iter_detect_nuclei(
    image,
    *,
    pixel_size_um: float,
    kind: str = "he",
    nucleus_diameter_um: float = 7.0,
    threshold: float | str = "auto",
    chunk_size: int = 1024,
    channel_axis: int | None = -1,
    method: str = "peaks",
    regions=None,
    split_touching: bool = True,
) -> Iterator[DetectProgress]:
    """Detect nuclei centres on an H&E or nuclear fluorescence (DAPI, Hoechst) image, tile by tile.

    A generator: it yields a :class:`DetectProgress` after each tile and returns the nuclei table
    (``StopIteration.value``; napari's ``GeneratorWorker`` emits it as ``returned``). Closing it stops between
    tiles. :func:`detect_nuclei` runs it to the end. The settings are checked when the first tile is asked for.

    Parameters
    ----------
    image : array-like
        (H, W, 3) RGB H&E (uint8/uint16, or float in [0, 1]), or (H, W) / (H, W, C) fluorescence; numpy,
        dask, zarr or anything sliceable. It is read one tile at a time.
    pixel_size_um : float
        Size of one image pixel in µm (for a Visium image at hires scale:
        ``spot_diameter_um / (spot_diameter_fullres * tissue_hires_scalef)``).
    kind : {'he', 'fluorescence'}
        Stain: H&E (hematoxylin by colour deconvolution) or a bright nuclear stain on a dark background.
    nucleus_diameter_um : float
        Typical nucleus diameter; sets the smoothing scale and the minimum distance between nuclei
        (0.6 of the radius, so touching and smaller nuclei stay apart).
    threshold : float or 'auto'
        Minimum difference-of-Gaussians response of a nucleus, in the units of the nuclear signal
        (hematoxylin optical density, or fluorescence intensity in [0, 1]); 'auto' uses
        :func:`auto_threshold` on all candidate maxima, above a floor of ``NOISE_K`` standard deviations
        of the response to the image's pixel noise (:func:`pixel_noise_from_histogram`).
    chunk_size : int
        Tile edge in pixels; peak memory grows with ``(chunk_size + 2 * halo) ** 2``, the halo being
        about six nucleus radii.
    channel_axis : int or None
        Axis of the colour channels of a 3-D image (``-1`` for (H, W, C); ``0`` for a (C, H, W)
        SpatialData image).
    method : {'peaks', 'stardist', 'cellpose'}
        'peaks' (default, scikit-image only) or a deep-learning model, only when installed.
    regions : array-like, optional
        (n, 4) boxes ``(r0, r1, c0, c1)`` in image pixels (e.g. the spots and a margin): only the tiles
        that meet a box are read, and nuclei are found there only. Default: the whole image.
    split_touching : bool
        Separate touching and overlapping nuclei (default): each lobe of a blob's stained area is a nucleus
        (see :mod:`._split`). Used with ``method='peaks'`` when nuclei are at least one pixel in radius
        (below, they cannot be resolved one by one); costs about 2.5x the time of the peaks alone at
        1 µm/px, 6x at 2 µm/px. False gives the maxima only (the behaviour before splitting).

    Yields
    ------
    DetectProgress
        Tiles done, tiles in all, candidate maxima so far and the elapsed time.

    Returns
    -------
    pandas.DataFrame
        One row per nucleus: ``row``, ``col`` (image pixels, napari's (y, x) order, pixel centres at
        integers), ``response`` (peak response; for a centre split off a blob, that of the blob's maximum)
        and ``split`` (True for centres added by splitting touching nuclei). ``attrs`` records
        ``threshold``, ``noise_floor``, ``n_candidates``, ``n_split``, ``pixel_size_um`` and the other
        settings.

    Raises
    ------
    ValueError
        On an invalid parameter or image shape.
    ImportError
        When ``method`` names a package that is not installed.
    """
    axis, (h, w) = _check(image, pixel_size_um, kind, nucleus_diameter_um, chunk_size, method, channel_axis, threshold)
    radius_px = 0.5 * float(nucleus_diameter_um) / float(pixel_size_um)
    if radius_px < 1.0:
        logger.warning(
            "nuclei are %.2f px in radius at %.3g µm/px: below one pixel they cannot be resolved one by one; "
            "counts will be too low in dense tissue (use a higher-resolution image)",
            radius_px,
            float(pixel_size_um),
        )
    split = bool(split_touching) and method == "peaks" and radius_px >= 1.0
    radius_px = max(radius_px, 0.5)
    min_distance = max(1, int(round(0.6 * radius_px)))
    model = _load_model(method, kind) if method != "peaks" else None
    halo = _halo(radius_px, min_distance, method, split)
    tiles = _tiles((h, w), int(chunk_size), regions)
    found = _Candidates(split)
    noise_hist = np.zeros(len(_NOISE_BINS) - 1, dtype=np.int64)
    start = time.perf_counter()
    for i, (r0, r1, c0, c1) in enumerate(tiles):
        a0, b0 = max(r0 - halo, 0), max(c0 - halo, 0)
        signal = nuclear_signal(_read_block(image, axis, a0, min(r1 + halo, h), b0, min(c1 + halo, w)), kind, axis)
        noise_hist += _diff_histogram(signal, slice(r0 - a0, r1 - a0), slice(c0 - b0, c1 - b0))
        if model is None:
            peaks, values = _dog_peaks(signal, radius_px, min_distance)
        else:
            peaks, values = _model_centres(signal, method, model, radius_px)
        found.add(signal, peaks, values, (a0, b0), (r0, r1, c0, c1), radius_px)
        del signal
        yield DetectProgress(i + 1, len(tiles), found.n, time.perf_counter() - start)
    row, col, value = found.maxima()
    floor = NOISE_K * dog_noise_factor(radius_px) * pixel_noise_from_histogram(noise_hist)
    if model is not None:
        thr = 0.0
    elif threshold == "auto":
        thr = auto_threshold(value, floor)
    else:
        thr = float(threshold)
    keep = value > thr
    out = pd.DataFrame(
        {
            "row": row[keep].astype(np.float64),
            "col": col[keep].astype(np.float64),
            "response": value[keep],
            "split": np.zeros(int(keep.sum()), dtype=bool),
        }
    )
    out, n_split = found.split(out, keep, radius_px) if split and len(out) else (out, 0)
    out.attrs.update(
        {
            "threshold": float(thr),
            "noise_floor": float(floor),
            "n_candidates": int(len(value)),
            "n_split": int(n_split),
            "split_touching": bool(split),
            "pixel_size_um": float(pixel_size_um),
            "nucleus_diameter_um": float(nucleus_diameter_um),
            "kind": kind,
            "method": method,
            "n_tiles": len(tiles),
        }
    )
    logger.info(
        "detect_nuclei: %d nuclei (%d split off touching neighbours; %d candidates, threshold %.4g) in %d tiles "
        "of %d px, %.2f s",
        len(out), n_split, len(value), thr, len(tiles), int(chunk_size), time.perf_counter() - start,
    )  # fmt: skip
    return out


def detect_nuclei(image, *, progress: Callable[[DetectProgress], None] | None = None, **settings: Any) -> pd.DataFrame:
    """Detect nuclei centres on an H&E or nuclear fluorescence (DAPI, Hoechst) image.

    Runs :func:`iter_detect_nuclei` to its end; the image and the settings (``pixel_size_um``, ``kind``,
    ``nucleus_diameter_um``, ``threshold``, ``chunk_size``, ``channel_axis``, ``method``, ``regions``,
    ``split_touching``) are documented there.

    Parameters
    ----------
    image : array-like
        The image, read one tile at a time.
    progress : callable, optional
        Called with a :class:`DetectProgress` after each tile.
    **settings
        Keyword arguments of :func:`iter_detect_nuclei`; ``pixel_size_um`` is required.

    Returns
    -------
    pandas.DataFrame
        The nuclei table of :func:`iter_detect_nuclei`: ``row``, ``col``, ``response``, ``split`` and ``attrs``.

    Raises
    ------
    ValueError
        On an invalid parameter or image shape.
    ImportError
        When ``method`` names a package that is not installed.

    Examples
    --------
    >>> from napari_cell2location.datasets import synthetic_visium    # doctest: +SKIP
    >>> data = synthetic_visium(n_spots=100)                           # doctest: +SKIP
    >>> nuclei = detect_nuclei(data.image, pixel_size_um=2.0)          # doctest: +SKIP
    """
    return run_to_end(iter_detect_nuclei(image, **settings), progress)


def _detect_signature() -> inspect.Signature:
    """Signature of :func:`detect_nuclei` as callers see it: that of :func:`iter_detect_nuclei` plus ``progress``."""
    settings = inspect.signature(iter_detect_nuclei)
    progress = inspect.signature(detect_nuclei).parameters["progress"]
    return settings.replace(parameters=[*settings.parameters.values(), progress], return_annotation="pd.DataFrame")


detect_nuclei.__signature__ = _detect_signature()  # help() and introspection show every keyword and its default
