"""Synthetic Visium-like data with a synthetic H&E image and full ground truth, generated offline in code.

The generator follows the Cell2location generative model (``spec/MODEL.md`` section 1), so a fit of the
model on the data is well specified and its estimates can be scored against the truth:

* spots sit on the Visium hexagonal lattice (100 µm centre-to-centre, 55 µm diameter), one roughly oval
  tissue section per batch, sections side by side in x in one coordinate frame;
* cell types live in smooth spatial zones (layers and blobs), so each type is absent from many spots;
* per-spot integer cell counts ``w_sf`` are drawn from zone-driven proportions;
* counts are ``D_sg ~ NB(mu_sg, alpha_eg)`` with ``mu_sg = (m_g * sum_f w_sf g_fg + s_eg) * y_s``;
* every cell is drawn as a nucleus on the H&E image, inside its spot's circle, and filler cells are drawn
  between the spots, so nuclei counting on the image can be checked against ``truth['n_cells']``.

Coordinate conventions (written once, used everywhere):

* ``adata.obsm['spatial']`` is (x, y) in full-resolution pixels; one full-resolution pixel is 0.5 µm;
* the image is stored at ``hires`` scale: image (row, col) = (y, x) * ``tissue_hires_scalef`` (0.25), so one
  image pixel is 2 µm; pixel centres sit at integer (row, col), as in napari.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anndata
import numpy as np
import pandas as pd
from scipy import sparse

if TYPE_CHECKING:  # pragma: no cover
    import spatialdata

__all__ = ["SyntheticVisium", "synthetic_visium"]

logger = logging.getLogger(__name__)

#: Visium spot centre-to-centre distance (µm).
SPOT_PITCH_UM = 100.0
#: Visium spot diameter (µm).
SPOT_DIAMETER_UM = 55.0
#: Size of one full-resolution pixel (µm).
FULLRES_UM_PER_PX = 0.5
#: Scale factor full-resolution -> hires image (one hires pixel = 2 µm).
HIRES_SCALEF = 0.25
#: Scale factor full-resolution -> lowres image (as in Space Ranger, 600 / 2000 of hires).
LOWRES_SCALEF = 0.075
#: Fiducial / spot diameter ratio of Space Ranger's scalefactors_json.json.
_FIDUCIAL_RATIO = 1.615

_ROW_SPACING_UM = SPOT_PITCH_UM * np.sqrt(3.0) / 2.0  # vertical distance between lattice rows
_SECTION_GAP_UM = 200.0  # minimum free space between the bounding boxes of two sections
_SECTION_PAD_UM = 80.0  # bounding box of a section = its spot centres +- this
_IMAGE_MARGIN_UM = 100.0  # white border around the outermost section boxes
_TISSUE_DILATION_UM = 32.0  # tissue reaches this far beyond the spot-selection outline
_EDGE_MARGIN_UM = 2.0  # nuclei centres keep this distance from a spot's circle, inside and outside
_NUCLEUS_SPACING = 1.3  # minimum centre distance in units of the mean of two nuclei's major diameters
_NUCLEUS_DIAMETER_UM = (6.0, 9.0)
_ZONE_THRESHOLD = 0.3  # zone affinity below which a cell type is absent
_PER_GENE_COUNTS_PER_CELL = 2.5  # mean expected count per gene per cell in the signatures


@dataclass
class SyntheticVisium:
    """A synthetic Visium experiment with its single-cell reference and the ground truth behind both.

    Parameters
    ----------
    adata : anndata.AnnData
        Spatial counts, shape (n_obs, n_vars) = (n_spots, n_genes); raw integer counts as CSR float32.
        ``obs`` has ``'batch'`` (categorical, one per section), ``'in_tissue'``, ``'array_row'``,
        ``'array_col'``; ``obsm['spatial']`` holds (x, y) in full-resolution pixels; ``uns['spatial']``
        follows the scanpy layout.
    reference : anndata.AnnData
        Labelled single-cell counts, shape (n_cells, n_vars); ``obs`` has ``'cell_type'`` and ``'batch'``.
    signatures : pandas.DataFrame
        True expected counts per cell ``g_fg``, shape (n_vars, n_cell_types); index gene names, columns
        cell type names.
    truth : dict
        Ground truth; see :func:`synthetic_visium` for its keys.
    image : numpy.ndarray or None
        Synthetic H&E image at hires scale, shape (H, W, 3), uint8; ``None`` when not generated.
    scalefactors : dict
        Space Ranger ``scalefactors_json.json``-style scale factors.
    library_id : str
        Name of the library, the key in ``adata.uns['spatial']`` and the prefix of SpatialData elements.
    """

    adata: anndata.AnnData
    reference: anndata.AnnData
    signatures: pd.DataFrame
    truth: dict = field(repr=False)
    image: np.ndarray | None = field(repr=False)
    scalefactors: dict
    library_id: str

    def to_spatialdata(self) -> spatialdata.SpatialData:
        """Build a SpatialData object laid out as ``spatialdata_io.visium()`` lays out a Space Ranger folder.

        Elements: image ``'{library_id}_hires_image'`` (dims c, y, x; a ``Scale`` of
        ``1 / tissue_hires_scalef`` maps it onto full-resolution pixels of the ``'global'`` coordinate
        system), shapes ``'{library_id}_spots'`` (circles at ``obsm['spatial']`` with ``'radius'`` in
        full-resolution pixels, identity to ``'global'``) and table ``'table'`` annotating the shapes through
        ``region_key='region'`` and ``instance_key='spot_id'``. Both the image and the shapes are also in
        the ``'downscaled_hires'`` coordinate system (image pixels). The reference is not included.

        Returns
        -------
        spatialdata.SpatialData
            The image (when one was generated), the spot circles and the counts table.
        """
        import spatialdata as sd
        from spatialdata.models import Image2DModel, ShapesModel, TableModel
        from spatialdata.transformations import Identity, Scale

        lib = self.library_id
        scalef = float(self.scalefactors["tissue_hires_scalef"])
        shapes_name = f"{lib}_spots"
        n_obs = self.adata.n_obs
        spot_id = np.arange(n_obs)

        images = {}
        if self.image is not None:
            images[f"{lib}_hires_image"] = Image2DModel.parse(
                np.moveaxis(self.image, -1, 0),
                dims=("c", "y", "x"),
                c_coords=["r", "g", "b"],
                transformations={
                    "global": Scale([1.0 / scalef, 1.0 / scalef], axes=("y", "x")),
                    "downscaled_hires": Identity(),
                },
            )
        radius = float(self.scalefactors["spot_diameter_fullres"]) / 2.0
        shapes = ShapesModel.parse(
            np.asarray(self.adata.obsm["spatial"], dtype=np.float64),
            geometry=0,
            radius=np.full(n_obs, radius),
            index=pd.Index(spot_id, name="spot_id"),
            transformations={
                "global": Identity(),
                "downscaled_hires": Scale([scalef, scalef], axes=("x", "y")),
            },
        )
        table = self.adata.copy()
        # the image lives in the SpatialData image element; keep only the scale factors in the table
        table.uns["spatial"] = {lib: {"scalefactors": dict(self.scalefactors)}}
        table.obs["region"] = pd.Categorical([shapes_name] * n_obs)
        table.obs["spot_id"] = spot_id
        table = TableModel.parse(table, region=shapes_name, region_key="region", instance_key="spot_id")
        return sd.SpatialData(images=images, shapes={shapes_name: shapes}, tables={"table": table})


# ----------------------------------------------------------------------------------------------------------
# tissue sections: lattice, outline, zones
# ----------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------
# expression
# ----------------------------------------------------------------------------------------------------------


def _signatures(rng: np.random.Generator, n_genes: int, n_cell_types: int) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """Draw expected counts per cell ``g_fg`` (n_genes, n_cell_types) and marker gene indices per type.

    Shared log-normal baseline + family programme + type-specific noise + several-fold marker genes, each
    type scaled to a per-cell total of about ``_PER_GENE_COUNTS_PER_CELL * n_genes``.
    """
    base = rng.normal(0.0, 1.0, n_genes)
    n_families = max(1, int(round(np.sqrt(n_cell_types))))
    family = rng.integers(0, n_families, n_cell_types)
    family_effect = rng.normal(0.0, 0.5, (n_families, n_genes))
    log_g = base[:, None] + family_effect[family].T + rng.normal(0.0, 0.3, (n_genes, n_cell_types))
    n_markers = max(3, int(0.02 * n_genes))
    markers = {}
    if n_markers * n_cell_types <= n_genes:
        perm = rng.permutation(n_genes)
        for f in range(n_cell_types):
            markers[f] = np.sort(perm[f * n_markers : (f + 1) * n_markers])
    else:
        for f in range(n_cell_types):
            markers[f] = np.sort(rng.choice(n_genes, size=min(n_markers, n_genes), replace=False))
    for f, genes in markers.items():
        log_g[genes, f] += np.log(rng.uniform(3.0, 10.0, len(genes)))
    g = np.exp(log_g)
    totals = _PER_GENE_COUNTS_PER_CELL * n_genes * np.exp(rng.normal(0.0, 0.25, n_cell_types))
    g *= totals[None, :] / g.sum(axis=0, keepdims=True)
    return g, markers


def _neg_binomial(rng: np.random.Generator, mu: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Negative binomial draws with mean ``mu`` and variance ``mu + mu**2 / alpha`` (Gamma-Poisson)."""
    lam = rng.gamma(shape=alpha, scale=mu / alpha)
    return rng.poisson(lam)


