"""Tissue sections of a spatial dataset, and their placement side by side (pure numpy, no napari).

A :class:`Section` is one library (scanpy ``uns['spatial']``) or one shapes region (SpatialData): the
rows of the table it holds and, optionally, its image with the affine from image pixels to world.
World coordinates are full-resolution pixels as ``(row, col) = (y, x)``; the whole convention is
written in :mod:`napari_cell2location._layers`.

Side-by-side placement has one rule, :func:`side_by_side_shifts`, used for the sections of one
dataset (:func:`layout_side_by_side`) and for several datasets opened together
(:func:`napari_cell2location._layers.place_side_by_side`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._fullres import Pyramid
from ._validate import InputError

logger = logging.getLogger(__name__)

#: Visium spot diameter / centre-to-centre distance (55 µm / 100 µm)
_DIAMETER_PER_PITCH = 0.55
#: gap between sections (or datasets) placed side by side, as a fraction of the widest one
SECTION_GAP = 0.05


@dataclass
class Section:
    """One tissue section: an optional image with its affine to world, and the spots on it.

    Parameters
    ----------
    name : str
        Library / section name.
    spots : numpy.ndarray
        (n_spots_in_section,) integer rows of the table.
    image : array-like or None
        (H, W, 3) RGB (or (H, W)) image.
    image_affine : numpy.ndarray
        (3, 3) affine from image (row, col) to world (row, col) = full-resolution pixels.
    """

    name: str
    spots: np.ndarray
    image: Any = None
    image_affine: np.ndarray = field(default_factory=lambda: np.eye(3))


# ------------------------------------------------------------------------------------------------
# parsing: the scanpy Visium layout and SpatialData
# ------------------------------------------------------------------------------------------------


def estimate_spot_diameter(yx: np.ndarray) -> float:
    """Spot diameter from the lattice: 0.55 x the median nearest-neighbour distance (Visium geometry).

    Parameters
    ----------
    yx : numpy.ndarray
        (n_spots, 2) spot centres.

    Returns
    -------
    float
    """
    yx = np.asarray(yx, dtype=float)
    if len(yx) < 2:
        return 1.0
    from scipy.spatial import cKDTree

    dist, _ = cKDTree(yx).query(yx, k=2)
    nn = float(np.median(dist[:, 1]))
    return nn * _DIAMETER_PER_PITCH if nn > 0 else 1.0


def _scanpy_libraries(adata) -> tuple[list[str], np.ndarray]:
    """Libraries of ``uns['spatial']`` and the library index of each spot (-1 when unknown)."""
    libs = list(adata.uns.get("spatial", {}).keys()) if hasattr(adata.uns.get("spatial", {}), "keys") else []
    lib_of = np.zeros(adata.n_obs, dtype=int) if len(libs) == 1 else np.full(adata.n_obs, -1)
    if len(libs) > 1:
        for col in adata.obs.columns:
            values = adata.obs[col].astype(str).to_numpy()
            if set(np.unique(values)) <= set(libs):
                lib_of = np.asarray([libs.index(v) for v in values])
                break
        else:
            logger.warning("uns['spatial'] has libraries %s but no obs column names them per spot", libs)
            lib_of = np.zeros(adata.n_obs, dtype=int)
    return libs, lib_of


def _pick_image(images: dict, scalefactors: dict) -> tuple[Any, float] | tuple[None, None]:
    """The finest image of a scanpy library and its scale factor (full-res -> image pixels)."""
    for key, sf_key in (("hires", "tissue_hires_scalef"), ("lowres", "tissue_lowres_scalef")):
        if key in images and images[key] is not None:
            scalef = scalefactors.get(sf_key)
            if scalef is None:
                logger.warning("image %r has no %r in scalefactors; assuming full resolution", key, sf_key)
                scalef = 1.0
            return images[key], float(scalef)
    return None, None


def _affine_scale(scalef: float) -> np.ndarray:
    return np.diag([1.0 / scalef, 1.0 / scalef, 1.0])


def scanpy_sections(adata) -> tuple[list[Section], np.ndarray, float | None]:
    """Sections of an AnnData in the scanpy Visium layout.

    Parameters
    ----------
    adata : anndata.AnnData
        (n_obs, n_vars) with ``obsm['spatial']`` (x, y) in full-resolution pixels and optionally
        ``uns['spatial'][library] = {'images': {'hires'|'lowres': (H, W, 3)}, 'scalefactors': {...}}``.

    Returns
    -------
    sections : list of Section
    yx : numpy.ndarray
        (n_obs, 2) spot centres in world (row, col) = full-resolution pixels.
    diameter : float or None
        ``spot_diameter_fullres`` when known.
    """
    if "spatial" not in adata.obsm:
        raise InputError(
            "this table has no obsm['spatial'] (spot x, y in full-resolution pixels); cannot place the spots."
        )
    yx = np.asarray(adata.obsm["spatial"], dtype=float)[:, ::-1].copy()
    libs, lib_of = _scanpy_libraries(adata)
    if not libs:
        return [Section("spots", np.arange(adata.n_obs))], yx, None
    sections, diameter = [], None
    for i, lib in enumerate(libs):
        entry = adata.uns["spatial"][lib]
        scalefactors = dict(entry.get("scalefactors", {}) or {})
        if diameter is None and scalefactors.get("spot_diameter_fullres"):
            diameter = float(scalefactors["spot_diameter_fullres"])
        image, scalef = _pick_image(dict(entry.get("images", {}) or {}), scalefactors)
        sec = Section(str(lib), np.flatnonzero(lib_of == i))
        if image is not None:
            image = image if isinstance(image, Pyramid) else np.asarray(image)  # a pyramid stays lazy
            sec.image, sec.image_affine = image, _affine_scale(scalef)
        sections.append(sec)
    return sections, yx, diameter


def _shape_centres(shapes) -> tuple[np.ndarray, float | None, str]:
    """Centres (n, 2) as (y, x) of a shapes element in its own coordinates, the size of its shapes (a circle's
    diameter, a square's side; None when circles have no radius) and ``'circle'`` or ``'square'``."""
    geometry = shapes.geometry
    if (geometry.geom_type == "Point").all():
        size = 2.0 * float(np.median(shapes["radius"])) if "radius" in shapes.columns else None
        return np.column_stack([geometry.y.to_numpy(), geometry.x.to_numpy()]), size, "circle"
    centroid = geometry.centroid
    yx = np.column_stack([centroid.y.to_numpy(), centroid.x.to_numpy()])
    area = float(np.median(geometry.area))
    bounds = geometry.bounds
    width, height = (bounds["maxx"] - bounds["minx"]).to_numpy(), (bounds["maxy"] - bounds["miny"]).to_numpy()
    box, aspect = float(np.median(width * height)), float(np.median(width / np.maximum(height, 1e-12)))
    if area > 0 and abs(area / box - 1.0) < 0.02 and abs(aspect - 1.0) < 0.02:  # axis-aligned squares: HD bins
        return yx, float(np.sqrt(area)), "square"
    return yx, 2.0 * float(np.sqrt(area / np.pi)) if area > 0 else None, "circle"


def spatialdata_sections(
    sdata, table_key: str | None = None
) -> tuple[list[Section], np.ndarray, float | None, str, str]:
    """Sections of a SpatialData: the shapes the table annotates and the images in their coordinate system.

    Parameters
    ----------
    sdata : spatialdata.SpatialData
        With a table annotating shapes through ``region`` / ``instance_key``: circles (points with a
        ``radius`` column, Visium spots) or polygons (spatialdata-io's square Visium HD bins).
    table_key : str, optional
        Table to use (default as :func:`napari_cell2location.io.pick_table`).

    Returns
    -------
    sections, yx, size, table_key, shape
        As :func:`scanpy_sections` (``size``: the spots' diameter, or the side of square bins, in world
        units), plus the table used and the spots' shape: ``'square'`` for axis-aligned square polygons, else
        ``'circle'`` (other polygons count as discs of their area). World = the ``'global'`` coordinate
        system (or the first one the shapes are in).
    """
    from spatialdata.models import get_table_keys
    from spatialdata.transformations import get_transformation

    from ._spatial import pick_table

    key = pick_table(sdata, table_key)
    table = sdata.tables[key]
    regions, region_key, instance_key = get_table_keys(table)
    regions = [regions] if isinstance(regions, str) else list(regions)
    yx = np.full((table.n_obs, 2), np.nan)
    sections, diameter, cs, shape = [], None, None, "circle"
    region_values = table.obs[region_key].astype(str).to_numpy()
    for region in regions:
        if region not in sdata.shapes:
            continue
        shapes = sdata.shapes[region]
        transforms = get_transformation(shapes, get_all=True)
        cs_here = "global" if "global" in transforms else next(iter(transforms))
        cs = cs or cs_here
        affine = np.asarray(
            transforms[cs_here].to_affine_matrix(input_axes=("y", "x"), output_axes=("y", "x")), dtype=float
        )
        yx_here, size, shape_here = _shape_centres(shapes)
        world = np.column_stack([yx_here, np.ones(len(shapes))]) @ affine.T
        rows = np.flatnonzero(region_values == region)
        pos = shapes.index.get_indexer(table.obs[instance_key].to_numpy()[rows])
        ok = pos >= 0
        yx[rows[ok]] = world[pos[ok], :2]
        if diameter is None and size is not None:
            diameter = size * float(np.sqrt(abs(np.linalg.det(affine[:2, :2]))))
            shape = shape_here
        sections.append(Section(region, rows[ok]))
    if not sections:
        raise InputError(f"table {key!r} annotates {regions}, but none of them is a shapes element of the SpatialData.")
    # images in the same coordinate system; a lowres copy of an image that has a hires one is left out
    names = [n for n in sdata.images if cs in get_transformation(sdata.images[n], get_all=True)]
    names = [n for n in names if not ("lowres" in n and n.replace("lowres", "hires") in names)]
    for name in names:
        image, affine = _image_array(sdata.images[name], cs)
        # the section whose shapes name shares the longest prefix with the image name (one image each)
        free = [s for s in sections if s.image is None]
        if not free:
            logger.warning("image %r has no section of spots left to sit under; not shown", name)
            continue
        target = max(free, key=lambda s: len(os.path.commonprefix([s.name, name])))
        target.image, target.image_affine = image, affine
    return sections, yx, diameter, key, shape


def _image_array(element, cs: str) -> tuple[Any, np.ndarray]:
    """The image of a SpatialData image element as (H, W, C) (or (H, W)) and its (3, 3) affine to ``cs``.

    A multiscale element (a DataTree of ``scale0``, ``scale1``, ...) becomes a lazy :class:`Pyramid` of its
    levels, finest first (napari shows it as a multiscale layer; the nuclei detector reads its finest level
    tile by tile); a single-scale one an array, read into memory when under 256 MB.
    """
    from spatialdata.transformations import get_transformation

    transform = get_transformation(element, to_coordinate_system=cs)
    affine = np.asarray(transform.to_affine_matrix(input_axes=("y", "x"), output_axes=("y", "x")), dtype=float)
    if getattr(element, "children", None):  # a multiscale DataTree of scale0, scale1, ...
        levels = []
        for name in element.children:
            ds = element[name].ds
            levels.append(_yxc(ds[next(iter(ds.data_vars))]))
        levels.sort(key=lambda lv: -int(lv.shape[0]))
        levels = [lv for i, lv in enumerate(levels) if i == 0 or lv.shape[0] < levels[i - 1].shape[0]]
        if len(levels) > 1:
            return Pyramid(levels), affine
        arr = levels[0]
    else:
        arr = _yxc(element)
    if hasattr(arr, "compute") and arr.size * arr.dtype.itemsize < 256 * 2**20:
        arr = arr.compute()
    return arr, affine


def _yxc(data):
    """The array of an image DataArray with dims (y, x, c) (or (y, x))."""
    return data.transpose("y", "x", "c").data if "c" in data.dims else data.transpose("y", "x").data


# ------------------------------------------------------------------------------------------------
# side by side: one rule for the sections of a dataset and for several datasets
# ------------------------------------------------------------------------------------------------


def bounding_box(points: Iterable[np.ndarray] = (), images: Iterable[tuple[Any, np.ndarray]] = ()) -> np.ndarray | None:
    """World extent of point sets and images.

    Parameters
    ----------
    points : iterable of numpy.ndarray
        (n, 2) world (row, col) positions each; NaN rows are ignored.
    images : iterable of (array-like, numpy.ndarray)
        An (H, W, ...) image and its (3, 3) affine from image (row, col) to world (row, col).

    Returns
    -------
    numpy.ndarray or None
        ``(row_min, col_min, row_max, col_max)``, or None when there is nothing to bound.
    """
    boxes = []
    for pts in points:
        pts = np.asarray(pts, dtype=float).reshape(-1, 2)
        pts = pts[np.isfinite(pts).all(1)]
        if len(pts):
            boxes.append(np.r_[pts.min(0), pts.max(0)])
    for image, affine in images:
        h, w = image.shape[:2]
        corners = np.array([[0, 0, 1], [h, w, 1], [0, w, 1], [h, 0, 1]], float) @ np.asarray(affine, float).T
        boxes.append(np.r_[corners[:, :2].min(0), corners[:, :2].max(0)])
    if not boxes:
        return None
    b = np.stack(boxes)
    return np.r_[b[:, :2].min(0), b[:, 2:].max(0)]


def _overlap(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3])


