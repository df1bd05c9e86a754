"""Spot QC: colour spots by QC metrics, reconstruction and ELBO plots, and one spot's composition and genes."""

import logging

import napari.viewer
import numpy as np
from magicgui.widgets import ComboBox, Container, FloatSpinBox, Label, PushButton

from .._layers import cell_types, robust_limits, value_colors
from ._mpl import MplCanvas
from ._session import get_session

logger = logging.getLogger(__name__)

#: QC metric -> (label, colormap); reconstruction uses a reversed map so badly explained spots are bright
METRICS = {
    "total_counts": ("total counts", "viridis"),
    "total_cells": ("total estimated cells Σ_f w_sf", "viridis"),
    "detection_y_s": ("detection efficiency y_s", "viridis"),
    "reconstruction_r": ("reconstruction r (observed vs expected)", "magma_r"),
}
_N_TOP_GENES = 12
_N_HIST_SPOTS = 1000


class SpotQCWidget(Container):
    """Visual quality control of a fit.

    Parameters
    ----------
    viewer : napari.viewer.Viewer
        The viewer; uses the session's last fit and results layer.
    """

    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__(labels=True)
        self.viewer = viewer
        self.session = get_session(viewer)
        self.session.widgets["qc"] = self
        self.metric = ComboBox(label="colour spots by", choices=[(v[0], k) for k, v in METRICS.items()])
        self.show_button = PushButton(text="Colour spots")
        self.worst_pct = FloatSpinBox(label="worst %", value=5.0, min=0.1, max=100.0, step=1.0)
        self.worst_button = PushButton(text="Select worst-explained spots")
        self.info = Label(label="", value="Run a fit to see QC.")
        self.overview = MplCanvas(height=2.3, ncols=2, width=5)
        self.spot_label = Label(label="", value="Click a spot of the results layer.")
        self.spot_plot = MplCanvas(height=2.3, ncols=2, width=5)
        self.extend(
            [self.metric, self.show_button, self.worst_pct, self.worst_button, self.info, self.overview,
             self.spot_label, self.spot_plot]
        )  # fmt: skip
        self.show_button.changed.connect(lambda _v=None: self.color_by(self.metric.value))
        self.worst_button.changed.connect(lambda _v=None: self.select_worst(self.worst_pct.value))
        self.session.fitted.connect(self._on_fitted)
        self._hooked = None
        if self.session.model is not None:
            self._on_fitted(self.session.model)

    # ------------------------------------------------------------------ after a fit
    def _on_fitted(self, mod):
        self.draw_overview()
        layer = self.session.results_layer
        if layer is not None and self._hooked is not layer:
            layer.mouse_drag_callbacks.append(self._on_click)
            self._hooked = layer
        qc = self.session.qc
        if qc is not None:
            r = qc["reconstruction_r"].to_numpy()
            p5 = np.nanpercentile(r, 5)
            self.info.value = (
                f"median reconstruction r {np.nanmedian(r):.2f}; {int(np.sum(r < p5))} spots below its 5th "
                f"percentile ({p5:.2f})"
            )

    def draw_overview(self):
        """Reconstruction 2D histogram (observed vs expected, log) and the ELBO history."""
        from ..plotting import plot_history, plot_reconstruction

        mod = self.session.model
        if mod is None:
            return
        self.overview.clear()
        ax1, ax2 = self.overview.axes
        rng = np.random.default_rng(0)
        ind = np.sort(rng.choice(mod.n_obs, size=min(_N_HIST_SPOTS, mod.n_obs), replace=False))
        mu = mod.compute_expected(mod.samples.get("post_sample_means"), ind_x=ind)["mu"]
        x = mod.X[ind]
        x = x.toarray() if hasattr(x, "toarray") else np.asarray(x)
        plot_reconstruction(x, mu, ax=ax1, bins=40)
        plot_history(mod.history_, ax=ax2)
        for ax in (ax1, ax2):
            ax.title.set_fontsize(9)
            ax.xaxis.label.set_fontsize(8)
            ax.yaxis.label.set_fontsize(8)
            ax.tick_params(labelsize=7)
        self.overview.draw()

    # ------------------------------------------------------------------ spot colouring / selection
    def color_by(self, metric: str):
        """Colour the results layer by a QC metric (robust limits)."""
        layer = self.session.results_layer
        if layer is None or metric not in layer.features:
            return False
        if self.metric.value != metric:
            with self.metric.changed.blocked():
                self.metric.value = metric
        values = layer.features[metric].to_numpy(dtype=float)
        limits = robust_limits(values)
        layer.face_color = value_colors(values, METRICS[metric][1], limits)
        layer.metadata["shown"] = ("qc", metric)
        self.info.value = f"{METRICS[metric][0]}: {limits[0]:.3g} … {limits[1]:.3g}"
        return True

    def select_worst(self, percent: float = 5.0) -> np.ndarray:
        """Select the spots with the lowest reconstruction r (worst explained) in the results layer."""
        layer = self.session.results_layer
        if layer is None or "reconstruction_r" not in layer.features:
            return np.zeros(0, int)
        r = layer.features["reconstruction_r"].to_numpy(dtype=float)
        cut = np.nanpercentile(r, percent)
        worst = np.flatnonzero(np.nan_to_num(r, nan=-np.inf) <= cut)
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
        mod = self.session.model
        layer = self.session.results_layer
        if mod is None or layer is None:
            return
        adata = mod.adata
        types = cell_types(adata)
        means = np.asarray(adata.obsm["means_cell_abundance_w_sf"])[index]
        mu = mod.compute_expected(mod.samples.get("post_sample_means"), ind_x=[index])["mu"][0]
        x = mod.X[index]
        x = np.asarray(x.toarray() if hasattr(x, "toarray") else x).ravel()
        top = np.argsort(-(x + mu))[:_N_TOP_GENES]
        self.spot_plot.clear()
        ax1, ax2 = self.spot_plot.axes
        order = np.argsort(means)[::-1][:12][::-1]
        ax1.barh(np.asarray(types)[order], means[order], color="tab:purple")
        ax1.set_title("cell abundance (mean w_sf)", fontsize=9)
        ax1.tick_params(labelsize=7)
        pos = np.arange(len(top))
        ax2.barh(pos - 0.2, x[top], height=0.4, label="observed", color="tab:blue")
        ax2.barh(pos + 0.2, mu[top], height=0.4, label="expected", color="tab:orange")
        ax2.set_yticks(pos, np.asarray(mod.var_names)[top])
        ax2.invert_yaxis()
        ax2.tick_params(labelsize=7)
        ax2.legend(fontsize=7)
        ax2.set_title("top genes", fontsize=9)
        self.spot_plot.draw()
        feats = layer.features.iloc[index]
        r = feats.get("reconstruction_r", np.nan)
        self.spot_label.value = (
            f"spot {feats.get('barcode', index)}: {feats.get('total_counts', np.nan):.0f} counts, "
            f"{means.sum():.1f} cells, r = {r:.2f}"
        )
        self.current_spot = index
