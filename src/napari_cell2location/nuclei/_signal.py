"""What the detector measures and where it draws the line: the nuclear signal of a tile, the image's pixel
noise, and the threshold between nuclei and background.

The detector (:mod:`._detect`) reads the image tile by tile and finds local maxima of a nucleus-sized
difference of Gaussians of the tile's nuclear signal; this module holds the per-pixel and per-candidate
measurements it relies on, none of which depend on the tiling:

* the nuclear signal (:func:`nuclear_signal`): hematoxylin optical density by colour deconvolution for H&E,
  the intensity scaled to [0, 1] for fluorescence;
* the noise floor: the image's own pixel noise, estimated tile by tile from a histogram of neighbour
  differences (:func:`_diff_histogram`, :func:`pixel_noise_from_histogram`; the summed histogram does not
  depend on the tiling), times the detector's response to unit white noise (:func:`dog_noise_factor`) and
  ``NOISE_K``;
* the threshold above it (:func:`auto_threshold`): Otsu's split of the log responses when they are bimodal,
  else an empty gap below the bulk of them (:func:`_gap_threshold`), else the floor.

numpy and scikit-image only.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["auto_threshold", "dog_noise_factor", "nuclear_signal", "pixel_noise_from_histogram"]

#: Minimum between-class share of the variance of log responses for :func:`auto_threshold` to see nuclei.
BIMODALITY_MIN = 0.7
#: Smallest empty gap in log response (a factor 4) that separates a small background class from the nuclei.
GAP_MIN = math.log(4.0)
#: Responses below this many standard deviations of the detector's response to pixel noise are noise.
NOISE_K = 6.0


def _hematoxylin_vector() -> np.ndarray:
    from skimage.color import hed_from_rgb

    return np.asarray(hed_from_rgb[:, 0], dtype=np.float32)  # (3,) RGB optical density -> hematoxylin


def nuclear_signal(tile: np.ndarray, kind: str = "he", channel_axis: int | None = -1) -> np.ndarray:
    """Per-pixel nuclear stain of a tile, float32, larger where there is more nuclear stain.

    Parameters
    ----------
    tile : numpy.ndarray
        (H, W, C) RGB(A) for ``kind='he'`` (channel axis ``channel_axis``), (H, W) or (H, W, C) for
        ``'fluorescence'`` (the first channel is taken when there is a channel axis).
    kind : {'he', 'fluorescence'}
        Stain type.
    channel_axis : int or None
        Axis of the colour channels; None for a single-channel image.

    Returns
    -------
    numpy.ndarray
        (H, W) float32: hematoxylin optical density (H&E) or intensity scaled to [0, 1] (fluorescence).
    """
    arr = np.asarray(tile)
    if channel_axis is not None and arr.ndim == 3:
        arr = np.moveaxis(arr, channel_axis, -1)
    if kind == "he":
        if arr.ndim != 3 or arr.shape[-1] < 3:
            raise ValueError(f"an H&E image must have 3 (RGB) or 4 (RGBA) channels, got shape {arr.shape}")
        rgb = arr[..., :3]
        scale = _dtype_max(rgb)
        od = -np.log(np.maximum(rgb.astype(np.float32), np.float32(1e-6 * scale)) / np.float32(scale))
        return od @ _hematoxylin_vector()
    if arr.ndim == 3:
        arr = arr[..., 0]
    return arr.astype(np.float32) / np.float32(_dtype_max(arr))


def _dtype_max(arr: np.ndarray) -> float:
    if np.issubdtype(arr.dtype, np.integer):
        return float(np.iinfo(arr.dtype).max)
    return 1.0  # floats are taken as already in [0, 1]


def dog_noise_factor(radius_px: float) -> float:
    """Standard deviation of the detector's difference of Gaussians applied to unit white noise.

    For unit-sum 2-D Gaussian kernels of widths ``a`` and ``b`` it is
    ``sqrt(1 / (4 pi a^2) + 1 / (4 pi b^2) - 1 / (pi (a^2 + b^2)))``; here ``a = r / 2`` and ``b = 3 r``.
    """
    a2, b2 = (0.5 * radius_px) ** 2, (3.0 * radius_px) ** 2
    return math.sqrt(1 / (4 * math.pi * a2) + 1 / (4 * math.pi * b2) - 1 / (math.pi * (a2 + b2)))


#: bins of absolute neighbour differences for the pixel-noise estimate: exact zeros, then log-spaced (0.6 % wide)
_NOISE_BINS = np.concatenate([[0.0], np.geomspace(1e-7, 1e2, 3601)])


def _diff_histogram(signal: np.ndarray, rows: slice, cols: slice) -> np.ndarray:
    """Histogram of |horizontal neighbour differences| for the pixel pairs whose left pixel is in (rows, cols).

    Every pair of the image belongs to exactly one tile, so the summed histogram does not depend on tiling.
    """
    stop = cols.stop + 1 if cols.stop < signal.shape[1] else cols.stop
    diff = np.abs(np.diff(signal[rows, cols.start : stop], axis=1))
    return np.histogram(diff, bins=_NOISE_BINS)[0]


def pixel_noise_from_histogram(hist: np.ndarray) -> float:
    """Per-pixel noise sd from a :func:`_diff_histogram`: median |difference| / (0.6745 sqrt 2)."""
    total = int(hist.sum())
    if total == 0:
        return 0.0
    k = int(np.searchsorted(np.cumsum(hist), 0.5 * total))
    median = math.sqrt(_NOISE_BINS[k] * _NOISE_BINS[k + 1])
    return median / (0.6745 * math.sqrt(2.0))


def auto_threshold(responses: np.ndarray, noise_floor: float = 0.0) -> float:
    """Response threshold separating nuclei from background maxima.

    Candidate maxima below ``noise_floor`` (the detector sets it at ``NOISE_K`` standard deviations of its
    response to the image's own pixel noise) are noise. The rest of a stained section are usually two
    populations: background texture (small responses) and nuclei (responses one to two orders of magnitude
    larger). Otsu's method on the log responses splits them, and the threshold is the geometric mean of
    the two classes' medians, which sits in the gap between them rather than on the upper edge of the
    background. When the log responses are not bimodal (Otsu's between-class share of the variance below
    ``BIMODALITY_MIN``; one Gaussian population gives 0.64, the synthetic H&E 0.90, the mouse brain lowres
    H&E 0.80) they are taken as one population of nuclei, all above the noise floor, unless an empty gap of
    a factor 4 lies under most of them (a small background class far below the nuclei, see
    :func:`_gap_threshold`).

    Parameters
    ----------
    responses : numpy.ndarray
        (n,) responses of the candidate maxima.
    noise_floor : float
        Responses at or below it are never nuclei.

    Returns
    -------
    float
        The threshold; ``inf`` when there is no response above the floor.
    """
    from skimage.filters import threshold_otsu

    floor = max(float(noise_floor), 0.0)
    pos = np.asarray(responses, dtype=np.float64)
    pos = pos[pos > floor]
    if pos.size == 0:
        return math.inf
    if pos.size < 10:
        return floor
    logs = np.log(pos)
    if np.ptp(logs) == 0:
        return floor
    split = threshold_otsu(logs)
    low, high = logs[logs <= split], logs[logs > split]
    if low.size == 0 or high.size == 0:
        return floor
    # between-class share of the variance: 2/pi (0.64) for one Gaussian population, -> 1 for two apart
    w0, w1 = low.size / logs.size, high.size / logs.size
    eta = w0 * w1 * (high.mean() - low.mean()) ** 2 / logs.var()
    if eta < BIMODALITY_MIN:
        return max(_gap_threshold(logs), floor)
    return max(float(np.exp(0.5 * (np.median(low) + np.median(high)))), floor)


def _gap_threshold(logs: np.ndarray) -> float:
    """A threshold in an empty gap of the log responses below the bulk of them, else 0.

    Otsu's measure misses a background class that is a tiny share of the candidates (a clean scan: a few
    maxima in pale stroma among thousands of nuclei) however far below the nuclei it lies. A gap of at
    least ``GAP_MIN`` (a factor 4 in response) with no candidate in it, under which lie fewer than half of
    them, separates such a class; the threshold is the gap's geometric middle.
    """
    values = np.sort(logs)
    gaps = np.diff(values)
    below = np.arange(1, len(values))  # candidates below each gap
    usable = (gaps >= GAP_MIN) & (below < 0.5 * len(values))
    if not usable.any():
        return 0.0
    i = int(np.flatnonzero(usable)[np.argmax(gaps[usable])])
    return float(np.exp(0.5 * (values[i] + values[i + 1])))
