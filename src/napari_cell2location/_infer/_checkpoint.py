"""Checkpoints of a training run, so that a fit that dies can be resumed to the same answer.

A :class:`Checkpointer` is handed to :meth:`PyroEstimator._svi` by ``iter_train(checkpoint_dir=...)``.
Every few epochs (and when the run ends or is interrupted after a whole epoch) it writes one file,
``checkpoint.pt``, holding everything the next epoch depends on:

* the guide's parameters, and the optimiser's state (Adam's moment estimates and step count);
* the loss history, the number of epochs done, and the stopper's state (its running window);
* the random number generators: torch's (and CUDA's), Python's and numpy's global ones (Pyro's
  state), and the numpy generator that shuffles the minibatches;
* a fingerprint of the fit: model class, dimensions, names of observations, genes and factors (hashed),
  the model's constants, learning rate, batch size, loss estimator and stopping rule.

The file is written beside its final name and renamed over it (``io.atomic_output``), so a run killed
while writing leaves the previous checkpoint whole. With ``resume=True`` a fresh model on the same
data loads it, checks the fingerprint and continues from the next epoch: the same draws, the same
minibatches, the same steps, so the same parameters and history as an uninterrupted fit. A file that
cannot be read or is the checkpoint of another fit is an :class:`~napari_cell2location.io.InputError`
naming the file and what to do.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch

from ..io import InputError, atomic_output, check_writable

logger = logging.getLogger(__name__)

#: the checkpoint's file name inside ``checkpoint_dir``
FILE_NAME = "checkpoint.pt"
#: a data-parallel fit's record of its last whole checkpoint (``_checkpoint_parallel.py``)
MANIFEST_NAME = "checkpoint.parallel.json"
#: what the file says it is, and the version of its layout
FORMAT, VERSION = "napari-cell2location checkpoint", 1
#: without ``checkpoint_every``, a checkpoint about every this many optimiser steps (whole epochs)
DEFAULT_EVERY_STEPS = 100
_ADVICE = "delete it or choose another checkpoint folder"
#: what each kind of model calls its observations, genes and factors (for messages)
_UNITS = {
    "Cell2location": ("spots", "genes", "cell types"),
    "RegressionModel": ("cells", "genes", "cell types"),
}
#: the attributes of the package's stoppers that change while training (their settings are fingerprinted)
_STOPPER_STATE = {
    "AnswerStopper": ("speeds", "_sum", "_previous", "_epochs", "_strikes"),
    "ConvergenceStopper": ("_losses", "_strikes"),
}


def _digest(names) -> str:
    return hashlib.sha256("\n".join(map(str, names)).encode()).hexdigest()[:16]


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())[:160]
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def loss_description(loss_fn) -> str:
    """What estimates a step's loss: Pyro's ``Trace_ELBO`` (``None``), or the fused ELBO of either mode."""
    if loss_fn is None:
        return "Pyro's Trace_ELBO"
    analytic = getattr(loss_fn, "analytic", None)
    if analytic is None:
        return type(loss_fn).__name__
    return "the fast mode's ELBO (exact prior terms)" if analytic else "the original's single-draw ELBO"


def stopper_description(stopper) -> str | None:
    """The stopping rule and its settings (None: a fixed number of epochs)."""
    if stopper is None:
        return None
    rule = getattr(stopper, "rule", type(stopper).__name__)
    return f"{type(stopper).__name__}: {rule}, at least {getattr(stopper, 'min_epochs', 0)} epochs"


def fingerprint(est, *, lr, batch_size, num_particles, scale_elbo, loss_fn, stopper) -> dict:
    """What makes a checkpoint belong to this fit: the model, its data and the training settings that
    shape the path (not ``max_epochs``, which a resumed fit may raise)."""
    constants = {
        name: [list(t.shape), float(t.detach().double().sum()), float(t.detach().double().abs().sum())]
        for name, t in est.module.state_dict().items()
    }
    effective_batch = None if batch_size is None or int(batch_size) >= est.n_obs else int(batch_size)
    return {
        "model": type(est).__name__,
        "module": type(est.module).__name__,
        "n_obs": int(est.n_obs),
        "obs_names": _digest(est.obs_names),
        "n_vars": int(est.n_vars),
        "var_names": _digest(est.var_names),
        "factor_names": [str(f) for f in est.factor_names_],
        "batch_names": _digest(est.batch_names),
        "constants": constants,
        "lr": float(lr),
        "batch_size": effective_batch,
        "num_particles": int(num_particles),
        "scale_elbo": float(scale_elbo),
        "loss": loss_description(loss_fn),
        "stopper": stopper_description(stopper),
    }


def _same_constants(a: dict, b: dict) -> bool:
    if set(a) != set(b):
        return False
    for name, (shape, total, absolute) in a.items():
        shape2, total2, absolute2 = b[name]
        if list(shape) != list(shape2) or not np.allclose([total, absolute], [total2, absolute2], rtol=1e-6, atol=0):
            return False
    return True


def differences(saved: dict, here: dict) -> list[str]:
    """What differs between a checkpoint's fingerprint and this fit's, in words (empty: the same fit)."""
    obs, var, factors = _UNITS.get(here["model"], ("observations", "genes", "factors"))

    def count(key, names, what):
        if saved.get(key) != here[key]:
            return f"other {what} ({saved.get(key)} there, {here[key]} here)"
        if saved.get(names) != here[names]:
            return f"other {what} (as many, with other names)"
        return None

    def batch(size):
        return "all at once" if size is None else str(size)

    out = []
    if saved.get("model") != here["model"]:
        out.append(f"it is a {saved.get('model')}'s, this is a {here['model']}")
    elif saved.get("module") != here["module"]:
        out.append(f"model {saved.get('module')} there, {here['module']} here")
    out += [d for d in (count("n_obs", "obs_names", obs), count("n_vars", "var_names", var)) if d]
    if saved.get("factor_names") != here["factor_names"]:
        there = saved.get("factor_names") or []
        out.append(f"other {factors} ({len(there)} there, {len(here['factor_names'])} here)")
    if saved.get("batch_names") != here["batch_names"]:
        out.append("other batches")
    if not out and not _same_constants(saved.get("constants", {}), here["constants"]):
        out.append("other model settings or priors (e.g. cells per spot, detection alpha)")
    if saved.get("lr") != here["lr"]:
        out.append(f"learning rate {saved.get('lr'):g} there, {here['lr']:g} here")
    if saved.get("batch_size") != here["batch_size"]:
        out.append(f"batch size {batch(saved.get('batch_size'))} there, {batch(here['batch_size'])} here")
    for key, what in (("num_particles", "particles"), ("scale_elbo", "scale_elbo")):
        if saved.get(key) != here[key]:
            out.append(f"{what} {saved.get(key)} there, {here[key]} here")
    if saved.get("loss") != here["loss"]:
        out.append(f"trained with {saved.get('loss')} there, {here['loss']} here")
    if saved.get("stopper") != here["stopper"]:
        out.append(f"stopping rule {saved.get('stopper') or 'none'} there, {here['stopper'] or 'none'} here")
    return out


def checked_folder(folder, every) -> Path:
    """``checkpoint_dir`` as a path (not a file), with ``checkpoint_every`` checked."""
    if every is not None and (isinstance(every, bool) or int(every) < 1):
        raise InputError(f"checkpoint_every must be a positive number of epochs or None, got {every}")
    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise InputError(f"checkpoint_dir {str(folder)!r} is a file, not a folder.")
    return folder


def read_checkpoint(path) -> dict:
    """Read a checkpoint file; one that is not a whole checkpoint of ours is an :class:`InputError`."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - garbage, a copy cut short, another pickle: one clear line
        size = path.stat().st_size if path.exists() else 0
        raise InputError(
            f"{str(path)!r} is not a readable checkpoint ({size:,} bytes; {_one_line(err)}): it is damaged, e.g. cut "
            f"short by a full disk or a copy; {_ADVICE}."
        ) from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise InputError(f"{str(path)!r} is not a napari-cell2location checkpoint; {_ADVICE}.")
    if state.get("version") != VERSION:
        raise InputError(
            f"{str(path)!r} is a checkpoint of layout {state.get('version')}, this version reads {VERSION}; {_ADVICE}."
        )
    try:
        state["fingerprint"] = json.loads(state["fingerprint"])
        for key in ("epochs", "history", "guide", "optim", "rng", "stopper", "finished"):
            state[key]  # noqa: B018 - a file without one of these is not a whole checkpoint
    except Exception as err:  # noqa: BLE001
        raise InputError(f"{str(path)!r} is an incomplete checkpoint ({_one_line(err)}); {_ADVICE}.") from err
    return state


