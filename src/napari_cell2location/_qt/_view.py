"""What the user sees first: a window sized to the screen, room for the dock, the view framed on the tissue."""

from __future__ import annotations

#: fraction of the screen's free area the demo's window takes
WINDOW_FRACTION = 0.92
#: width the canvas keeps beside napari's layer panel and the Cell2location dock (px)
MIN_CANVAS_WIDTH = 640
#: napari's layer controls and layer list on the left (px, about)
LEFT_PANEL_WIDTH = 300


def _screen_area():
    from qtpy.QtWidgets import QApplication

    screen = QApplication.primaryScreen()
    return None if screen is None else screen.availableGeometry()


def fit_window_to_screen(viewer, fraction: float = WINDOW_FRACTION) -> None:
    """Size the viewer's window to ``fraction`` of the screen's free area, centred."""
    area = _screen_area()
    if area is None:
        return
    width, height = int(area.width() * fraction), int(area.height() * fraction)
    left, top = area.x() + (area.width() - width) // 2, area.y() + (area.height() - height) // 2
    viewer.window.set_geometry(left, top, width, height)


def make_room_for_dock(viewer, dock_width: int) -> None:
    """Widen the window to :data:`WINDOW_FRACTION` of the screen (or more, within it), centred, when a dock
    of ``dock_width`` would squeeze the canvas below :data:`MIN_CANVAS_WIDTH`."""
    left, top, width, height = viewer.window.geometry()
    needed = LEFT_PANEL_WIDTH + dock_width + MIN_CANVAS_WIDTH
    area = _screen_area()
    if width >= needed or area is None:
        return
    width = min(max(needed, int(area.width() * WINDOW_FRACTION)), area.width())
    height = max(height, min(int(area.height() * WINDOW_FRACTION), area.height()))
    left = area.x() + (area.width() - width) // 2  # centred on the screen, as the demo's window
    top = area.y() + (area.height() - height) // 2
    viewer.window.set_geometry(left, top, width, height)


#: blank space around the spots when the view is framed on them (fraction of the canvas): the tissue
#: reaches about a spot pitch beyond the outermost spot centres
FRAME_MARGIN = 0.08


def spot_layers(viewer) -> list:
    """The visible layers that hold spots of a dataset (from the reader, the sample data or a fit)."""
    from ._state import context_of

    return [layer for layer in viewer.layers if layer.visible and context_of(layer) is not None]


def _fit_to_tissue(viewer) -> None:
    layers = spot_layers(viewer)
    if layers:  # the spots mark the tissue; the image may be a whole slide with fiducials and glass
        viewer.reset_view(layers=layers, margin=FRAME_MARGIN)
    else:
        viewer.reset_view()


def frame_tissue(viewer) -> None:
    """Fit the tissue, where the spots of every section are, to the canvas (every layer when no spots are
    shown), once Qt has laid the window out."""
    from qtpy.QtWidgets import QApplication

    QApplication.processEvents()  # the canvas gets its final size before the view is fitted to it
    _fit_to_tissue(viewer)


def frame_tissue_later(viewer) -> None:
    """:func:`frame_tissue` after the events being handled now (e.g. all layers of a dataset added)."""
    from qtpy.QtCore import QTimer

    QTimer.singleShot(0, lambda: _fit_to_tissue(viewer))
