"""Reference signatures from a labelled single-cell AnnData, written once for the command line and the
Reference tab: gene filter -> cluster averages or the NB regression -> signatures (genes x cell types).

:func:`iter_signatures` is a generator like the fit pipeline: it yields a
:class:`~napari_cell2location.model.Stage` when a stage starts and a
:class:`~napari_cell2location.model.TrainStep` per regression step, and returns a
:class:`SignaturesResult`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import pandas as pd

from .._contract import signature_column, signature_key
from .._infer import Stage, consume
from ..io import InputError
from ._filter import filter_genes
from ._regression import RegressionModel
from ._signatures import cluster_average_signatures, signatures_from_adata

logger = logging.getLogger(__name__)

#: the two ways to make signatures
METHODS = ("regression", "average")


@dataclass(frozen=True)
class SignatureSettings:
    """Everything signature estimation needs besides the reference (CLI options, Reference tab controls).

    Parameters
    ----------
    labels_key : str
        Column of ``obs`` with each cell's type.
    batch_key : str, optional
        Column of ``obs`` with each cell's batch (sample).
    layer : str, optional
        Layer with raw counts (default ``X``).
    categorical_covariate_keys : tuple of str
        Columns of technical covariates (regression only).
    filter : bool
        Select genes with :func:`~napari_cell2location.reference.filter_genes` first.
    cell_count_cutoff, cell_percentage_cutoff2, nonz_mean_cutoff : float
        Its cut-offs (the original's defaults).
    method : {'regression', 'average'}
        The NB regression, or per-type mean counts (fast).
    max_epochs : int, optional
        Regression epochs (None: min(round(20000 / n_cells * 400), 400)).
    batch_size : int, optional
        Cells per minibatch.
    lr : float
        Learning rate.
    device : str
        'auto', 'cpu', 'cuda' or 'cuda:N'.
    seed : int, optional
        Random seed.
    use_quantiles : bool
        Summaries straight from the guide (no sampling).
    num_samples : int
        Posterior samples otherwise.
    """

    labels_key: str
    batch_key: str | None = None
    layer: str | None = None
    categorical_covariate_keys: tuple = ()
    filter: bool = True
    cell_count_cutoff: float = 15
    cell_percentage_cutoff2: float = 0.05
    nonz_mean_cutoff: float = 1.12
    method: str = "regression"
    max_epochs: int | None = None
    batch_size: int | None = 2500
    lr: float = 0.002
    device: str = "auto"
    seed: int | None = 0
    use_quantiles: bool = True
    num_samples: int = 1000


@dataclass
class SignaturesResult:
    """Finished signatures.

    Attributes
    ----------
    signatures : pandas.DataFrame
        (n_genes, n_cell_types) expression per cell of each type, ready for ``Cell2location``.
    model : RegressionModel or None
        The trained regression (None for cluster averages).
    adata : anndata.AnnData
        The reference restricted to the kept genes, with ``varm['means_per_cluster_mu_fg']`` and
        ``uns['mod']`` (cell2location's reference layout; readable by ``io.read_signatures``).
    """

    signatures: pd.DataFrame
    model: RegressionModel | None
    adata: object


def _kept_genes(adata, settings: SignatureSettings):
    if not settings.filter:
        return adata.copy()
    genes = filter_genes(
        adata,
        cell_count_cutoff=settings.cell_count_cutoff,
        cell_percentage_cutoff2=settings.cell_percentage_cutoff2,
        nonz_mean_cutoff=settings.nonz_mean_cutoff,
        layer=settings.layer,
    )
    if len(genes) == 0:
        raise InputError("the gene filter keeps no gene; lower the cut-offs or do not filter genes")
    logger.info("filter_genes kept %d of %d genes", len(genes), adata.n_vars)
    return adata[:, genes].copy()


def iter_signatures(adata, settings: SignatureSettings | None = None, **changes):
    """Estimate reference signatures from ``adata`` (cells x genes, raw counts), as a generator.

    Parameters
    ----------
    adata : anndata.AnnData
        Labelled single-cell reference; not modified (the genes kept are copied).
    settings : SignatureSettings, optional
        ``changes`` replace some of its fields (``labels_key`` is required one way or the other).

    Yields
    ------
    Stage or TrainStep
        For the regression: ``Stage('model', mod)``, a ``TrainStep`` per step, ``Stage('exporting')``.

    Returns
    -------
    SignaturesResult
    """
    settings = replace(settings, **changes) if settings is not None else SignatureSettings(**changes)
    if settings.method not in METHODS:
        raise InputError(f"method must be one of {METHODS}, got {settings.method!r}")
    adata = _kept_genes(adata, settings)
    if settings.method == "average":
        signatures = cluster_average_signatures(adata, settings.labels_key, layer=settings.layer)
        adata.varm[signature_key("means")] = signatures.set_axis(
            [signature_column("means", c) for c in signatures.columns], axis=1
        )
        adata.uns["mod"] = {"factor_names": list(signatures.columns)}
        return SignaturesResult(signatures, None, adata)
    RegressionModel.setup_anndata(
        adata,
        layer=settings.layer,
        batch_key=settings.batch_key,
        labels_key=settings.labels_key,
        categorical_covariate_keys=list(settings.categorical_covariate_keys) or None,
    )
    mod = RegressionModel(adata)
    yield Stage("model", mod)
    yield from mod.iter_train(
        max_epochs=settings.max_epochs,
        batch_size=settings.batch_size,
        lr=settings.lr,
        device=settings.device,
        seed=settings.seed,
    )
    yield Stage("exporting")
    mod.export_posterior(
        adata,
        add_to_varm=["means", "stds", "q05", "q95"],
        use_quantiles=settings.use_quantiles,
        sample_kwargs={"num_samples": settings.num_samples},
    )
    return SignaturesResult(signatures_from_adata(adata), mod, adata)


def estimate_signatures(adata, settings: SignatureSettings | None = None, progress_bar: bool = True, **changes):
    """:func:`iter_signatures` run to the end; returns its :class:`SignaturesResult`."""
    return consume(iter_signatures(adata, settings, **changes), progress_bar, "training reference")
