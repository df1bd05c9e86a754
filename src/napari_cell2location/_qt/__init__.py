"""Qt side of the plugin (the only place qtpy / magicgui / napari.qt are imported): the dock widgets."""

from ._data_widget import DataWidget
from ._dock import Cell2locationDock
from ._fit_widget import FitWidget
from ._qc_widget import SpotQCWidget
from ._results_widget import ResultsWidget
from ._session import Session, get_session

__all__ = ["Cell2locationDock", "DataWidget", "FitWidget", "ResultsWidget", "Session", "SpotQCWidget", "get_session"]
