"""What the Cell2location widgets of one viewer share: a typed state whose every change is an event.

Each value has one owner and one channel: a widget sets it through a ``set_*`` method, which stores it
and emits the matching signal; the other widgets listen. Widgets never look each other up.

The dock makes one state and passes it to its tabs; a widget opened on its own (from the Plugins menu)
takes its viewer's state (:func:`state_of`), so it works together with the dock.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

from psygnal import Signal

_STATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass(eq=False)
class SharedState:
    """The data, settings and results the widgets pass to each other.

    Attributes
    ----------
    spots_layer : napari.layers.Points or None
        The spots to fit (a layer with a :class:`~napari_cell2location._layers.SpotContext`).
    signatures : pandas.DataFrame or None
        Reference signatures (n_genes, n_cell_types).
    signatures_source : str
        Where they came from.
    batch_key : str or None
        Column of ``obs`` with each spot's section / sample.
    n_cells : float or numpy.ndarray or None
        N_cells_per_location chosen from the histology: one value or (n_spots,) counts; None until
        the Cells-per-spot tab sends one.
    result : napari_cell2location.model.FitResult or None
        The last finished fit (model and per-spot QC).
    results_layer : napari.layers.Points or None
        Where its abundances are shown.
    """

    spots_layer: Any = None
    signatures: Any = None
    signatures_source: str = ""
    batch_key: str | None = None
    n_cells: Any = None
    result: Any = None
    results_layer: Any = None

    #: the spots layer, the signatures or the batch column changed (what a fit would use)
    data_changed = Signal()
    #: N_cells_per_location was chosen (a float or a per-spot array)
    n_cells_changed = Signal(object)
    #: a fit (or a loaded model) finished: emitted with the FitResult
    fitted = Signal(object)
    #: a widget asks the dock to show one of its tabs (by title)
    tab_requested = Signal(str)

    # ------------------------------------------------------------------ setters (one channel each)
    def set_spots(self, layer, batch_key: str | None = None, bundled=None, source: str = "") -> None:
        """Choose the spots layer to fit and its batch column (one event).

        ``bundled`` signatures that came with the data (sample data) are used when none are chosen yet.
        """
        self.spots_layer, self.batch_key = layer, batch_key
        if bundled is not None and self.signatures is None:
            self.signatures, self.signatures_source = bundled, source or "bundled"
        self.data_changed.emit()

    def set_signatures(self, signatures, source: str = "") -> None:
        """Use ``signatures`` (n_genes, n_cell_types) for the fit."""
        self.signatures, self.signatures_source = signatures, source or "signatures"
        self.data_changed.emit()

    def set_batch_key(self, key: str | None) -> None:
        """Column of ``obs`` with each spot's section (None: one batch)."""
        self.batch_key = key
        self.data_changed.emit()

    def set_n_cells(self, value) -> None:
        """N_cells_per_location from the histology: a positive float, or (n_spots,) positive counts
        (checked; :class:`~napari_cell2location.io.InputError` otherwise)."""
        from ..model import check_n_cells

        self.n_cells = check_n_cells(value, self._n_spots())
        self.n_cells_changed.emit(self.n_cells)

    def set_result(self, result, layer) -> None:
        """Record a finished fit and the layer showing it."""
        self.result, self.results_layer = result, layer
        self.fitted.emit(result)

    @property
    def model(self):
        """The last fitted model (or None)."""
        return None if self.result is None else self.result.model

    @property
    def qc(self):
        """Per-spot QC of the last fit (or None)."""
        return None if self.result is None else self.result.qc

    def context(self):
        """The :class:`~napari_cell2location._layers.SpotContext` of the chosen spots layer (or None)."""
        return context_of(self.spots_layer)

    def _n_spots(self) -> int | None:
        ctx = self.context()
        return None if ctx is None else int(ctx.adata.n_obs)


def state_of(viewer) -> SharedState:
    """The state shared by the Cell2location widgets of ``viewer`` (made on first use, dropped with it)."""
    state = _STATES.get(viewer)
    if state is None:
        state = _STATES[viewer] = SharedState()
    return state


def context_of(layer):
    """SpotContext of a layer: from the reader / sample data, or built from ``metadata['adata']``."""
    from .._layers import CONTEXT_KEY, SpotContext

    if layer is None:
        return None
    meta = layer.metadata
    ctx = meta.get(CONTEXT_KEY)
    if isinstance(ctx, SpotContext):
        return ctx
    adata = meta.get("adata")
    if adata is not None and hasattr(adata, "obs_names") and adata.n_obs == len(layer.data):
        ctx = SpotContext(adata=adata, sdata=meta.get("sdata"), source=layer.name)
        meta[CONTEXT_KEY] = ctx
        return ctx
    return None
