"""Spot QC: colour spots by QC metrics, reconstruction and ELBO plots, and one spot's composition and genes."""

import logging

import napari.viewer
import numpy as np
from magicgui.widgets import ComboBox, Container, FloatSpinBox, Label, PushButton

from .._layers import feature_table, robust_limits, show_on_hover, value_colors
from ._mpl import MplCanvas
from ._state import SharedState, state_of

logger = logging.getLogger(__name__)

#: QC metric -> (label, colormap); reconstruction uses a reversed map so badly explained spots are bright
METRICS = {
    "total_counts": ("total counts", "viridis"),
    "total_cells": ("total estimated cells Σ_f w_sf", "viridis"),
    "detection_y_s": ("detection efficiency y_s", "viridis"),
    "reconstruction_r": ("reconstruction r (observed vs expected)", "plasma_r"),  # no black on the canvas
}
_N_TOP_GENES = 12
_N_HIST_SPOTS = 1000
_N_TYPES_SHOWN = 12


class SpotQCWidget(Container):
    """Visual quality control of a fit.

    Parameters
    ----------
    viewer : napari.viewer.Viewer
        The viewer.
    state : SharedState, optional
        Gives the last fit and its results layer (default: the viewer's).
    """

    def __init__(self, viewer: napari.viewer.Viewer, state: SharedState | None = None):
        super().__init__(labels=True)
        self.viewer = viewer
        self.state = state if state is not None else state_of(viewer)
        self.metric = ComboBox(label="colour spots by", choices=[(v[0], k) for k, v in METRICS.items()])
        self.show_button = PushButton(text="Colour spots")
        self.worst_pct = FloatSpinBox(label="worst %", value=5.0, min=0.1, max=100.0, step=1.0)
        self.worst_button = PushButton(text="Select worst-explained spots")
        self.info = Label(label="", value="Run a fit to see QC.")
        self.overview = MplCanvas(
            height=2.3, ncols=2, width=5, placeholder="observed vs expected counts and the loss appear here after a fit"
        )
        self.spot_label = Label(label="", value="Click a spot of the results layer.")
        self.spot_plot = MplCanvas(
            height=2.3, ncols=2, width=5, placeholder="click a spot of the results layer: its cell types and top genes"
        )
        self.extend(
            [self.metric, self.show_button, self.worst_pct, self.worst_button, self.info, self.overview,
             self.spot_label, self.spot_plot]
        )  # fmt: skip
        self.show_button.changed.connect(lambda _v=None: self.color_by(self.metric.value))
        self.worst_button.changed.connect(lambda _v=None: self.select_worst(self.worst_pct.value))
        self.state.fitted.connect(self._on_fitted)
        self.state.data_changed.connect(self._on_data)
        self._hooked = None
        if self.state.result is not None:
            self._on_fitted(self.state.result)
        else:
            self._on_data()

    # ------------------------------------------------------------------ after a fit
    def layer(self):
        """The layer QC works on: the last fit's results, else the chosen spots when they hold saved
        results with their QC (an opened ``.zarr`` / ``.h5ad`` written after a fit)."""
        if self.state.results_layer is not None:
            return self.state.results_layer
        spots = self.state.spots_layer
        table = None if spots is None else feature_table(spots)
        return spots if table is not None and "reconstruction_r" in table else None

    def _hook(self, layer):
        if layer is not None and self._hooked is not layer:
            layer.mouse_drag_callbacks.append(self._on_click)
            self._hooked = layer

    def _summarise(self, r: np.ndarray) -> str:
        from ..model import worst_explained

        worst, p5 = worst_explained(r, 5.0)
        return (
            f"median reconstruction r {np.nanmedian(r):.2f}; {len(worst)} spots at or below its 5th "
            f"percentile ({p5:.2f})"
        )

    def _on_fitted(self, result):
        self.draw_overview()
        self._hook(self.state.results_layer)
        self.info.value = self._summarise(result.qc["reconstruction_r"].to_numpy())

    def _on_data(self):
        """Spots chosen without a fit in this session: saved results bring their QC (colour, select);
        the plots need the model."""
        if self.state.result is not None:
            return
        layer = self.layer()
        if layer is None:
            self.info.value = "Run a fit to see QC."
            return
        self._hook(layer)
        self.overview.show_placeholder("these plots need the model: load it in the Fit tab (Load model)")
        r = feature_table(layer)["reconstruction_r"].to_numpy(dtype=float)
        self.info.value = f"QC saved with these results: {self._summarise(r)}. Load the model (Fit tab) for plots."

    def draw_overview(self):
        """The model's QC figure: reconstruction 2D histogram (observed vs expected, log) and the ELBO; drawn
        when the tab is in sight (a fit ends with the Fit tab showing: the viewer need not wait for it)."""
        self.overview.plot(self._plot_overview)

    def _plot_overview(self):
        mod = self.state.model
        if mod is None:
            return
        self.overview.figure.clear()
        mod.plot_QC(fig=self.overview.figure, use_n_obs=_N_HIST_SPOTS)
        for ax in self.overview.axes:
            ax.title.set_fontsize(9)
            ax.xaxis.label.set_fontsize(8)
            ax.yaxis.label.set_fontsize(8)
            ax.tick_params(labelsize=7)

    # ------------------------------------------------------------------ spot colouring / selection
    def color_by(self, metric: str):
        """Colour the results layer by a QC metric (robust limits)."""
        layer = self.layer()
        table = None if layer is None else feature_table(layer)
        if table is None or metric not in table:
            self.info.value = "No QC yet: run a fit, or open results saved after one."
            return False
        if self.metric.value != metric:
            with self.metric.changed.blocked():
                self.metric.value = metric
        values = table[metric].to_numpy(dtype=float)
        limits = robust_limits(values)
        layer.face_color = value_colors(values, METRICS[metric][1], limits)
        show_on_hover(layer, ("qc", metric))
        self.info.value = f"{METRICS[metric][0]}: {limits[0]:.3g} … {limits[1]:.3g}"
        return True

    def select_worst(self, percent: float = 5.0) -> np.ndarray:
        """Select the spots with the lowest reconstruction r (worst explained) in the results layer."""
        from ..model import worst_explained

        layer = self.layer()
        table = None if layer is None else feature_table(layer)
        if table is None or "reconstruction_r" not in table:
            self.info.value = "No QC yet: run a fit, or open results saved after one."
            return np.zeros(0, int)
        worst, cut = worst_explained(table["reconstruction_r"].to_numpy(dtype=float), percent)
        layer.selected_data = set(worst.tolist())
        self.viewer.layers.selection.active = layer
        self.info.value = f"selected {len(worst)} spots with reconstruction r ≤ {cut:.2f}"
        return worst

    # ------------------------------------------------------------------ one spot
    def _on_click(self, layer, event):
        index = layer.get_value(event.position, world=True)
        if index is not None:
            self.show_spot(int(index))

    def show_spot(self, index: int):
        """Bar charts of spot ``index``: cell-type composition (mean w_sf) and top genes observed vs expected."""
        from ..model import spot_detail

        mod, layer = self.state.model, self.layer()
        if layer is None:
            return
        if mod is None:
            self.spot_label.value = "Load the model in the Fit tab to see a spot's cell types and genes."
            return
        spot = spot_detail(mod, index, _N_TOP_GENES)
        self.spot_plot.clear()
        ax1, ax2 = self.spot_plot.axes
        shown = spot["abundance"].iloc[:_N_TYPES_SHOWN][::-1]
        ax1.barh(shown.index.astype(str), shown.to_numpy(), color="tab:purple")
        ax1.set_title("cell abundance (mean w_sf)", fontsize=9)
        ax1.tick_params(labelsize=7)
        pos = np.arange(len(spot["genes"]))
        ax2.barh(pos - 0.2, spot["observed"], height=0.4, label="observed", color="tab:blue")
        ax2.barh(pos + 0.2, spot["expected"], height=0.4, label="expected", color="tab:orange")
        ax2.set_yticks(pos, spot["genes"])
        ax2.invert_yaxis()
        ax2.tick_params(labelsize=7)
        ax2.legend(fontsize=7)
        ax2.set_title("top genes", fontsize=9)
        self.spot_plot.draw()
        feats = feature_table(layer).iloc[index]
        r = feats.get("reconstruction_r", np.nan)
        self.spot_label.value = (
            f"spot {feats.get('barcode', index)}: {feats.get('total_counts', np.nan):.0f} counts, "
            f"{spot['total_cells']:.1f} cells, r = {r:.2f}"
        )
        self.current_spot = index
