"""Nuclei of every cell: the cells of each spot packed inside its circle, filler cells on the tissue between spots.

Positions and sizes are in µm in the global frame of :mod:`._layout`; shapes are stacked as
(major diameter, minor diameter, orientation, hematoxylin darkness).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from ._constants import _EDGE_MARGIN_UM, _HIRES_UM_PER_PX, _NUCLEUS_DIAMETER_UM, _NUCLEUS_SPACING, SPOT_DIAMETER_UM
from ._layout import _Composition

logger = logging.getLogger(__name__)

_SPOT_RADIUS_UM = SPOT_DIAMETER_UM / 2
_FILLER_ROUNDS = 6  # rounds of random sequential addition of filler nuclei
_FILLER_RATE = 0.008  # filler candidates per µm² of tissue per round


def _pack_disk(
    rng: np.random.Generator, diam: np.ndarray, radius: float, spacing: float = _NUCLEUS_SPACING
) -> tuple[np.ndarray, float]:
    """Place ``len(diam)`` nuclei centres in a disk of ``radius``, no two closer than ``spacing`` allows.

    Random sequential addition with minimum centre distance ``spacing`` times the mean major diameter of
    the pair (above 1 the nuclei keep a gap, below 1 they may overlap); when the disk is too crowded the
    nuclei are shrunk, and at last they are laid on a sunflower spiral. Returns offsets (n, 2) from the disk
    centre and the shrink factor applied to ``diam``.
    """
    n = len(diam)
    for shrink in (1.0, 0.92, 0.85, 0.78, 0.72, 0.66):
        d = (diam * shrink).tolist()
        k = 40 * n + 40
        r = radius * np.sqrt(rng.random(k))
        t = 2 * np.pi * rng.random(k)
        px: list[float] = []
        py: list[float] = []
        for x, y in zip((r * np.cos(t)).tolist(), (r * np.sin(t)).tolist(), strict=True):
            di = d[len(px)]
            for ax, ay, ad in zip(px, py, d, strict=False):
                lim = spacing * 0.5 * (di + ad)
                if (x - ax) ** 2 + (y - ay) ** 2 < lim * lim:
                    break
            else:
                px.append(x)
                py.append(y)
                if len(px) == n:
                    return np.stack([px, py], axis=1), shrink
    # sunflower (Vogel) spiral: evenly spread, then size the nuclei to the spacing it gives
    i = np.arange(n)
    rr = radius * np.sqrt((i + 0.5) / n)
    tt = i * np.pi * (3.0 - np.sqrt(5.0)) + rng.uniform(0, 2 * np.pi)
    offsets = np.stack([rr * np.cos(tt), rr * np.sin(tt)], axis=1)
    if n > 1:
        dd = np.sqrt(((offsets[:, None] - offsets[None]) ** 2).sum(-1)) + np.eye(n) * 1e9
        shrink = min(0.66, float(dd.min()) / (spacing * float(diam.max())))
    else:
        shrink = 1.0
    return offsets, shrink


def _nucleus_shapes(
    rng: np.random.Generator, types: np.ndarray, type_diameter: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Major and minor diameters (µm), orientation (rad) and hematoxylin darkness for cells of ``types``."""
    n = len(types)
    major = np.clip(type_diameter[types] + rng.normal(0.0, 0.5, n), *_NUCLEUS_DIAMETER_UM)
    minor = major * rng.uniform(0.7, 0.95, n)
    angle = rng.uniform(0.0, np.pi, n)
    dark = rng.uniform(1.0, 1.5, n)
    return major, minor, angle, dark


