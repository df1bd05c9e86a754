"""Synthetic Visium-like data with a synthetic H&E image and full ground truth, generated offline in code.

The generator follows the Cell2location generative model (``spec/MODEL.md`` section 1), so a fit of the
model on the data is well specified and its estimates can be scored against the truth:

* spots sit on the Visium hexagonal lattice (100 µm centre-to-centre, 55 µm diameter), one roughly oval
  tissue section per batch, sections side by side in x in one coordinate frame;
* cell types live in smooth spatial zones (layers and blobs), so each type is absent from many spots;
* per-spot integer cell counts ``w_sf`` are drawn from zone-driven proportions;
* counts are ``D_sg ~ NB(mu_sg, alpha_eg)`` with ``mu_sg = (m_g * sum_f w_sf g_fg + s_eg) * y_s``;
* every cell is drawn as a nucleus on the H&E image, inside its spot's circle, and filler cells are drawn
  between the spots, so nuclei counting on the image can be checked against ``truth['n_cells']``;
* how close nuclei lie (``nucleus_spacing``: apart, touching, overlapping) and the image's pixel size
  (``image_um_per_px``) are parameters, and :func:`density_sweep` draws one section per cell density
  (sparse to crowded) for checking nuclei counts across densities.

:func:`write_visium_hd` writes a synthetic Visium HD run to disk instead (Space Ranger's ``outs/`` with
``binned_outputs/square_002um|square_008um|square_016um/``, coarser bins the sums of the finest, the truth
returned), since no HD data can be downloaded for tests.

Coordinate conventions (written once, used everywhere):

* ``adata.obsm['spatial']`` is (x, y) in full-resolution pixels; one full-resolution pixel is 0.5 µm;
* the image is stored at ``hires`` scale: image (row, col) = (y, x) * ``tissue_hires_scalef`` (0.25 by
  default, so one image pixel is 2 µm; ``0.5 / image_um_per_px`` in general); pixel centres sit at integer
  (row, col), as in napari.
"""

from __future__ import annotations

import logging
import numbers
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pandas as pd

from ._constants import (  # noqa: F401  (public constants of the coordinate conventions)
    _HIRES_UM_PER_PX,
    _NUCLEUS_SPACING,
    FULLRES_UM_PER_PX,
    HIRES_SCALEF,
    LOWRES_SCALEF,
    SPOT_DIAMETER_UM,
    SPOT_PITCH_UM,
)
from ._expression import _reference_counts, _signatures, _spatial_counts
from ._fullres import FullResScan, write_fullres_visium
from ._histology import _histology
from ._layout import _cell_composition
from ._visium import _LIBRARY_ID, SyntheticVisium, _Names, _reference_adata, _scalefactors, _spatial_adata, _truth
from ._visium_hd import SyntheticVisiumHD, write_visium_hd

__all__ = [
    "FullResScan",
    "SyntheticVisium",
    "SyntheticVisiumHD",
    "density_sweep",
    "synthetic_visium",
    "write_fullres_visium",
    "write_visium_hd",
]

#: Cells per spot of :func:`density_sweep`: sparse (2) to crowded (15, as lymph node, tumour, brain cell layers).
SWEEP_DENSITIES = (2.0, 5.0, 8.0, 12.0, 15.0)

logger = logging.getLogger(__name__)


