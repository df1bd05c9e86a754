"""The output contract shared with the original cell2location: where results live in an AnnData.

Written once here and used by the models' exports, the fit pipeline, the layer data and the command
line (no heavy imports, so napari's reader can use it too).
"""

from __future__ import annotations

#: posterior summaries the fit pipeline exports (the original's four, and the median)
EXPORTED_SUMMARIES = ("means", "stds", "q05", "q50", "q95")

#: ``obsm`` key of the fit pipeline's per-spot QC (total counts and cells, detection y_s, reconstruction r),
#: so saved results keep it; not one of the original's keys
QC_KEY = "cell2location_qc"


def abundance_key(stat: str) -> str:
    """``obsm`` key of a summary of cell abundance, e.g. ``'q05'`` -> ``'q05_cell_abundance_w_sf'``."""
    return f"{stat}_cell_abundance_w_sf"


def abundance_column(stat: str, cell_type: str) -> str:
    """Column of one cell type in :func:`abundance_key` (``'q05cell_abundance_w_sf_B_cell'``, as the original)."""
    return f"{stat}cell_abundance_w_sf_{cell_type}"


def signature_key(stat: str) -> str:
    """``varm`` key of a summary of reference signatures, e.g. ``'means'`` -> ``'means_per_cluster_mu_fg'``."""
    return f"{stat}_per_cluster_mu_fg"


def signature_column(stat: str, cell_type: str) -> str:
    """Column of one cell type in :func:`signature_key` (``'means_per_cluster_mu_fg_B_cell'``)."""
    return f"{stat}_per_cluster_mu_fg_{cell_type}"
