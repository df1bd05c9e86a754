"""Fit: model settings, Run in a worker thread with progress, ETA, live ELBO plot and Cancel; Save results.

The fit itself is the core's pipeline (:func:`napari_cell2location.model.iter_fit`); this widget
collects its :class:`~napari_cell2location.model.FitSettings`, runs it in a worker and shows the result.
"""

import logging
import time
from pathlib import Path

import napari.viewer
import numpy as np
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

from .._variants import ModelVariant
from ._mpl import MplCanvas
from ._notify import tell
from ._state import SharedState, context_of, state_of
from ._view import frame_tissue_later
from ._worker import (
    beside_viewer,
    cancel_worker,
    fmt_time,
    log_failure,
    show_training_item,
    start_worker,
    training_threads,
)

logger = logging.getLogger(__name__)

_PLOT_INTERVAL_S = 1.0
_GLOBAL_NOTE = "global prior (set from histology when counted)"


def _devices() -> tuple[list[str], str]:
    import torch

    choices = ["auto", "cpu"]
    if torch.cuda.is_available():
        choices += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        note = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    else:
        n = training_threads()
        spare = ", one core left for napari" if n < torch.get_num_threads() else ""
        note = f"no GPU found; cpu ({n} thread{'s' if n != 1 else ''}{spare})"
    return choices, note


