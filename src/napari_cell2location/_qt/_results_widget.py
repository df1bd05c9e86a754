"""Results: recolour the spots by one cell type's statistic, or show several cell types at once."""

import logging

import napari.layers
import napari.viewer
import numpy as np
from magicgui.widgets import ComboBox, Container, FloatSpinBox, Label, RadioButtons, Select

from .._contract import EXPORTED_SUMMARIES
from .._layers import (
    COMPOSITE_COLORS,
    composite_colors,
    feature_name,
    feature_table,
    robust_limits,
    show_on_hover,
    value_colors,
)
from ._mpl import ColorBar
from ._state import SharedState, state_of

logger = logging.getLogger(__name__)

CMAPS = ("magma", "viridis", "inferno", "plasma", "cividis", "Reds", "Blues", "turbo")
SINGLE, COMPOSITE = "one cell type", "composite"


def result_stats_and_types(layer) -> tuple[list[str], list[str]]:
    """Statistics and cell types present as ``'{stat} {cell_type}'`` features of ``layer``."""
    if layer is None or not hasattr(layer, "features"):
        return [], []
    cols = [str(c) for c in feature_table(layer).columns]
    stats, types = [], []
    for stat in EXPORTED_SUMMARIES:
        names = [c[len(stat) + 1 :] for c in cols if c.startswith(f"{stat} ")]
        if names:
            stats.append(stat)
            if not types:
                types = names
    return stats, types


