"""Nuclei under the spots of a full-resolution scan: the Cells-per-spot job, without Qt.

A full-resolution scan (:func:`napari_cell2location.io.open_fullres_image`) is a pyramid; nuclei are detected on
its finest level, tile by tile, and only in the tiles that meet a spot (its circle plus a margin of one
nucleus) when spots are given: on a 20,000 px scan a few hundred spots need a few percent of the tiles.
Visium HD bins (``spot_shape='square'``) are squares: the tiles under the squares (plus the margin) are read,
and each nucleus is counted in the one bin holding its centre (:func:`~._count.count_nuclei_per_spot`).
Positions go through one affine from the image's pixels to world coordinates (full-resolution pixels as
(row, col) for a Visium scan: the identity), so spots and nuclei meet in world coordinates whatever the scale
of the image.

>>> from napari_cell2location.io import fullres_image_for, read_spaceranger, read_visium_hd  # doctest: +SKIP
>>> adata = read_spaceranger("run/outs")                                               # doctest: +SKIP
>>> scan = fullres_image_for("run/outs", adata=adata)                                  # doctest: +SKIP
>>> found = detect_in_spots(scan, spots=adata.obsm["spatial"][:, ::-1], spot_radius=55.0)  # doctest: +SKIP
>>> found.counts                      # nuclei per spot                                   # doctest: +SKIP
>>> bins = read_visium_hd("hd_run/outs", bin_size=8)                                   # doctest: +SKIP
>>> side = bins.uns["spatial"]["hd_run"]["scalefactors"]["bin_side_fullres"]          # doctest: +SKIP
>>> found = detect_in_spots(fullres_image_for("hd_run/outs", adata=bins), spots=bins.obsm["spatial"][:, ::-1],
...                         spot_radius=side / 2, spot_shape="square", spot_size_um=8.0)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from .._jobs import run_to_end
from ._count import VISIUM_SPOT_DIAMETER_UM, _check_shape, count_nuclei_per_spot
from ._detect import DetectProgress, iter_detect_nuclei

logger = logging.getLogger(__name__)

__all__ = ["SpotNuclei", "detect_in_spots", "finest_level", "iter_detect_in_spots", "spot_regions"]


@dataclass
class SpotNuclei:
    """Nuclei found by :func:`iter_detect_in_spots`.

    Attributes
    ----------
    table : pandas.DataFrame
        The detector's table (:func:`~napari_cell2location.nuclei.detect_nuclei`): ``row``, ``col`` in pixels of
        the finest level, ``response``; its ``attrs`` also hold ``n_tiles_total`` and ``pixel_size_um``.
    world : numpy.ndarray
        (n_nuclei, 2) nuclei centres in world (row, col).
    counts : numpy.ndarray or None
        (n_spots,) nuclei centred in each spot's circle, or each bin's square (None without spots).
    n_tiles : int
        Tiles read.
    n_tiles_total : int
        Tiles of the whole finest level.
    image_shape : tuple of int
        Shape of the finest level.
    """

    table: pd.DataFrame = field(repr=False)
    world: np.ndarray = field(repr=False)
    counts: np.ndarray | None = field(repr=False)
    n_tiles: int
    n_tiles_total: int
    image_shape: tuple[int, ...]

    def summary(self) -> str:
        """One line for a status label or a log."""
        px = self.table.attrs.get("pixel_size_um", float("nan"))
        whole = self.n_tiles == self.n_tiles_total
        where = "the whole image" if whole else f"{self.n_tiles} of {self.n_tiles_total} tiles"
        return (
            f"{len(self.table)} nuclei in {where} of {self.image_shape[1]:,} x {self.image_shape[0]:,} px "
            f"at {px:.3g} µm/px"
        )


def finest_level(image):
    """The finest level of a multiscale image (a :class:`~napari_cell2location.io.Pyramid` or any list of
    levels, finest first); any other image as it is."""
    if isinstance(image, list | tuple):
        if not len(image):
            raise ValueError("an empty list of levels is not an image")
        return image[0]
    return image


def _apply(affine: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ affine[:2, :2].T + affine[:2, 2]


def spot_regions(centres, radius, shape: tuple[int, ...], margin: float = 0.0) -> np.ndarray:
    """Boxes ``(r0, r1, c0, c1)`` around spot circles or bin squares in image pixels, for
    ``detect_nuclei(regions=...)``.

    The box of a circle of radius ``r`` is the square of half side ``r``: for a Visium HD bin (an axis-aligned
    square, ``radius`` = half its side) the box is the bin itself, plus ``margin``.

    Parameters
    ----------
    centres : array-like
        (n_spots, 2) spot centres as (row, col) image pixels.
    radius : float or array-like
        Spot radius in image pixels (half the side of a square bin), one value or (n_spots,).
    shape : tuple of int
        Image shape (H, W, ...); boxes are clipped to it and spots wholly outside are dropped.
    margin : float
        Pixels added around each circle (a nucleus centred just inside the circle must be in a read tile).

    Returns
    -------
    numpy.ndarray
        (m, 4) float boxes, m <= n_spots.
    """
    ctr = np.asarray(centres, dtype=np.float64).reshape(-1, 2)
    reach = np.broadcast_to(np.asarray(radius, dtype=np.float64), (len(ctr),)) + float(margin)
    boxes = np.stack([ctr[:, 0] - reach, ctr[:, 0] + reach, ctr[:, 1] - reach, ctr[:, 1] + reach], axis=1)
    boxes = boxes[np.isfinite(boxes).all(1)]
    h, w = float(shape[0]), float(shape[1])
    inside = (boxes[:, 1] >= 0) & (boxes[:, 0] < h) & (boxes[:, 3] >= 0) & (boxes[:, 2] < w)
    boxes = boxes[inside]
    boxes[:, :2] = np.clip(boxes[:, :2], 0, h)
    boxes[:, 2:] = np.clip(boxes[:, 2:], 0, w)
    return boxes


def iter_detect_in_spots(
    image,
    *,
    spots=None,
    spot_radius=None,
    image_to_world=None,
    pixel_size_um: float | None = None,
    whole_image: bool = False,
    nucleus_diameter_um: float = 7.0,
    chunk_size: int = 1024,
    spot_shape: str = "circle",
    spot_size_um: float | None = None,
    **settings: Any,
) -> Generator[DetectProgress, None, SpotNuclei]:
    """Detect nuclei on the finest level of an image, tile by tile, in the tiles under the spots only.

    A generator, as :func:`~napari_cell2location.nuclei.iter_detect_nuclei` (whose progress records it
    yields): it returns a :class:`SpotNuclei`. Memory holds one tile (plus a halo of about six nucleus radii)
    at a time, whatever the size of the image.

    Parameters
    ----------
    image : array-like or list of array-like
        (H, W, 3) H&E or (H, W) nuclear stain; a multiscale image (finest level first, e.g. a
        :class:`~napari_cell2location.io.Pyramid`) is detected on its finest level. Numpy, dask or zarr.
    spots : array-like, optional
        (n_spots, 2) spot centres in world (row, col) (for Visium: ``obsm['spatial'][:, ::-1]``, full-resolution
        pixels).
    spot_radius : float or array-like, optional
        Spot radius in world units, one value or (n_spots,); half the side of square bins; needed with
        ``spots``.
    image_to_world : array-like, optional
        (3, 3) affine from the finest level's pixel (row, col) to world; default the identity (a
        full-resolution image of a Visium section).
    pixel_size_um : float, optional
        µm per pixel of the finest level; default from the spots and ``spot_size_um``, else the image's
        ``um_per_px`` (a :class:`~napari_cell2location.io.Pyramid` read it from the file).
    whole_image : bool
        Detect on every tile, not only under the spots (the spots are still counted).
    nucleus_diameter_um : float
        Typical nucleus diameter; also the margin read around each spot.
    chunk_size : int
        Tile edge (px).
    spot_shape : {'circle', 'square'}
        Round Visium spots, or Visium HD bins: axis-aligned squares of side ``2 * spot_radius``, each
        nucleus counted in the one bin holding its centre (:func:`~._count.count_nuclei_per_spot`).
    spot_size_um : float, optional
        The spots' diameter, or the bins' side, in µm, for the default pixel size; default 55 µm for round
        spots (a Visium spot), none for bins (give ``bin_size_um``, or the pixel size).
    **settings
        Other keywords of :func:`~napari_cell2location.nuclei.iter_detect_nuclei` (``kind``, ``threshold``,
        ``channel_axis``, ``method``).

    Yields
    ------
    DetectProgress

    Returns
    -------
    SpotNuclei

    Raises
    ------
    ValueError
        Spots without a radius, no way to tell the pixel size, or an invalid detector setting.
    """
    _check_shape(spot_shape)
    if spot_size_um is None and spot_shape == "circle":
        spot_size_um = VISIUM_SPOT_DIAMETER_UM
    level = finest_level(image)
    affine = np.eye(3) if image_to_world is None else np.asarray(image_to_world, dtype=np.float64).reshape(3, 3)
    world_per_px = math.sqrt(abs(np.linalg.det(affine[:2, :2])))
    if not world_per_px > 0:
        raise ValueError("image_to_world must be an invertible affine")
    centres = radius_px = None
    if spots is not None:
        if spot_radius is None:
            raise ValueError("spot_radius (world units) is needed with spots")
        spots = np.asarray(spots, dtype=np.float64).reshape(-1, 2)
        centres = _apply(np.linalg.inv(affine), spots)
        radius_px = np.asarray(spot_radius, dtype=np.float64) / world_per_px
    if pixel_size_um is None and spot_size_um is not None and radius_px is not None and len(spots):
        pixel_size_um = 0.5 * float(spot_size_um) / float(np.median(radius_px))
    if pixel_size_um is None:
        pixel_size_um = getattr(image, "um_per_px", None)
    if pixel_size_um is None:
        raise ValueError(
            "cannot tell the pixel size: give pixel_size_um, or spots with their radius (and spot_size_um, the "
            "bin size, for square bins)"
        )
    regions = None
    if centres is not None and not whole_image:
        regions = spot_regions(centres, radius_px, tuple(level.shape), margin=nucleus_diameter_um / pixel_size_um)
    table = yield from iter_detect_nuclei(
        level, pixel_size_um=pixel_size_um, nucleus_diameter_um=nucleus_diameter_um, chunk_size=chunk_size,
        regions=regions, **settings,
    )  # fmt: skip
    h, w = int(level.shape[0]), int(level.shape[1])
    total = math.ceil(h / int(chunk_size)) * math.ceil(w / int(chunk_size))
    table.attrs["n_tiles_total"] = total
    world = _apply(affine, table[["row", "col"]].to_numpy(dtype=np.float64))
    counts = None
    if spots is not None:
        counts = count_nuclei_per_spot(world, spots, np.asarray(spot_radius, dtype=np.float64), shape=spot_shape)
    found = SpotNuclei(table, world, counts, int(table.attrs.get("n_tiles", total)), total, tuple(level.shape))
    logger.info("detect_in_spots: %s", found.summary())
    return found


def detect_in_spots(image, *, progress: Callable[[DetectProgress], None] | None = None, **settings: Any) -> SpotNuclei:
    """Run :func:`iter_detect_in_spots` to its end (its parameters are documented there).

    Parameters
    ----------
    image : array-like or list of array-like
        The image or its levels, finest first.
    progress : callable, optional
        Called with a :class:`~napari_cell2location.nuclei.DetectProgress` after each tile.
    **settings
        Keywords of :func:`iter_detect_in_spots`.

    Returns
    -------
    SpotNuclei
    """
    return run_to_end(iter_detect_in_spots(image, **settings), progress)