def _to_csr(counts: np.ndarray) -> sparse.csr_matrix:
    return sparse.csr_matrix(counts.astype(np.float32))


# ----------------------------------------------------------------------------------------------------------
# nuclei and H&E image
# ----------------------------------------------------------------------------------------------------------


def _pack_disk(rng: np.random.Generator, diam: np.ndarray, radius: float) -> tuple[np.ndarray, float]:
    """Place ``len(diam)`` nuclei centres in a disk of ``radius`` without overlaps.

    Random sequential addition with minimum centre distance ``_NUCLEUS_SPACING`` times the mean major
    diameter of the pair; when the disk is too crowded the nuclei are shrunk, and at last they are laid on
    a sunflower spiral. Returns offsets (n, 2) from the disk centre and the shrink factor applied to ``diam``.
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
                lim = _NUCLEUS_SPACING * 0.5 * (di + ad)
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
        shrink = min(0.66, float(dd.min()) / (_NUCLEUS_SPACING * float(diam.max())))
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


def _upsample_linear(coarse: np.ndarray, step: int, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling of ``coarse`` (h, w), sampled every ``step`` pixels, to ``shape`` (H, W)."""
    out = coarse
    for axis, n in enumerate(shape):
        pos = np.arange(n) / step
        i0 = np.minimum(pos.astype(np.int64), coarse.shape[axis] - 2)
        frac = (pos - i0).astype(coarse.dtype)
        lo, hi = np.take(out, i0, axis=axis), np.take(out, i0 + 1, axis=axis)
        frac = frac[:, None] if axis == 0 else frac[None, :]
        out = lo + (hi - lo) * frac
    return out


