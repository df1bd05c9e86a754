"""A synthetic Visium HD run on disk: Space Ranger's ``outs/`` with square bins of several sizes, counts drawn
from the Cell2location model, and the truth behind them.

The layout written (what :func:`napari_cell2location.io.read_visium_hd` reads; Space Ranger 3 writes the same
files, and more)::

    outs/
      binned_outputs/
        square_002um/  square_008um/  square_016um/      one folder per size of ``bin_sizes``
          filtered_feature_bc_matrix.h5                  in-tissue bins x genes, 10x HDF5 (CSC genes x barcodes)
          spatial/
            tissue_positions.parquet                     every bin of the capture area, row-major: barcode,
                                                         in_tissue, array_row, array_col, pxl_row_in_fullres,
                                                         pxl_col_in_fullres
            scalefactors_json.json                       tissue_hires_scalef, tissue_lowres_scalef,
                                                         spot_diameter_fullres (= the bin side), bin_size_um,
                                                         microns_per_pixel, fiducial_diameter_fullres,
                                                         regist_target_img_scalef
            tissue_hires_image.png  tissue_lowres_image.png
      spatial/                                           the images and the finest bins' scale factors

* The capture area is a square grid of ``n_bins_side`` x ``n_bins_side`` bins of the finest size, ``margin``
  µm from the image's corner; a bin of size ``b`` at ``(array_row, array_col) = (r, c)`` has its centre at
  ``(margin + (c + 0.5) b, margin + (r + 0.5) b)`` µm = that / ``microns_per_pixel`` full-resolution pixels
  (x, y). Barcodes are ``s_{b:03d}um_{r:05d}_{c:05d}-1``, as Space Ranger names them.
* The tissue is an oval whose outline follows the coarsest bins, so each bin is wholly in or out at every
  size; out-of-tissue bins are in the positions (``in_tissue = 0``) but not in the filtered matrix.
* Cells (``cells_per_100um2`` on average, denser in some zones) sit in the finest bins with types drawn from
  smooth zones (as :func:`~napari_cell2location.datasets.synthetic_visium` draws them); each finest bin's
  counts are ``NB(mu, alpha_g)`` with ``mu = (m_g * sum_f w_f g_fg + s_g) * y_s``; a coarser bin's counts,
  and cells, are the sums of the finest bins it covers, exactly.
* The H&E (pink tissue, a purple nucleus per cell) is stored as ``hires`` (at most ``2000`` px a side) and
  ``lowres`` (a quarter of it) PNGs.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import sparse

from ._expression import _neg_binomial, _signatures
from ._layout import _density, _expected_cells, _Section, _type_probabilities, _zone_preference
from ._visium import _names

logger = logging.getLogger(__name__)

__all__ = ["SyntheticVisiumHD", "write_visium_hd"]

#: side of the hires image at most (px); the lowres one is 4 x coarser
_HIRES_MAX_SIDE = 2000
_NUCLEUS_RADIUS_UM = 3.0
_GLASS = (242, 240, 245)
_EOSIN = (232, 170, 200)
_HEMATOXYLIN = (80, 50, 130)
_CHUNK = 16384  # finest bins drawn at once (bounds the dense (chunk, n_genes) means)


@dataclass
class SyntheticVisiumHD:
    """A synthetic Visium HD run written by :func:`write_visium_hd`, and the truth behind its counts.

    Parameters
    ----------
    outs : pathlib.Path
        The ``outs/`` folder.
    bin_sizes : tuple of int
        Bin sizes written (µm), smallest first.
    signatures : pandas.DataFrame
        True expected counts per cell ``g_fg``, (n_genes, n_cell_types).
    cell_abundance : dict of int to pandas.DataFrame
        Per bin size, the cells of each type in each in-tissue bin, (n_bins, n_cell_types) integers indexed by
        barcode, in the rows' order of that size's count matrix.
    cells : pandas.DataFrame
        Every cell: ``x_um``, ``y_um`` (its nucleus centre; full-resolution pixels x ``microns_per_pixel``) and
        ``cell_type``.
    m_g : pandas.Series
        (n_genes,) gene-wise platform effect.
    microns_per_pixel : float
        Size of a full-resolution pixel (µm).
    scalefactors : dict of int to dict
        Per bin size, its ``scalefactors_json.json``.
    image : numpy.ndarray
        The hires H&E, (H, W, 3) uint8.
    seconds : float
        Time it took to generate and write.
    """

    outs: Path
    bin_sizes: tuple[int, ...]
    signatures: pd.DataFrame
    cell_abundance: dict[int, pd.DataFrame] = field(repr=False)
    cells: pd.DataFrame = field(repr=False)
    m_g: pd.Series = field(repr=False)
    microns_per_pixel: float = 0.5
    scalefactors: dict[int, dict] = field(default_factory=dict, repr=False)
    image: np.ndarray | None = field(default=None, repr=False)
    seconds: float = 0.0

    def bin_folder(self, bin_size: int) -> Path:
        """The folder of the ``bin_size`` µm bins."""
        return self.outs / "binned_outputs" / f"square_{int(bin_size):03d}um"


def _check(n_bins_side, bin_sizes, n_genes, n_cell_types, cells_per_100um2, microns_per_pixel) -> tuple[int, ...]:
    """The bin sizes, sorted; ValueError when a setting is not usable."""
    if not len(bin_sizes) or any(isinstance(b, bool) or int(b) != b or b < 1 for b in bin_sizes):
        raise ValueError(f"bin_sizes must be positive whole µm, got {bin_sizes!r}")
    sizes = tuple(sorted({int(b) for b in bin_sizes}))
    if any(sizes[-1] % b for b in sizes):
        raise ValueError(f"every bin size must divide the largest ({sizes[-1]} µm), got {sizes}")
    ratio = sizes[-1] // sizes[0]
    if int(n_bins_side) != n_bins_side or n_bins_side < ratio or n_bins_side % ratio:
        raise ValueError(
            f"n_bins_side must be a positive multiple of {ratio} (largest / smallest bin), got {n_bins_side!r}"
        )
    for name, value in (("n_genes", n_genes), ("n_cell_types", n_cell_types)):
        if int(value) != value or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    for name, value in (("cells_per_100um2", cells_per_100um2), ("microns_per_pixel", microns_per_pixel)):
        if not 0 < value < np.inf:
            raise ValueError(f"{name} must be a positive number, got {value!r}")
    return sizes


def _tissue_section(rng: np.random.Generator, side_um: float, margin: float, n_zones: int) -> _Section:
    """An oval section filling most of the capture area, with layered and blob zones (as in :mod:`._layout`)."""
    n_layers = min(3, n_zones)
    n_blobs = n_zones - n_layers
    r = 0.6 * np.sqrt(rng.uniform(0, 1, n_blobs))
    phi = rng.uniform(0, 2 * np.pi, n_blobs)
    return _Section(
        semi_axes=(0.46 * side_um, 0.38 * side_um),
        rotation=rng.uniform(-0.5, 0.5),
        wobble=np.stack([np.arange(2, 5), rng.uniform(0.0, 0.05, 3), rng.uniform(0, 2 * np.pi, 3)], axis=1),
        layer_angle=rng.uniform(0, np.pi),
        layer_centres=np.linspace(-0.65, 0.65, n_layers) if n_layers > 1 else np.zeros(1),
        layer_sigma={1: 0.6, 2: 0.38}.get(n_layers, 0.3),
        blob_centres=np.stack([r * np.cos(phi), r * np.sin(phi)], axis=1),
        blob_sigmas=rng.uniform(0.22, 0.35, n_blobs),
        centre=np.array([margin + side_um / 2, margin + side_um / 2]),
    )


def _grid(n: int, size: float, margin: float) -> tuple[np.ndarray, np.ndarray]:
    """Row-major ``(rows, cols)`` of an n x n grid and the bin centres (n * n, 2) as (x, y) µm."""
    rows, cols = np.divmod(np.arange(n * n), n)
    return np.stack([rows, cols], 1), np.stack([margin + (cols + 0.5) * size, margin + (rows + 0.5) * size], 1)


def _draw_counts(rng, g_gf, w_sf, area_um2) -> tuple[sparse.csr_matrix, np.ndarray]:
    """NB counts (n_bins, n_genes) CSR of bins holding ``w_sf`` cells, drawn ``_CHUNK`` bins at a time; ``m_g``."""
    n_genes = g_gf.shape[0]
    m_g = np.exp(rng.normal(0.0, 0.3, n_genes))
    y_e = rng.uniform(0.12, 0.3)
    background = rng.uniform(0.002, 0.006) * area_um2 / 100.0  # cells' worth of mean expression per bin
    s_g = background * g_gf.mean(axis=1) * rng.gamma(4.0, 0.25, n_genes)
    alpha_g = np.exp(rng.uniform(np.log(5.0), np.log(50.0), n_genes))
    y_s = rng.gamma(20.0, y_e / 20.0, len(w_sf))
    blocks = []
    for start in range(0, len(w_sf), _CHUNK):
        part = slice(start, start + _CHUNK)
        mu = (m_g[None, :] * (w_sf[part] @ g_gf.T) + s_g[None, :]) * y_s[part, None]
        blocks.append(sparse.csr_matrix(_neg_binomial(rng, mu, alpha_g[None, :]).astype(np.float32)))
    counts = sparse.vstack(blocks, format="csr") if blocks else sparse.csr_matrix((0, n_genes), dtype=np.float32)
    return counts, m_g


def _render(rng, tissue_um, cells_xy_um, extent_um: float, um_per_px: float) -> np.ndarray:
    """An (H, W, 3) uint8 H&E: glass, pink where ``tissue_um(xy) -> bool``, a purple disc per cell."""
    n = int(np.ceil(extent_um / um_per_px))
    rows, cols = np.divmod(np.arange(n * n), n)
    inside = tissue_um(np.stack([cols * um_per_px, rows * um_per_px], 1)).reshape(n, n)
    image = np.empty((n, n, 3), np.float32)
    image[:] = _GLASS
    texture = 1.0 + 0.06 * rng.standard_normal((n, n))
    image[inside] = np.asarray(_EOSIN, np.float32) * texture[inside][:, None]
    radius = max(_NUCLEUS_RADIUS_UM / um_per_px, 0.7)
    reach = int(np.ceil(radius))
    dr, dc = np.mgrid[-reach : reach + 1, -reach : reach + 1]
    disc = dr**2 + dc**2 <= radius**2
    centre = np.rint(np.asarray(cells_xy_um)[:, ::-1] / um_per_px).astype(np.int64)  # (row, col)
    for r, c in zip(dr[disc], dc[disc], strict=True):
        rr, cc = centre[:, 0] + r, centre[:, 1] + c
        ok = (rr >= 0) & (rr < n) & (cc >= 0) & (cc < n)
        image[rr[ok], cc[ok]] = _HEMATOXYLIN
    return np.clip(image, 0, 255).astype(np.uint8)


def _write_png(path: Path, image: np.ndarray) -> None:
    from skimage.io import imsave

    imsave(path, image, check_contrast=False)


@dataclass
class _Capture:
    """The capture area: ``n`` x ``n`` finest bins (side ``fine`` µm) at ``margin`` µm from the image's corner, and
    which are in tissue (the coarsest bins, side ``coarse``, whose centre is inside the section's outline; a
    finer bin follows the coarse bin holding it)."""

    n: int
    fine: int
    coarse: int
    margin: float
    section: _Section
    coarse_in: np.ndarray  # (n_coarse, n_coarse) bool
    fine_rc: np.ndarray  # (n * n, 2) finest bins' (row, col), row-major
    fine_xy: np.ndarray  # (n * n, 2) their centres, (x, y) µm
    tissue: np.ndarray  # finest in-tissue bins, row-major (the matrix's order)

    @classmethod
    def build(cls, n: int, fine: int, coarse: int, rng: np.random.Generator, n_zones: int) -> _Capture:
        margin = 2.0 * coarse
        section = _tissue_section(rng, n * fine, margin, n_zones)
        k_max = coarse // fine
        n_coarse = n // k_max
        _, coarse_xy = _grid(n_coarse, coarse, margin)
        coarse_in = (section.shape_distance(coarse_xy) <= 1.0).reshape(n_coarse, n_coarse)
        fine_rc, fine_xy = _grid(n, fine, margin)
        fine_in = coarse_in[fine_rc[:, 0] // k_max, fine_rc[:, 1] // k_max]
        return cls(n, fine, coarse, margin, section, coarse_in, fine_rc, fine_xy, np.flatnonzero(fine_in))

    def in_tissue_um(self, xy: np.ndarray) -> np.ndarray:
        """Whether points (x, y) µm are in tissue, through the coarse bin (col, row) holding each."""
        cr = np.floor((xy - self.margin) / self.coarse).astype(np.int64)
        n_coarse = len(self.coarse_in)
        ok = ((cr >= 0) & (cr < n_coarse)).all(1)
        out = np.zeros(len(xy), bool)
        out[ok] = self.coarse_in[cr[ok, 1], cr[ok, 0]]
        return out


def _cells_in_bins(grid: _Capture, rng, rng_place, types: list[str], n_zones: int, cells_per_100um2: float):
    """Cells in the finest in-tissue bins, their types from the zones: (bins x types counts, one row a cell)."""
    n_types = len(types)
    zones = grid.section.zones(grid.fine_xy[grid.tissue])
    preference = _zone_preference(rng, n_types, n_zones)
    abundance = np.exp(rng.normal(0.0, 0.4, n_types))
    density = _density(zones, rng.uniform(0.0, 1.0, n_zones))
    mean_density = float(density.mean()) if len(density) else 1.0
    expected = _expected_cells(density, mean_density, cells_per_100um2 * grid.fine**2 / 100)
    w_sf = rng.multinomial(rng.poisson(expected), _type_probabilities(zones, preference, abundance))
    owner = np.repeat(np.arange(len(grid.tissue)), w_sf.sum(1))
    cell_xy = grid.fine_xy[grid.tissue][owner] + rng_place.uniform(-0.5, 0.5, (len(owner), 2)) * grid.fine
    cell_type = np.repeat(np.tile(np.arange(n_types), len(grid.tissue)), w_sf.ravel())  # bin by bin, as owner
    cells = pd.DataFrame({"x_um": cell_xy[:, 0], "y_um": cell_xy[:, 1],
                          "cell_type": pd.Categorical.from_codes(cell_type, types)})  # fmt: skip
    return w_sf, cells


def _scalefactors(size: int, microns_per_pixel: float, hires_um: float) -> dict:
    return {
        "spot_diameter_fullres": size / microns_per_pixel,
        "bin_size_um": float(size),
        "microns_per_pixel": float(microns_per_pixel),
        "tissue_hires_scalef": microns_per_pixel / hires_um,
        "tissue_lowres_scalef": microns_per_pixel / (4 * hires_um),
        "fiducial_diameter_fullres": 1.615 * 55.0 / microns_per_pixel,
        "regist_target_img_scalef": microns_per_pixel / hires_um,
    }


def _write_bins(folder: Path, grid: _Capture, size: int, counts, w_sf, genes, microns_per_pixel: float):
    """Write one bin size's matrix and positions into ``folder``: the finest bins' counts and cells summed
    into the bins of ``size``. Returns the cells per bin and the barcodes of its in-tissue bins."""
    import anndata

    from ._fullres import _write_matrix_h5

    k = size // grid.fine
    m = grid.n // k
    rc, xy = _grid(m, size, grid.margin)
    in_tissue = grid.coarse_in[rc[:, 0] * size // grid.coarse, rc[:, 1] * size // grid.coarse]
    barcodes = np.array([f"s_{size:03d}um_{r:05d}_{c:05d}-1" for r, c in rc], dtype=object)
    # finest in-tissue bin -> its bin of this size, numbered among this size's in-tissue bins
    number = np.full(m * m, -1)
    number[in_tissue] = np.arange(int(in_tissue.sum()))
    fine_rc = grid.fine_rc[grid.tissue]
    parent = number[(fine_rc[:, 0] // k) * m + fine_rc[:, 1] // k]
    pool = sparse.csr_matrix(
        (np.ones(len(grid.tissue), np.float32), (parent, np.arange(len(grid.tissue)))),
        shape=(int(in_tissue.sum()), len(grid.tissue)),
    )
    x = (pool @ counts).tocsr()
    cells_here = np.rint(pool @ w_sf).astype(np.int64)
    names = pd.Index(barcodes[in_tissue].astype(str))
    adata = anndata.AnnData(X=x, obs=pd.DataFrame(index=names), var=pd.DataFrame(index=genes))
    (folder / "spatial").mkdir(parents=True, exist_ok=True)
    _write_matrix_h5(folder / "filtered_feature_bc_matrix.h5", adata)
    pd.DataFrame(
        {
            "barcode": barcodes,
            "in_tissue": in_tissue.astype(np.int32),
            "array_row": rc[:, 0].astype(np.int32),
            "array_col": rc[:, 1].astype(np.int32),
            "pxl_row_in_fullres": xy[:, 1] / microns_per_pixel,
            "pxl_col_in_fullres": xy[:, 0] / microns_per_pixel,
        }
    ).to_parquet(folder / "spatial" / "tissue_positions.parquet", index=False)
    return cells_here, names


def write_visium_hd(
    path,
    n_bins_side: int = 64,
    bin_sizes=(2, 8, 16),
    *,
    n_genes: int = 100,
    n_cell_types: int = 5,
    cells_per_100um2: float = 1.0,
    microns_per_pixel: float = 0.5,
    seed: int = 0,
) -> SyntheticVisiumHD:
    """Write a synthetic Space Ranger Visium HD ``outs/`` folder (layout in the module docstring) and return
    the truth behind its counts.

    Parameters
    ----------
    path : str or os.PathLike
        The run folder: ``outs/`` is made in it (it may exist).
    n_bins_side : int
        Bins of the finest size along each side of the square capture area; a multiple of the largest
        over the smallest bin size. 64 2 µm bins (the default) are a 128 µm square: 4,096 / 256 / 64 bins
        of 2 / 8 / 16 µm, about two thirds of them in tissue.
    bin_sizes : sequence of int
        Bin sizes to write (µm); each must divide the largest. Counts are drawn at the smallest, the others
        are their sums.
    n_genes : int
        Genes (``gene_0000``, ...).
    n_cell_types : int
        Cell types (``Type_00``, ...).
    cells_per_100um2 : float
        Mean cell density in the tissue (cells per 100 µm², about 1 in a dense tissue); it varies by zone
        between 0.25x and 2.3x.
    microns_per_pixel : float
        Size of a full-resolution pixel (µm); real HD slides are about 0.27.
    seed : int
        Seed of everything drawn.

    Returns
    -------
    SyntheticVisiumHD
        Paths and truth (signatures, cells per bin at every size, the cells, the hires image).

    Raises
    ------
    ValueError
        If a bin size does not divide the largest, ``n_bins_side`` is not a multiple of largest / smallest,
        or a size or density is not positive.

    Examples
    --------
    >>> hd = write_visium_hd("run", n_bins_side=32)                   # doctest: +SKIP
    >>> from napari_cell2location.io import read_visium_hd
    >>> read_visium_hd(hd.outs, bin_size=16).shape                    # doctest: +SKIP
    (12, 100)
    """
    start = time.perf_counter()
    sizes = _check(n_bins_side, bin_sizes, n_genes, n_cell_types, cells_per_100um2, microns_per_pixel)
    n_genes, n_cell_types, n = int(n_genes), int(n_cell_types), int(n_bins_side)
    rng_layout, rng_cells, rng_expr, rng_counts, rng_image = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(5)
    )
    n_zones = int(min(6, n_cell_types))
    grid = _Capture.build(n, sizes[0], sizes[-1], rng_layout, n_zones)
    types = _names("Type_", n_cell_types, 2)
    w_sf, cells = _cells_in_bins(grid, rng_cells, rng_image, types, n_zones, cells_per_100um2)
    g_gf, _ = _signatures(rng_expr, n_genes, n_cell_types)
    counts, m_g = _draw_counts(rng_counts, g_gf, w_sf, float(grid.fine**2))
    genes = _names("gene_", n_genes, 4)

    extent_um = grid.n * grid.fine + 2 * grid.margin
    hires_um = max(1.0, extent_um / _HIRES_MAX_SIDE)
    cell_xy = cells[["x_um", "y_um"]].to_numpy()
    hires = _render(rng_image, grid.in_tissue_um, cell_xy, extent_um, hires_um)
    lowres = hires[::4, ::4].copy()
    outs = Path(path).expanduser() / "outs"
    (outs / "spatial").mkdir(parents=True, exist_ok=True)
    _write_png(outs / "spatial" / "tissue_hires_image.png", hires)
    _write_png(outs / "spatial" / "tissue_lowres_image.png", lowres)
    scalefactors_by_size = {s: _scalefactors(s, microns_per_pixel, hires_um) for s in sizes}
    (outs / "spatial" / "scalefactors_json.json").write_text(json.dumps(scalefactors_by_size[sizes[0]], indent=2))
    abundance_by_size = {}
    for size in sizes:
        folder = outs / "binned_outputs" / f"square_{size:03d}um"
        cells_here, barcodes = _write_bins(folder, grid, size, counts, w_sf, genes, microns_per_pixel)
        (folder / "spatial" / "scalefactors_json.json").write_text(json.dumps(scalefactors_by_size[size], indent=2))
        _write_png(folder / "spatial" / "tissue_hires_image.png", hires)
        _write_png(folder / "spatial" / "tissue_lowres_image.png", lowres)
        abundance_by_size[size] = pd.DataFrame(cells_here, index=barcodes, columns=types)

    seconds = time.perf_counter() - start
    logger.info(
        "write_visium_hd: %d x %d bins of %d µm (%s µm written), %d in tissue, %d cells, %d genes in %.1f s",
        n, n, grid.fine, "/".join(map(str, sizes)), len(grid.tissue), len(cells), n_genes, seconds,
    )  # fmt: skip
    return SyntheticVisiumHD(
        outs=outs,
        bin_sizes=sizes,
        signatures=pd.DataFrame(g_gf, index=genes, columns=types),
        cell_abundance=abundance_by_size,
        cells=cells,
        m_g=pd.Series(m_g, index=genes, name="m_g"),
        microns_per_pixel=float(microns_per_pixel),
        scalefactors=scalefactors_by_size,
        image=hires,
        seconds=seconds,
    )
