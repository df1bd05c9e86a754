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
    """Widen the window (within the screen) when a dock of ``dock_width`` would squeeze the canvas below
    :data:`MIN_CANVAS_WIDTH`."""
    left, top, width, height = viewer.window.geometry()
    needed = LEFT_PANEL_WIDTH + dock_width + MIN_CANVAS_WIDTH
    area = _screen_area()
    if width >= needed or area is None:
        return
    width = min(needed, area.width())
    height = max(height, min(int(area.height() * WINDOW_FRACTION), area.height()))
    left = max(area.x(), min(left, area.x() + area.width() - width))
    top = max(area.y(), min(top, area.y() + area.height() - height))
    viewer.window.set_geometry(left, top, width, height)


def frame_tissue(viewer) -> None:
    """Fit every layer (the sections' H&E and spots) to the canvas, once Qt has laid the window out."""
    from qtpy.QtWidgets import QApplication

    QApplication.processEvents()  # the canvas gets its final size before the view is fitted to it
    viewer.reset_view()


def frame_tissue_later(viewer) -> None:
    """:func:`frame_tissue` after the events being handled now (e.g. all layers of a dataset added)."""
    from qtpy.QtCore import QTimer

    QTimer.singleShot(0, viewer.reset_view)
