"""Tissue sections on the Visium lattice, their smooth zone fields and the cell composition of the spots."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ._constants import (
    _IMAGE_MARGIN_UM,
    _ROW_SPACING_UM,
    _SECTION_GAP_UM,
    _SECTION_PAD_UM,
    _ZONE_THRESHOLD,
    SPOT_PITCH_UM,
)


@dataclass
class _Section:
    """One roughly oval tissue section: its outline and its smooth zone fields (all lengths in µm)."""

    semi_axes: tuple[float, float]
    rotation: float
    wobble: np.ndarray  # (n_harmonics, 3): harmonic, amplitude, phase
    layer_angle: float
    layer_centres: np.ndarray  # (n_layers,)
    layer_sigma: float
    blob_centres: np.ndarray  # (n_blobs, 2)
    blob_sigmas: np.ndarray  # (n_blobs,)
    centre: np.ndarray = field(default_factory=lambda: np.zeros(2))  # (2,) (x, y) in the global frame
    scale: float = 1.0  # outline threshold of the shape distance

    def _local(self, xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        d = np.asarray(xy, dtype=np.float64) - self.centre
        c, s = np.cos(self.rotation), np.sin(self.rotation)
        u = (c * d[..., 0] + s * d[..., 1]) / self.semi_axes[0]
        v = (-s * d[..., 0] + c * d[..., 1]) / self.semi_axes[1]
        return u, v

    def shape_distance(self, xy: np.ndarray) -> np.ndarray:
        """Star-shaped elliptical distance of points ``xy`` (..., 2) from the section centre."""
        u, v = self._local(xy)
        theta = np.arctan2(v, u)
        radius = np.ones_like(theta)
        for k, amp, phase in self.wobble:
            radius += amp * np.cos(k * theta + phase)
        return np.hypot(u, v) / radius

    def zones(self, xy: np.ndarray) -> np.ndarray:
        """Zone fields in [0, 1] at points ``xy`` (n, 2); returns (n, n_zones), layers first then blobs."""
        u, v = self._local(xy)
        u, v = u / self.scale, v / self.scale
        t = u * np.cos(self.layer_angle) + v * np.sin(self.layer_angle)
        layers = np.exp(-0.5 * ((t[:, None] - self.layer_centres[None, :]) / self.layer_sigma) ** 2)
        d2 = (u[:, None] - self.blob_centres[None, :, 0]) ** 2 + (v[:, None] - self.blob_centres[None, :, 1]) ** 2
        blobs = np.exp(-0.5 * d2 / self.blob_sigmas[None, :] ** 2)
        return np.concatenate([layers, blobs], axis=1)


def _make_section(rng: np.random.Generator, n_spots: int, n_zones: int) -> tuple[_Section, np.ndarray, np.ndarray]:
    """Draw a section outline and select ``n_spots`` lattice spots inside it (local frame, centre at 0).

    Returns the section, the spot centres (n_spots, 2) in µm and the lattice indices (n_spots, 2) as
    (row, col) with col of the same parity as row.
    """
    aspect = rng.uniform(0.72, 0.95)
    area = n_spots * SPOT_PITCH_UM * _ROW_SPACING_UM
    a = np.sqrt(area / (np.pi * aspect))
    n_harm = 3
    wobble = np.stack(
        [np.arange(2, 2 + n_harm), rng.uniform(0.0, 0.05, n_harm), rng.uniform(0, 2 * np.pi, n_harm)], axis=1
    )
    n_layers = min(3, n_zones)
    n_blobs = n_zones - n_layers
    layer_sigma = {1: 0.6, 2: 0.38}.get(n_layers, 0.3)
    layer_centres = np.linspace(-0.65, 0.65, n_layers) if n_layers > 1 else np.zeros(1)
    r = 0.6 * np.sqrt(rng.uniform(0, 1, n_blobs))
    phi = rng.uniform(0, 2 * np.pi, n_blobs)
    section = _Section(
        semi_axes=(a, a * aspect),
        rotation=rng.uniform(-0.5, 0.5),
        wobble=wobble,
        layer_angle=rng.uniform(0, np.pi),
        layer_centres=layer_centres,
        layer_sigma=layer_sigma,
        blob_centres=np.stack([r * np.cos(phi), r * np.sin(phi)], axis=1),
        blob_sigmas=rng.uniform(0.22, 0.35, n_blobs),
    )
    # hexagonal lattice around the centre, large enough for any outline
    half = 1.6 * a + 2 * SPOT_PITCH_UM
    n_rows = int(np.ceil(half / _ROW_SPACING_UM))
    n_cols = int(np.ceil(half / (SPOT_PITCH_UM / 2)))
    rows, cols = np.meshgrid(np.arange(-n_rows, n_rows + 1), np.arange(-n_cols, n_cols + 1), indexing="ij")
    keep = (rows - cols) % 2 == 0
    rows, cols = rows[keep], cols[keep]
    xy = np.stack([cols * SPOT_PITCH_UM / 2, rows * _ROW_SPACING_UM], axis=1)
    dist = section.shape_distance(xy)
    order = np.argsort(dist, kind="stable")[:n_spots]
    section.scale = float(dist[order].max())
    return section, xy[order], np.stack([rows[order], cols[order]], axis=1)


def _layout(
    rng: np.random.Generator, n_spots: int, n_batches: int, n_zones: int
) -> tuple[list[_Section], np.ndarray, np.ndarray, np.ndarray, list[np.ndarray]]:
    """Place ``n_batches`` sections side by side in x.

    Returns sections, spot centres (n_spots, 2) in µm (global frame), section index per spot (n_spots,),
    array (row, col) per spot (n_spots, 2) and the bounding box [x0, y0, x1, y1] of each section (µm).
    """
    sizes = np.full(n_batches, n_spots // n_batches)
    sizes[: n_spots % n_batches] += 1
    sections, xys, batch, arrays, boxes = [], [], [], [], []
    cursor = 0.0
    for size in sizes:
        section, xy, lattice = _make_section(rng, int(size), n_zones)
        lo, hi = xy.min(axis=0) - _SECTION_PAD_UM, xy.max(axis=0) + _SECTION_PAD_UM
        # shift by whole pitches so that every section stays on one global lattice
        x_off = np.ceil((cursor - lo[0]) / SPOT_PITCH_UM) * SPOT_PITCH_UM
        offset = np.array([x_off, 0.0])
        section.centre = offset.copy()
        cursor = x_off + hi[0] + _SECTION_GAP_UM
        sections.append(section)
        xys.append(xy + offset)
        boxes.append(np.concatenate([lo + offset, hi + offset]))
        batch.append(np.full(len(xy), len(sections) - 1))
        # Visium-style array indices per section: non-negative, parity of (row + col) kept even
        rows = lattice[:, 0] - 2 * (lattice[:, 0].min() // 2)
        cols = lattice[:, 1] - 2 * (lattice[:, 1].min() // 2)
        order = np.lexsort((cols, rows))
        xys[-1], batch[-1] = xys[-1][order], batch[-1][order]
        arrays.append(np.stack([rows[order], cols[order]], axis=1))
    boxes_arr = np.stack(boxes)
    shift = _IMAGE_MARGIN_UM - boxes_arr[:, :2].min(axis=0)
    for section in sections:
        section.centre = section.centre + shift
    boxes = [box + np.concatenate([shift, shift]) for box in boxes_arr]
    return sections, np.concatenate(xys) + shift, np.concatenate(batch), np.concatenate(arrays), boxes


def _zone_matrix(sections: list[_Section], xy: np.ndarray, section_idx: np.ndarray) -> np.ndarray:
    """Zone fields (n, n_zones) of points ``xy`` (n, 2) belonging to sections ``section_idx`` (n,)."""
    n_zones = len(sections[0].layer_centres) + len(sections[0].blob_sigmas)
    out = np.zeros((len(xy), n_zones))
    for b, section in enumerate(sections):
        sel = section_idx == b
        if sel.any():
            out[sel] = section.zones(xy[sel])
    return out


def _type_probabilities(zones: np.ndarray, preference: np.ndarray, abundance: np.ndarray) -> np.ndarray:
    """Cell type probabilities (n, n_cell_types) from zone fields (n, n_zones).

    A type's affinity is its preference-weighted zone value; below ``_ZONE_THRESHOLD`` it is absent.
    """
    affinity = zones @ preference.T
    p = abundance[None, :] * np.clip(affinity - _ZONE_THRESHOLD, 0.0, None) ** 1.5
    p += 1e-12 * abundance[None, :]  # a spot outside every zone falls back to global abundance
    return p / p.sum(axis=1, keepdims=True)


def _density(zones: np.ndarray, coef: np.ndarray) -> np.ndarray:
    """Unnormalised cell density (n,) from zone fields (n, n_zones)."""
    return 0.35 + zones @ coef


def _expected_cells(density: np.ndarray, density_norm: float, mean_cells: float) -> np.ndarray:
    """Expected cells per spot area from an unnormalised ``density``, bounded to [0.25, 2.3] x ``mean_cells``."""
    return np.clip(mean_cells * density / density_norm, 0.25 * mean_cells, 2.3 * mean_cells)


def _zone_preference(rng: np.random.Generator, n_cell_types: int, n_zones: int) -> np.ndarray:
    """Preference (n_cell_types, n_zones) of each type: 1 for its primary zone, half of them a weaker second one."""
    preference = np.zeros((n_cell_types, n_zones))
    primary = rng.permutation(np.arange(n_cell_types) % n_zones)
    preference[np.arange(n_cell_types), primary] = 1.0
    for f in range(n_cell_types):
        if n_zones > 1 and rng.random() < 0.5:
            other = rng.choice(np.setdiff1d(np.arange(n_zones), [primary[f]]))
            preference[f, other] = rng.uniform(0.4, 0.8)
    return preference


@dataclass
class _Composition:
    """The sections, their spots and the cells in every spot; the fields that the nuclei are drawn from.

    Spot arrays are (n_spots, ...) in µm in the global frame; ``boxes`` holds [x0, y0, x1, y1] per section.
    """

    sections: list[_Section]
    xy_um: np.ndarray  # (n_spots, 2) spot centres
    batch_idx: np.ndarray  # (n_spots,) section of each spot
    array_rc: np.ndarray  # (n_spots, 2) Visium array (row, col)
    boxes: list[np.ndarray]
    zones: np.ndarray  # (n_spots, n_zones)
    preference: np.ndarray  # (n_cell_types, n_zones)
    abundance: np.ndarray  # (n_cell_types,) global relative abundance
    prob: np.ndarray  # (n_spots, n_cell_types) cell type probabilities
    density_coef: np.ndarray  # (n_zones,)
    density_norm: float  # mean unnormalised density over the spots
    mean_cells: float
    expected: np.ndarray  # (n_spots,) expected cells per spot
    w_sf: np.ndarray  # (n_spots, n_cell_types) integer cell numbers

    def section_of(self, xy: np.ndarray) -> np.ndarray:
        """Index of the section whose column of the image holds each point of ``xy`` (n, 2)."""
        return np.clip(np.searchsorted([box[2] for box in self.boxes], xy[:, 0]), 0, len(self.sections) - 1)

    def zones_at(self, xy: np.ndarray) -> np.ndarray:
        """Zone fields (n, n_zones) at arbitrary points ``xy`` (n, 2)."""
        return _zone_matrix(self.sections, xy, self.section_of(xy))

    def type_probabilities(self, zones: np.ndarray) -> np.ndarray:
        """Cell type probabilities (n, n_cell_types) at points with zone fields ``zones`` (n, n_zones)."""
        return _type_probabilities(zones, self.preference, self.abundance)

    def expected_cells(self, zones: np.ndarray) -> np.ndarray:
        """Expected cells per spot area (n,) at points with zone fields ``zones`` (n, n_zones)."""
        return _expected_cells(_density(zones, self.density_coef), self.density_norm, self.mean_cells)


def _cell_composition(
    rng_layout: np.random.Generator,
    rng_cells: np.random.Generator,
    n_spots: int,
    n_batches: int,
    n_cell_types: int,
    mean_cells: float,
) -> _Composition:
    """Lay out the sections (``rng_layout``) and draw zone preferences and cells per spot (``rng_cells``)."""
    n_zones = int(min(6, max(n_cell_types, 1)))
    sections, xy_um, batch_idx, array_rc, boxes = _layout(rng_layout, n_spots, n_batches, n_zones)
    zones = _zone_matrix(sections, xy_um, batch_idx)
    preference = _zone_preference(rng_cells, n_cell_types, n_zones)
    abundance = np.exp(rng_cells.normal(0.0, 0.4, n_cell_types))
    prob = _type_probabilities(zones, preference, abundance)
    density_coef = rng_cells.uniform(0.0, 1.0, n_zones)
    density = _density(zones, density_coef)
    density_norm = float(density.mean())
    expected = _expected_cells(density, density_norm, mean_cells)
    n_cells = np.maximum(rng_cells.poisson(expected), 1)
    w_sf = rng_cells.multinomial(n_cells, prob)
    return _Composition(
        sections=sections,
        xy_um=xy_um,
        batch_idx=batch_idx,
        array_rc=array_rc,
        boxes=boxes,
        zones=zones,
        preference=preference,
        abundance=abundance,
        prob=prob,
        density_coef=density_coef,
        density_norm=density_norm,
        mean_cells=mean_cells,
        expected=expected,
        w_sf=w_sf,
    )
