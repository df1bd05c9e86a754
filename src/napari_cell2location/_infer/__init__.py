"""The inference engine both models are built on (torch + pyro; no Qt, no napari).

* :class:`PyroEstimator`: the base of :class:`~napari_cell2location.Cell2location` and
  :class:`~napari_cell2location.reference.RegressionModel` (guide set-up, training, posterior
  summaries, export, plots, saving and loading);
* the training loop (:func:`svi_steps`, :class:`TrainStep`, :class:`ConvergenceStopper`, :func:`consume`);
* data-parallel training over processes (:class:`DataParallel`, ``torchrun``);
* posterior summaries of the guide (:class:`GuideSummary`, :class:`DrawSummaries`);
* model building blocks shared by both models: :class:`Site` generators and the additive background
  (:func:`gene_background_sites`), and the negative binomial count likelihood.

These names are the package's own API between ``model/`` and ``reference/``: neither reaches into
the other's private modules.
"""

from ._device import cpu_threads, describe_device, json_ready, resolve_device, to_numpy
from ._distributed import DataParallel
from ._estimator import PyroEstimator, aligned_order, register_fields
from ._likelihood import MAX_ALPHA, CountsPattern, NegativeBinomialCounts, nb_log_likelihood, overdispersion
from ._posterior import (
    DEFAULT_SUMMARIES,
    DrawSummaries,
    GuideSummary,
    PosteriorMixin,
    check_summaries,
    parse_quantile,
    sorted_quantile,
)
from ._sites import Site, gene_background_sites, sample_gene_background, sample_sites
from ._training import (
    Adam,
    AnswerStopper,
    ConvergenceStopper,
    Stage,
    TrainStep,
    check_training_args,
    consume,
    epoch_batches,
    svi_steps,
)

__all__ = [
    "DEFAULT_SUMMARIES",
    "MAX_ALPHA",
    "Adam",
    "AnswerStopper",
    "ConvergenceStopper",
    "CountsPattern",
    "DataParallel",
    "DrawSummaries",
    "GuideSummary",
    "NegativeBinomialCounts",
    "PosteriorMixin",
    "PyroEstimator",
    "Site",
    "Stage",
    "TrainStep",
    "aligned_order",
    "check_summaries",
    "check_training_args",
    "consume",
    "cpu_threads",
    "describe_device",
    "epoch_batches",
    "gene_background_sites",
    "json_ready",
    "nb_log_likelihood",
    "overdispersion",
    "parse_quantile",
    "register_fields",
    "resolve_device",
    "sample_gene_background",
    "sample_sites",
    "sorted_quantile",
    "svi_steps",
    "to_numpy",
]
