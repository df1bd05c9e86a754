"""Cell2location model: Pyro modules, the user-facing estimator, the fit pipeline and its QC.

Built on the shared inference engine (:mod:`napari_cell2location._infer`). Imports no Qt and no napari.
"""

from .._infer import (
    AnswerStopper,
    ConvergenceStopper,
    DataParallel,
    NegativeBinomialCounts,
    Stage,
    TrainStep,
    resolve_device,
)
from .._variants import ModelVariant
from ._cell2location import Cell2location
from ._modules import (
    Cell2locationModule,
    LocationModelLinearDependentWMultiExperimentLocationBackgroundNormLevelGeneAlphaPyroModel,
    LocationModelLinearDependentWMultiExperimentLocationBackgroundNormLevelNoMGPyroModel,
    LocationModelMultiExperimentLocationBackgroundNormLevelGeneAlphaPyroModel,
    NoFactorisationModule,
    NoMGModule,
)
from ._pipeline import FitResult, FitSettings, build_model, fit, iter_fit, iter_load_fit
from ._priors import check_n_cells
from ._qc import model_qc, spot_detail, spot_qc, worst_explained

__all__ = [
    "AnswerStopper",
    "Cell2location",
    "Cell2locationModule",
    "ConvergenceStopper",
    "DataParallel",
    "FitResult",
    "FitSettings",
    "LocationModelLinearDependentWMultiExperimentLocationBackgroundNormLevelGeneAlphaPyroModel",
    "LocationModelLinearDependentWMultiExperimentLocationBackgroundNormLevelNoMGPyroModel",
    "LocationModelMultiExperimentLocationBackgroundNormLevelGeneAlphaPyroModel",
    "ModelVariant",
    "NegativeBinomialCounts",
    "NoFactorisationModule",
    "NoMGModule",
    "Stage",
    "TrainStep",
    "build_model",
    "check_n_cells",
    "fit",
    "iter_fit",
    "iter_load_fit",
    "model_qc",
    "resolve_device",
    "spot_detail",
    "spot_qc",
    "worst_explained",
]