def _rng_state(batches, device) -> dict:
    rng = getattr(batches, "rng", None)
    py = random.getstate()
    np_state = np.random.get_state()  # noqa: NPY002 - numpy's global generator, which Pyro seeds too
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "python": json.dumps([py[0], list(py[1]), py[2]]),
        "numpy": json.dumps(
            [np_state[0], np_state[1].tolist(), *(v.item() if hasattr(v, "item") else v for v in np_state[2:])]
        ),
        "batches": None if rng is None else json.dumps(rng.bit_generator.state),
    }


def _set_rng_state(state: dict, batches, device) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    version, internal, gauss = json.loads(state["python"])
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = json.loads(state["numpy"])
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))  # noqa: NPY002
    rng = getattr(batches, "rng", None)
    if rng is not None and state.get("batches") is not None:
        rng.bit_generator.state = json.loads(state["batches"])


def _stopper_state(stopper) -> dict | None:
    if stopper is None:
        return None
    kind = type(stopper).__name__
    if kind in _STOPPER_STATE:
        values = {k: getattr(stopper, k) for k in _STOPPER_STATE[kind]}
    elif hasattr(stopper, "state_dict"):
        values = stopper.state_dict()
    else:
        return {"class": kind, "tensors": {}, "values": "null"}
    tensors = {k: v.detach().cpu() for k, v in values.items() if isinstance(v, torch.Tensor)}
    rest = {k: v for k, v in values.items() if not isinstance(v, torch.Tensor)}
    return {"class": kind, "tensors": tensors, "values": json.dumps(rest)}


