"""Background work of the dock widgets: one way to start, cancel and report a napari worker."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

#: the fewest seconds between two updates of a job's progress bar and status line (a step can take 10 ms;
#: relaying out the dock at every step slows the job the GUI is showing)
SHOW_INTERVAL_S = 0.1


def training_threads() -> int:
    """CPU threads for a training job started from the viewer: torch's number less one, so the viewer
    keeps a core to draw on (with 2 cores, 2 threads sharing one core with napari train ~3x slower than
    1 thread alone)."""
    import torch

    return max(1, torch.get_num_threads() - 1)


def beside_viewer(job: Callable) -> Callable:
    """``job`` (a generator function that trains with torch) run with :func:`training_threads` threads."""

    @functools.wraps(job)
    def run(*args, **kwargs):
        from .._infer import cpu_threads

        with cpu_threads(training_threads()):
            return (yield from job(*args, **kwargs))

    return run


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
    ``owner._t0`` is the run's start time; when ``owner._open_ended`` (the fast mode, which stops when the
    answer settles) the bar is a busy bar and the status counts epochs instead of an ETA to the step limit.
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
    now = time.perf_counter()
    if step.step < step.total and now - getattr(owner, "_last_shown", 0.0) < SHOW_INTERVAL_S:
        return step
    owner._last_shown = now
    if getattr(owner, "_open_ended", False):  # the fast mode: it stops when the answer settles, not at total
        if owner.progress.max != 0:
            owner.progress.min, owner.progress.max = 0, 0  # a busy bar: no end to count down to
        owner.status.value = (
            f"epoch {step.step}, {fmt_time(now - owner._t0)}: training until the abundances settle "
            f"(at most {step.total} epochs)  loss {step.loss:,.0f}"
        )
        return step
    if owner.progress.max != step.total:
        owner.progress.max = step.total
    owner.progress.value = step.step
    eta = (now - owner._t0) / step.step * (step.total - step.step)
    owner.status.value = f"step {step.step}/{step.total}  loss {step.loss:,.0f}  ETA {fmt_time(eta)}"
    return step
