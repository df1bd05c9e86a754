"""State shared by the dock widgets of one viewer: the chosen data, signatures, fitted model and results."""

import logging
import weakref

import numpy as np
from psygnal import Signal

logger = logging.getLogger(__name__)

_SESSIONS: dict[int, "Session"] = {}


class Session:
    """What the Data, Fit, Results and Spot QC widgets of one viewer share.

    Attributes
    ----------
    spots_layer : napari.layers.Points or None
        The layer whose spots are fitted.
    signatures : pandas.DataFrame or None
        Reference signatures (n_genes, n_cell_types).
    signatures_source : str
        Where they came from.
    batch_key : str or None
        Column of ``obs`` with each spot's section / sample.
    model : napari_cell2location.model.Cell2location or None
        The last finished fit.
    qc : pandas.DataFrame or None
        Per-spot QC of that fit (:func:`napari_cell2location._layers.spot_qc`).
    results_layer : napari.layers.Points or None
        Where its abundances are shown.
    widgets : dict
        Widgets registered by name (``'data'``, ``'fit'``, ...) so widgets can reach each other.
    """

    data_changed = Signal()
    fitted = Signal(object)

    def __init__(self, viewer):
        self._viewer_ref = weakref.ref(viewer)
        self.spots_layer = None
        self.signatures = None
        self.signatures_source = ""
        self.batch_key = None
        self.model = None
        self.qc = None
        self.results_layer = None
        self.widgets: dict = {}

    @property
    def viewer(self):
        return self._viewer_ref()

    def context(self):
        """The :class:`~napari_cell2location._layers.SpotContext` of the chosen spots layer (or None)."""
        return context_of(self.spots_layer)


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


def get_session(viewer) -> Session:
    """The session of ``viewer`` (created on first use, dropped with the viewer)."""
    key = id(viewer)
    session = _SESSIONS.get(key)
    if session is None or session.viewer is not viewer:
        session = Session(viewer)
        _SESSIONS[key] = session
        weakref.finalize(viewer, _SESSIONS.pop, key, None)
    return session


def as_n_cells(value, n_obs: int | None = None):
    """Validate an N_cells_per_location value: a positive float or a per-spot array of positive floats."""
    if np.ndim(value) == 0:
        v = float(value)
        if not (np.isfinite(v) and v > 0):
            raise ValueError(f"N_cells_per_location must be positive, got {value}")
        return v
    arr = np.asarray(value, dtype=float).reshape(-1)
    if n_obs is not None and arr.shape[0] != n_obs:
        raise ValueError(f"N_cells_per_location has {arr.shape[0]} values for {n_obs} spots")
    if not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        raise ValueError("per-spot N_cells_per_location must be positive and finite")
    return arr
