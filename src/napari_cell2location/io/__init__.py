"""The file and input boundary: reading spatial data and signatures, writing results, validating inputs.

Imports no Qt and no napari; ``anndata`` / ``spatialdata`` load inside the functions that need them.
"""

from ._read import pick_table, read_signatures, read_spatial, write_results
from ._validate import InputError, prepare_inputs, validate_counts, validate_signatures

__all__ = [
    "InputError",
    "pick_table",
    "prepare_inputs",
    "read_signatures",
    "read_spatial",
    "validate_counts",
    "validate_signatures",
    "write_results",
]
