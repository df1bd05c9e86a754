"""A small matplotlib canvas for dock widgets, and a fast colour bar label."""

import numpy as np
from magicgui.widgets import Container
from qtpy.QtGui import QImage, QPixmap
from qtpy.QtWidgets import QLabel, QSizePolicy


def _canvas_class():
    from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg

    class Canvas(FigureCanvasQTAgg):
        """Qt Agg canvas whose queued redraw is dropped when the widget is gone (a viewer closed right after
        a plot was asked for), instead of raising from Qt's event loop."""

        def draw(self):
            # matplotlib's queued redraw catches and prints what draw() raises, so the widget being gone
            # ("wrapped C/C++ object ... has been deleted") is dropped here, where it is raised
            try:
                super().draw()
            except RuntimeError as err:
                if "has been deleted" not in str(err):
                    raise

        def showEvent(self, event):  # noqa: N802 - Qt's name
            super().showEvent(event)
            plot, self.plot_when_shown = self.plot_when_shown, None
            if plot is not None:
                plot()
            if self.redraw_when_shown or plot is not None:
                self.redraw_when_shown = False
                self.draw_idle()

    Canvas.redraw_when_shown = False
    Canvas.plot_when_shown = None
    return Canvas


class MplCanvas(Container):
    """A magicgui Container holding one matplotlib figure (Qt Agg canvas).

    Until something is plotted it shows a line of text saying what will appear there (``placeholder``),
    not empty axes.

    Parameters
    ----------
    height : float
        Figure height in inches.
    ncols : int
        Number of axes side by side.
    placeholder : str
        What the canvas says before anything is plotted.
    """

    def __init__(self, height: float = 2.2, ncols: int = 1, width: float = 4.0, placeholder: str = ""):
        super().__init__(labels=False)
        from matplotlib.figure import Figure

        self.figure = Figure(figsize=(width, height), dpi=90, layout="constrained")
        self.canvas = _canvas_class()(self.figure)
        self.canvas.setMinimumHeight(int(height * 80))
        self.canvas.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
        self.native.layout().addWidget(self.canvas)
        self.ncols = int(ncols)
        self.show_placeholder(placeholder)

    @property
    def axes(self) -> list:
        """The figure's axes: those of a plot drawn on the figure, else ``ncols`` new ones (a placeholder's
        text goes)."""
        if not self.figure.axes:
            self.figure.clear()
            for i in range(self.ncols):
                self.figure.add_subplot(1, self.ncols, i + 1)
        return self.figure.axes

    def plot(self, plot) -> None:
        """Call ``plot()`` (which draws on :attr:`figure`) and redraw, now when the canvas is in sight, else
        when it is next shown (a plot on another tab costs nothing until it is looked at)."""
        if self.canvas.isVisible():
            self.canvas.plot_when_shown = None
            plot()
            self.draw()
        else:
            self.canvas.plot_when_shown = plot

    def show_placeholder(self, text: str) -> None:
        """Show ``text`` (e.g. "the loss appears here during a fit") instead of empty axes."""
        self.canvas.plot_when_shown = None
        self.figure.clear()
        if text:
            self.figure.text(0.5, 0.5, text, ha="center", va="center", wrap=True, color="0.45", fontsize=9)
        self.draw()

    def clear(self):
        for ax in self.axes:
            ax.clear()

    def draw(self):
        """Redraw at the next turn of the event loop; a canvas out of sight (another tab) is redrawn when it
        is shown instead: drawing a figure with its layout takes 0.1-0.2 s of the viewer's thread, and a fit's
        end updates plots on several tabs at once."""
        if self.canvas.isVisible():
            self.canvas.draw_idle()
        else:
            self.canvas.redraw_when_shown = True


class ColorBar(QLabel):
    """A colour bar drawn as a pixmap (no matplotlib redraw, so switching stays instant)."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.setMinimumHeight(14)
        self.setMaximumHeight(14)
        self.setScaledContents(True)
        self._cmap = None

    def set_colormap(self, cmap: str):
        if cmap == self._cmap:
            return
        from matplotlib import colormaps

        rgba = (colormaps[cmap](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.uint8)
        strip = np.ascontiguousarray(np.repeat(rgba[None], 8, axis=0))
        self._image = QImage(strip.data, 256, 8, 3 * 256, QImage.Format.Format_RGB888).copy()
        self.setPixmap(QPixmap.fromImage(self._image))
        self._cmap = cmap
