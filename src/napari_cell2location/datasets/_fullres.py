"""A synthetic full-resolution Visium scan: a Space Ranger-like folder and a pyramidal, tiled OME-TIFF of the
section at 0.5 µm per pixel, drawn tile by tile from the nuclei of :func:`synthetic_visium`.

The scan is what Space Ranger is given with ``--image``: tens of thousands of pixels a side, mostly glass,
with the section somewhere on it. Every tile of every level is rendered on its own from the cells of the
synthetic experiment (their nuclei, in µm) and written at once, so the image is never whole in memory:

* coordinates: a pixel of level ``k`` (``f = 2**k`` full-resolution pixels per pixel) sits at full-resolution
  position ``i * f`` (napari's placement of pyramid levels, and Space Ranger's of its hires / lowres images:
  image pixel = full-resolution pixel x scale factor, pixel centres at integers); its value is the mean of
  up to 4 x 4 samples over the ``f x f`` pixels around that position, so every level is a box-filtered
  view of the same section;
* stains, as in :mod:`._histology`: Beer-Lambert optical densities of hematoxylin (nuclei, faint in the
  cytoplasm) and eosin (tissue, smooth texture from coarse noise grids fixed in µm, so tiles and levels
  agree at their edges); glass is one constant colour, so the many empty tiles compress to almost nothing
  (deflate; no optional codec needed);
* the Space Ranger folder holds ``outs/filtered_feature_bc_matrix.h5``, ``outs/spatial/`` (tissue positions in
  full-resolution pixels of the scan, scale factors, hires and lowres PNGs: two levels of the pyramid) and,
  in the run folder, the scan and a ``_cmdline`` that records it as ``--image``.
"""

from __future__ import annotations

import json
import logging
import math
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ._constants import _FIDUCIAL_RATIO, _HIRES_UM_PER_PX, FULLRES_UM_PER_PX, HIRES_SCALEF, SPOT_DIAMETER_UM

logger = logging.getLogger(__name__)

__all__ = ["FullResScan", "write_fullres_visium"]

#: edge of the TIFF tiles (px)
TILE = 512
#: optical density of the glass; its RGB value is ``255 * exp(-GLASS_OD)``
GLASS_OD = 0.03
_H_VEC = np.array([0.65, 0.70, 0.29], dtype=np.float32)
_E_VEC = np.array([0.10, 0.75, 0.35], dtype=np.float32)
_MAX_SAMPLES = 4  # samples per axis averaged into one pixel of a coarse level
_HEMA_BLUR_UM = 1.2  # blur of the hematoxylin field (soft nuclear edges)
_PIXEL_NOISE = 2.5  # sd of the RGB pixel noise on tissue
_GRIDS_UM = {"coarse": 48.0, "fine": 6.0, "mid": 12.0}  # spacing of the stain-texture noise grids (µm)
_COARSEST_SIDE = 640  # the pyramid's coarsest level has its longest side at most this
_HIRES_SIDE = 2560  # the hires PNG is the first level whose longest side is at most this
_DEFLATE_LEVEL = 6


@dataclass
class FullResScan:
    """A synthetic scan written by :func:`write_fullres_visium`.

    Attributes
    ----------
    run : pathlib.Path
        The run folder: ``outs/``, the scan and ``_cmdline``.
    outs : pathlib.Path
        The Space Ranger ``outs/`` folder.
    image_path : pathlib.Path
        The pyramidal OME-TIFF.
    shape : tuple of int
        (H, W) of the scan in full-resolution pixels.
    level_shapes : list of tuple of int
        (H_k, W_k) of each pyramid level, finest first.
    offset : tuple of float
        (row, col) full-resolution pixel of the synthetic experiment's origin in the scan.
    spatial : numpy.ndarray
        (n_obs, 2) spot centres as (x, y) full-resolution pixels of the scan (as in ``tissue_positions.csv``).
    nuclei : pandas.DataFrame
        Every drawn nucleus: ``row``, ``col`` (full-resolution pixels of the scan), ``spot`` (None between spots),
        ``cell_type``, ``major_um``, ``minor_um``, ``angle``.
    n_cells : pandas.Series
        (n_obs,) true cells per spot, indexed by barcode.
    scalefactors : dict
        As written to ``scalefactors_json.json``.
    data : SyntheticVisium
        The synthetic experiment drawn (its own frame: ``offset`` moves it onto the scan).
    seconds : float
        Time taken to write it all.
    """

    run: Path
    outs: Path
    image_path: Path
    shape: tuple[int, int]
    level_shapes: list[tuple[int, int]]
    offset: tuple[float, float]
    spatial: np.ndarray = field(repr=False)
    nuclei: pd.DataFrame = field(repr=False)
    n_cells: pd.Series = field(repr=False)
    scalefactors: dict
    data: object = field(repr=False)
    seconds: float = 0.0

    @property
    def um_per_px(self) -> float:
        """Size of a full-resolution pixel (µm)."""
        return FULLRES_UM_PER_PX