def side_by_side_shifts(boxes: Sequence[np.ndarray | None]) -> np.ndarray:
    """Shift in x (world columns) of each box so that they sit side by side, never overlapped.

    The one placement rule: when no two boxes overlap nothing moves; otherwise the first box stays
    where it is and each next one is placed right of the one before, ``SECTION_GAP`` x the widest
    box apart, in the given order.

    Parameters
    ----------
    boxes : sequence of numpy.ndarray or None
        ``(row_min, col_min, row_max, col_max)`` of each section or dataset (:func:`bounding_box`);
        None for one with nothing to show (it does not move).

    Returns
    -------
    numpy.ndarray
        (len(boxes),) float shifts to add to the column coordinates.
    """
    shifts = np.zeros(len(boxes))
    placed = [i for i, b in enumerate(boxes) if b is not None]
    if len(placed) < 2:
        return shifts
    if not any(_overlap(boxes[i], boxes[j]) for k, i in enumerate(placed) for j in placed[:k]):
        return shifts
    gap = SECTION_GAP * max(boxes[i][3] - boxes[i][1] for i in placed)
    cursor = boxes[placed[0]][3] + gap
    for i in placed[1:]:
        shifts[i] = cursor - boxes[i][1]
        cursor += boxes[i][3] - boxes[i][1] + gap
    return shifts


def layout_side_by_side(sections: list[Section], yx: np.ndarray) -> np.ndarray:
    """Shift sections whose extents overlap so they sit side by side in x (:func:`side_by_side_shifts`).

    Parameters
    ----------
    sections : list of Section
        Modified in place (image affines get the shift).
    yx : numpy.ndarray
        (n_obs, 2) spot centres in world coordinates.

    Returns
    -------
    numpy.ndarray
        (n_obs, 2) shifted spot centres (a copy).
    """
    yx = np.array(yx, dtype=float, copy=True)
    boxes = [bounding_box([yx[s.spots]], [(s.image, s.image_affine)] if s.image is not None else []) for s in sections]
    for sec, shift in zip(sections, side_by_side_shifts(boxes), strict=True):
        if not shift:
            continue
        yx[sec.spots, 1] += shift
        if sec.image is not None:
            sec.image_affine = sec.image_affine.copy()
            sec.image_affine[1, 2] += shift
    return yx
