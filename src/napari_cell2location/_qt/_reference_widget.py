"""Reference: labelled single-cell .h5ad -> gene filter -> signatures (regression or averages) -> the fit.

Thin widget over :mod:`napari_cell2location.reference`: it collects the settings of the core's signature
pipeline (:func:`~napari_cell2location.reference.iter_signatures`), draws the gene filter's 2D histogram,
runs the pipeline in a worker thread (progress bar, cancel between steps), saves the signatures as CSV
and puts them into the shared state, where the Data and Fit tabs take them.
"""

import logging
import time
from pathlib import Path

import napari.viewer
import pandas as pd
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    FloatSpinBox,
    Label,
    ProgressBar,
    PushButton,
    SpinBox,
)

from ._mpl import MplCanvas
from ._notify import tell
from ._state import SharedState, state_of
from ._worker import beside_viewer, cancel_worker, log_failure, show_training_item, start_worker

logger = logging.getLogger(__name__)

NO_BATCH = "(one batch)"
X_LAYER = "X"
#: GUI label -> ``SignatureSettings.method``
METHODS = {"NB regression (RegressionModel)": "regression", "cluster averages (fast)": "average"}
_FILTER_PLACEHOLDER = "the gene filter (genes by cells detected and mean count) appears here once a reference is open"
_LABEL_GUESSES = ("cell_type", "celltype", "cell_types", "labels", "label", "annotation", "cluster", "leiden")
_BATCH_GUESSES = ("batch", "sample", "donor", "library", "sample_id")