def _spot_nuclei(
    rng: np.random.Generator,
    spot_xy: np.ndarray,
    w_sf: np.ndarray,
    type_diameter: np.ndarray,
    spacing: float = _NUCLEUS_SPACING,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Nuclei of the ``w_sf`` cells of each spot, packed inside the spot's circle (:func:`_pack_disk`).

    Returns centres (n, 2), cell type (n,), owning spot index (n,) and shapes (n, 4).
    """
    n_types = w_sf.shape[1]
    xs, types, owner, shapes = [], [], [], []
    for s in range(len(spot_xy)):
        t = np.repeat(np.arange(n_types), w_sf[s])
        if len(t) == 0:
            continue
        t = rng.permutation(t)
        major, minor, angle, dark = _nucleus_shapes(rng, t, type_diameter)
        offsets, shrink = _pack_disk(rng, major, _SPOT_RADIUS_UM - _EDGE_MARGIN_UM, spacing)
        xs.append(spot_xy[s] + offsets)
        types.append(t)
        owner.append(np.full(len(t), s))
        shapes.append(np.stack([major * shrink, minor * shrink, angle, dark], axis=1))
    return (
        np.concatenate(xs) if xs else np.zeros((0, 2)),
        np.concatenate(types) if types else np.zeros(0, dtype=int),
        np.concatenate(owner) if owner else np.zeros(0, dtype=int),
        np.concatenate(shapes) if shapes else np.zeros((0, 4)),
    )


def _filler_candidates(
    rng: np.random.Generator, tissue_px: np.ndarray, width: int, tissue_area: float, spot_tree, um_per_px: float
) -> tuple[np.ndarray, int]:
    """Uniform candidate centres on the tissue pixels ``tissue_px`` (flat indices of an image ``width`` wide,
    ``um_per_px`` µm per pixel).

    Returns the candidates (m, 2) in µm that keep clear of every spot circle, and the number drawn.
    """
    n = rng.poisson(_FILLER_RATE * tissue_area)
    pick = tissue_px[rng.integers(0, len(tissue_px), n)]
    jitter = rng.uniform(-0.5, 0.5, (n, 2))
    xy = (np.stack([pick % width, pick // width], axis=1) + jitter) * um_per_px
    ok = spot_tree.query(xy)[0] >= _SPOT_RADIUS_UM + _EDGE_MARGIN_UM
    return xy[ok], n


def _drop_sure_clashes(
    xy: np.ndarray, placed_xy: np.ndarray, placed_major: np.ndarray, spacing: float = _NUCLEUS_SPACING
) -> tuple[np.ndarray, Any]:
    """Drop candidates ``xy`` that clash with a placed nucleus whatever their own size (minimum centre
    distance ``spacing`` times the pair's mean major diameter).

    Returns the remaining candidates and their pairs with placed nuclei in reach (structured array with
    fields ``i`` (candidate), ``j`` (placed nucleus), ``v`` (distance)), or None when either set is empty.
    """
    from scipy.spatial import cKDTree

    if not (len(placed_xy) and len(xy)):
        return xy, None
    min_major, max_major = _NUCLEUS_DIAMETER_UM
    pairs = cKDTree(xy).sparse_distance_matrix(cKDTree(placed_xy), spacing * max_major, output_type="ndarray")
    sure = pairs["v"] < spacing * 0.5 * (min_major + placed_major[pairs["j"]])
    clear = np.ones(len(xy), dtype=bool)
    clear[pairs["i"][sure]] = False
    new_index = np.cumsum(clear) - 1
    pairs = pairs[clear[pairs["i"]]]
    pairs["i"] = new_index[pairs["i"]]
    return xy[clear], pairs


def _clashes(
    xy: np.ndarray, major: np.ndarray, placed_pairs: Any, placed_major: np.ndarray, spacing: float = _NUCLEUS_SPACING
) -> np.ndarray:
    """Candidates (boolean, (m,)) that overlap, with their actual sizes, a placed nucleus or another candidate.

    Among candidates of one round the later one loses (Matern type II); ``placed_pairs`` is the second
    result of :func:`_drop_sure_clashes`.
    """
    from scipy.spatial import cKDTree

    bad = np.zeros(len(xy), dtype=bool)
    if placed_pairs is not None and len(placed_pairs):
        i, j = placed_pairs["i"], placed_pairs["j"]
        clash = placed_pairs["v"] < spacing * 0.5 * (major[i] + placed_major[j])
        bad[i[clash]] = True
    lim = spacing * _NUCLEUS_DIAMETER_UM[1]
    pairs = cKDTree(xy).query_pairs(lim, output_type="ndarray") if len(xy) else np.zeros((0, 2), int)
    if len(pairs):
        dist = np.sqrt(((xy[pairs[:, 0]] - xy[pairs[:, 1]]) ** 2).sum(axis=1))
        clash = dist < spacing * 0.5 * (major[pairs[:, 0]] + major[pairs[:, 1]])
        bad[pairs[clash].max(axis=1)] = True
    return bad


def _draw_types(rng: np.random.Generator, prob: np.ndarray) -> np.ndarray:
    """One cell type per row of the probabilities ``prob`` (n, n_types)."""
    return (rng.random(len(prob))[:, None] > np.cumsum(prob, axis=1)).sum(axis=1).clip(0, prob.shape[1] - 1)


def _saturated_filler(
    rng: np.random.Generator,
    comp: _Composition,
    mask: np.ndarray,
    spot_xy: np.ndarray,
    spot_major: np.ndarray,
    type_diameter: np.ndarray,
    spacing: float = _NUCLEUS_SPACING,
    um_per_px: float = _HIRES_UM_PER_PX,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Filler nuclei between the spots, by random sequential addition to saturation of the tissue ``mask``
    (an image of ``um_per_px`` µm per pixel), no two nuclei closer than ``spacing`` allows.

    Returns centres (n, 2), cell types (n,), shapes (n, 4) and the tissue area (µm²) outside the spot circles.
    """
    from scipy.spatial import cKDTree

    spot_tree = cKDTree(comp.xy_um)
    placed_xy, placed_major = spot_xy, spot_major
    fill_xy, fill_types, fill_shapes = np.zeros((0, 2)), np.zeros(0, dtype=int), np.zeros((0, 4))
    tissue_px = np.flatnonzero(mask)
    tissue_area = len(tissue_px) * um_per_px**2
    n_pass, n_cand = 0, 0
    for _ in range(_FILLER_ROUNDS):
        xy, n = _filler_candidates(rng, tissue_px, mask.shape[1], tissue_area, spot_tree, um_per_px)
        n_cand += n
        n_pass += len(xy)
        # types and sizes are drawn only for candidates that may fit
        xy, placed_pairs = _drop_sure_clashes(xy, placed_xy, placed_major, spacing)
        t = _draw_types(rng, comp.type_probabilities(comp.zones_at(xy)))
        major, minor, angle, dark = _nucleus_shapes(rng, t, type_diameter)
        keep = ~_clashes(xy, major, placed_pairs, placed_major, spacing)
        fill_xy = np.concatenate([fill_xy, xy[keep]])
        fill_types = np.concatenate([fill_types, t[keep]])
        fill_shapes = np.concatenate([fill_shapes, np.stack([major, minor, angle, dark], axis=1)[keep]])
        placed_xy = np.concatenate([placed_xy, xy[keep]])
        placed_major = np.concatenate([placed_major, major[keep]])
    return fill_xy, fill_types, fill_shapes, tissue_area * n_pass / max(n_cand, 1)


def _thin_filler(rng: np.random.Generator, comp: _Composition, fill_xy: np.ndarray, filler_area: float) -> np.ndarray:
    """Keep mask (n,) thinning saturated filler nuclei ``fill_xy`` (n, 2) to the local expected cell density."""
    spot_area = np.pi * _SPOT_RADIUS_UM**2
    saturated = len(fill_xy) / max(filler_area, 1.0)
    expected = comp.expected_cells(comp.zones_at(fill_xy))
    keep = rng.random(len(fill_xy)) < expected / spot_area / max(saturated, 1e-12)
    logger.debug("filler nuclei: %d saturated (%.4f / µm²), %d kept", len(fill_xy), saturated, int(keep.sum()))
    return keep


def _nuclei(
    rng: np.random.Generator,
    comp: _Composition,
    spot_names: np.ndarray,
    mask: np.ndarray,
    spacing: float = _NUCLEUS_SPACING,
    um_per_px: float = _HIRES_UM_PER_PX,
) -> dict[str, np.ndarray]:
    """Nuclei of all cells: those of each spot inside its circle, filler cells on the tissue ``mask`` between spots.

    ``spacing`` is the minimum centre distance of two nuclei in units of their mean major diameter;
    ``mask`` is on an image grid of ``um_per_px`` µm per pixel. The nuclei of the spots are drawn before
    the filler, so they do not depend on ``um_per_px``.

    Returns centres ``x_um``, ``y_um``, owning ``spot`` name (None for filler cells), cell ``type`` index and
    the shape columns ``major_um``, ``minor_um``, ``angle``, ``dark``, one entry per nucleus.
    """
    type_diameter = rng.uniform(6.5, 8.5, comp.w_sf.shape[1])
    spot_xy, spot_types, spot_owner, spot_shapes = _spot_nuclei(rng, comp.xy_um, comp.w_sf, type_diameter, spacing)
    fill_xy, fill_types, fill_shapes, filler_area = _saturated_filler(
        rng, comp, mask, spot_xy, spot_shapes[:, 0], type_diameter, spacing, um_per_px
    )
    keep = _thin_filler(rng, comp, fill_xy, filler_area)

    xy = np.concatenate([spot_xy, fill_xy[keep]])
    shapes = np.concatenate([spot_shapes, fill_shapes[keep]])
    return {
        "x_um": xy[:, 0],
        "y_um": xy[:, 1],
        "spot": np.concatenate([spot_names[spot_owner], np.full(int(keep.sum()), None, dtype=object)]).astype(object),
        "type": np.concatenate([spot_types, fill_types[keep]]).astype(int),
        "major_um": shapes[:, 0],
        "minor_um": shapes[:, 1],
        "angle": shapes[:, 2],
        "dark": shapes[:, 3],
    }
