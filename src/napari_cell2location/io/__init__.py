"""The file and input boundary: reading spatial data and signatures, writing results, validating inputs.

Every entry point (Python, the CLI, napari's reader hook) reads spatial data through :func:`read_spatial`,
which knows AnnData ``.h5ad``, SpatialData / AnnData ``.zarr``, Space Ranger ``outs/`` folders and Visium HD
ones (:func:`read_visium_hd`: the square bins of one size, picked with ``bin_size=``). :func:`spatial_format`
says which one a path holds; :mod:`._sections` turns what was read into tissue
sections placed side by side. The full-resolution scan of a section (a pyramidal TIFF) opens lazily as a
:class:`Pyramid` (:func:`open_fullres_image`; :func:`fullres_image_for` finds and checks the one of a Space
Ranger folder).

Imports no Qt and no napari; ``anndata`` / ``spatialdata`` load inside the functions that need them.
"""

from ._files import atomic_output, check_writable, read_h5ad, reading, shorten_paths
from ._fullres import TIFF_SUFFIXES, Pyramid, is_tiff_name, open_fullres_image
from ._fullres_find import find_fullres_image, frame_mismatch, fullres_image_for, place_on_sections
from ._read import read_signatures, write_results
from ._spaceranger import read_spaceranger, spaceranger_root
from ._spatial import bin_tables, pick_table, read_spatial, spatial_format, table_bin_size
from ._validate import (
    MIN_SHARED_GENES,
    InputError,
    batch_codes,
    count_matrix,
    duplicated_names,
    prepare_inputs,
    preview,
    validate_counts,
    validate_signatures,
)
from ._visium_hd import bin_side, is_visium_hd, library_scalefactors, read_visium_hd, visium_hd_bin_sizes

__all__ = [
    "MIN_SHARED_GENES",
    "TIFF_SUFFIXES",
    "InputError",
    "Pyramid",
    "atomic_output",
    "batch_codes",
    "bin_side",
    "bin_tables",
    "library_scalefactors",
    "check_writable",
    "count_matrix",
    "duplicated_names",
    "find_fullres_image",
    "frame_mismatch",
    "fullres_image_for",
    "is_tiff_name",
    "is_visium_hd",
    "open_fullres_image",
    "place_on_sections",
    "pick_table",
    "prepare_inputs",
    "preview",
    "read_h5ad",
    "read_signatures",
    "read_spaceranger",
    "read_spatial",
    "read_visium_hd",
    "reading",
    "shorten_paths",
    "spaceranger_root",
    "spatial_format",
    "table_bin_size",
    "validate_counts",
    "validate_signatures",
    "visium_hd_bin_sizes",
    "write_results",
]