class ReferenceWidget(Container):
    """Estimate reference signatures from a labelled single-cell ``.h5ad`` and send them to the fit.

    Parameters
    ----------
    napari_viewer : napari.viewer.Viewer
        The viewer.
    state : SharedState, optional
        Where the signatures go (default: the viewer's).

    Attributes
    ----------
    adata : anndata.AnnData or None
        The reference opened.
    signatures : pandas.DataFrame or None
        The last signatures (n_genes, n_cell_types).
    model : napari_cell2location.reference.RegressionModel or None
        The last trained regression.
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer, state: SharedState | None = None):
        super().__init__(labels=True)
        self.viewer = napari_viewer
        self.state = state if state is not None else state_of(napari_viewer)
        self.adata = None
        self.signatures = None
        self.model = None
        self.worker = None
        self._stats = None
        self.losses: list = []

        self.path = FileEdit(label="reference .h5ad", mode="r", filter="AnnData (*.h5ad)")
        self.open_button = PushButton(text="Open reference")
        self.info = Label(label="", value="Open a labelled single-cell reference (raw counts).")
        self.labels_key = ComboBox(label="labels column", choices=[])
        self.batch_key = ComboBox(label="batch column", choices=[NO_BATCH])
        self.layer = ComboBox(label="counts", choices=[X_LAYER])
        self.label_note = Label(label="", value="")
        self.filter = CheckBox(text="filter genes", value=True)
        self.cell_count_cutoff = FloatSpinBox(label="min cells", value=15, min=0, max=1e6, step=1)
        self.cell_percentage_cutoff2 = FloatSpinBox(label="min fraction", value=0.05, min=0, max=1, step=0.01)
        self.nonz_mean_cutoff = FloatSpinBox(label="min non-zero mean", value=1.12, min=0, max=1e3, step=0.02)
        self.filter_note = Label(label="", value="")
        self.plot = MplCanvas(height=2.6, placeholder=_FILTER_PLACEHOLDER)
        self.method = ComboBox(label="method", choices=list(METHODS))
        self.epochs = SpinBox(label="epochs (0 = auto)", value=0, min=0, max=100000)
        self.batch_size = SpinBox(label="cells per batch", value=2500, min=1, max=10_000_000)
        self.lr = FloatSpinBox(label="learning rate", value=0.002, min=1e-5, max=1.0, step=0.001)
        self.device = ComboBox(label="device", choices=["auto", "cpu", "cuda"])
        self.run_button = PushButton(text="Estimate signatures")
        self.cancel_button = PushButton(text="Cancel")
        self.progress = ProgressBar(label="progress", value=0, max=1)
        self.status = Label(label="", value="")
        self.send_button = PushButton(text="Use for the fit (Data tab)")
        self.save_path = FileEdit(label="save as", mode="w", filter="CSV (*.csv)", value="signatures.csv")
        self.save_button = PushButton(text="Save signatures CSV")
        self.extend(
            [
                self.path,
                self.open_button,
                self.info,
                self.labels_key,
                self.batch_key,
                self.layer,
                self.label_note,
                self.filter,
                self.cell_count_cutoff,
                self.cell_percentage_cutoff2,
                self.nonz_mean_cutoff,
                self.filter_note,
                self.plot,
                self.method,
                self.epochs,
                self.batch_size,
                self.lr,
                self.device,
                self.run_button,
                self.cancel_button,
                self.progress,
                self.status,
                self.send_button,
                self.save_path,
                self.save_button,
            ]
        )
        self.open_button.changed.connect(self.open_reference)
        self.labels_key.changed.connect(self._on_labels)
        self.layer.changed.connect(self._on_layer)
        for w in (self.filter, self.cell_count_cutoff, self.cell_percentage_cutoff2, self.nonz_mean_cutoff):
            w.changed.connect(self.draw_filter)
        self.method.changed.connect(self._on_method)
        self.run_button.changed.connect(self.run)
        self.cancel_button.changed.connect(self.cancel)
        self.send_button.changed.connect(self.send_to_fit)
        self.save_button.changed.connect(self.save)
        self._update_buttons()

    # ------------------------------------------------------------------ opening
    def open_reference(self, _value=None, path=None):
        """Read a reference ``.h5ad`` (on error a notification, and the current reference stays)."""
        from ..io import InputError, read_h5ad

        path = Path(path if path is not None else self.path.value)
        if path.suffix.lower() != ".h5ad" or not path.is_file():
            tell(
                "error",
                "Choose a single-cell .h5ad first.",
                f"{path.name or 'no file'} is not a labelled single-cell .h5ad file.",
                self.status,
            )
            return False
        try:
            adata = read_h5ad(path, "labelled single-cell reference .h5ad")
        except InputError as err:
            tell("error", "Cannot open this reference.", str(err), self.status)
            return False
        self.set_reference(adata, source=path.name)
        return True

    def set_reference(self, adata, source: str = "reference"):
        """Use ``adata`` (cells x genes, raw counts, labels in ``obs``) as the reference."""
        self.adata = adata
        self.source = source
        self.signatures, self.model = None, None
        obs = adata.obs
        cols = [
            str(c)
            for c in obs.columns
            if isinstance(obs[c].dtype, pd.CategoricalDtype) or obs[c].dtype == object or obs[c].dtype == bool
        ]
        self.labels_key.choices = cols
        self.batch_key.choices = [NO_BATCH, *cols]
        self.layer.choices = [X_LAYER, *[str(k) for k in adata.layers.keys()]]
        guess = next((c for g in _LABEL_GUESSES for c in cols if c.lower() == g), cols[0] if cols else None)
        if guess is not None:
            self.labels_key.value = guess
        batch = next((c for g in _BATCH_GUESSES for c in cols if c.lower() == g), NO_BATCH)
        self.batch_key.value = batch
        self.info.value = f"{source}\n{adata.n_obs} cells x {adata.n_vars} genes"
        if not cols:
            tell(
                "warning",
                "No column of cell-type labels.",
                f"{source} has no categorical obs column to use as labels.",
                self.status,
            )
        self._on_layer(self.layer.value)
        self._on_labels(self.labels_key.value)
        self._update_buttons()

    def _on_layer(self, _value=None):
        from ..reference import gene_filter_stats

        self._stats = None
        if self.adata is not None:
            try:
                self._stats = gene_filter_stats(self.adata, self.settings().layer)
            except ValueError as err:
                tell("error", "Cannot filter this reference's genes.", str(err), self.status)
        self.draw_filter()

    def _on_labels(self, value):
        if self.adata is None or value is None:
            self.label_note.value = ""
            return
        from ..reference import MIN_CELLS_PER_LABEL

        counts = self.adata.obs[value].value_counts()
        counts = counts[counts > 0]
        small = counts[counts < MIN_CELLS_PER_LABEL]
        text = f"{len(counts)} cell types, {int(counts.min())}-{int(counts.max())} cells each"
        if len(small):
            text += "; few cells: " + ", ".join(f"{k} ({v})" for k, v in small.sort_values().items())
        self.label_note.value = text

    def _on_method(self, value):
        regression = METHODS[value] == "regression"
        for w in (self.epochs, self.batch_size, self.lr, self.device):
            w.enabled = regression

    # ------------------------------------------------------------------ gene filter
    def kept_genes(self) -> pd.Index:
        """Genes the current cut-offs keep (all genes when filtering is off)."""
        from ..reference import genes_kept

        if self._stats is None:
            return pd.Index([])
        if not self.filter.value:
            return self._stats.index
        s = self.settings()
        keep = genes_kept(
            self._stats, self.adata.n_obs, s.cell_count_cutoff, s.cell_percentage_cutoff2, s.nonz_mean_cutoff
        )
        return self._stats.index[keep]

    def draw_filter(self, _value=None):
        """Redraw the gene filter's 2D histogram with the current cut-offs."""
        from ..reference import plot_filter_genes

        if self._stats is None:
            self.plot.show_placeholder(_FILTER_PLACEHOLDER)
            return
        ax = self.plot.axes[0]
        ax.clear()
        s = self.settings()
        plot_filter_genes(
            self._stats,
            n_obs=self.adata.n_obs,
            cell_count_cutoff=s.cell_count_cutoff,
            cell_percentage_cutoff2=s.cell_percentage_cutoff2,
            nonz_mean_cutoff=s.nonz_mean_cutoff,
            ax=ax,
        )
        ax.set_title("gene filter (red: cut-offs)", fontsize=8)
        ax.xaxis.label.set_fontsize(8)
        ax.yaxis.label.set_fontsize(8)
        n = len(self.kept_genes())
        self.filter_note.value = f"{n} of {self.adata.n_vars} genes kept" + ("" if self.filter.value else " (off)")
        self.plot.draw()

    # ------------------------------------------------------------------ run / cancel
    def settings(self):
        """The :class:`~napari_cell2location.reference.SignatureSettings` the controls hold."""
        from ..reference import SignatureSettings

        return SignatureSettings(
            labels_key=self.labels_key.value,
            batch_key=None if self.batch_key.value in (None, NO_BATCH) else str(self.batch_key.value),
            layer=None if self.layer.value in (None, X_LAYER) else str(self.layer.value),
            filter=bool(self.filter.value),
            cell_count_cutoff=float(self.cell_count_cutoff.value),
            cell_percentage_cutoff2=float(self.cell_percentage_cutoff2.value),
            nonz_mean_cutoff=float(self.nonz_mean_cutoff.value),
            method=METHODS[self.method.value],
            max_epochs=int(self.epochs.value) or None,
            batch_size=int(self.batch_size.value),
            lr=float(self.lr.value),
            device=str(self.device.value),
        )

    @property
    def running(self) -> bool:
        return self.worker is not None

    def _update_buttons(self):
        ready = self.adata is not None and self.labels_key.value is not None
        self.run_button.enabled = ready and not self.running
        self.cancel_button.enabled = self.running
        done = self.signatures is not None and not self.running
        self.save_button.enabled = done
        self.send_button.enabled = done

    def run(self, _value=None):
        """Estimate the signatures in a worker thread (no-op while one runs); returns the worker."""

        from ..io import InputError
        from ..reference import check_reference, iter_signatures

        if self.running:
            return None
        if self.adata is None or self.labels_key.value is None:
            tell("error", "Open a reference .h5ad first.", "Then choose its column of cell-type labels.", self.status)
            return None
        settings = self.settings()
        try:  # fast checks on the main thread: a clear message before any work starts
            check_reference(self.adata, settings.labels_key, settings.batch_key, settings.layer)
        except InputError as err:
            tell("error", "Cannot use this reference.", str(err), self.status)
            return None
        self.losses = []
        self._t0 = time.perf_counter()
        self.progress.max, self.progress.value = 1, 0
        self.status.value = "filtering genes..."
        start_worker(
            self,
            beside_viewer(iter_signatures),
            self.adata,
            settings,
            on_yielded=self._on_yield,
            on_returned=self._on_returned,
        )
        self._update_buttons()
        self.worker.start()
        return self.worker

    def cancel(self, _value=None):
        """Ask the worker to stop; it stops before the next training step."""
        cancel_worker(self)

    def _on_yield(self, item):
        step = show_training_item(self, item, "cells")
        if step is not None:
            self.losses.append(float(step.loss))

    def _on_returned(self, result):
        """A finished SignaturesResult: keep it and hand the signatures to the fit."""
        signatures = result.signatures
        self.signatures, self.model = signatures, result.model
        self.progress.value = self.progress.max
        elapsed = time.perf_counter() - self._t0
        self.status.value = f"done in {elapsed:.0f} s: {signatures.shape[1]} cell types x {signatures.shape[0]} genes"
        self.send_to_fit(quiet=True)

    def _on_error(self, err):
        log_failure(logger, "reference signatures", err)
        tell("error", "Reference signatures failed.", str(err), self.status)

    def _on_aborted(self):
        tell(
            "warning",
            "Reference training cancelled.",
            f"After {len(self.losses)} steps; no signatures were made.",
            self.status,
        )

    def _on_finished(self):
        self.worker = None
        self._update_buttons()

    # ------------------------------------------------------------------ hand over / save
    def send_to_fit(self, _value=None, quiet: bool = False):
        """Use the signatures for the fit: into the shared state (the Data tab shows them), Data tab in front."""
        if self.signatures is None:
            if not quiet:
                tell("error", "No signatures yet.", "Estimate them first (Run).", self.status)
            return False
        method = "regression" if self.model is not None else "cluster averages"
        self.state.set_signatures(self.signatures, source=f"{getattr(self, 'source', 'reference')} ({method})")
        self.state.tab_requested.emit("Data")
        return True

    def save(self, _value=None, path=None):
        """Write the signatures (genes x cell types) to a CSV file; returns the path or None."""
        if self.signatures is None:
            tell("error", "No signatures yet.", "Estimate them first (Run).", self.status)
            return None
        path = Path(path if path is not None else self.save_path.value)
        if path.suffix.lower() not in (".csv", ".tsv"):
            tell(
                "error",
                "Save signatures to a .csv or .tsv file.",
                f"Not {path.name or 'an empty path'!r}.",
                self.status,
            )
            return None
        from ..io import atomic_output

        try:
            with atomic_output(path) as tmp:
                self.signatures.to_csv(tmp, sep="\t" if path.suffix.lower() == ".tsv" else ",")
        except OSError as err:
            tell("error", "Cannot save the signatures.", f"{path}: {err}", self.status)
            return None
        tell(
            "info", f"Saved {path.name}.", f"Signatures ({self.signatures.shape[1]} cell types) in {path}.", self.status
        )
        return path