class FitWidget(Container):
    """Model settings and the fit in a background worker.

    Parameters
    ----------
    viewer : napari.viewer.Viewer
        The viewer; results are added to it.
    state : SharedState, optional
        Where the data come from and the result goes (default: the viewer's).
    """

    def __init__(self, viewer: napari.viewer.Viewer, state: SharedState | None = None):
        super().__init__(labels=True)
        self.viewer = viewer
        self.state = state if state is not None else state_of(viewer)
        self.worker = None
        self.losses: list[float] = []
        self._t0 = 0.0
        self._last_plot = 0.0

        self.model = ComboBox(label="model", choices=[(v.label, v) for v in ModelVariant], value=ModelVariant.MAIN)
        self.n_cells = FloatSpinBox(label="N cells / spot", value=8.0, min=0.1, max=1000.0, step=0.5)
        self.n_cells_note = Label(label="", value=_GLOBAL_NOTE)
        self.detection_alpha = ComboBox(
            label="detection alpha", choices=[("20 (variable sensitivity)", 20.0), ("200 (uniform)", 200.0)], value=20.0
        )
        self.epochs = SpinBox(label="epochs (0 = auto)", value=0, min=0, max=100000, step=100)
        self.epochs.tooltip = (
            "0 = fast mode: the original's path at a 25x learning rate, stopped when the abundances have "
            "converged; a number = the original's schedule (lr 0.002), that many epochs"
        )
        self.tolerance = FloatSpinBox(label="converged at (%)", value=2.0, min=0.05, max=50.0, step=0.5)
        self.tolerance.tooltip = (
            "fast mode: stop when the abundances change by less than this per unit of learning rate x steps. "
            "The original's own answer keeps drifting to fewer cells the longer it trains: lower trains longer "
            "(2 % lands where its 30,000-step default ends on a real lymph node)"
        )
        self.lr = FloatSpinBox(label="learning rate (0 = auto)", value=0.0, min=0.0, max=1.0, step=0.001)
        self.lr.native.setDecimals(4)
        self.lr.tooltip = "0 = 0.05 in the fast mode, 0.002 (the original's) with a number of epochs"
        self.batch_size = SpinBox(label="batch size", value=0, min=0, max=10_000_000, step=256)
        self.batch_size.tooltip = "spots per minibatch; 0 = all spots at once (full data)"
        choices, note = _devices()
        self.device = ComboBox(label="device", choices=choices, value="auto", tooltip=note)
        self.device_note = Label(label="", value=note)
        self.checkpoint_path = FileEdit(label="checkpoint folder", mode="d")
        self.checkpoint_path.tooltip = (
            "empty = no checkpoints; a folder: the fit's state is saved there about every 100 steps and when "
            "it ends or is cancelled, so a fit that dies can be resumed"
        )
        self.resume = CheckBox(text="resume from the checkpoint there", value=False)
        self.resume.tooltip = (
            "continue the fit saved in the checkpoint folder (same data and settings; epochs = the total) "
            "to the same result as an uninterrupted fit; a fresh fit when the folder has none"
        )
        self.run_button = PushButton(text="Run")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.progress = ProgressBar(label="progress", value=0, min=0, max=1)
        self.status = Label(label="", value="ready")
        self.plot = MplCanvas(height=2.0, placeholder="the loss (-ELBO) appears here during a fit")
        self.save_path = FileEdit(label="save to", mode="w", filter="Results (*.zarr *.h5ad)")
        self.save_button = PushButton(text="Save results", enabled=False)
        self.load_path = FileEdit(label="model folder", mode="d")
        self.load_path.tooltip = (
            "Save model writes the fitted model here (a new folder); Load reads one written by Save model, "
            "Cell2location.save or the CLI's --save-model"
        )
        self.save_model_button = PushButton(text="Save model", enabled=False)
        self.load_button = PushButton(text="Load model", enabled=False)
        for label in (self.n_cells_note, self.device_note, self.status):
            label.native.setWordWrap(True)  # long notes wrap instead of being cut or widening the dock
        buttons = Container(widgets=[self.run_button, self.cancel_button], layout="horizontal", labels=False)
        model_buttons = Container(widgets=[self.save_model_button, self.load_button], layout="horizontal", labels=False)
        self.extend(
            [
                self.model, self.n_cells, self.n_cells_note, self.detection_alpha, self.epochs, self.tolerance, self.lr,
                self.batch_size, self.device, self.device_note, self.checkpoint_path, self.resume, buttons,
                self.progress, self.status,
                self.plot, self.save_path, self.save_button, self.load_path, model_buttons,
            ]
        )  # fmt: skip
        self.run_button.changed.connect(self.run)
        self.cancel_button.changed.connect(self.cancel)
        self.save_button.changed.connect(self.save)
        self.load_button.changed.connect(self.load)
        self.save_model_button.changed.connect(self.save_model)
        self.n_cells.changed.connect(self.set_n_cells_per_location)  # typed by the user: a global prior
        self.state.n_cells_changed.connect(self._show_n_cells)
        self.state.data_changed.connect(self._update_run_state)
        self.epochs.changed.connect(lambda v: setattr(self.tolerance, "enabled", not v))
        self.checkpoint_path.changed.connect(
            lambda _: setattr(self.resume, "enabled", self.checkpoint_dir() is not None)
        )
        self.resume.enabled = False  # until a checkpoint folder is chosen
        self._update_run_state()

    # ------------------------------------------------------------------ N cells per spot
    def set_n_cells_per_location(self, value):
        """Set N_cells_per_location: a float (global prior) or a per-spot numpy array (n_spots,).

        The value goes into the shared state (the Cells-per-spot tab sets it the same way); the spin
        box shows it, or the mean of a per-spot array, which is used as is at the next Run.
        """
        self.state.set_n_cells(value)

    def _show_n_cells(self, value):
        with self.n_cells.changed.blocked():
            self.n_cells.value = float(np.mean(value))
        if np.ndim(value) == 0:
            self.n_cells_note.value = "global prior"
        else:
            self.n_cells_note.value = (
                f"per-spot prior and observed counts from histology (mean {np.mean(value):.2f}, {len(value)} spots)"
            )

    def settings(self):
        """The :class:`~napari_cell2location.model.FitSettings` the controls hold."""
        from ..model import FitSettings

        n_cells = self.state.n_cells
        return FitSettings(
            variant=ModelVariant(self.model.value),
            n_cells_per_location=float(self.n_cells.value) if n_cells is None else n_cells,
            detection_alpha=float(self.detection_alpha.value),
            batch_key=self.state.batch_key,
            max_epochs=int(self.epochs.value) or None,
            tolerance=float(self.tolerance.value) / 100.0,
            lr=float(self.lr.value) or None,
            batch_size=int(self.batch_size.value) or None,
            device=str(self.device.value),
            checkpoint_dir=self.checkpoint_dir(),
            resume=bool(self.resume.value),
        )

    def checkpoint_dir(self) -> Path | None:
        """The checkpoint folder chosen (None: the field is empty, no checkpoints)."""
        text = str(self.checkpoint_path.value).strip()
        return None if text in ("", ".") else Path(text)

    # ------------------------------------------------------------------ run / cancel
    @property
    def running(self) -> bool:
        return self.worker is not None

    def _update_run_state(self, keep_status: bool = False):
        has_spots = self.state.context() is not None
        ready = has_spots and self.state.signatures is not None
        self.run_button.enabled = ready and not self.running
        self.load_button.enabled = has_spots and not self.running
        if not self.running and not keep_status:
            self.status.value = "ready" if ready else "choose spots and a reference in Data"

    def run(self, _value=None):
        """Start the fit (the core's ``iter_fit``) in a worker thread (no-op while one runs)."""
        from ..model import iter_fit

        if self.running:
            return None
        ctx = self.state.context()
        if ctx is None or self.state.signatures is None:
            tell(
                "error",
                "Choose spots and signatures first.",
                "In the Data tab: a spots layer and reference signatures.",
                self.status,
            )
            return None
        settings = self.settings()
        if settings.per_spot and len(settings.n_cells_per_location) != ctx.adata.n_obs:
            tell(
                "error",
                "Per-spot cell counts do not fit these spots.",
                "Count them again in the Cells per spot tab, or type one N.",
                self.status,
            )
            return None
        self.losses = []
        self._t0 = time.perf_counter()
        self._open_ended = settings.max_epochs is None
        self.progress.max = max(settings.max_epochs or 1, 1)
        self.progress.value = 0
        self.status.value = "setting up the model..."
        self._fit_layer = self.state.spots_layer
        self._checkpoint = settings.checkpoint_dir
        start_worker(
            self,
            beside_viewer(iter_fit),
            ctx.adata,
            self.state.signatures,
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
        self.save_model_button.enabled = False
        self.worker.start()

    def load(self, _value=None, path=None):
        """Load a saved fit of the chosen spots in a worker and show it as a fresh fit would be shown."""
        from ..model import iter_load_fit

        if self.running:
            return None
        ctx = self.state.context()
        if ctx is None:
            tell(
                "error",
                "Choose the spots first.",
                "In the Data tab: the spots layer the model was fitted on.",
                self.status,
            )
            return None
        path = Path(path if path is not None else self.load_path.value)
        if not (path / "attr.json").is_file():
            tell(
                "error",
                "Not a saved model folder.",
                f"{path} has no attr.json; pick the folder Cell2location.save (or Save model) wrote.",
                self.status,
            )
            return None
        self.losses = []
        self._t0 = time.perf_counter()
        self._open_ended = False
        self.progress.max, self.progress.value = 1, 0
        self.status.value = f"loading {path.name}..."
        self._fit_layer = self.state.spots_layer
        start_worker(
            self,
            beside_viewer(iter_load_fit),
            ctx.adata,
            path,
            on_yielded=self._on_yield,
            on_returned=self._on_returned,
        )
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
        """Redraw the ELBO plot from ``history`` (a finished fit's) or, by default, the losses of the
        running fit."""
        from ..plotting import plot_history

        values = self.losses if history is None else history
        ax = self.plot.axes[0]
        ax.clear()
        if len(values):
            plot_history(np.asarray(values), ax=ax)
        ax.set_title("-ELBO (live)" if history is None else "-ELBO", fontsize=9)
        self.plot.draw()

    def _on_returned(self, result):
        """Show a finished fit (a FitResult): the results layer, the loss, and tell the other tabs."""
        from .._layers import results_layer_data

        mod = result.model
        layer = self._fit_layer
        data, kwargs, _ = results_layer_data(
            layer.data, layer.size, context_of(layer).adata, context_of(layer), result.qc
        )
        existing = self.state.results_layer
        if existing is not None and existing in self.viewer.layers and len(existing.data) == len(data):
            existing.metadata.update(kwargs["metadata"])
            existing.features = kwargs["features"]
            existing.face_color = kwargs["face_color"]
            results = existing
        else:
            results = self.viewer.add_points(data, **kwargs)
        self.draw_history(mod.history_["elbo_train"].to_numpy().ravel())
        self.progress.max = max(self.progress.max, 1)  # the fast mode's busy bar ends full
        self.progress.value = self.progress.max
        elapsed = time.perf_counter() - self._t0
        what = "loaded" if getattr(self, "_job", "fit") == "load" else "done"
        self.status.value = (
            f"{what} in {fmt_time(elapsed)}: {mod.n_factors} cell types over {mod.n_obs} spots; "
            f"{len(mod.history_['elbo_train'])} epochs, stopped: {mod.history_['stop_reason']}"
        )
        self.save_button.enabled = True
        self.save_model_button.enabled = True
        self.state.set_result(result, results)
        for other in self.viewer.layers:  # the results are what to look at now; nuclei stay one click away
            if other.name.startswith("nuclei ("):
                other.visible = False
        frame_tissue_later(self.viewer)  # the tissue framed again, with its results
        tell("info", f"{'Model loaded' if what == 'loaded' else 'Fit finished'} in {fmt_time(elapsed)}.")

    def _on_error(self, err):
        log_failure(logger, "fit", err)
        what = "Loading the model" if getattr(self, "_job", "fit") == "load" else "The fit"
        tell("error", f"{what} failed.", str(err), self.status)

    def _on_aborted(self):
        detail = f"After {len(self.losses)} steps; nothing exported."
        if getattr(self, "_checkpoint", None) is not None and getattr(self, "_job", "fit") == "fit":
            detail += f" Its last checkpoint is in {self._checkpoint.name}: tick resume to continue it."
        tell("warning", "Fit cancelled.", detail, self.status)

    def _on_finished(self):
        self.worker = None
        if self.progress.max == 0:  # a busy bar stopped by an error or Cancel: an empty bar
            self.progress.max, self.progress.value = 1, 0
        self.cancel_button.enabled = False
        self._update_run_state(keep_status=True)

    # ------------------------------------------------------------------ save
    def save(self, _value=None, path=None):
        """Write the fitted table (with cell2location's obsm/uns keys) to ``.zarr`` or ``.h5ad``."""
        from ..io import write_results

        ctx = context_of(self._fit_layer) if getattr(self, "_fit_layer", None) is not None else None
        if ctx is None or self.state.model is None:
            tell("error", "Nothing to save yet.", "Run a fit (or load a model) first.", self.status)
            return None
        path = Path(path if path is not None else self.save_path.value)
        if path.suffix.lower() not in (".zarr", ".h5ad"):
            tell(
                "error",
                "Choose where to save first.",
                f"A path ending in .zarr or .h5ad, not {path.name or 'an empty one'!r}.",
                self.status,
            )
            return None
        try:
            out = write_results(ctx.adata, path, sdata=ctx.sdata if path.suffix.lower() == ".zarr" else None)
        except (OSError, ValueError) as err:
            tell("error", "Cannot save the results.", f"{path}: {err}", self.status)
            return None
        tell("info", f"Saved {out.name}.", f"Results in {out}.", self.status)
        return out

    def save_model(self, _value=None, path=None):
        """Save the fitted model to a new folder (``Cell2location.save``; reopen it with Load model)."""
        from ..io import InputError

        model = self.state.model
        if model is None:
            tell("error", "No fitted model yet.", "Run a fit first.", self.status)
            return None
        path = Path(path if path is not None else self.load_path.value)
        if not str(path) or path == Path("."):
            tell("error", "Choose a model folder first.", "A new folder to save the model in.", self.status)
            return None
        try:
            out = model.save(path)
        except FileExistsError:
            tell("error", "A model is already saved there.", f"{path} holds one; choose a new folder.", self.status)
            return None
        except (OSError, InputError) as err:
            tell("error", "Cannot save the model.", f"{path}: {err}", self.status)
            return None
        tell("info", f"Saved the model to {out.name}.", f"Reopen it with Load model: {out}.", self.status)
        return out