# ------------------------------------------------------------------------------------------------
# the section as continuous fields
# ------------------------------------------------------------------------------------------------


def _bilinear(grid: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``grid`` (h, w) sampled at every (row, col) of the 1-D ``rows`` x ``cols`` (grid units); 0 outside."""
    h, w = grid.shape
    padded = np.pad(grid, 1)  # zeros around, so outside fades to 0 over one grid cell
    r = np.clip(rows + 1.0, 0.0, h + 1.0 - 1e-6)
    c = np.clip(cols + 1.0, 0.0, w + 1.0 - 1e-6)
    r0, c0 = np.floor(r).astype(np.int64), np.floor(c).astype(np.int64)
    fr, fc = (r - r0).astype(np.float32)[:, None], (c - c0).astype(np.float32)[None, :]
    lo, hi = int(c0.min()), int(c0.max()) + 2  # the grid columns in reach: interpolate rows on those only
    band = padded[:, lo:hi]
    rows_done = band[r0] * (1 - fr) + band[np.minimum(r0 + 1, h + 1)] * fr  # (len(rows), hi - lo)
    c0 -= lo
    return rows_done[:, c0] * (1 - fc) + rows_done[:, np.minimum(c0 + 1, hi - lo - 1)] * fc


class _Section:
    """The synthetic section in full-resolution pixels of the scan: tissue, stain textures and nuclei."""

    def __init__(self, mask: np.ndarray, nuclei: pd.DataFrame, offset: tuple[float, float], seed: int):
        from scipy import ndimage

        self.offset = offset
        self.seed = seed
        self.mask = mask.astype(np.float32)  # hires grid (2 µm), origin at the experiment's origin
        rows, cols = np.nonzero(mask)
        hires_to_full = _HIRES_UM_PER_PX / FULLRES_UM_PER_PX
        pad = 2 * hires_to_full
        self.tissue_box = (
            rows.min() * hires_to_full + offset[0] - pad,
            rows.max() * hires_to_full + offset[0] + pad,
            cols.min() * hires_to_full + offset[1] - pad,
            cols.max() * hires_to_full + offset[1] + pad,
        )
        extent_um = np.array(mask.shape) * _HIRES_UM_PER_PX
        rng = np.random.default_rng(np.random.SeedSequence([seed, 7]))
        self.grids = {}
        for name, step in _GRIDS_UM.items():
            shape = tuple(int(math.ceil(e / step)) + 2 for e in extent_um)
            noise = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), 1.0)
            self.grids[name] = ((noise - noise.mean()) / (noise.std() + 1e-12), step)
        order = np.argsort(nuclei["row"].to_numpy())
        self.n_row = nuclei["row"].to_numpy(np.float64)[order]
        self.n_col = nuclei["col"].to_numpy(np.float64)[order]
        self.n_a_um = 0.5 * nuclei["major_um"].to_numpy(np.float64)[order]
        self.n_b_um = 0.5 * nuclei["minor_um"].to_numpy(np.float64)[order]
        self.n_angle = nuclei["angle"].to_numpy(np.float64)[order]
        self.n_dark = rng.uniform(1.0, 1.5, len(order))
        self.reach = (self.n_a_um.max() if len(order) else 0.0) / FULLRES_UM_PER_PX + 2.0

    def meets_tissue(self, r0: float, r1: float, c0: float, c1: float) -> bool:
        """Whether the full-resolution box [r0, r1] x [c0, c1] may hold tissue."""
        b = self.tissue_box
        return r0 <= b[1] and b[0] <= r1 and c0 <= b[3] and b[2] <= c1

    def rgb(self, rows: np.ndarray, cols: np.ndarray, spacing: float, rng: np.random.Generator):
        """RGB float32 (len(rows), len(cols), 3) and the tissue weight at full-resolution positions ``rows`` x
        ``cols`` (uniform steps of ``spacing`` px, with a margin of samples for the blur already included)."""
        from scipy import ndimage

        um = FULLRES_UM_PER_PX
        y_um, x_um = (rows - self.offset[0]) * um, (cols - self.offset[1]) * um
        soft = _bilinear(self.mask, y_um / _HIRES_UM_PER_PX, x_um / _HIRES_UM_PER_PX)
        field_of = {k: _bilinear(g, y_um / step, x_um / step) for k, (g, step) in self.grids.items()}
        eosin = soft * (np.float32(0.55) + np.float32(0.07) * field_of["coarse"] + np.float32(0.05) * field_of["fine"])
        hema = soft * (np.float32(0.10) + np.float32(0.03) * field_of["mid"])
        self._draw_nuclei(hema, rows, cols, spacing, rng)
        sigma = _HEMA_BLUR_UM / (spacing * um)
        if sigma >= 0.3:
            hema = ndimage.gaussian_filter(hema, sigma, truncate=3.0)
        od = hema[..., None] * _H_VEC + eosin[..., None] * _E_VEC + np.float32(GLASS_OD)
        return np.float32(255.0) * np.exp(-od), soft

    def _draw_nuclei(self, hema: np.ndarray, rows: np.ndarray, cols: np.ndarray, spacing: float, rng) -> None:
        """Max-composite the nuclei near the sample grid into ``hema`` (soft-edged filled ellipses)."""
        lo, hi = np.searchsorted(self.n_row, [rows[0] - self.reach, rows[-1] + self.reach])
        idx = np.arange(lo, hi)
        idx = idx[(self.n_col[idx] >= cols[0] - self.reach) & (self.n_col[idx] <= cols[-1] + self.reach)]
        if not len(idx):
            return
        f32 = np.float32
        um = spacing * FULLRES_UM_PER_PX  # µm per sample
        r_s = ((self.n_row[idx] - rows[0]) / spacing).astype(f32)  # centres in sample units
        c_s = ((self.n_col[idx] - cols[0]) / spacing).astype(f32)
        a, b = (self.n_a_um[idx] / um).astype(f32), (self.n_b_um[idx] / um).astype(f32)
        half = int(math.ceil(float(a.max()) + 1.5))
        off = np.arange(-half, half + 1)
        rr = np.rint(r_s).astype(np.int64)[:, None, None] + off[None, :, None]
        cc = np.rint(c_s).astype(np.int64)[:, None, None] + off[None, None, :]
        dr, dc = (rr - r_s[:, None, None]).astype(f32), (cc - c_s[:, None, None]).astype(f32)
        cos = np.cos(self.n_angle[idx]).astype(f32)[:, None, None]
        sin = np.sin(self.n_angle[idx]).astype(f32)[:, None, None]
        q = np.sqrt(((dc * cos + dr * sin) / a[:, None, None]) ** 2 + ((dr * cos - dc * sin) / b[:, None, None]) ** 2)
        val = np.clip(f32(0.5) + (f32(1.0) - q) * b[:, None, None], 0.0, 1.0)
        val *= self.n_dark[idx].astype(f32)[:, None, None] * rng.uniform(0.85, 1.1, val.shape).astype(f32)
        rr, cc = np.broadcast_arrays(rr, cc)
        h, w = hema.shape
        ok = (val > 0) & (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
        flat = np.zeros(h * w, dtype=f32)
        np.maximum.at(flat, (rr * w + cc)[ok], val[ok])
        hema += flat.reshape(h, w)


def _glass(shape: tuple[int, ...]) -> np.ndarray:
    return np.full(shape, int(round(255.0 * math.exp(-GLASS_OD))), dtype=np.uint8)


def _render_block(section: _Section, f: int, r0: int, c0: int, h: int, w: int) -> np.ndarray:
    """(h, w, 3) uint8 pixels [r0, r0 + h) x [c0, c0 + w) of the level with ``f`` full-resolution px per px."""
    full = (r0 * f - f, (r0 + h) * f + f, c0 * f - f, (c0 + w) * f + f)
    if not section.meets_tissue(*full):
        return _glass((h, w, 3))
    rng = np.random.default_rng(np.random.SeedSequence([section.seed, f, r0, c0]))
    s = min(f, _MAX_SAMPLES)  # samples per axis in one pixel
    spacing = f / s  # full-resolution px between samples
    sigma = _HEMA_BLUR_UM / (spacing * FULLRES_UM_PER_PX)
    margin = int(math.ceil(3.0 * sigma)) + 1 if sigma >= 0.3 else 0
    first = -f / 2 + spacing / 2  # first sample of a pixel, relative to the pixel's position
    rows = r0 * f + first + spacing * np.arange(-margin, h * s + margin)
    cols = c0 * f + first + spacing * np.arange(-margin, w * s + margin)
    rgb, soft = section.rgb(rows, cols, spacing, rng)
    core = (slice(margin, margin + h * s), slice(margin, margin + w * s))
    rgb, soft = rgb[core], soft[core]
    if s > 1:  # box filter: the mean of the s x s samples of each pixel
        rgb = rgb.reshape(h, s, w, s, 3).mean(axis=(1, 3))
        soft = soft.reshape(h, s, w, s).mean(axis=(1, 3))
    on_tissue = (soft > 0.02)[..., None]
    rgb = rgb + on_tissue * rng.normal(0.0, _PIXEL_NOISE, rgb.shape).astype(np.float32)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def _level_tiles(section: _Section, f: int, shape: tuple[int, int], keep: np.ndarray | None) -> Iterator[bytes]:
    """The deflated tiles of one level, row by row, as tifffile writes them (a tile of glass is deflated once);
    each also goes into ``keep`` when given."""
    h, w = shape
    sub = max(TILE // min(f, _MAX_SAMPLES), 64)  # blocks small enough for the samples of a coarse level
    glass = _glass((TILE, TILE, 3))
    glass_bytes = zlib.compress(glass.tobytes(), _DEFLATE_LEVEL)
    for r in range(0, h, TILE):
        for c in range(0, w, TILE):
            th, tw = min(TILE, h - r), min(TILE, w - c)
            if not section.meets_tissue((r - 1) * f, (r + TILE + 1) * f, (c - 1) * f, (c + TILE + 1) * f):
                if keep is not None:
                    keep[r : r + th, c : c + tw] = glass[:th, :tw]
                yield glass_bytes
                continue
            tile = glass.copy()  # a tile at the image's edge is padded with glass
            for br in range(0, th, sub):
                for bc in range(0, tw, sub):
                    bh, bw = min(sub, th - br), min(sub, tw - bc)
                    tile[br : br + bh, bc : bc + bw] = _render_block(section, f, r + br, c + bc, bh, bw)
            if keep is not None:
                keep[r : r + th, c : c + tw] = tile[:th, :tw]
            yield zlib.compress(tile.tobytes(), _DEFLATE_LEVEL)


# ------------------------------------------------------------------------------------------------
# the Space Ranger folder
# ------------------------------------------------------------------------------------------------


def _write_matrix_h5(path: Path, adata) -> None:
    """``filtered_feature_bc_matrix.h5`` in the Space Ranger v3 layout (CSC genes x barcodes)."""
    import h5py
    from scipy import sparse

    x = sparse.csr_matrix(adata.X)  # (spots, genes) CSR = (genes, spots) CSC
    with h5py.File(path, "w") as h5:
        m = h5.create_group("matrix")
        m["data"] = x.data.astype(np.int32)
        m["indices"] = x.indices.astype(np.int64)
        m["indptr"] = x.indptr.astype(np.int64)
        m["shape"] = np.array([adata.n_vars, adata.n_obs], dtype=np.int32)
        m["barcodes"] = np.array(adata.obs_names, dtype="S")
        feats = m.create_group("features")
        feats["id"] = np.array([f"ENSSYN{i:06d}" for i in range(adata.n_vars)], dtype="S")
        feats["name"] = np.array(adata.var_names, dtype="S")
        feats["feature_type"] = np.array(["Gene Expression"] * adata.n_vars, dtype="S")


def _write_spatial(spatial: Path, adata, xy: np.ndarray, scalefactors: dict, hires, lowres) -> None:
    from skimage.io import imsave

    spatial.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(
        {
            "barcode": adata.obs_names,
            "in_tissue": adata.obs["in_tissue"].to_numpy(),
            "array_row": adata.obs["array_row"].to_numpy(),
            "array_col": adata.obs["array_col"].to_numpy(),
            "pxl_row_in_fullres": xy[:, 1],
            "pxl_col_in_fullres": xy[:, 0],
        }
    ).to_csv(spatial / "tissue_positions.csv", index=False)
    (spatial / "scalefactors_json.json").write_text(json.dumps(scalefactors, indent=2))
    imsave(spatial / "tissue_hires_image.png", hires, check_contrast=False)
    imsave(spatial / "tissue_lowres_image.png", lowres, check_contrast=False)


def _levels(shape: tuple[int, int]) -> list[tuple[int, int]]:
    out, f = [], 1
    while True:
        out.append((math.ceil(shape[0] / f), math.ceil(shape[1] / f)))
        if max(out[-1]) <= _COARSEST_SIDE:
            return out
        f *= 2


def write_fullres_visium(
    folder,
    *,
    size: int | tuple[int, int] = 20480,
    n_spots: int = 100,
    n_genes: int = 200,
    n_cell_types: int = 6,
    mean_cells_per_spot: float = 8.0,
    seed: int = 0,
    image_name: str = "tissue_image.ome.tif",
    record_image: bool = True,
) -> FullResScan:
    """Write a synthetic Visium run: a Space Ranger ``outs/`` folder and the full-resolution scan beside it.

    The section of :func:`~napari_cell2location.datasets.synthetic_visium` (one section, ``n_spots`` spots) is
    placed in the middle of a ``size`` scan at 0.5 µm per pixel and drawn tile by tile (512 px tiles,
    deflate, levels halved down to 640 px or less), never whole in memory.

    Parameters
    ----------
    folder : str or os.PathLike
        The run folder to create (``outs/``, the scan, ``_cmdline``); it may exist.
    size : int or (int, int)
        Scan size (H, W) in full-resolution pixels, rounded up to a multiple of 512; at least the
        section's extent.
    n_spots, n_genes, n_cell_types, mean_cells_per_spot, seed
        Passed to :func:`~napari_cell2location.datasets.synthetic_visium` (``n_batches=1``); ``seed`` also
        seeds the rendering.
    image_name : str
        File name of the scan in the run folder.
    record_image : bool
        Write ``_cmdline`` recording the scan as Space Ranger's ``--image`` (as a real run folder does).

    Returns
    -------
    FullResScan
        Paths, geometry and the truth (nuclei in full-resolution pixels of the scan, cells per spot).

    Raises
    ------
    ValueError
        If ``size`` is smaller than the section.

    Examples
    --------
    >>> scan = write_fullres_visium("run", size=4096, n_spots=30)   # doctest: +SKIP
    >>> from napari_cell2location.io import fullres_image_for
    >>> fullres_image_for(scan.outs)                                  # doctest: +SKIP
    Pyramid(4 levels from 'tissue_image.ome.tif': 4096x4096, 2048x2048, 1024x1024, 512x512)
    """
    import tifffile

    from . import synthetic_visium

    start = time.perf_counter()
    h, w = (size, size) if isinstance(size, int | np.integer) else (int(size[0]), int(size[1]))
    h, w = (int(math.ceil(v / TILE)) * TILE for v in (h, w))
    data = synthetic_visium(
        n_spots=n_spots, n_genes=n_genes, n_cell_types=n_cell_types, n_batches=1,
        mean_cells_per_spot=mean_cells_per_spot, image=True, seed=seed,
    )  # fmt: skip
    to_full = 1.0 / HIRES_SCALEF  # the experiment's hires pixels -> full-resolution pixels
    mask = data.truth["tissue_mask"]
    extent = (mask.shape[0] * to_full, mask.shape[1] * to_full)
    if extent[0] > h or extent[1] > w:
        raise ValueError(f"size {(h, w)} is smaller than the section ({extent[0]:.0f} x {extent[1]:.0f} px)")
    offset = (float((h - extent[0]) // 2), float((w - extent[1]) // 2))
    nuclei = data.truth["nuclei"].copy()
    nuclei["row"] = nuclei["row"].to_numpy() * to_full + offset[0]
    nuclei["col"] = nuclei["col"].to_numpy() * to_full + offset[1]
    xy = np.asarray(data.adata.obsm["spatial"], dtype=np.float64) + [offset[1], offset[0]]
    section = _Section(mask, nuclei, offset, seed)

    run = Path(folder).expanduser()
    outs = run / "outs"
    outs.mkdir(parents=True, exist_ok=True)
    image_path = run / image_name
    shapes = _levels((h, w))
    factors = [2**k for k in range(len(shapes))]
    hires_k = next(k for k, s in enumerate(shapes) if max(s) <= _HIRES_SIDE)
    keep = {hires_k: np.empty((*shapes[hires_k], 3), np.uint8), len(shapes) - 1: np.empty((*shapes[-1], 3), np.uint8)}
    per_cm = 1e4 / FULLRES_UM_PER_PX
    options = {"tile": (TILE, TILE), "photometric": "rgb", "compression": "zlib", "resolutionunit": "CENTIMETER"}
    with tifffile.TiffWriter(image_path, bigtiff=True, ome=True) as tif:
        for k, (shape, f) in enumerate(zip(shapes, factors, strict=True)):
            extra = (
                {"subifds": len(shapes) - 1, "metadata": {"axes": "YXS", "PhysicalSizeX": FULLRES_UM_PER_PX,
                 "PhysicalSizeY": FULLRES_UM_PER_PX, "PhysicalSizeXUnit": "µm", "PhysicalSizeYUnit": "µm"}}
                if k == 0 else {"subfiletype": 1, "metadata": None}
            )  # fmt: skip
            tif.write(
                _level_tiles(section, f, shape, keep.get(k)), shape=(*shape, 3), dtype=np.uint8,
                resolution=(per_cm / f, per_cm / f), **options, **extra,
            )  # fmt: skip

    scalefactors = {
        "tissue_hires_scalef": 1.0 / factors[hires_k],
        "tissue_lowres_scalef": 1.0 / factors[-1],
        "spot_diameter_fullres": SPOT_DIAMETER_UM / FULLRES_UM_PER_PX,
        "fiducial_diameter_fullres": _FIDUCIAL_RATIO * SPOT_DIAMETER_UM / FULLRES_UM_PER_PX,
    }
    adata = data.adata
    _write_matrix_h5(outs / "filtered_feature_bc_matrix.h5", adata)
    _write_spatial(outs / "spatial", adata, xy, scalefactors, keep[hires_k], keep[len(shapes) - 1])
    if record_image:
        (run / "_cmdline").write_text(
            f"spaceranger count --id={run.name} --transcriptome=synthetic --probe-set=synthetic.csv "
            f"--fastqs=fastqs --image={image_path.resolve()} --slide=V19L01-000 --area=A1\n"
        )
    seconds = time.perf_counter() - start
    logger.info(
        "write_fullres_visium: %d x %d px scan (%d levels, %.0f MB on disk), %d spots, %d nuclei in %.1f s",
        h, w, len(shapes), image_path.stat().st_size / 2**20, adata.n_obs, len(nuclei), seconds,
    )  # fmt: skip
    return FullResScan(
        run=run,
        outs=outs,
        image_path=image_path,
        shape=(h, w),
        level_shapes=shapes,
        offset=offset,
        spatial=xy,
        nuclei=nuclei,
        n_cells=data.truth["n_cells"].copy(),
        scalefactors=scalefactors,
        data=data,
        seconds=seconds,
    )
