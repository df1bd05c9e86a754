"""Cells per spot, the counting side: where layers lie in world coordinates, and nuclei counted per spot.

* geometry glue (pure functions): a 2-D layer's data -> world transform as napari composes it, and the spots'
  centres and radii in world coordinates (DESIGN.md rule 7: counting happens in world coordinates, so it is
  right at every image scale and for sections placed side by side), and their shape: round Visium spots, or
  Visium HD bins, counted as the axis-aligned squares they are drawn as (half the side where a spot has its
  radius; each nucleus in the one bin holding its centre);
* :class:`SpotCounting`, the count half of :class:`~._cells_widget.CellsPerSpotWidget` (a mixin): an empty
  layer to click nuclei into, the count per spot (in-tissue spots, or the selected ones for the manual
  protocol), the spots coloured by it, its histogram, and the suggested ``N_cells_per_location`` handed to
  the Fit tab.
"""

import numpy as np
import pandas as pd

from ..io._visium_hd import BIN_SIZE_KEY
from ._notify import tell
from ._state import context_of

#: Visium spot diameter (µm): sets µm per world unit from the spot size when the user gives no pixel size
SPOT_DIAMETER_UM = 55.0

#: feature column of the spots layer holding the count
COUNT_FEATURE = "nuclei_per_spot"
SCOPE_ALL = "all in-tissue spots"
SCOPE_SELECTED = "selected spots only (manual protocol)"
_UNCOUNTED_RGBA = (0.75, 0.75, 0.75, 0.35)


def data_to_world_matrix(layer) -> np.ndarray:
    """(3, 3) homogeneous matrix from a 2-D layer's data (row, col) to world (row, col).

    The layer's scale, translate, rotate and shear, then its affine, as napari composes them.
    """
    from napari.utils.transforms import CompositeAffine

    if layer.ndim != 2:
        raise ValueError(f"layer {layer.name!r} has {layer.ndim} spatial dimensions; only 2-D layers are supported")
    inner = CompositeAffine(
        scale=layer.scale, translate=layer.translate, rotate=layer.rotate, shear=layer.shear, ndim=2
    ).affine_matrix
    return np.asarray(layer.affine.affine_matrix, dtype=float) @ np.asarray(inner, dtype=float)


def to_world(layer, coords) -> np.ndarray:
    """(n, 2) data coordinates of ``layer`` -> (n, 2) world coordinates."""
    rc = np.asarray(coords, dtype=float).reshape(-1, 2)
    m = data_to_world_matrix(layer)
    return rc @ m[:2, :2].T + m[:2, 2]


def _linear_scale(layer) -> float:
    """World units per data unit of a layer (geometric mean of its two axes)."""
    return float(np.sqrt(abs(np.linalg.det(data_to_world_matrix(layer)[:2, :2]))))


def spot_geometry(spots_layer) -> tuple[np.ndarray, np.ndarray]:
    """Spot centres (n, 2) and radii (n,) in world coordinates (half the side of square bins)."""
    centres = to_world(spots_layer, spots_layer.data)
    size = np.asarray(spots_layer.size, dtype=float)
    size = np.broadcast_to(size.reshape(-1) if size.ndim else size, (len(centres),))
    return centres, 0.5 * size * _linear_scale(spots_layer)


def _scalefactors(spots_layer) -> list[dict]:
    from ..io import library_scalefactors

    ctx = context_of(spots_layer)
    if ctx is None:
        return []
    # a SpatialData's Visium HD bins carry their size in the layer's context, a scanpy table in its libraries
    return [*library_scalefactors(ctx.adata), *([ctx.extra] if BIN_SIZE_KEY in ctx.extra else [])]


def spot_shape_of(spots_layer) -> str:
    """``'square'`` when the layer's points are Visium HD bins (its table's scale factors carry a bin size, or
    every point is drawn as a square), else ``'circle'`` (round Visium spots)."""
    from ..nuclei import spot_shape

    if any(spot_shape(f) == "square" for f in _scalefactors(spots_layer)):
        return "square"
    symbols = {str(getattr(s, "value", s)) for s in np.atleast_1d(spots_layer.symbol)}
    return "square" if symbols == {"square"} else "circle"


