"""The Cell2location dock: Reference, Data, Cells per spot, Fit, Results and Spot QC as tabs."""

import napari.viewer
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QComboBox, QLabel, QScrollArea, QTabWidget, QVBoxLayout, QWidget

from ._cells_widget import CellsPerSpotWidget
from ._data_widget import DataWidget
from ._fit_widget import FitWidget
from ._qc_widget import SpotQCWidget
from ._reference_widget import ReferenceWidget
from ._results_widget import ResultsWidget
from ._state import SharedState, context_of, state_of
from ._view import frame_tissue_later, make_room_for_dock

#: the dock's width: its controls side by side without wrapping (px)
DOCK_WIDTH = 460

#: the tabs, in order: one step of the workflow each
TABS = (
    ("Reference", ReferenceWidget),
    ("Data", DataWidget),
    ("Cells per spot", CellsPerSpotWidget),
    ("Fit", FitWidget),
    ("Results", ResultsWidget),
    ("Spot QC", SpotQCWidget),
)


def fit_to_width(native) -> None:
    """Let a widget's contents narrow to the dock: labels wrap, drop-downs shrink to about 12 characters
    (their lists still show whole names)."""
    for label in native.findChildren(QLabel):
        if label.pixmap() is None or label.pixmap().isNull():
            label.setWordWrap(True)
    for combo in native.findChildren(QComboBox):
        combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        combo.setMinimumContentsLength(12)


class Cell2locationDock(QWidget):
    """All Cell2location steps in one dock, one tab per step, sharing one :class:`SharedState`.

    Parameters
    ----------
    napari_viewer : napari.viewer.Viewer
        The viewer.
    state : SharedState, optional
        What the tabs share (default: the viewer's, so widgets opened on their own join in).

    Attributes
    ----------
    reference, data, cells, fit, results, qc : magicgui.widgets.Container
        The step widgets.
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer, state: SharedState | None = None):
        super().__init__()
        self.viewer = napari_viewer
        self.state = state if state is not None else state_of(napari_viewer)
        self.tabs = QTabWidget()
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.tabs)
        self._pages: dict = {}
        widgets = {}
        for title, cls in TABS:
            widgets[title] = cls(napari_viewer, state=self.state)
            self.add_tab(widgets[title], title)
        self.reference, self.data, self.cells = widgets["Reference"], widgets["Data"], widgets["Cells per spot"]
        self.fit, self.results, self.qc = widgets["Fit"], widgets["Results"], widgets["Spot QC"]
        self.state.tab_requested.connect(self.show_tab)
        self.state.fitted.connect(lambda _result: self.show_tab("Results"))
        self.setMinimumWidth(DOCK_WIDTH)
        self._shown_once = False
        napari_viewer.layers.events.inserted.connect(self._on_layer_added)

    def showEvent(self, event):  # noqa: N802 - Qt's name
        """The first time the dock appears: make room for it and frame the tissue in what is left."""
        super().showEvent(event)
        if not self._shown_once:
            self._shown_once = True
            make_room_for_dock(self.viewer, DOCK_WIDTH)
            frame_tissue_later(self.viewer)

    def _on_layer_added(self, event):
        """A dataset's spots were added (by the reader or the sample data): frame all its sections."""
        if context_of(event.value) is not None:
            frame_tissue_later(self.viewer)

    def add_tab(self, widget, title: str):
        """Add a widget (magicgui or Qt) as a tab that scrolls up and down and fits the dock's width: its
        texts wrap and its drop-downs may shrink, so nothing is cut at the dock's edge; returns the page."""
        native = getattr(widget, "native", widget)
        if native.layout() is not None:
            native.layout().addStretch(1)  # keep the controls together at the top of the tab
        fit_to_width(native)
        page = QScrollArea()
        page.setWidgetResizable(True)
        page.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        page.setWidget(native)
        self._pages[title] = page
        self.tabs.addTab(page, title)
        return page

    def show_tab(self, title: str):
        """Bring the tab called ``title`` to the front (unknown titles are ignored)."""
        if title in self._pages:
            self.tabs.setCurrentWidget(self._pages[title])
