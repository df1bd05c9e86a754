"""Fit: model settings, Run in a worker thread with progress, ETA, live ELBO plot and Cancel; Save results."""

import logging
import time
from pathlib import Path

import napari.viewer
import numpy as np
from magicgui.widgets import ComboBox, Container, FileEdit, FloatSpinBox, Label, ProgressBar, PushButton, SpinBox
from napari.utils.notifications import show_error, show_info, show_warning

from ._mpl import MplCanvas
from ._session import as_n_cells, context_of, get_session
from ._worker import cancel_worker, fmt_time, show_training_item, start_worker

logger = logging.getLogger(__name__)

#: GUI label -> model class name (the three variants of the core)
_PREFIX = "LocationModel"
_SUFFIX = "PyroModel"
MODELS = {
    "main model": f"{_PREFIX}LinearDependentWMultiExperimentLocationBackgroundNormLevelGeneAlpha{_SUFFIX}",
    "no factorisation of w": f"{_PREFIX}MultiExperimentLocationBackgroundNormLevelGeneAlpha{_SUFFIX}",
    "no gene-level m_g": f"{_PREFIX}LinearDependentWMultiExperimentLocationBackgroundNormLevelNoMG{_SUFFIX}",
}
_PLOT_INTERVAL_S = 0.3


def fit_job(adata, signatures, settings: dict):
    """Generator run in the worker: build the model, train (one yield per step), export, QC.

    Yields ``('model', mod)`` first, then :class:`~napari_cell2location.model.TrainStep` records, then
    ``('exporting', None)``; returns ``(mod, qc)``. Quitting the worker stops it between two steps.
    """
    from .._layers import STATS
    from ..model import Cell2location, model_qc

    Cell2location.setup_anndata(adata, batch_key=settings["batch_key"])
    n_cells = settings["N_cells_per_location"]
    per_spot = isinstance(n_cells, np.ndarray) and n_cells.ndim == 1
    mod = Cell2location(
        adata,
        signatures,
        model_class=settings["model_class"],
        N_cells_per_location=n_cells,
        detection_alpha=settings["detection_alpha"],
        # per-spot counts from the histology are also observed: they pin the abundance scale
        nuclei_counts=n_cells if per_spot else None,
    )
    yield ("model", mod)
    yield from mod.iter_train(
        max_epochs=settings["max_epochs"],
        batch_size=settings["batch_size"],
        lr=settings["lr"],
        device=settings["device"],
        seed=settings.get("seed", 0),
    )
    yield ("exporting", None)
    mod.export_posterior(adata, add_to_obsm=list(STATS), use_quantiles=True, sample_kwargs={"batch_size": 2000})
    return mod, model_qc(mod)


def load_job(adata, path, device: str = "cpu"):
    """Generator run in the worker: load a fit saved with ``Cell2location.save`` (the CLI's
    ``--save-model``, the demo's ``model/``) for these spots, export its posterior and QC.

    Yields ``('model', mod)`` and ``('exporting', None)``; returns ``(mod, qc)`` as :func:`fit_job`.
    """
    from .._layers import STATS
    from ..model import Cell2location, model_qc

    mod = Cell2location.load(path, adata, device=device)
    yield ("model", mod)
    yield ("exporting", None)
    mod.export_posterior(adata, add_to_obsm=list(STATS), use_quantiles=True, sample_kwargs={"batch_size": 2000})
    return mod, model_qc(mod)


def _devices() -> tuple[list[str], str]:
    import torch

    choices = ["auto", "cpu"]
    if torch.cuda.is_available():
        choices += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        note = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    else:
        note = f"no GPU found; cpu ({torch.get_num_threads()} threads)"
    return choices, note