def synthetic_visium(
    n_spots: int = 600,
    n_genes: int = 1000,
    n_cell_types: int = 15,
    n_batches: int = 2,
    mean_cells_per_spot: float = 8.0,
    n_ref_cells_per_type: int = 60,
    image: bool = True,
    seed: int = 0,
    nucleus_spacing: float = _NUCLEUS_SPACING,
    image_um_per_px: float = _HIRES_UM_PER_PX,
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
    nucleus_spacing : float
        Minimum distance between two nuclei centres, in units of the mean of their major diameters. 1.3
        (default) leaves a gap between neighbours; 1.0 lets them touch; below 1 they overlap, as crowded
        nuclei do in a section (lymph node, tumour, brain cell layers): at 0.8 two 7 µm nuclei may lie
        5.6 µm apart. The nuclei of a spot that do not fit are shrunk (see ``major_um``). Only the image
        and ``truth['nuclei']`` depend on it.
    image_um_per_px : float
        Size of one pixel of the H&E image (µm), stored as the ``hires`` image with
        ``tissue_hires_scalef = 0.5 / image_um_per_px``: 2 (default) as a Visium hires image, where a 7 µm
        nucleus is 3.5 px across; 0.25-1 as a full-resolution scan. The image grows as
        ``1 / image_um_per_px ** 2`` (use fewer spots at fine pixel sizes). The spot nuclei (position,
        size, type) do not depend on it; the filler nuclei between spots and the pixels do.

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
        If a size is not positive, there are fewer spots than sections, or ``nucleus_spacing`` or
        ``image_um_per_px`` is not positive.

    Examples
    --------
    >>> data = synthetic_visium(n_spots=60, n_genes=80, n_cell_types=5, n_batches=1, image=False)
    >>> data.adata.shape
    (60, 80)
    """
    _check_arguments(n_spots, n_genes, n_cell_types, n_batches, n_ref_cells_per_type, mean_cells_per_spot)
    for name, value in (("nucleus_spacing", nucleus_spacing), ("image_um_per_px", image_um_per_px)):
        if not (isinstance(value, numbers.Real) and 0 < value < np.inf):
            raise ValueError(f"{name} must be a positive number, got {value!r}")
    n_spots, n_genes, n_cell_types, n_batches = int(n_spots), int(n_genes), int(n_cell_types), int(n_batches)
    start = time.perf_counter()
    rng_layout, rng_cells, rng_expr, rng_counts, rng_ref, rng_image = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(6)
    )

    comp = _cell_composition(rng_layout, rng_cells, n_spots, n_batches, n_cell_types, mean_cells_per_spot)
    g_gf, markers = _signatures(rng_expr, n_genes, n_cell_types)
    spatial = _spatial_counts(rng_counts, g_gf, comp.w_sf, comp.batch_idx, n_batches)
    ref = _reference_counts(rng_ref, g_gf, n_ref_cells_per_type)

    names = _Names.make(n_spots, n_genes, n_cell_types, n_batches, comp.zones.shape[1])
    scalefactors = _scalefactors()
    scalefactors["tissue_hires_scalef"] = FULLRES_UM_PER_PX / float(image_um_per_px)
    adata = _spatial_adata(comp, spatial, names, scalefactors)
    reference = _reference_adata(ref, names)
    signatures = pd.DataFrame(g_gf, index=names.genes, columns=names.types)
    truth = _truth(comp, spatial, ref, markers, names, adata.obs_names)

    he = None
    if image:
        he, truth["nuclei"], truth["tissue_mask"] = _histology(
            rng_image, comp, names.spots, names.types, float(nucleus_spacing), float(image_um_per_px)
        )
        adata.uns["spatial"][_LIBRARY_ID]["images"] = {"hires": he}

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
        library_id=_LIBRARY_ID,
    )


def density_sweep(
    densities: Sequence[float] = SWEEP_DENSITIES,
    *,
    nucleus_spacing: float = 0.8,
    image_um_per_px: float = _HIRES_UM_PER_PX,
    n_spots: int = 100,
    seed: int = 0,
    **kwargs: Any,
) -> Iterator[tuple[float, SyntheticVisium]]:
    """One synthetic section per cell density, sparse to crowded, for checking nuclei counts across densities.

    Each section is :func:`synthetic_visium` with ``mean_cells_per_spot`` set to one of ``densities`` and
    everything else equal (same seed: the same tissue outline and zones, more cells). Within a section the
    cells per spot still vary spatially (about 0.25x to 2.3x the mean), so a per-spot correlation can be
    scored at every density. With the default ``nucleus_spacing`` of 0.8, nuclei may overlap by up to a
    fifth of their diameter, so the crowded sections have touching and overlapping nuclei as lymph node,
    tumour or brain cell layers do. Sections are generated one at a time as the iterator is consumed.

    Parameters
    ----------
    densities : sequence of float
        Mean cells per spot of each section (default 2, 5, 8, 12, 15).
    nucleus_spacing : float
        Minimum centre distance of two nuclei in units of their mean major diameter (see
        :func:`synthetic_visium`; 1.3 keeps a gap, 1.0 touching, 0.8 overlapping).
    image_um_per_px : float
        Pixel size of the drawn H&E (µm); 2 is Visium's hires scale, 0.25-1 a full-resolution scan.
    n_spots : int
        Spots per section.
    seed : int
        Seed shared by all sections.
    **kwargs
        Further arguments of :func:`synthetic_visium` (``n_genes``, ``n_cell_types``, ``n_batches``, ...);
        by default 40 genes, 6 cell types and one section, since only the image and the cell numbers matter
        here.

    Yields
    ------
    tuple of (float, SyntheticVisium)
        The density and its section.

    Examples
    --------
    >>> for density, data in density_sweep((2, 15), n_spots=20, image=False):
    ...     print(density, data.truth["n_cells"].mean() > density / 2)
    2.0 True
    15.0 True
    """
    settings = {"n_genes": 40, "n_cell_types": 6, "n_batches": 1, **kwargs}
    for density in densities:
        yield (
            float(density),
            synthetic_visium(
                n_spots=n_spots,
                mean_cells_per_spot=float(density),
                nucleus_spacing=nucleus_spacing,
                image_um_per_px=image_um_per_px,
                seed=seed,
                **settings,
            ),
        )


def _check_arguments(
    n_spots: int,
    n_genes: int,
    n_cell_types: int,
    n_batches: int,
    n_ref_cells_per_type: int,
    mean_cells_per_spot: float,
) -> None:
    """Raise ValueError unless the sizes are positive integers, ``n_spots >= n_batches`` and the mean is positive."""
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
