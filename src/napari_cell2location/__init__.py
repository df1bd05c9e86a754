"""napari-cell2location: map reference cell types onto spatial transcriptomics spots.

The headless API is importable without napari or Qt; heavy modules load on first use.

>>> from napari_cell2location import Cell2location, datasets   # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it (loaded lazily, so `import napari_cell2location` stays cheap)
_LAZY = {
    "Cell2location": "napari_cell2location.model",
    "LocationModelLinearDependentWMultiExperimentLocationBackgroundNormLevelGeneAlphaPyroModel": (
        "napari_cell2location.model"
    ),
    "LocationModelMultiExperimentLocationBackgroundNormLevelGeneAlphaPyroModel": "napari_cell2location.model",
    "LocationModelLinearDependentWMultiExperimentLocationBackgroundNormLevelNoMGPyroModel": (
        "napari_cell2location.model"
    ),
    "Cell2locationModule": "napari_cell2location.model",
    "NoFactorisationModule": "napari_cell2location.model",
    "NoMGModule": "napari_cell2location.model",
    "RegressionModel": "napari_cell2location.reference",
}
_SUBMODULES = {"datasets", "model", "io", "nuclei", "plotting", "reference"}

__all__ = ["__version__", *_LAZY, *sorted(_SUBMODULES)]

if TYPE_CHECKING:  # pragma: no cover
    from . import datasets, io, model, nuclei, plotting, reference  # noqa: F401
    from .model import Cell2location  # noqa: F401
    from .reference import RegressionModel  # noqa: F401


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"napari_cell2location.{name}")
    raise AttributeError(f"module 'napari_cell2location' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