class FitWidget(Container):
    """Model settings and the fit in a background worker.

    Parameters
    ----------
    viewer : napari.viewer.Viewer
        The viewer; results are added to it.
    """

    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__(labels=True)
        self.viewer = viewer
        self.session = get_session(viewer)
        self.session.widgets["fit"] = self
        self.worker = None
        self._n_cells_array = None
        self.losses: list[float] = []
        self._t0 = 0.0
        self._last_plot = 0.0

        self.model = ComboBox(label="model", choices=list(MODELS), value=next(iter(MODELS)))
        self.n_cells = FloatSpinBox(label="N cells / spot", value=8.0, min=0.1, max=1000.0, step=0.5)
        self.n_cells_note = Label(label="", value="global prior (set from histology when counted)")
        self.detection_alpha = ComboBox(
            label="detection alpha", choices=[("20 (variable sensitivity)", 20.0), ("200 (uniform)", 200.0)], value=20.0
        )
        self.epochs = SpinBox(label="epochs (0 = auto)", value=0, min=0, max=100000, step=100)
        self.epochs.tooltip = "0 = fast mode: start from a regression fit and stop when the loss converges"
        self.lr = FloatSpinBox(label="learning rate", value=0.01, min=1e-5, max=1.0, step=0.001)
        self.lr.native.setDecimals(4)
        self.batch_size = SpinBox(label="batch size", value=0, min=0, max=10_000_000, step=256)
        self.batch_size.tooltip = "spots per minibatch; 0 = all spots at once (full data)"
        choices, note = _devices()
        self.device = ComboBox(label="device", choices=choices, value="auto", tooltip=note)
        self.device_note = Label(label="", value=note)
        self.run_button = PushButton(text="Run")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.progress = ProgressBar(label="progress", value=0, min=0, max=1)
        self.status = Label(label="", value="ready")
        self.plot = MplCanvas(height=2.0)
        self.save_path = FileEdit(label="save to", mode="w", filter="Results (*.zarr *.h5ad)")
        self.save_button = PushButton(text="Save results", enabled=False)
        self.load_path = FileEdit(label="saved model", mode="d")
        self.load_path.tooltip = "a folder written by Cell2location.save (CLI --save-model, the demo's model/)"
        self.load_button = PushButton(text="Load fitted model", enabled=False)
        buttons = Container(widgets=[self.run_button, self.cancel_button], layout="horizontal", labels=False)
        self.extend(
            [
                self.model, self.n_cells, self.n_cells_note, self.detection_alpha, self.epochs, self.lr,
                self.batch_size, self.device, self.device_note, buttons, self.progress, self.status,
                self.plot, self.save_path, self.save_button, self.load_path, self.load_button,
            ]
        )  # fmt: skip
        self.run_button.changed.connect(self.run)
        self.cancel_button.changed.connect(self.cancel)
        self.save_button.changed.connect(self.save)
        self.load_button.changed.connect(self.load)
        self.n_cells.changed.connect(self._scalar_n_cells)
        self.session.data_changed.connect(self._update_run_state)
        self._update_run_state()

    # ------------------------------------------------------------------ public API for other widgets
    def set_n_cells_per_location(self, value):
        """Set N_cells_per_location: a float (global prior) or a per-spot numpy array (n_spots,).

        Called by the histology (nuclei) widget. A per-spot array is used as is at the next Run; the
        spin box shows its mean.
        """
        ctx = self.session.context()
        value = as_n_cells(value, None if np.ndim(value) == 0 or ctx is None else ctx.adata.n_obs)
        if np.ndim(value) == 0:
            self._n_cells_array = None
            with self.n_cells.changed.blocked():
                self.n_cells.value = float(value)
            self.n_cells_note.value = "global prior"
        else:
            self._n_cells_array = value
            with self.n_cells.changed.blocked():
                self.n_cells.value = float(np.mean(value))
            self.n_cells_note.value = (
                f"per-spot prior and observed counts from histology (mean {np.mean(value):.2f}, {len(value)} spots)"
            )

    def _scalar_n_cells(self, value):
        self._n_cells_array = None
        self.n_cells_note.value = "global prior"

    def settings(self) -> dict:
        """The fit settings the widgets hold."""
        return {
            "model_class": MODELS[self.model.value],
            "N_cells_per_location": self._n_cells_array
            if self._n_cells_array is not None
            else float(self.n_cells.value),
            "detection_alpha": float(self.detection_alpha.value),
            "max_epochs": int(self.epochs.value) or None,
            "lr": float(self.lr.value),
            "batch_size": int(self.batch_size.value) or None,
            "device": str(self.device.value),
            "batch_key": self.session.batch_key,
        }

    # ------------------------------------------------------------------ run / cancel
    @property
    def running(self) -> bool:
        return self.worker is not None

    def _update_run_state(self, keep_status: bool = False):
        has_spots = self.session.context() is not None
        ready = has_spots and self.session.signatures is not None
        self.run_button.enabled = ready and not self.running
        self.load_button.enabled = has_spots and not self.running
        if not self.running and not keep_status:
            self.status.value = "ready" if ready else "choose spots and a reference in Data"

    def run(self, _value=None):
        """Start the fit in a worker thread (no-op while one runs)."""

        if self.running:
            return None
        ctx = self.session.context()
        if ctx is None or self.session.signatures is None:
            show_error("Choose a spots layer and load reference signatures in the Data tab first.")
            return None
        settings = self.settings()
        if (
            isinstance(settings["N_cells_per_location"], np.ndarray)
            and len(settings["N_cells_per_location"]) != ctx.adata.n_obs
        ):
            show_error("The per-spot N_cells_per_location does not match the spots; set it again.")
            return None
        self.losses = []
        self._t0 = time.perf_counter()
        self.progress.max = max(settings["max_epochs"] or 1, 1)
        self.progress.value = 0
        self.status.value = "setting up the model..."
        self._fit_layer = self.session.spots_layer
        start_worker(
            self,
            fit_job,
            ctx.adata,
            self.session.signatures,
            settings,
            on_yielded=self._on_yield,
            on_returned=self._on_returned,
        )
        self._job = "fit"
        self._start()
        return self.worker

    def _start(self):
        self.run_button.enabled = False
        self.load_button.enabled = False
        self.cancel_button.enabled = True
        self.save_button.enabled = False
        self.worker.start()

    def load(self, _value=None, path=None):
        """Load a saved fit of the chosen spots in a worker and show it as a fresh fit would be shown."""
        if self.running:
            return None
        ctx = self.session.context()
        if ctx is None:
            show_error("Choose the spots layer the model was fitted on in the Data tab first.")
            return None
        path = Path(path if path is not None else self.load_path.value)
        if not (path / "attr.json").is_file():
            show_error(f"{path} is not a saved model folder (no attr.json); pick the folder Cell2location.save wrote.")
            return None
        self.losses = []
        self._t0 = time.perf_counter()
        self.progress.max, self.progress.value = 1, 0
        self.status.value = f"loading {path.name}..."
        self._fit_layer = self.session.spots_layer
        start_worker(self, load_job, ctx.adata, path, on_yielded=self._on_yield, on_returned=self._on_returned)
        self._job = "load"
        self._start()
        return self.worker

    def cancel(self, _value=None):
        """Ask the worker to stop; it stops before the next training step."""
        cancel_worker(self)

    def _on_yield(self, item):
        step = show_training_item(self, item, "spots")
        if step is None:
            return
        self.losses.append(float(step.loss))
        now = time.perf_counter()
        if now - self._last_plot > _PLOT_INTERVAL_S or step.step == step.total:
            self._last_plot = now
            self.draw_history()

    def draw_history(self, history=None):
        """Redraw the ELBO plot from ``history`` (default: the losses of the current run)."""
        from ..plotting import plot_history

        values = self.losses if history is None else history
        ax = self.plot.axes[0]
        ax.clear()
        if len(values):
            plot_history(np.asarray(values), ax=ax)
        ax.set_title("-ELBO (live)", fontsize=9)
        self.plot.draw()

    def _on_returned(self, result):
        from .._layers import results_layer_data, short_hover

        mod, qc = result
        self.session.model, self.session.qc = mod, qc
        layer = self._fit_layer
        ctx = context_of(layer)
        data, kwargs, _ = results_layer_data(layer.data, layer.size, ctx.adata, ctx)
        features = kwargs["features"]
        for col in qc.columns:
            if col not in features:
                features[col] = qc[col].to_numpy()
        existing = self.session.results_layer
        if existing is not None and existing in self.viewer.layers and len(existing.data) == len(data):
            existing.features = features
            existing.face_color = kwargs["face_color"]
            existing.metadata.update(kwargs["metadata"])
            results = existing
        else:
            results = self.viewer.add_points(data, **kwargs)
        short_hover(results)
        self.session.results_layer = results
        self.draw_history(mod.history_["elbo_train"].to_numpy().ravel())
        self.progress.value = self.progress.max  # fast mode may stop before its step limit
        elapsed = time.perf_counter() - self._t0
        what = "loaded" if getattr(self, "_job", "fit") == "load" else "done"
        self.status.value = f"{what} in {fmt_time(elapsed)}: {mod.n_factors} cell types over {mod.n_obs} spots"
        self.save_button.enabled = True
        self.session.fitted.emit(mod)
        what = "model loaded" if what == "loaded" else "fit finished"
        show_info(f"Cell2location {what} in {fmt_time(elapsed)}; see the '{results.name}' layer.")

    def _on_error(self, err):
        logger.exception("fit failed", exc_info=err)
        self.status.value = f"failed: {err}"
        what = "loading the model" if getattr(self, "_job", "fit") == "load" else "fit"
        show_error(f"Cell2location {what} failed: {err}")

    def _on_aborted(self):
        self.status.value = f"cancelled after {len(self.losses)} steps; nothing exported"
        show_warning("Fit cancelled; nothing was exported.")

    def _on_finished(self):
        self.worker = None
        self.cancel_button.enabled = False
        self._update_run_state(keep_status=True)

    # ------------------------------------------------------------------ save
    def save(self, _value=None, path=None):
        """Write the fitted table (with cell2location's obsm/uns keys) to ``.zarr`` or ``.h5ad``."""
        from ..io import write_results

        ctx = context_of(self._fit_layer) if getattr(self, "_fit_layer", None) is not None else None
        if ctx is None or self.session.model is None:
            show_error("Nothing to save yet: run a fit first.")
            return None
        path = Path(path if path is not None else self.save_path.value)
        if path.suffix.lower() not in (".zarr", ".h5ad"):
            show_error(f"Save to a path ending in .zarr or .h5ad, not {path.name!r}.")
            return None
        try:
            out = write_results(ctx.adata, path, sdata=ctx.sdata if path.suffix.lower() == ".zarr" else None)
        except (OSError, ValueError) as err:
            show_error(f"Cannot save results to {path}: {err}")
            return None
        show_info(f"Saved results to {out}")
        return out