def spot_size_um(spots_layer) -> float | None:
    """Diameter of a round spot (55 µm) or side of a square bin (its ``bin_size_um``) in µm; None for squares
    whose size the table does not say."""
    if spot_shape_of(spots_layer) == "circle":
        return SPOT_DIAMETER_UM
    sizes = [float(f[BIN_SIZE_KEY]) for f in _scalefactors(spots_layer) if f.get(BIN_SIZE_KEY)]
    return sizes[0] if sizes else None


def spot_word(shape: str | None) -> str:
    """What a counted place is called: ``'bin'`` for square bins, ``'spot'`` otherwise."""
    return "bin" if shape == "square" else "spot"


class SpotCounting:
    """The count half of the Cells-per-spot tab, mixed into :class:`~._cells_widget.CellsPerSpotWidget`.

    The widget builds what these methods read (``viewer``, ``state``, ``spots``, ``nuclei``, ``scope``,
    ``nucleus_diameter``, ``status``, ``summary``, ``plot``, ``use_mean_button``, ``use_per_spot_button``,
    ``um_per_world()`` and ``_refresh()``); they set ``nuclei_layer``, ``counts``, ``counted``,
    ``counted_shape`` and ``estimate``.
    """

    #: shape of the places last counted: 'circle' (Visium spots) or 'square' (Visium HD bins)
    counted_shape = None

    def _counted_mask(self, spots) -> np.ndarray | None:
        """(n_spots,) the spots counted: the selected ones (manual protocol) or the in-tissue ones. None, after
        a notification, when the manual protocol has no spot selected."""
        n = len(spots.data)
        if self.scope.value == SCOPE_SELECTED:
            mask = np.zeros(n, dtype=bool)
            mask[sorted(i for i in spots.selected_data if i < n)] = True
            if not mask.any():
                tell(
                    "error",
                    "Select the spots to count first.",
                    "In the spots layer: select mode, shift-click or drag; the original protocol counts 10-20 spots.",
                    self.status,
                )
                return None
            return mask
        ctx = context_of(spots)
        obs = ctx.adata.obs if ctx is not None else None
        if obs is not None and "in_tissue" in obs and len(obs) == n:
            return obs["in_tissue"].to_numpy().astype(bool)
        return np.ones(n, dtype=bool)

    # ------------------------------------------------------------------ manual nuclei
    def new_nuclei_layer(self, _value=None):
        """Add an empty Points layer in 'add' mode for clicking nuclei by hand; it becomes the nuclei layer."""
        px = self.um_per_world()
        size = float(self.nucleus_diameter.value) / px if px else 10.0
        layer = self.viewer.add_points(
            np.zeros((0, 2)), name="nuclei (manual)", size=size, face_color="transparent",
            border_color="#ffcc00", border_width=0.25, border_width_is_relative=True,
        )  # fmt: skip
        layer.current_size = size
        layer.mode = "add"
        self.viewer.layers.selection.active = layer
        self.nuclei_layer = layer
        self._refresh()
        self.nuclei.value = layer
        self.status.value = "click nuclei in the selected spots, then 'Count nuclei per spot'"
        return layer

    # ------------------------------------------------------------------ counting
    def count(self, _value=None):
        """Count the nuclei layer's points per spot, colour the spots, plot and suggest N_cells_per_location.

        Returns the :class:`~napari_cell2location.nuclei.NCellsEstimate` (None on error).
        """
        from ..nuclei import count_nuclei_per_spot, estimate_n_cells_per_location

        spots, points = self.spots.value, self.nuclei.value
        if spots is None:
            tell("error", "Choose the spots layer first.", "", self.status)
            return None
        if points is None:
            tell("error", "No nuclei layer yet.", "Detect nuclei, or add an empty layer and click them.", self.status)
            return None
        mask = self._counted_mask(spots)
        if mask is None:
            return None
        centres, radius = spot_geometry(spots)
        shape = spot_shape_of(spots)  # HD bins: the square each is drawn as, a nucleus in one bin only
        counts = count_nuclei_per_spot(to_world(points, points.data), centres, radius, shape=shape)
        try:
            est = estimate_n_cells_per_location(counts, mask, spot_shape=shape)
        except ValueError as err:
            tell("error", "Cannot estimate N cells per spot.", str(err), self.status)
            return None
        self.counts = np.where(mask, counts.astype(float), np.nan)
        self.counted = mask
        self.counted_shape = shape
        self.estimate = est
        self._colour_spots(spots)
        self._draw()
        manual = self.scope.value == SCOPE_SELECTED
        self.summary.value = (
            f"{int(mask.sum())} {'selected' if manual else 'in-tissue'} {spot_word(shape)}s, "
            f"{len(points.data)} nuclei in '{points.name}'\n"
            f"suggested N_cells_per_location = {est.value:.1f} ± {est.spread:.1f}\n"
            f"(median {est.median:.0f}, 5-95% {est.q05:.0f}-{est.q95:.0f})"
        )
        empty = not np.nansum(self.counts) > 0
        if empty:  # nothing to send: a prior of 0 cells is refused by the model
            self.summary.value += f"\nNo nuclei in the counted {spot_word(shape)}s: nothing to use for the fit."
            tell(
                "warning",
                f"No nuclei in the counted {spot_word(shape)}s.",
                "Check that the nuclei layer lies on the spots (and the image resolves nuclei), or count by hand.",
                self.status,
            )
        self.use_mean_button.enabled = not empty
        self.use_per_spot_button.enabled = not manual and not empty
        self.use_per_spot_button.tooltip = (
            "count all spots for a per-spot prior" if manual else "each spot's own count (floored at 1)"
        )
        return est

    def _colour_spots(self, spots):
        from .._layers import value_colors

        features = spots.features.copy() if len(spots.features.columns) else pd.DataFrame(index=range(len(spots.data)))
        features[COUNT_FEATURE] = self.counts
        spots.features = features
        finite = self.counts[np.isfinite(self.counts)]
        limits = (0.0, float(max(finite.max(), 1.0))) if finite.size else (0.0, 1.0)
        colors = value_colors(self.counts, "viridis", limits)
        colors[~np.isfinite(self.counts)] = _UNCOUNTED_RGBA
        spots.face_color = colors
        spots.metadata["colored_by"] = COUNT_FEATURE

    def _draw(self):
        ax = self.plot.axes[0]
        ax.clear()
        values = self.counts[np.isfinite(self.counts)]
        est = self.estimate
        if values.size:
            top = int(values.max())
            ax.hist(values, bins=np.arange(-0.5, top + 1.5, 1.0 if top < 40 else max(top // 30, 1)), color="#4c9be8")
            ax.axvline(est.value, color="#d62728", lw=1.5, label=f"mean {est.value:.1f}")
            ax.axvspan(est.value - est.spread, est.value + est.spread, color="#d62728", alpha=0.12, lw=0)
            ax.legend(fontsize=7, frameon=False)
        word = spot_word(self.counted_shape)
        ax.set_xlabel(f"nuclei per {word}", fontsize=8)
        ax.set_ylabel(f"{word}s", fontsize=8)
        ax.tick_params(labelsize=7)
        self.plot.draw()

    # ------------------------------------------------------------------ hand over to the fit
    def _send(self, value):
        """Put N_cells_per_location into the shared state (the Fit tab takes it from there) and show Fit."""
        try:
            self.state.set_n_cells(value)
        except ValueError as err:
            tell("error", "This N cells per spot is refused.", str(err), self.status)
            return None
        self.state.tab_requested.emit("Fit")
        return value

    def use_mean(self, _value=None):
        """Send the suggested tissue-level N_cells_per_location (a float) to the Fit widget."""
        if self.estimate is None:
            tell("error", "Count nuclei per spot first.", "", self.status)
            return None
        return self._send(float(self.estimate.value))

    def use_per_spot(self, _value=None):
        """Send the per-spot prior (n_spots,) from the counts to the Fit widget (all spots must be counted)."""
        if self.estimate is None or self.counted is None:
            tell("error", "Count nuclei per spot first.", "", self.status)
            return None
        if self.scope.value == SCOPE_SELECTED or not np.isfinite(self.counts[self.counted]).all():
            tell("error", "Count every spot for a per-spot prior.", "Count in all in-tissue spots.", self.status)
            return None
        return self._send(np.asarray(self.estimate.per_spot, dtype=float))
