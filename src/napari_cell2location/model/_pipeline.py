"""The fit pipeline, written once for the command line, the Python API and the Fit tab.

validate -> build -> train -> export -> per-spot QC, as a generator (:func:`iter_fit`) that yields a
:class:`~napari_cell2location.model.Stage` when a stage starts and a
:class:`~napari_cell2location.model.TrainStep` after every step, and returns a :class:`FitResult`.
The GUI runs it in a worker thread (cancel = close the generator between two steps), the command
line and :func:`fit` consume it. :func:`iter_load_fit` does the same for a model saved with
``Cell2location.save``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pandas as pd

from .._contract import EXPORTED_SUMMARIES, QC_KEY
from .._infer import AnswerStopper, DataParallel, Stage, consume
from .._variants import ModelVariant
from ._cell2location import Cell2location
from ._parallel import iter_fit_parallel
from ._qc import model_qc

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FitSettings:
    """Everything a fit needs besides the data (the CLI's options, the Fit tab's controls).

    Parameters
    ----------
    variant : ModelVariant
        Which model.
    n_cells_per_location : float or numpy.ndarray
        Prior mean of cells per spot: one value, or (n_spots,) counts from the histology. A per-spot
        array is also observed as nuclei counts, which pins the absolute scale of the abundances.
    detection_alpha : float
        Regularisation of spot-to-spot detection efficiency (20 weak, 200 strong).
    batch_key, layer : str, optional
        Column of ``obs`` with each spot's section; layer with raw counts (default ``X``).
    max_epochs : int, optional
        Epochs (the original's schedule); None: the fast mode, which stops when the abundances have
        converged (see ``Cell2location.iter_train``).
    tolerance : float, optional
        The fast mode's convergence tolerance (an
        :class:`~napari_cell2location.model.AnswerStopper`'s; None: its default, 0.02). Lower trains
        longer, further along the drift of the original's own answer.
    batch_size : int, optional
        Spots per minibatch; None: all at once.
    lr : float, optional
        Learning rate (None: the mode's default).
    device : str
        'auto', 'cpu', 'cuda' or 'cuda:N'.
    seed : int, optional
        Random seed.
    summaries : tuple of str
        Posterior summaries to export (cell2location's ``obsm`` keys).
    use_quantiles : bool
        Summaries straight from the guide (exact quantiles, no sampling; fast, low memory).
    num_samples : int
        Posterior samples otherwise.
    export_batch_size : int, optional
        Spots per batch of the export (bounds its memory).
    checkpoint_dir : str or path, optional
        Folder of the training checkpoint (None: none); see ``Cell2location.iter_train``.
    checkpoint_every : int, optional
        Epochs between checkpoints (None: about every 100 optimiser steps).
    resume : bool
        Continue from the checkpoint in ``checkpoint_dir`` (a fresh fit when there is none).
    """

    variant: ModelVariant = ModelVariant.MAIN
    n_cells_per_location: Any = 8.0
    detection_alpha: float = 20.0
    batch_key: str | None = None
    layer: str | None = None
    max_epochs: int | None = None
    tolerance: float | None = None
    batch_size: int | None = None
    lr: float | None = None
    device: str = "auto"
    seed: int | None = 0
    summaries: tuple = EXPORTED_SUMMARIES
    use_quantiles: bool = True
    num_samples: int = 1000
    export_batch_size: int | None = 2000
    checkpoint_dir: Any = None
    checkpoint_every: int | None = None
    resume: bool = False

    @property
    def per_spot(self) -> bool:
        """Whether N_cells_per_location is a per-spot array (counted nuclei)."""
        return np.ndim(self.n_cells_per_location) == 1


@dataclass
class FitResult:
    """A finished fit: the model (its posterior exported into the data) and its per-spot QC.

    Attributes
    ----------
    model : Cell2location
        The trained model.
    qc : pandas.DataFrame
        One row per spot (``model.obs_names`` order): total counts, expected counts, total cells,
        detection efficiency and reconstruction r (see :func:`~napari_cell2location.model.spot_qc`).
    """

    model: Cell2location
    qc: pd.DataFrame


def build_model(adata, signatures: pd.DataFrame, settings: FitSettings, **model_kwargs) -> Cell2location:
    """Register ``adata`` and build the model the settings describe (inputs are validated here).

    Per-spot ``n_cells_per_location`` (counted on the histology; an array in spot order or a Series by
    spot name) is the prior of each spot's total and is also observed as nuclei counts.
    ``model_kwargs`` go to the model (e.g. ``detection_mean``).
    """
    Cell2location.setup_anndata(adata, batch_key=settings.batch_key, layer=settings.layer)
    n_cells = settings.n_cells_per_location  # per spot: an array in spot order, or a Series by spot name
    return Cell2location(
        adata,
        signatures,
        model_class=settings.variant,
        N_cells_per_location=n_cells,
        detection_alpha=settings.detection_alpha,
        nuclei_counts=n_cells if settings.per_spot else None,
        **model_kwargs,
    )


def export_fit(mod: Cell2location, adata, settings: FitSettings) -> FitResult:
    """Export the trained ``mod``'s posterior into ``adata`` (the settings' summaries) with its per-spot QC."""
    sample_kwargs = {"batch_size": settings.export_batch_size}
    if not settings.use_quantiles:
        sample_kwargs["num_samples"] = settings.num_samples
    mod.export_posterior(
        adata, add_to_obsm=list(settings.summaries), use_quantiles=settings.use_quantiles, sample_kwargs=sample_kwargs
    )
    qc = model_qc(mod)
    by_spot = qc.set_axis(mod.obs_names, axis=0).reindex(adata.obs_names.astype(str))
    adata.obsm[QC_KEY] = by_spot.set_axis(adata.obs_names, axis=0)  # saved with the results
    return FitResult(mod, qc)


def train_fit(mod: Cell2location, settings: FitSettings, stopper=None, parallel: DataParallel | None = None):
    """``mod.iter_train`` with the settings' training fields (and the fast mode's ``stopper``)."""
    return mod.iter_train(
        max_epochs=settings.max_epochs,
        batch_size=settings.batch_size,
        lr=settings.lr,
        device=settings.device,
        seed=settings.seed,
        early_stopping=stopper,
        checkpoint_dir=settings.checkpoint_dir,
        checkpoint_every=settings.checkpoint_every,
        resume=settings.resume,
        parallel=parallel,
    )


def iter_fit(
    adata,
    signatures: pd.DataFrame,
    settings: FitSettings | None = None,
    parallel: DataParallel | None = None,
    **changes,
):
    """Fit Cell2location to ``adata`` and export the posterior into it, as a generator.

    Parameters
    ----------
    adata : anndata.AnnData
        Spatial counts (the table of a SpatialData works too: results land in it).
    signatures : pandas.DataFrame
        Reference signatures, genes x cell types.
    settings : FitSettings, optional
        Default ``FitSettings()``; ``changes`` replace some of its fields.
    parallel : DataParallel, optional
        This process's place in a data-parallel fit (``DataParallel.from_env()`` under ``torchrun``):
        each process is given the whole section and trains its shard of the spots; ``batch_size``
        is the total over the processes. Rank 0's ``adata`` receives the whole section's results
        (and its FitResult the QC of every spot); the other ranks' ``adata`` is left as it was.

    Yields
    ------
    Stage or TrainStep
        ``Stage('model', mod)`` once the inputs are validated and the model is built, a
        ``TrainStep`` per step, ``Stage('exporting')`` when training is over.

    Returns
    -------
    FitResult
        The generator's return value (``StopIteration.value``; :func:`fit` returns it).
    """
    settings = replace(settings or FitSettings(), **changes)
    stopper = None
    if settings.max_epochs is None and settings.tolerance is not None:
        stopper = AnswerStopper(tolerance=settings.tolerance)
    if parallel is not None and parallel.active:
        return (yield from iter_fit_parallel(adata, signatures, settings, parallel, stopper))
    mod = build_model(adata, signatures, settings)
    yield Stage("model", mod)
    yield from train_fit(mod, settings, stopper)
    yield Stage("exporting")
    return export_fit(mod, adata, settings)


def iter_load_fit(adata, path, settings: FitSettings | None = None, **changes):
    """Load a model saved with ``Cell2location.save`` for ``adata`` and export it as :func:`iter_fit` does.

    Yields ``Stage('model', mod)`` and ``Stage('exporting')``; returns a :class:`FitResult`. Only the
    export fields of the settings (and ``device``) are used.
    """
    settings = replace(settings or FitSettings(device="cpu"), **changes)
    mod = Cell2location.load(path, adata, device=settings.device)
    yield Stage("model", mod)
    yield Stage("exporting")
    return export_fit(mod, adata, settings)


def fit(
    adata,
    signatures: pd.DataFrame,
    settings: FitSettings | None = None,
    progress_bar: bool = True,
    parallel: DataParallel | None = None,
    **changes,
):
    """:func:`iter_fit` run to the end (a tqdm bar on stderr when ``progress_bar``); returns its FitResult."""
    return consume(iter_fit(adata, signatures, settings, parallel, **changes), progress_bar, "training")