def _tissue_mask(shape: tuple[int, int], sections: list[_Section], boxes: list[np.ndarray]) -> np.ndarray:
    """Boolean tissue mask (H, W) on the hires pixel grid.

    A section's tissue is its outline (the region its spots were selected from) dilated by
    ``_TISSUE_DILATION_UM``, so every spot circle and its nuclei lie on tissue.
    """
    from scipy import ndimage

    um_per_px = FULLRES_UM_PER_PX / HIRES_SCALEF
    step = 4  # the outline's distance field is smooth: evaluate it on a coarse grid and interpolate
    mask = np.zeros(shape, dtype=bool)
    dil_px = _TISSUE_DILATION_UM / um_per_px
    for section, box in zip(sections, boxes, strict=True):
        c0, r0 = max(int(np.floor(box[0] / um_per_px)), 0), max(int(np.floor(box[1] / um_per_px)), 0)
        c1, r1 = (
            min(int(np.ceil(box[2] / um_per_px)) + 1, shape[1]),
            min(int(np.ceil(box[3] / um_per_px)) + 1, shape[0]),
        )
        rows = r0 + step * np.arange((r1 - r0 - 1) // step + 2)
        cols = c0 + step * np.arange((c1 - c0 - 1) // step + 2)
        xy = np.stack(np.broadcast_arrays(cols[None, :] * um_per_px, rows[:, None] * um_per_px), axis=-1)
        dist = _upsample_linear(section.shape_distance(xy).astype(np.float32), step, (r1 - r0, c1 - c0))
        mask[r0:r1, c0:c1] |= ndimage.distance_transform_edt(dist > section.scale) <= dil_px
    return mask


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float, step: int) -> np.ndarray:
    """Standardised smooth noise (H, W) float32: Gaussian-filtered on a grid ``step`` times coarser, upsampled."""
    from scipy import ndimage

    small = (shape[0] // step + 2, shape[1] // step + 2)
    noise = ndimage.gaussian_filter(rng.standard_normal(small, dtype=np.float32), sigma / step)
    noise = (noise - noise.mean()) / (noise.std() + 1e-12)
    if step > 1:
        noise = ndimage.zoom(noise, step, order=1)
    return noise[: shape[0], : shape[1]]


def _render_he(rng: np.random.Generator, mask: np.ndarray, nuclei: dict[str, np.ndarray]) -> np.ndarray:
    """Render a synthetic H&E image (H, W, 3) uint8 from a tissue mask (H, W) and nuclei (image pixel units).

    Colour follows Beer-Lambert: optical density = hematoxylin * h_vec + eosin * e_vec + glass.
    """
    from scipy import ndimage

    f32 = np.float32
    h, w = mask.shape
    soft = ndimage.gaussian_filter(mask.astype(f32), 1.2)
    coarse, fine = _smooth_noise(rng, mask.shape, 24.0, 8), _smooth_noise(rng, mask.shape, 3.0, 1)
    eosin = soft * (f32(0.55) + f32(0.07) * coarse + f32(0.05) * fine)
    hema = soft * (f32(0.10) + f32(0.03) * _smooth_noise(rng, mask.shape, 6.0, 2))

    # nuclei: soft-edged filled ellipses (about one pixel of anti-aliasing), max-composited
    rows, cols = nuclei["row"].astype(f32), nuclei["col"].astype(f32)
    a_px, b_px = (nuclei["major_px"] / 2).astype(f32), (nuclei["minor_px"] / 2).astype(f32)
    if len(rows):
        half = int(np.ceil(a_px.max() + 0.5))
        off = np.arange(-half, half + 1)
        r0, c0 = np.rint(rows).astype(np.int64), np.rint(cols).astype(np.int64)
        rr = r0[:, None, None] + off[None, :, None]  # (n, k, 1)
        cc = c0[:, None, None] + off[None, None, :]  # (n, 1, k)
        dr, dc = (rr - rows[:, None, None]).astype(f32), (cc - cols[:, None, None]).astype(f32)
        angle = nuclei["angle"].astype(f32)[:, None, None]
        cos, sin = np.cos(angle), np.sin(angle)
        q = np.sqrt(
            ((dc * cos + dr * sin) / a_px[:, None, None]) ** 2 + ((dr * cos - dc * sin) / b_px[:, None, None]) ** 2
        )
        val = np.clip(f32(0.5) + (f32(1.0) - q) * b_px[:, None, None], 0.0, 1.0)
        val *= nuclei["dark"].astype(f32)[:, None, None] * rng.uniform(0.8, 1.1, val.shape).astype(f32)  # chromatin
        rr, cc = np.broadcast_arrays(rr, cc)
        ok = (val > 0) & (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
        nuc = np.zeros(h * w, dtype=f32)
        np.maximum.at(nuc, (rr * w + cc)[ok], val[ok])
        hema += nuc.reshape(h, w)

    hema = ndimage.gaussian_filter(hema, 0.6)
    eosin = ndimage.gaussian_filter(eosin, 0.8)
    h_vec = np.array([0.65, 0.70, 0.29], dtype=f32)
    e_vec = np.array([0.10, 0.75, 0.35], dtype=f32)
    od = hema[..., None] * h_vec + eosin[..., None] * e_vec + f32(0.03)
    rgb = f32(255.0) * np.exp(-od)
    rgb += f32(2.5) * rng.standard_normal(rgb.shape, dtype=f32)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def _nuclei(
    rng: np.random.Generator,
    spot_xy: np.ndarray,
    w_sf: np.ndarray,
    spot_names: np.ndarray,
    mask: np.ndarray,
    sections: list[_Section],
    boxes: list[np.ndarray],
    preference: np.ndarray,
    abundance: np.ndarray,
    density_coef: np.ndarray,
    density_norm: float,
    mean_cells: float,
) -> dict[str, np.ndarray]:
    """Nuclei of all cells: those of each spot inside its circle, filler cells between the spots (µm)."""
    from scipy.spatial import cKDTree

    n_types = w_sf.shape[1]
    type_diameter = rng.uniform(6.5, 8.5, n_types)
    radius = SPOT_DIAMETER_UM / 2
    spot_area = np.pi * radius**2

    # cells of the spots
    xs, types, owner, shapes = [], [], [], []
    for s in range(len(spot_xy)):
        t = np.repeat(np.arange(n_types), w_sf[s])
        if len(t) == 0:
            continue
        t = rng.permutation(t)
        major, minor, angle, dark = _nucleus_shapes(rng, t, type_diameter)
        offsets, shrink = _pack_disk(rng, major, radius - _EDGE_MARGIN_UM)
        xs.append(spot_xy[s] + offsets)
        types.append(t)
        owner.append(np.full(len(t), s))
        shapes.append(np.stack([major * shrink, minor * shrink, angle, dark], axis=1))
    spot_cells = np.concatenate(xs) if xs else np.zeros((0, 2))
    spot_types = np.concatenate(types) if types else np.zeros(0, dtype=int)
    spot_owner = np.concatenate(owner) if owner else np.zeros(0, dtype=int)
    spot_shapes = np.concatenate(shapes) if shapes else np.zeros((0, 4))

    # filler cells: random sequential addition to saturation, then thinned to the local target density
    um_per_px = FULLRES_UM_PER_PX / HIRES_SCALEF
    w = mask.shape[1]
    spot_tree = cKDTree(spot_xy)
    acc_xy, acc_major = spot_cells, spot_shapes[:, 0]
    fill_xy, fill_types, fill_shapes = np.zeros((0, 2)), np.zeros(0, dtype=int), np.zeros((0, 4))
    min_major, max_major = _NUCLEUS_DIAMETER_UM
    rate = 0.008  # candidates per µm² of tissue per round
    tissue_px = np.flatnonzero(mask)
    tissue_area = len(tissue_px) * um_per_px**2
    n_pass, n_cand = 0, 0
    for _ in range(6):
        n = rng.poisson(rate * tissue_area)
        pick = tissue_px[rng.integers(0, len(tissue_px), n)]
        jitter = rng.uniform(-0.5, 0.5, (n, 2))
        xy = (np.stack([pick % w, pick // w], axis=1) + jitter) * um_per_px
        ok = spot_tree.query(xy)[0] >= radius + _EDGE_MARGIN_UM
        n_cand += n
        n_pass += int(ok.sum())
        xy = xy[ok]
        lim = _NUCLEUS_SPACING * max_major
        # drop candidates that clash with placed nuclei whatever their size, before drawing types and sizes
        pairs = None
        if len(acc_xy) and len(xy):
            pairs = cKDTree(xy).sparse_distance_matrix(cKDTree(acc_xy), lim, output_type="ndarray")
            sure = pairs["v"] < _NUCLEUS_SPACING * 0.5 * (min_major + acc_major[pairs["j"]])
            clear = np.ones(len(xy), dtype=bool)
            clear[pairs["i"][sure]] = False
            new_index = np.cumsum(clear) - 1
            pairs = pairs[clear[pairs["i"]]]
            pairs["i"] = new_index[pairs["i"]]
            xy = xy[clear]
        section_idx = np.clip(np.searchsorted([box[2] for box in boxes], xy[:, 0]), 0, len(sections) - 1)
        p = _type_probabilities(_zone_matrix(sections, xy, section_idx), preference, abundance)
        t = (rng.random(len(xy))[:, None] > np.cumsum(p, axis=1)).sum(axis=1).clip(0, n_types - 1)
        major, minor, angle, dark = _nucleus_shapes(rng, t, type_diameter)
        # conflicts with nuclei already placed, with the actual sizes
        bad = np.zeros(len(xy), dtype=bool)
        if pairs is not None and len(pairs):
            clash = pairs["v"] < _NUCLEUS_SPACING * 0.5 * (major[pairs["i"]] + acc_major[pairs["j"]])
            bad[pairs["i"][clash]] = True
        # conflicts among this round's candidates (Matern type II: the later mark loses)
        pairs = cKDTree(xy).query_pairs(lim, output_type="ndarray") if len(xy) else np.zeros((0, 2), int)
        if len(pairs):
            dist = np.sqrt(((xy[pairs[:, 0]] - xy[pairs[:, 1]]) ** 2).sum(axis=1))
            clash = dist < _NUCLEUS_SPACING * 0.5 * (major[pairs[:, 0]] + major[pairs[:, 1]])
            bad[pairs[clash].max(axis=1)] = True
        keep = ~bad
        fill_xy = np.concatenate([fill_xy, xy[keep]])
        fill_types = np.concatenate([fill_types, t[keep]])
        fill_shapes = np.concatenate([fill_shapes, np.stack([major, minor, angle, dark], axis=1)[keep]])
        acc_xy = np.concatenate([acc_xy, xy[keep]])
        acc_major = np.concatenate([acc_major, major[keep]])
    filler_area = tissue_area * n_pass / max(n_cand, 1)
    saturated = len(fill_xy) / max(filler_area, 1.0)
    section_idx = np.clip(np.searchsorted([box[2] for box in boxes], fill_xy[:, 0]), 0, len(sections) - 1)
    zones = _zone_matrix(sections, fill_xy, section_idx)
    expected = np.clip(mean_cells * _density(zones, density_coef) / density_norm, 0.25 * mean_cells, 2.3 * mean_cells)
    keep = rng.random(len(fill_xy)) < expected / spot_area / max(saturated, 1e-12)
    logger.debug("filler nuclei: %d saturated (%.4f / µm²), %d kept", len(fill_xy), saturated, int(keep.sum()))

    xy = np.concatenate([spot_cells, fill_xy[keep]])
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


# ----------------------------------------------------------------------------------------------------------
# public entry point
# ----------------------------------------------------------------------------------------------------------


def _names(prefix: str, n: int, width: int) -> list[str]:
    width = max(width, len(str(max(n - 1, 0))))
    return [f"{prefix}{i:0{width}d}" for i in range(n)]


def synthetic_visium(
    n_spots: int = 600,
    n_genes: int = 1000,
    n_cell_types: int = 15,
    n_batches: int = 2,
    mean_cells_per_spot: float = 8.0,
    n_ref_cells_per_type: int = 60,
    image: bool = True,
    seed: int = 0,
) -> SyntheticVisium:
    """Generate a synthetic Visium experiment, its single-cell reference and the ground truth.

    The counts follow the Cell2location model: ``D_sg ~ NB(mu_sg, alpha_eg)`` with
    ``mu_sg = (m_g * sum_f w_sf g_fg + s_eg) * y_s``, ``y_s ~ Gamma(20, 20 / y_e)`` and the variance
    ``mu + mu**2 / alpha``. Each batch is one tissue section. The result is deterministic given ``seed``,
    and the counts do not depend on ``image`` (the image draws from its own random stream).

    Parameters
    ----------
    n_spots : int
        Total number of spots (n_obs), split as evenly as possible between the sections.
    n_genes : int
        Number of genes (n_vars), shared by the spatial data and the reference.
    n_cell_types : int
        Number of cell types (n_factors), named ``'Type_00'``, ``'Type_01'``, ...
    n_batches : int
        Number of tissue sections (batches ``'section_0'``, ...), placed side by side in x.
    mean_cells_per_spot : float
        Target mean number of cells per spot; per-spot numbers vary spatially around it.
    n_ref_cells_per_type : int
        Mean number of reference single cells per cell type (the actual numbers vary by about 25 %).
    image : bool
        Whether to draw the synthetic H&E image and the nuclei (``truth['nuclei']``).
    seed : int
        Seed of the random generator.

    Returns
    -------
    SyntheticVisium
        The data. ``truth`` holds:

        - ``'cell_abundance'``: DataFrame (n_obs, n_cell_types) of integer cell numbers ``w_sf``;
        - ``'n_cells'``: Series (n_obs,), cells per spot (row sums of ``cell_abundance``);
        - ``'expected_cells'``: Series (n_obs,), the spatially smooth mean behind ``n_cells``;
        - ``'cell_type_probability'``: DataFrame (n_obs, n_cell_types), zone-driven proportions;
        - ``'zones'``: DataFrame (n_obs, n_zones) of zone fields; ``'zone_preference'``: DataFrame
          (n_cell_types, n_zones);
        - ``'m_g'``: Series (n_vars,), gene-wise platform effect;
        - ``'detection_y_s'``: Series (n_obs,); ``'detection_y_e'``: Series (n_batches,);
        - ``'s_eg'``: DataFrame (n_batches, n_vars), additive background;
        - ``'alpha_eg'``: DataFrame (n_batches, n_vars), NB overdispersion;
        - ``'marker_genes'``: dict cell type -> list of marker gene names;
        - ``'reference_batch_effect'``: DataFrame (n_ref_batches, n_vars), gene-wise multiplicative effects;
        - ``'reference_alpha_g'``: Series (n_vars,), NB overdispersion of the reference;
        - ``'nuclei'``: DataFrame with columns ``row``, ``col`` (image pixels), ``spot`` (spot name, None
          for filler cells between spots), ``cell_type``, ``major_um``, ``minor_um``, ``angle``; None when
          ``image=False``;
        - ``'tissue_mask'``: boolean array (H, W) on the image grid; None when ``image=False``.

    Raises
    ------
    ValueError
        If a size is not positive, or there are fewer spots than sections.

    Examples
    --------
    >>> data = synthetic_visium(n_spots=60, n_genes=80, n_cell_types=5, n_batches=1, image=False)
    >>> data.adata.shape
    (60, 80)
    """
    for name, value in (
        ("n_spots", n_spots),
        ("n_genes", n_genes),
        ("n_cell_types", n_cell_types),
        ("n_batches", n_batches),
        ("n_ref_cells_per_type", n_ref_cells_per_type),
    ):
        if int(value) != value or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if n_spots < n_batches:
        raise ValueError(f"n_spots ({n_spots}) must be at least n_batches ({n_batches})")
    if not mean_cells_per_spot > 0:
        raise ValueError(f"mean_cells_per_spot must be positive, got {mean_cells_per_spot!r}")
    n_spots, n_genes, n_cell_types, n_batches = int(n_spots), int(n_genes), int(n_cell_types), int(n_batches)
    start = time.perf_counter()
    rng_layout, rng_cells, rng_expr, rng_counts, rng_ref, rng_image = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(6)
    )

    spot_names = np.array(_names("spot_", n_spots, 4), dtype=object)
    gene_names = _names("gene_", n_genes, 4)
    type_names = _names("Type_", n_cell_types, 2)
    batch_names = [f"section_{b}" for b in range(n_batches)]

    # --- layout and cell composition
    n_zones = int(min(6, max(n_cell_types, 1)))
    zone_names = _names("zone_", n_zones, 1)
    sections, xy_um, batch_idx, array_rc, boxes = _layout(rng_layout, n_spots, n_batches, n_zones)
    zones = _zone_matrix(sections, xy_um, batch_idx)

    preference = np.zeros((n_cell_types, n_zones))
    primary = rng_cells.permutation(np.arange(n_cell_types) % n_zones)
    preference[np.arange(n_cell_types), primary] = 1.0
    for f in range(n_cell_types):
        if n_zones > 1 and rng_cells.random() < 0.5:
            other = rng_cells.choice(np.setdiff1d(np.arange(n_zones), [primary[f]]))
            preference[f, other] = rng_cells.uniform(0.4, 0.8)
    abundance = np.exp(rng_cells.normal(0.0, 0.4, n_cell_types))
    prob = _type_probabilities(zones, preference, abundance)

    density_coef = rng_cells.uniform(0.0, 1.0, n_zones)
    dens = _density(zones, density_coef)
    density_norm = float(dens.mean())
    expected = np.clip(mean_cells_per_spot * dens / density_norm, 0.25 * mean_cells_per_spot, 2.3 * mean_cells_per_spot)
    n_cells = np.maximum(rng_cells.poisson(expected), 1)
    w_sf = rng_cells.multinomial(n_cells, prob)

    # --- signatures and spatial counts
    g_gf, markers = _signatures(rng_expr, n_genes, n_cell_types)
    m_g = np.exp(rng_counts.normal(0.0, 0.3, n_genes))
    y_e = rng_counts.uniform(0.12, 0.3, n_batches)
    y_s = rng_counts.gamma(shape=20.0, scale=y_e[batch_idx] / 20.0)
    bg_cells = rng_counts.uniform(0.02, 0.06, n_batches)  # background, in cells' worth of mean expression
    s_eg = bg_cells[:, None] * g_gf.mean(axis=1)[None, :] * rng_counts.gamma(4.0, 0.25, (n_batches, n_genes))
    alpha_g = np.exp(rng_counts.uniform(np.log(5.0), np.log(50.0), n_genes))
    alpha_eg = np.clip(alpha_g[None, :] * np.exp(rng_counts.normal(0.0, 0.1, (n_batches, n_genes))), 5.0, 50.0)
    mu = (m_g[None, :] * (w_sf @ g_gf.T) + s_eg[batch_idx]) * y_s[:, None]
    counts = _neg_binomial(rng_counts, mu, alpha_eg[batch_idx])
    del mu

    # --- reference single cells
    n_ref = np.maximum(3, np.rint(n_ref_cells_per_type * np.exp(rng_ref.normal(0.0, 0.25, n_cell_types)))).astype(int)
    ref_type = np.repeat(np.arange(n_cell_types), n_ref)
    ref_batch_names = ["ref_batch_0", "ref_batch_1"]
    ref_batch = rng_ref.integers(0, 2, len(ref_type))
    ref_effect = np.exp(rng_ref.normal(0.0, 0.2, (2, n_genes)))
    ref_alpha = np.exp(rng_ref.uniform(np.log(3.0), np.log(30.0), n_genes))
    lib_size = np.exp(rng_ref.normal(-0.5 * 0.35**2, 0.35, len(ref_type)))
    ref_mu = g_gf.T[ref_type] * ref_effect[ref_batch] * lib_size[:, None]
    ref_counts = _neg_binomial(rng_ref, ref_mu, ref_alpha[None, :])
    del ref_mu

    # --- assemble AnnData objects
    library_id = "synthetic_visium"
    scalefactors = {
        "tissue_hires_scalef": HIRES_SCALEF,
        "tissue_lowres_scalef": LOWRES_SCALEF,
        "spot_diameter_fullres": SPOT_DIAMETER_UM / FULLRES_UM_PER_PX,
        "fiducial_diameter_fullres": _FIDUCIAL_RATIO * SPOT_DIAMETER_UM / FULLRES_UM_PER_PX,
    }
    obs = pd.DataFrame(
        {
            "batch": pd.Categorical([batch_names[b] for b in batch_idx], categories=batch_names),
            "in_tissue": np.ones(n_spots, dtype=np.int64),
            "array_row": array_rc[:, 0].astype(np.int64),
            "array_col": array_rc[:, 1].astype(np.int64),
        },
        index=pd.Index(spot_names.astype(str)),
    )
    adata = anndata.AnnData(X=_to_csr(counts), obs=obs, var=pd.DataFrame(index=pd.Index(gene_names)))
    adata.obsm["spatial"] = xy_um / FULLRES_UM_PER_PX
    adata.uns["spatial"] = {library_id: {"scalefactors": dict(scalefactors)}}

    ref_obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical([type_names[f] for f in ref_type], categories=type_names),
            "batch": pd.Categorical([ref_batch_names[b] for b in ref_batch], categories=ref_batch_names),
        },
        index=pd.Index(_names("cell_", len(ref_type), 5)),
    )
    reference = anndata.AnnData(X=_to_csr(ref_counts), obs=ref_obs, var=pd.DataFrame(index=pd.Index(gene_names)))
    signatures = pd.DataFrame(g_gf, index=gene_names, columns=type_names)

    spots_idx = adata.obs_names
    truth: dict[str, Any] = {
        "cell_abundance": pd.DataFrame(w_sf.astype(np.int64), index=spots_idx, columns=type_names),
        "n_cells": pd.Series(w_sf.sum(axis=1).astype(np.int64), index=spots_idx, name="n_cells"),
        "expected_cells": pd.Series(expected, index=spots_idx, name="expected_cells"),
        "cell_type_probability": pd.DataFrame(prob, index=spots_idx, columns=type_names),
        "zones": pd.DataFrame(zones, index=spots_idx, columns=zone_names),
        "zone_preference": pd.DataFrame(preference, index=type_names, columns=zone_names),
        "m_g": pd.Series(m_g, index=gene_names, name="m_g"),
        "detection_y_s": pd.Series(y_s, index=spots_idx, name="detection_y_s"),
        "detection_y_e": pd.Series(y_e, index=batch_names, name="detection_y_e"),
        "s_eg": pd.DataFrame(s_eg, index=batch_names, columns=gene_names),
        "alpha_eg": pd.DataFrame(alpha_eg, index=batch_names, columns=gene_names),
        "marker_genes": {type_names[f]: [gene_names[g] for g in genes] for f, genes in markers.items()},
        "reference_batch_effect": pd.DataFrame(ref_effect, index=ref_batch_names, columns=gene_names),
        "reference_alpha_g": pd.Series(ref_alpha, index=gene_names, name="reference_alpha_g"),
        "nuclei": None,
        "tissue_mask": None,
    }

    # --- H&E image with one nucleus per cell
    he = None
    if image:
        um_per_px = FULLRES_UM_PER_PX / HIRES_SCALEF
        extent = np.max(np.stack(boxes)[:, 2:], axis=0) + _IMAGE_MARGIN_UM
        shape = (int(np.ceil(extent[1] / um_per_px)), int(np.ceil(extent[0] / um_per_px)))
        mask = _tissue_mask(shape, sections, boxes)
        nuc = _nuclei(
            rng_image, xy_um, w_sf, spot_names, mask, sections, boxes, preference, abundance,
            density_coef, density_norm, mean_cells_per_spot,
        )  # fmt: skip
        render = {
            "row": nuc["y_um"] / um_per_px,
            "col": nuc["x_um"] / um_per_px,
            "major_px": nuc["major_um"] / um_per_px,
            "minor_px": nuc["minor_um"] / um_per_px,
            "angle": nuc["angle"],
            "dark": nuc["dark"],
        }
        he = _render_he(rng_image, mask, render)
        truth["nuclei"] = pd.DataFrame(
            {
                "row": render["row"],
                "col": render["col"],
                "spot": nuc["spot"],
                "cell_type": pd.Categorical([type_names[f] for f in nuc["type"]], categories=type_names),
                "major_um": nuc["major_um"],
                "minor_um": nuc["minor_um"],
                "angle": nuc["angle"],
            }
        )
        truth["tissue_mask"] = mask
        adata.uns["spatial"][library_id]["images"] = {"hires": he}

    logger.info(
        "synthetic_visium: %d spots x %d genes, %d types, %d sections, %d reference cells in %.2f s",
        n_spots, n_genes, n_cell_types, n_batches, reference.n_obs, time.perf_counter() - start,
    )  # fmt: skip
    return SyntheticVisium(
        adata=adata,
        reference=reference,
        signatures=signatures,
        truth=truth,
        image=he,
        scalefactors=scalefactors,
        library_id=library_id,
    )
