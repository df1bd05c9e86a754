"""Cell2location model: Pyro modules, AutoNormal guide, training generator, posterior export."""

from ._cell2location import Cell2location, TrainStep, resolve_device
from ._likelihood import NegativeBinomialCounts
from ._modules import (
    Cell2locationModule,
    LocationModelLinearDependentWMultiExperimentLocationBackgroundNormLevelGeneAlphaPyroModel,
    LocationModelLinearDependentWMultiExperimentLocationBackgroundNormLevelNoMGPyroModel,
    LocationModelMultiExperimentLocationBackgroundNormLevelGeneAlphaPyroModel,
    NoFactorisationModule,
    NoMGModule,
)

__all__ = [
    "Cell2location",
    "Cell2locationModule",
    "LocationModelLinearDependentWMultiExperimentLocationBackgroundNormLevelGeneAlphaPyroModel",
    "LocationModelLinearDependentWMultiExperimentLocationBackgroundNormLevelNoMGPyroModel",
    "LocationModelMultiExperimentLocationBackgroundNormLevelGeneAlphaPyroModel",
    "NegativeBinomialCounts",
    "NoFactorisationModule",
    "NoMGModule",
    "TrainStep",
    "resolve_device",
]
