"""The Cell2location dock: Reference, Data, Cells per spot, Fit, Results and Spot QC as tabs."""

import napari.viewer
from qtpy.QtWidgets import QScrollArea, QTabWidget, QVBoxLayout, QWidget

from ._cells_widget import CellsPerSpotWidget
from ._data_widget import DataWidget
from ._fit_widget import FitWidget
from ._qc_widget import SpotQCWidget
from ._reference_widget import ReferenceWidget
from ._results_widget import ResultsWidget
from ._session import get_session


class Cell2locationDock(QWidget):
    """All Cell2location steps in one dock, one tab per step.

    Parameters
    ----------
    napari_viewer : napari.viewer.Viewer
        The viewer.

    Attributes
    ----------
    reference, data, cells, fit, results, qc : magicgui.widgets.Container
        The step widgets.
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.session = get_session(napari_viewer)
        self.tabs = QTabWidget()
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.tabs)
        self.data = DataWidget(napari_viewer)
        self.fit = FitWidget(napari_viewer)
        self.results = ResultsWidget(napari_viewer)
        self.qc = SpotQCWidget(napari_viewer)
        for title, widget in (("Data", self.data), ("Fit", self.fit), ("Results", self.results), ("Spot QC", self.qc)):
            self.add_tab(widget, title)
        self.cells = CellsPerSpotWidget(napari_viewer)
        self.add_tab(self.cells, "Cells per spot", index=1)  # between Data and Fit: it sets the fit's N prior
        self.reference = ReferenceWidget(napari_viewer)
        self.add_tab(self.reference, "Reference", index=0)  # first step: signatures from single cells
        self.session.widgets["dock"] = self
        self.session.fitted.connect(lambda _mod: self.tabs.setCurrentIndex(self.tabs.indexOf(self._pages["Results"])))

    def add_tab(self, widget, title: str, index: int | None = None):
        """Add a widget (magicgui or Qt) as a scrollable tab; ``index`` places it (default: last).

        Returns the tab's page.
        """
        native = getattr(widget, "native", widget)
        if native.layout() is not None:
            native.layout().addStretch(1)  # keep the controls together at the top of the tab
        page = QScrollArea()
        page.setWidgetResizable(True)
        page.setWidget(native)
        if not hasattr(self, "_pages"):
            self._pages = {}
        self._pages[title] = page
        if index is None:
            self.tabs.addTab(page, title)
        else:
            self.tabs.insertTab(index, page, title)
        return page

    def show_tab(self, title: str):
        self.tabs.setCurrentWidget(self._pages[title])