class ResultsWidget(Container):
    """Choose what colours the results layer: one cell type and statistic, or a composite of several.

    Parameters
    ----------
    viewer : napari.viewer.Viewer
        The viewer whose Points layers with abundance features are offered.
    state : SharedState, optional
        Tells when a fit finished (default: the viewer's).
    """

    def __init__(self, viewer: napari.viewer.Viewer, state: SharedState | None = None):
        super().__init__(labels=True)
        self.viewer = viewer
        self.state = state if state is not None else state_of(viewer)
        self.layer = ComboBox(label="layer", choices=self._layer_choices, nullable=True)
        self.mode = RadioButtons(label="view", choices=[SINGLE, COMPOSITE], value=SINGLE, orientation="horizontal")
        # choices are callables of the current layer, so a container-wide reset_choices (napari calls it on
        # docked magicgui widgets) keeps them
        self.cell_type = ComboBox(label="cell type", choices=self._type_choices)
        self.stat = ComboBox(label="statistic", choices=self._stat_choices)
        self.cmap = ComboBox(label="colormap", choices=list(CMAPS), value="magma")
        self.lo_pct = FloatSpinBox(label="low percentile", value=1.0, min=0.0, max=100.0, step=1.0)
        self.hi_pct = FloatSpinBox(label="high percentile", value=99.0, min=0.0, max=100.0, step=1.0)
        self.colorbar = ColorBar()
        self.limits = Label(label="", value="")
        self.composite_types = Select(label=f"composite (≤{len(COMPOSITE_COLORS)})", choices=self._type_choices)
        self.composite_types.native.setMaximumHeight(120)
        self.legend = Label(label="", value="")
        self.extend(
            [self.layer, self.mode, self.cell_type, self.stat, self.cmap, self.lo_pct, self.hi_pct, self.limits,
             self.composite_types, self.legend]
        )  # fmt: skip
        self.native.layout().insertWidget(8, self.colorbar)
        for w in (self.cell_type, self.stat, self.cmap, self.lo_pct, self.hi_pct, self.mode, self.composite_types):
            w.changed.connect(self.recolor)
        self.layer.changed.connect(self._on_layer)
        for ev in (viewer.layers.events.inserted, viewer.layers.events.removed):
            ev.connect(self._refresh)
        self.state.fitted.connect(lambda _result: self._refresh(select=self.state.results_layer))
        self._refresh()

    def _layer_choices(self, _widget=None):
        return [
            (lyr.name, lyr)
            for lyr in self.viewer.layers
            if isinstance(lyr, napari.layers.Points) and result_stats_and_types(lyr)[1]
        ]

    def _type_choices(self, _widget=None):
        return result_stats_and_types(getattr(self, "layer", None) and self.layer.value)[1]

    def _stat_choices(self, _widget=None):
        return result_stats_and_types(getattr(self, "layer", None) and self.layer.value)[0]

    def _refresh(self, _event=None, select=None):
        self.layer.reset_choices()
        if select is not None and select in [c[1] for c in self._layer_choices()]:
            self.layer.value = select
        elif self.layer.value is None and self.layer.choices:
            self.layer.value = self.layer.choices[-1]
        self._on_layer(self.layer.value)

    def _on_layer(self, layer):
        stats, types = result_stats_and_types(layer)
        for w in (self.cell_type, self.stat, self.composite_types):
            w.changed.block()
        try:
            for w in (self.cell_type, self.stat, self.composite_types):
                w.reset_choices()
            if "q05" in stats:
                self.stat.value = "q05"
            self.composite_types.value = types[: min(3, len(types))]
        finally:
            for w in (self.cell_type, self.stat, self.composite_types):
                w.changed.unblock()
        self.recolor()

    # ------------------------------------------------------------------ colouring
    def show(self, cell_type: str | None = None, stat: str | None = None):
        """Colour by ``stat`` of ``cell_type`` (one recolouring)."""
        for w in (self.cell_type, self.stat, self.mode):
            w.changed.block()
        try:
            self.mode.value = SINGLE
            if stat is not None:
                self.stat.value = stat
            if cell_type is not None:
                self.cell_type.value = cell_type
        finally:
            for w in (self.cell_type, self.stat, self.mode):
                w.changed.unblock()
        self.recolor()

    def show_composite(self, cell_types: list[str], stat: str | None = None):
        """Show up to six cell types at once, each in its own colour (additive)."""
        if len(cell_types) > len(COMPOSITE_COLORS):
            raise ValueError(f"at most {len(COMPOSITE_COLORS)} cell types at once")
        for w in (self.composite_types, self.stat, self.mode):
            w.changed.block()
        try:
            self.composite_types.value = list(cell_types)
            self.mode.value = COMPOSITE
            if stat is not None:
                self.stat.value = stat
        finally:
            for w in (self.composite_types, self.stat, self.mode):
                w.changed.unblock()
        self.recolor()

    def recolor(self, _value=None):
        """Apply the current choice to the layer's face colours (one assignment of an (n, 4) array)."""
        layer = self.layer.value
        if layer is None or not self.stat.value:
            return
        feats = feature_table(layer)
        pct = (float(self.lo_pct.value), float(self.hi_pct.value))
        if pct[1] <= pct[0]:
            pct = (pct[0], min(100.0, pct[0] + 1.0))
        composite = self.mode.value == COMPOSITE
        for w in (self.cell_type, self.cmap):
            w.visible = not composite
        self.colorbar.setVisible(not composite)
        if composite:
            chosen = list(self.composite_types.value)[: len(COMPOSITE_COLORS)]
            if not chosen:
                return
            values = np.stack([feats[feature_name(self.stat.value, ct)].to_numpy() for ct in chosen], axis=1)
            limits = [robust_limits(values[:, j], pct) for j in range(values.shape[1])]
            layer.face_color = composite_colors(values, limits=limits)
            self.legend.value = "  ".join(
                f'<span style="color:{_hex(COMPOSITE_COLORS[j])}">■ {ct}</span>' for j, ct in enumerate(chosen)
            )
            self.limits.value = f"{self.stat.value}, each scaled to its {pct[0]:g}-{pct[1]:g}th percentiles"
            show_on_hover(layer, (self.stat.value, tuple(chosen)))
            return
        if not self.cell_type.value:
            return
        values = feats[feature_name(self.stat.value, self.cell_type.value)].to_numpy()
        lo, hi = robust_limits(values, pct)
        layer.face_color = value_colors(values, self.cmap.value, (lo, hi))
        self.colorbar.set_colormap(self.cmap.value)
        self.limits.value = f"{self.stat.value} {self.cell_type.value}: {lo:.3g} … {hi:.3g} cells"
        self.legend.value = ""
        show_on_hover(layer, (self.stat.value, self.cell_type.value))


def _hex(rgb) -> str:
    return "#" + "".join(f"{int(round(255 * c)):02x}" for c in rgb)
