"""Qt side of the plugin (the only place qtpy / magicgui / napari.qt are imported): the dock widgets.

Each widget is a thin magicgui Container: it collects settings, runs a core job generator in a worker
(:mod:`._worker`) and shows the result; the widgets of a viewer talk through one :class:`SharedState`.
"""

from ._data_widget import DataWidget
from ._dock import Cell2locationDock
from ._fit_widget import FitWidget
from ._qc_widget import SpotQCWidget
from ._results_widget import ResultsWidget
from ._state import SharedState, state_of

__all__ = ["Cell2locationDock", "DataWidget", "FitWidget", "ResultsWidget", "SharedState", "SpotQCWidget", "state_of"]
