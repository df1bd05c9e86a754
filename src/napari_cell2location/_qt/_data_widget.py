"""Data: choose the spots, the reference signatures and the batch column; show what will be fitted."""

import logging
from pathlib import Path

import napari.layers
import napari.viewer
import numpy as np
import pandas as pd
from magicgui.widgets import ComboBox, Container, FileEdit, Label, PushButton

from ._notify import tell
from ._state import SharedState, context_of, state_of

logger = logging.getLogger(__name__)

NO_BATCH = "(one batch)"


def _spot_layers(viewer) -> list:
    return [layer for layer in viewer.layers if isinstance(layer, napari.layers.Points) and context_of(layer)]


class DataWidget(Container):
    """Pick the spots layer, the reference signatures (CSV or cell2location .h5ad) and the batch column.

    Parameters
    ----------
    viewer : napari.viewer.Viewer
        The viewer whose layers are offered.
    state : SharedState, optional
        Where the choices go (default: the viewer's).
    """

    def __init__(self, viewer: napari.viewer.Viewer, state: SharedState | None = None):
        super().__init__(labels=True)
        self.viewer = viewer
        self.state = state if state is not None else state_of(viewer)
        self.spots = ComboBox(label="spots", choices=self._spot_choices, nullable=True)
        self.reference = FileEdit(label="reference", mode="r", filter="Signatures (*.csv *.tsv *.txt *.gz *.h5ad)")
        self.load_button = PushButton(text="Load reference")
        self.batch = ComboBox(label="batch column", choices=self._batch_choices)
        self.bin_size = ComboBox(label="bin size (µm)", choices=self._bin_size_choices, visible=False)
        self.summary = Label(label="", value="Open a section (File > Open Sample > Cell2location)")
        self.extend([self.spots, self.bin_size, self.reference, self.load_button, self.batch, self.summary])
        self.spots.changed.connect(self._on_spots)
        self.bin_size.changed.connect(self.show_bin_size)
        self.batch.changed.connect(self._on_batch)
        self.load_button.changed.connect(self.load_reference)
        for ev in (viewer.layers.events.inserted, viewer.layers.events.removed, viewer.layers.events.reordered):
            ev.connect(self._refresh)
        self.state.data_changed.connect(self._update_summary)  # e.g. signatures from the Reference tab
        self._refresh()

    # ------------------------------------------------------------------ choices
    def _spot_choices(self, _widget=None):
        return [(layer.name, layer) for layer in _spot_layers(self.viewer)]

    def _batch_choices(self, _widget=None):
        ctx = context_of(self.spots.value)
        if ctx is None:
            return [NO_BATCH]
        obs = ctx.adata.obs
        cols = [
            str(c)
            for c in obs.columns
            if (isinstance(obs[c].dtype, pd.CategoricalDtype) or obs[c].dtype == object)
            and 1 < obs[c].nunique() < len(obs)
        ]
        return [NO_BATCH, *cols]

    def _refresh(self, _event=None):
        current = self.spots.value
        self.spots.reset_choices()
        if self.spots.value is None or current is not self.spots.value:
            layers = _spot_layers(self.viewer)
            if layers and self.spots.value is None:
                self.spots.value = layers[-1]
        self._on_spots(self.spots.value)

    # ------------------------------------------------------------------ handlers
    def _on_spots(self, layer):
        self._offer_bin_sizes(layer)
        if layer is not None and layer is self.state.spots_layer:
            self._update_summary()
            return
        ctx = context_of(layer)
        self.batch.reset_choices()
        default = (ctx.extra.get("batch_key") if ctx is not None else None) or NO_BATCH
        with self.batch.changed.blocked():
            self.batch.value = default if default in self.batch.choices else NO_BATCH
        bundled = None if ctx is None else ctx.signatures
        source = "" if ctx is None else f"{ctx.source} (bundled)"
        self.state.set_spots(layer, self._batch_key(self.batch.value), bundled, source)

    # ------------------------------------------------------------------ Visium HD bin sizes
    def _bin_size_choices(self, _widget=None):
        from .._bin_sizes import bin_sizes_of

        return bin_sizes_of(context_of(self.spots.value))[0]

    def _offer_bin_sizes(self, layer) -> None:
        """Show the bin sizes of a Visium HD dataset (the one shown selected); hide the choice otherwise."""
        from .._bin_sizes import bin_sizes_of

        sizes, current = bin_sizes_of(context_of(layer))
        with self.bin_size.changed.blocked():
            self.bin_size.reset_choices()
            if current is not None:
                self.bin_size.value = current
        self.bin_size.visible = len(sizes) > 1

    def show_bin_size(self, size=None):
        """Fit the shown Visium HD dataset at another bin size: its bins of ``size`` µm as a spots layer (read
        and added when not shown yet), which becomes the chosen spots."""
        from .._bin_sizes import MAX_SHOWN_BINS, bin_layer_data, bin_sizes_of, expected_bins

        layer = self.spots.value
        ctx = context_of(layer)
        sizes, current = bin_sizes_of(ctx)
        size = self.bin_size.value if size is None else size
        if size is None or size == current or size not in sizes:
            return None
        suffix = f"{current:g} µm bins"
        base = layer.name[: -len(suffix)].rstrip() if layer.name.endswith(suffix) else layer.name
        name = f"{base} {size:g} µm bins"
        if name in self.viewer.layers:
            new = self.viewer.layers[name]
        else:
            n_bins = expected_bins(len(layer.data), current, size)
            if n_bins > MAX_SHOWN_BINS:
                tell(
                    "warning",
                    f"Too many {size:g} µm bins to show.",
                    f"About {n_bins:,} bins; napari draws at most {MAX_SHOWN_BINS:,} well. Fit them from the command "
                    f"line: napari-cell2location fit {ctx.source} --bin-size {size:g} --signatures ... --out ...",
                )
                self._offer_bin_sizes(layer)
                return None
            try:
                data, kwargs, _ = bin_layer_data(layer.data, ctx, size, name)
            except (ValueError, OSError, KeyError) as err:
                tell("error", f"Could not read the {size:g} µm bins.", str(err))
                self._offer_bin_sizes(layer)
                return None
            new = self.viewer.add_points(data, **kwargs)
            layer.visible = False  # one size at a time on the tissue
        new.visible = True
        self.spots.value = new
        return new

    @staticmethod
    def _batch_key(value) -> str | None:
        return None if value in (None, NO_BATCH) else str(value)

    def _on_batch(self, value):
        self.state.set_batch_key(self._batch_key(value))

    def load_reference(self, _value=None, path=None):
        """Read the reference file; on error a notification, and the current signatures stay."""
        from ..io import read_signatures

        path = Path(path if path is not None else self.reference.value)
        if not str(path) or path == Path(".") or path.is_dir() and not path.suffix:
            tell(
                "error",
                "Choose a reference file first.",
                "A CSV of genes x cell types, or an .h5ad from cell2location's RegressionModel (or the Reference tab).",
            )
            return False
        try:
            df = read_signatures(path)
        except (ValueError, OSError, KeyError) as err:
            single_cell = "single-cell table" in str(err)  # a reference to make signatures from, not signatures
            tell(
                "error",
                "A single-cell table, not signatures." if single_cell else "Not usable as signatures.",
                str(err),
            )
            return False
        self.set_signatures(df, source=path.name)
        return True

    def set_signatures(self, df: pd.DataFrame, source: str = "", quiet: bool = False):
        """Use ``df`` (n_genes, n_cell_types) as the reference signatures.

        Parameters
        ----------
        df : pandas.DataFrame
            Genes x cell types expression signatures.
        source : str
            Where they came from (shown in the summary).
        quiet : bool
            No notification.
        """
        if not isinstance(df, pd.DataFrame) or df.shape[0] == 0 or df.shape[1] == 0:
            tell("error", "No signatures to use.", "Signatures must be a non-empty DataFrame of genes x cell types.")
            return
        self.state.set_signatures(df, source)
        if not quiet:
            tell(
                "info",
                f"Signatures: {df.shape[1]} cell types.",
                f"{df.shape[0]} genes, from {self.state.signatures_source}.",
            )

    # ------------------------------------------------------------------ summary
    def describe(self) -> dict:
        """Spots, genes, cell types and genes shared between the spots and the signatures."""
        ctx = self.state.context()
        out = {"spots": 0, "genes": 0, "cell_types": 0, "shared_genes": 0, "batches": 1}
        if ctx is not None:
            out["spots"], out["genes"] = int(ctx.adata.n_obs), int(ctx.adata.n_vars)
            if self.state.batch_key:
                out["batches"] = int(ctx.adata.obs[self.state.batch_key].nunique())
        sig = self.state.signatures
        if sig is not None:
            out["cell_types"] = int(sig.shape[1])
            if ctx is not None:
                out["shared_genes"] = int(np.isin(ctx.adata.var_names.astype(str), sig.index.astype(str)).sum())
        return out

    def _unit(self) -> str:
        """'bin' for Visium HD bins, else 'spot'."""
        from ._cells_count import spot_shape_of, spot_word

        layer = self.state.spots_layer
        return spot_word(spot_shape_of(layer)) if layer is not None else "spot"

    def _update_summary(self, *_):
        d = self.describe()
        ref = self.state.signatures_source or "none loaded"
        from ..io import MIN_SHARED_GENES
        from ..io._validate import WARN_SHARED_GENES

        shared = d["shared_genes"]
        note = ""
        if self.state.signatures is not None and d["spots"]:
            if shared < MIN_SHARED_GENES:
                note = f" (too few to fit: at least {MIN_SHARED_GENES}; do the gene names match, e.g. symbols vs IDs?)"
            elif shared < WARN_SHARED_GENES:
                note = f" (few: estimates from under {WARN_SHARED_GENES} genes are unreliable)"
        self.summary.value = (
            f"{d['spots']} {self._unit()}s x {d['genes']} genes, {d['batches']} batch(es)\n"
            f"reference: {ref}, {d['cell_types']} cell types\n"
            f"genes shared: {shared}{note}"
        )