def _set_stopper_state(stopper, state: dict | None) -> None:
    if stopper is None or state is None:
        return
    values = json.loads(state["values"])
    if values is None:
        logger.warning("the stopper %s keeps no checkpointable state; it starts afresh", state["class"])
        return
    values.update(state["tensors"])
    if type(stopper).__name__ in _STOPPER_STATE:
        for key, value in values.items():
            setattr(stopper, key, value)
    else:
        stopper.load_state_dict(values)


class Checkpointer:
    """Writes a fit's checkpoints into ``folder`` and, with ``resume``, continues from the one there.

    Parameters
    ----------
    folder : str or os.PathLike
        Where ``checkpoint.pt`` lives (made when missing).
    every : int, optional
        Epochs between checkpoints; default about every :data:`DEFAULT_EVERY_STEPS` optimiser steps.
    resume : bool
        Continue from the folder's checkpoint when there is one (a fresh fit when there is none). Without
        it, a folder that already holds a checkpoint is refused rather than overwritten.

    Attributes
    ----------
    path : pathlib.Path
        The checkpoint file.
    saved : dict or None
        The checkpoint read at start (``resume`` and a file present).
    writes : list of (float, int)
        Seconds and bytes of each checkpoint written by this run.
    """

    #: one file per process of a data-parallel fit (:class:`~._checkpoint_parallel.ParallelCheckpointer`)
    PARALLEL = False

    def __init__(self, folder, every: int | None = None, resume: bool = False):
        self.folder = folder = checked_folder(folder, every)
        self.every = None if every is None else int(every)
        self.saved = None
        self.writes: list[tuple[float, int]] = []
        record = self._open(folder)
        if record.exists():
            if not resume:
                raise InputError(
                    f"{str(record)!r} already holds the checkpoint of a fit: resume it (resume=True, --resume, "
                    f"or tick resume), or {_ADVICE}."
                )
            self.saved = self._read_saved()
        elif resume:
            logger.info("no checkpoint in %s: starting a fresh fit", folder)
        for stale in folder.glob(self._partial_pattern()) if folder.is_dir() else ():
            stale.unlink(missing_ok=True)  # left by a run killed while writing

    def _open(self, folder):
        """Refuse a folder of the other layout; set :attr:`path`; return the file that records a checkpoint."""
        if (folder / MANIFEST_NAME).exists():
            raise InputError(
                f"{str(folder)!r} holds the checkpoint of a data-parallel fit: resume it with torchrun and as many "
                f"processes as wrote it ({str(folder / MANIFEST_NAME)!r} says how many), or {_ADVICE}."
            )
        self.path = check_writable(folder / FILE_NAME, "checkpoint")
        return self.path

    def _read_saved(self) -> dict:
        return read_checkpoint(self.path)

    def _partial_pattern(self) -> str:
        return f".{self.path.stem}.partial-*{self.path.suffix}"

    def start(self, est, *, batches, steps: int, stopper, max_epochs: int, **settings) -> tuple:
        """Bind to ``est``'s run; with a saved checkpoint, check it is this fit's and load it into ``est``,
        its stopper and the random number generators.

        ``steps`` is the optimiser steps per epoch; ``settings`` are those :func:`fingerprint` takes besides
        ``stopper`` (``lr``, ``batch_size``, ``num_particles``, ``scale_elbo``, ``loss_fn``). Returns
        ``(epochs_to_run, optim_state)``: the epochs left to reach ``max_epochs`` in all (0 when the
        checkpointed fit had stopped), and the optimiser state to continue from (None for a fresh fit).
        """
        import torch.distributed as dist

        if not self.PARALLEL and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise InputError(  # every process would write the same file
                "several processes share this checkpoint folder: train with parallel=DataParallel.from_env() "
                "(one file per process), or leave checkpoint_dir out."
            )
        self.est, self.batches, self.stopper = est, batches, stopper
        self.fingerprint = fingerprint(est, stopper=stopper, **settings)
        if self.every is None:
            self.every = max(1, math.ceil(DEFAULT_EVERY_STEPS / int(steps)))
        if steps > 1 and getattr(batches, "rng", None) is None:
            logger.warning("the minibatch order cannot be checkpointed here: a resumed fit will take other batches")
        self.finished = ""
        optim_state, to_run = None, int(max_epochs)
        if self.saved is not None:
            optim_state = self._restore(est, batches, stopper)
            done = len(est._history)
            to_run = 0 if self.finished else max(0, int(max_epochs) - done)
            logger.info(
                "resumed from %s at epoch %d%s",
                self.path,
                done,
                f" (it had stopped: {self.finished})" if self.finished else "",
            )
            self.saved = None  # the guide now holds it; free the copy
        self.target = len(est._history) + to_run
        self._written = len(est._history) if optim_state is not None else -1
        return to_run, optim_state

    def _restore(self, est, batches, stopper):
        saved = self.saved
        diffs = differences(saved["fingerprint"], self.fingerprint)
        if diffs:
            raise InputError(f"{str(self.path)!r} is the checkpoint of another fit ({'; '.join(diffs)}): {_ADVICE}.")
        names = [n for n, p in est.guide.named_parameters() if p.requires_grad]
        try:
            est.guide.load_state_dict({k: v.to(est.device) for k, v in saved["guide"].items()})
            optim = saved["optim"]
            optim_state = {
                "t": int(optim["t"]),
                "exp_avg": [optim["exp_avg"][n].to(est.device) for n in names],
                "exp_avg_sq": [optim["exp_avg_sq"][n].to(est.device) for n in names],
            }
            _set_stopper_state(stopper, saved["stopper"])
            _set_rng_state(saved["rng"], batches, est.device)
        except Exception as err:  # noqa: BLE001 - a damaged or foreign file that passed the fingerprint
            raise InputError(f"{str(self.path)!r} does not fit this model ({_one_line(err)}): {_ADVICE}.") from err
        est._history[:] = [float(v) for v in saved["history"]]
        est.is_trained_ = est.is_trained_ or bool(est._history)
        self.finished = str(saved["finished"] or "")
        est.stop_reason_ = self.finished or f"{len(est._history)} epochs done"
        return optim_state

    def epoch_end(self, optim, stopped: str | None = None, interrupted: bool = False) -> None:
        """After each whole epoch (``svi_steps``' ``on_epoch_end``): write a checkpoint every ``every`` epochs,
        when the run stops (``stopped`` says why) or ends, and when it is interrupted."""
        done = len(self.est._history)
        if stopped:
            self.finished = stopped
        if not (interrupted or stopped or done >= self.target or done % self.every == 0) or done == self._written:
            return
        try:
            self.write(optim)
        except Exception as err:
            if not interrupted:  # a long fit is not lost for a checkpoint that could not be written
                logger.warning("could not write the checkpoint %s (%s); training goes on", self.path, _one_line(err))
            else:
                logger.warning("could not write the checkpoint %s on interruption (%s)", self.path, _one_line(err))

    def write(self, optim) -> None:
        """Write the current state, atomically (a temporary file beside it, renamed over it)."""
        t0 = time.perf_counter()
        est = self.est
        names = [n for n, p in est.guide.named_parameters() if p.requires_grad]
        state = optim.state_dict()
        if len(state["exp_avg"]) != len(names):
            raise RuntimeError("the optimiser does not hold the guide's parameters")
        payload = {
            "format": FORMAT,
            "version": VERSION,
            "fingerprint": json.dumps(self.fingerprint),
            "epochs": len(est._history),
            "history": [float(v) for v in est._history],
            "finished": self.finished,
            "guide": {k: v.detach().cpu() for k, v in est.guide.state_dict().items()},
            "optim": {
                "t": int(state["t"]),
                "exp_avg": {n: v.detach().cpu() for n, v in zip(names, state["exp_avg"], strict=True)},
                "exp_avg_sq": {n: v.detach().cpu() for n, v in zip(names, state["exp_avg_sq"], strict=True)},
            },
            "rng": _rng_state(self.batches, est.device),
            "stopper": _stopper_state(self.stopper),
        }
        with atomic_output(self.path) as tmp, open(tmp, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())  # on disk before it replaces the last one
        self._written = payload["epochs"]
        seconds = time.perf_counter() - t0
        self.writes.append((seconds, self.path.stat().st_size))
        logger.debug("checkpoint at epoch %d: %s (%.3f s)", payload["epochs"], self.path, seconds)
