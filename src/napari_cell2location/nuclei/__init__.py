"""Nuclei on histology: detection, counting per spot, and the ``N_cells_per_location`` prior.

Headless: scipy, scikit-image and pandas only (dask, zarr or StarDist / Cellpose when the caller uses them).
Touching and overlapping nuclei are split by default (``detect_nuclei(..., split_touching=True)``, see
``nuclei._split``), so counts in crowded tissue are not short.

>>> from napari_cell2location import nuclei                                      # doctest: +SKIP
>>> found = nuclei.detect_nuclei(image, pixel_size_um=2.0)                       # doctest: +SKIP
>>> centres, radius = nuclei.spots_in_image(adata.obsm["spatial"], scalef, diameter_fullres)  # doctest: +SKIP
>>> counts = nuclei.count_nuclei_per_spot(found, centres, radius)                # doctest: +SKIP
>>> est = nuclei.estimate_n_cells_per_location(counts, adata.obs["in_tissue"])   # doctest: +SKIP
>>> Cell2location(adata, sig, N_cells_per_location=est.per_spot)                 # doctest: +SKIP

On a full-resolution scan (a lazy multiscale image, ``io.open_fullres_image``), :func:`detect_in_spots` reads
only the tiles under the spots and counts per spot in world coordinates. Visium HD bins are counted as the
squares they are (``shape='square'``; :func:`spot_shape` tells from the scale factors), each nucleus in one bin.
"""

from ._count import (
    NCellsEstimate,
    count_nuclei_per_spot,
    estimate_n_cells_per_location,
    outlier_fences,
    overlap_scaling,
    spot_shape,
    spots_in_image,
)
from ._detect import DetectProgress, detect_nuclei, iter_detect_nuclei
from ._fullres import SpotNuclei, detect_in_spots, finest_level, iter_detect_in_spots, spot_regions
from ._signal import auto_threshold, nuclear_signal

__all__ = [
    "DetectProgress",
    "NCellsEstimate",
    "SpotNuclei",
    "auto_threshold",
    "count_nuclei_per_spot",
    "detect_in_spots",
    "detect_nuclei",
    "estimate_n_cells_per_location",
    "finest_level",
    "iter_detect_in_spots",
    "iter_detect_nuclei",
    "nuclear_signal",
    "outlier_fences",
    "overlap_scaling",
    "spot_regions",
    "spot_shape",
    "spots_in_image",
]
