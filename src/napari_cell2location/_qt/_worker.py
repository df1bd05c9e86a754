"""Background work of the dock widgets: one way to start, cancel and report a napari worker."""

from __future__ import annotations

import time


def start_worker(owner, func, *args, on_yielded, on_returned, **kwargs):
    """Create (not start) a napari worker running ``func(*args, **kwargs)`` for a widget.

    Its errors, aborts and end go to ``owner._on_error``, ``owner._on_aborted`` and
    ``owner._on_finished`` (errors become notifications there, never tracebacks); the worker is
    stored as ``owner.worker`` and returned.
    """
    from napari.qt.threading import create_worker

    worker = create_worker(func, *args, _ignore_errors=True, **kwargs)
    worker.yielded.connect(on_yielded)
    worker.returned.connect(on_returned)
    worker.errored.connect(owner._on_error)
    worker.aborted.connect(owner._on_aborted)
    worker.finished.connect(owner._on_finished)
    owner.worker = worker
    return worker


def log_failure(logger, what: str, err: BaseException) -> None:
    """Log a job's failure: bad input (:class:`~napari_cell2location.io.InputError`) as one line, anything
    else with its traceback (for a bug report)."""
    from ..io import InputError

    if isinstance(err, InputError):
        logger.error("%s failed: %s", what, err)
    else:
        logger.error("%s failed", what, exc_info=err)


def cancel_worker(owner) -> None:
    """Ask ``owner.worker`` to stop at its next yield (between two steps or tiles)."""
    if owner.worker is not None:
        owner.status.value = "cancelling..."
        owner.worker.quit()


def fmt_time(seconds: float) -> str:
    """'42 s' or '3 min 05 s'."""
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.0f} s"
    return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"


def show_training_item(owner, item, unit: str):
    """Report one item of a job generator (``iter_fit``, ``iter_signatures``) on ``owner.status`` /
    ``owner.progress``.

    A job yields :class:`~napari_cell2location.model.Stage` messages and
    :class:`~napari_cell2location.model.TrainStep` records. Returns the step (None for a stage);
    ``owner._t0`` is the run's start time.
    """
    from .._infer import Stage

    if isinstance(item, Stage):
        if item.name == "model":
            mod = item.value
            owner.status.value = f"training: {mod.n_obs} {unit} x {mod.n_vars} genes, {mod.n_factors} cell types"
        elif item.name == "exporting":
            owner.status.value = "exporting the posterior..."
        return None
    step = item
    if owner.progress.max != step.total:
        owner.progress.max = step.total
    owner.progress.value = step.step
    eta = (time.perf_counter() - owner._t0) / step.step * (step.total - step.step)
    owner.status.value = f"step {step.step}/{step.total}  loss {step.loss:,.0f}  ETA {fmt_time(eta)}"
    return step
