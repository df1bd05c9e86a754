"""Reference signatures from labelled single-cell data (``spec/MODEL.md`` §4).

Gene selection (:func:`filter_genes`), per-type mean counts (:func:`cluster_average_signatures`) and
the negative binomial :class:`RegressionModel`, whose ``export_posterior`` writes
``varm['means_per_cluster_mu_fg']`` like the original cell2location; :func:`iter_signatures` runs them
as one pipeline (for the command line and the Reference tab). Imports no Qt and no napari.
"""

from ._filter import filter_genes, gene_filter_stats, genes_kept, plot_filter_genes
from ._module import RegressionBackgroundDetectionTechPyroModel
from ._pipeline import METHODS, SignatureSettings, SignaturesResult, estimate_signatures, iter_signatures
from ._regression import RegressionModel, default_max_epochs
from ._signatures import cluster_average_signatures, compute_cluster_averages, signatures_from_adata
from ._validate import MIN_CELLS_PER_LABEL, ReferenceInputs, check_reference

__all__ = [
    "METHODS",
    "MIN_CELLS_PER_LABEL",
    "ReferenceInputs",
    "RegressionBackgroundDetectionTechPyroModel",
    "RegressionModel",
    "SignatureSettings",
    "SignaturesResult",
    "check_reference",
    "cluster_average_signatures",
    "compute_cluster_averages",
    "default_max_epochs",
    "estimate_signatures",
    "filter_genes",
    "gene_filter_stats",
    "genes_kept",
    "iter_signatures",
    "plot_filter_genes",
    "signatures_from_adata",
]
