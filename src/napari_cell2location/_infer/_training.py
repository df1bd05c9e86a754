"""The training loop shared by the spatial model and the reference regression.

:func:`svi_steps` runs stochastic variational inference on a model / AutoNormal guide pair owned
by the caller (module-local parameters), one minibatch at a time, and yields a :class:`TrainStep`
after every optimisation step; :func:`consume` drives such a generator with a progress bar.
:class:`ConvergenceStopper` decides when a run without a fixed number of epochs has converged.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple

import numpy as np
import pyro
import torch
from pyro.infer import Trace_ELBO

from .._jobs import run_to_end
from ..io import InputError

logger = logging.getLogger(__name__)


class TrainStep(NamedTuple):
    """Progress record yielded after each optimisation step."""

    step: int  #: steps done so far in this call (1-based)
    total: int  #: steps this call will run (at most)
    loss: float  #: loss (negative ELBO, times ``scale_elbo``) of this step
    epoch: int  #: epoch of this step (0-based, counted over all calls)


class Stage(NamedTuple):
    """A stage message of a job generator (``iter_fit``, ``iter_signatures``): what starts now.

    ``name`` is ``'model'`` (``value`` is the model just built, training follows) or
    ``'exporting'`` (training is over; ``value`` is None).
    """

    name: str
    value: object = None


class ConvergenceStopper:
    """Decide when the training loss has converged.

    Every ``window`` epochs, the mean loss of the last window is compared with that of the
    window before; training stops once the relative improvement has stayed below ``rtol`` for
    ``patience`` windows in a row, and never before ``min_epochs``.

    Parameters
    ----------
    window : int
        Epochs per window.
    rtol : float
        Relative improvement of the windowed mean loss counted as no progress.
    patience : int
        Windows in a row without progress before stopping.
    min_epochs : int
        Epochs always run.
    """

    def __init__(self, window: int = 100, rtol: float = 2e-3, patience: int = 1, min_epochs: int = 200):
        self.window, self.rtol = int(window), float(rtol)
        self.patience, self.min_epochs = int(patience), int(min_epochs)
        self.rule = f"windows of {window} epochs, relative improvement < {rtol:g} for {patience} windows"
        self._losses: list[float] = []
        self._strikes = 0

    def update(self, loss: float) -> bool:
        """Record one epoch's loss; True when training should stop."""
        self._losses.append(float(loss))
        n, w = len(self._losses), self.window
        if n % w or n < 2 * w:
            return False
        last = float(np.mean(self._losses[-w:]))
        prev = float(np.mean(self._losses[-2 * w : -w]))
        improvement = (prev - last) / max(abs(last), 1e-12)
        self._strikes = self._strikes + 1 if improvement < self.rtol else 0
        return n >= self.min_epochs and self._strikes >= self.patience

    @property
    def reason(self) -> str:
        return f"the loss converged ({self.rule})"


class AnswerStopper:
    """Decide when the answer has stopped moving: the abundances themselves, not the loss.

    After every epoch the current answer (e.g. posterior means of w_sf) is added to a running mean
    over a window of ``window`` epochs. At the end of each window its relative change from the
    window before, ``sum |mean_now - mean_before| / sum mean_now``, is divided by the training done
    in between in units of learning rate x steps (``lr * window * steps_per_epoch``): the answer's
    speed per unit of optimiser travel, which does not depend on the learning rate. Training stops
    once that speed has stayed below ``tolerance`` for ``patience`` windows in a row, and never
    before ``min_epochs``.

    Window means remove the step-to-step jitter of a noisy optimiser, so what is measured is drift.
    The default tolerance, 2 % per unit (0.1 % per epoch at lr 0.05), is where Cell2location's
    own schedule (30,000 steps at lr 0.002) leaves the real lymph node section: its abundances were
    still changing at that speed there (see the README's "Fast mode" section for the measurements).

    Parameters
    ----------
    tolerance : float
        Relative change of the answer per unit of learning rate x steps counted as converged.
    window : int
        Epochs per window.
    patience : int
        Windows in a row below the tolerance before stopping.
    min_epochs : int
        Epochs always run.
    """

    def __init__(self, tolerance: float = 0.02, window: int = 100, patience: int = 2, min_epochs: int = 300):
        if not float(tolerance) > 0:
            raise InputError(f"tolerance must be positive, got {tolerance}")
        self.tolerance, self.window = float(tolerance), int(window)
        self.patience, self.min_epochs = int(patience), int(min_epochs)
        self.answer = None
        self.travel = None
        self.speeds: list[float] = []  # one per finished window after the first
        self._sum = None
        self._previous = None
        self._epochs = 0
        self._strikes = 0
        self._total = None

    def bind(self, answer, lr: float, steps_per_epoch: int = 1, total=None) -> AnswerStopper:
        """Attach to a training run: ``answer()`` returns the current answer (array or tensor); the
        run takes ``steps_per_epoch`` optimiser steps per epoch at learning rate ``lr``. ``total(*numbers)``
        sums numbers over the processes of a data-parallel fit (each holds part of the answer)."""
        self.answer, self.travel = answer, float(lr) * int(steps_per_epoch) * self.window
        self._total = total
        return self

    @property
    def rule(self) -> str:
        return (
            f"the abundances changed less than {self.tolerance:g} per unit of learning rate x steps "
            f"between {self.window}-epoch windows, {self.patience} windows in a row"
        )

    @property
    def reason(self) -> str:
        return f"the abundances converged (change < {self.tolerance:g} per unit of lr x steps)"

    def update(self, loss: float = None) -> bool:
        """Record one epoch (its loss is not used); True when training should stop."""
        if self.answer is None:
            raise RuntimeError("bind() the stopper to a training run first")
        value = self.answer()
        value = (
            value.detach().double() if isinstance(value, torch.Tensor) else torch.as_tensor(value, dtype=torch.float64)
        )
        self._sum = value.clone() if self._sum is None else self._sum.add_(value)
        self._epochs += 1
        if self._epochs % self.window:
            return False
        mean, self._sum = self._sum / self.window, None
        if self._previous is not None:
            moved, size = float((mean - self._previous).abs().sum()), float(mean.abs().sum())
            if self._total is not None:  # the whole answer's, over the processes of a data-parallel fit
                moved, size = self._total(moved, size)
            change = moved / max(size, 1e-300)
            self.speeds.append(change / self.travel)
            self._strikes = self._strikes + 1 if self.speeds[-1] < self.tolerance else 0
        self._previous = mean
        return self._epochs >= self.min_epochs and self._strikes >= self.patience


def check_training_args(max_epochs: int, batch_size: int | None, train_size: float, lr: float, num_particles: int):
    """Refuse training arguments no fit can use, with a message that names the value (:class:`InputError`)."""
    if train_size != 1:
        raise InputError("train_size must be 1: every observation is used for training")
    if int(max_epochs) < 1:
        raise InputError(f"max_epochs must be at least 1 (or None for the default), got {max_epochs}")
    if batch_size is not None and int(batch_size) < 1:
        raise InputError(f"batch_size must be a positive integer or None, got {batch_size}")
    if not float(lr) > 0:
        raise InputError(f"lr must be positive, got {lr}")
    if int(num_particles) < 1:
        raise InputError(f"num_particles must be at least 1, got {num_particles}")


class Adam:
    """Adam (Kingma & Ba), the same update as ``torch.optim.Adam`` with its defaults, in a few fused
    ``torch._foreach`` calls.

    Written out because constructing ``torch.optim.Adam`` imports ``torch._dynamo`` (seconds on
    the first fit of a session) and its per-step bookkeeping costs milliseconds on small models.

    Parameters
    ----------
    params : list of torch.Tensor
        Leaf tensors to optimise.
    lr : float
        Learning rate.
    betas : tuple of float
        Decay of the first and second moment estimates.
    eps : float
        Added to the denominator.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8):
        self.params = [p for p in params if p.requires_grad]
        self.lr, (self.beta1, self.beta2), self.eps = float(lr), betas, float(eps)
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]
        self.t = 0

    def zero_grad(self, set_to_none: bool = True):
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self):
        self.t += 1
        idx = [i for i, p in enumerate(self.params) if p.grad is not None]
        if not idx:
            return
        params = [self.params[i] for i in idx]
        grads = [p.grad for p in params]
        m = [self.exp_avg[i] for i in idx]
        v = [self.exp_avg_sq[i] for i in idx]
        torch._foreach_lerp_(m, grads, 1 - self.beta1)
        torch._foreach_mul_(v, self.beta2)
        torch._foreach_addcmul_(v, grads, grads, value=1 - self.beta2)
        bias1 = 1 - self.beta1**self.t
        bias2 = 1 - self.beta2**self.t
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, math.sqrt(bias2))
        torch._foreach_add_(denom, self.eps)
        torch._foreach_addcdiv_(params, m, denom, value=-self.lr / bias1)

    def state_dict(self) -> dict:
        """Step count and moment estimates (lists in ``params`` order), e.g. for a checkpoint."""
        return {"t": self.t, "exp_avg": list(self.exp_avg), "exp_avg_sq": list(self.exp_avg_sq)}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Continue from a :meth:`state_dict` of the same parameters."""
        for key in ("exp_avg", "exp_avg_sq"):
            if [tuple(v.shape) for v in state[key]] != [tuple(p.shape) for p in self.params]:
                raise ValueError(f"the optimiser state's {key} does not match the parameters' shapes")
            for mine, saved in zip(getattr(self, key), state[key], strict=True):
                mine.copy_(saved)
        self.t = int(state["t"])


def epoch_batches(
    n_obs: int, batch_size: int | None, make_args: Callable, make_full_args: Callable, seed=None, n_steps=None
):
    """``batches(epoch)`` for :func:`svi_steps`, and the steps in one epoch: all observations at
    once, or shuffled minibatches.

    Parameters
    ----------
    n_obs : int
        Observations.
    batch_size : int or None
        Observations per minibatch; ``None`` (or >= n_obs): one full-data step per epoch.
    make_args : callable
        ``make_args(sorted_indices)`` -> model arguments of one minibatch.
    make_full_args : callable
        ``make_full_args()`` -> model arguments of a full-data step (called once, only when not
        minibatching).
    seed : int, optional
        Seed of the minibatch order.
    n_steps : int, optional
        Split each epoch into exactly this many minibatches instead (sizes differ by at most one):
        the ranks of a data-parallel fit, each with its own share of the observations, step together.

    Returns
    -------
    (callable, int)
        ``batches`` and ``steps_per_epoch``.
    """
    if n_steps is None and (batch_size is None or int(batch_size) >= n_obs):
        full_args = make_full_args()
        return (lambda epoch: [full_args]), 1
    if n_steps is not None:
        if not 1 <= int(n_steps) <= n_obs:
            raise InputError(f"{n_obs} observations cannot make {n_steps} minibatches")
        steps = int(n_steps)

        def parts(order):
            return np.array_split(order, steps)
    else:
        size = int(batch_size)
        steps = math.ceil(n_obs / size)

        def parts(order):
            return (order[i : i + size] for i in range(0, n_obs, size))

    rng = np.random.default_rng(seed)

    def batches(epoch):
        return (make_args(np.sort(part)) for part in parts(rng.permutation(n_obs)))

    batches.rng = rng  # its state is the minibatch order to come (a checkpoint keeps it)
    return batches, steps


def svi_steps(
    module,
    guide,
    batches: Callable[[int], Iterable[tuple]],
    max_epochs: int,
    steps_per_epoch: int,
    lr: float,
    history: list,
    num_particles: int = 1,
    scale_elbo: float = 1.0,
    stopper=None,
    nan_hint: str = "normalised or non-integer counts",
    loss_fn: Callable | None = None,
    after_step: Callable | None = None,
    reduce: Callable | None = None,
    optim_state: dict | None = None,
    on_epoch_end: Callable | None = None,
) -> Iterator[TrainStep]:
    """Optimise ``guide`` for ``module``, yielding after every step.

    Parameters
    ----------
    module, guide : pyro.nn.PyroModule
        Model and guide, built under ``pyro.settings.context(module_local_params=True)``.
    batches : callable
        ``batches(epoch)`` returns the model arguments of each step of that epoch.
    max_epochs, steps_per_epoch : int
        Epochs to run at most, and steps in each (for ``TrainStep.total``).
    lr : float
        Adam learning rate.
    history : list of float
        Mean loss of each epoch is appended here (an interrupted epoch too).
    num_particles : int
        Particles of the ELBO estimate.
    scale_elbo : float
        Multiplier of the loss.
    stopper : object, optional
        ``stopper.update(epoch_loss) -> bool``: stop when True (its ``reason`` says why).
    nan_hint : str
        Likely causes named when the loss becomes NaN.
    loss_fn : callable, optional
        ``loss_fn(*args)`` -> the loss (negative ELBO) of one step, computed without Pyro (e.g.
        :class:`~napari_cell2location.model._elbo.MeanFieldELBO`); default: Pyro's ``Trace_ELBO``.
    after_step : callable, optional
        Called after every optimiser step (e.g. to keep parameters in bounds).
    reduce : callable, optional
        ``reduce(loss) -> float``, called after the backward pass, before the update: a
        data-parallel fit sums the global parameters' gradients and the loss over its processes
        (:meth:`~napari_cell2location._infer._distributed.DataParallel.reduce_gradients`); returns
        the loss of the whole step, which the history records and the NaN check reads.
    optim_state : dict, optional
        :meth:`Adam.state_dict` to continue from (a resumed fit).
    on_epoch_end : callable, optional
        ``on_epoch_end(optim, stopped, interrupted=False)`` after each whole epoch, once ``history`` and
        the stopper have it: ``stopped`` is the reason when the stopper ends the run there, else None
        (e.g. to write a checkpoint). Also called with ``interrupted=True`` when the run is
        interrupted (closed, an error) after every step of an epoch but before its bookkeeping.

    Yields
    ------
    TrainStep

    Returns
    -------
    str
        What ended the run: the stopper's reason, or that ``max_epochs`` were done.
    """
    if loss_fn is None:
        elbo = Trace_ELBO(num_particles=int(num_particles))

        def loss_fn(*args):
            return elbo.differentiable_loss(module, guide, *args)

    optim = Adam(list(guide.parameters()), lr=lr)
    if optim_state is not None:
        optim.load_state_dict(optim_state)
    total = int(max_epochs) * int(steps_per_epoch)
    start_epoch = len(history)
    epoch_losses: list[float] = []
    step = 0
    reason = f"{start_epoch + int(max_epochs)} epochs done"
    module.train()
    try:
        for epoch in range(int(max_epochs)):
            epoch_losses = []
            for args in batches(epoch):
                with pyro.settings.context(module_local_params=True), pyro.validation_enabled(False):
                    loss = loss_fn(*args) * scale_elbo
                value = float(loss.detach())
                step += 1
                optim.zero_grad()
                loss.backward()
                if reduce is not None:  # every process sees the same value, so all stop together
                    value = reduce(value)
                if not math.isfinite(value):  # before the update: the parameters stay as they were
                    raise FloatingPointError(
                        f"the loss became {value} at step {step}. Usual causes: {nan_hint}, "
                        f"or too high a learning rate (lr={lr})."
                    )
                optim.step()
                if after_step is not None:
                    after_step()
                epoch_losses.append(value)
                yield TrainStep(step, total, value, start_epoch + epoch)
            history.append(float(np.mean(epoch_losses)))
            epoch_losses = []
            stopped = stopper is not None and stopper.update(history[-1])
            if stopped:
                reason = f"{stopper.reason} after {start_epoch + epoch + 1} epochs"
                logger.info("stopping: %s", reason)
            if on_epoch_end is not None:
                on_epoch_end(optim, reason if stopped else None)
            if stopped:
                break
    finally:
        if epoch_losses:  # interrupted mid-epoch: record what was done
            history.append(float(np.mean(epoch_losses)))
            if on_epoch_end is not None and len(epoch_losses) == steps_per_epoch:  # a whole epoch after all
                stopped = stopper is not None and stopper.update(history[-1])
                on_epoch_end(optim, f"{stopper.reason} after {len(history)} epochs" if stopped else None, True)
        module.eval()
    return reason


def consume(gen: Iterator, progress_bar: bool = True, desc: str = "training"):
    """Run a job generator to the end, with a tqdm bar of its :class:`TrainStep` s on stderr; returns
    the generator's return value (a pipeline's result; None for ``iter_train``)."""
    bar = None
    steps = 0
    start = time.perf_counter()

    def each(rec) -> None:
        nonlocal bar, steps
        if isinstance(rec, Stage):
            logger.info("%s: %s", desc, rec.name)
            return
        steps = rec.step
        if progress_bar:
            if bar is None:
                from tqdm import tqdm

                bar = tqdm(total=rec.total, desc=desc, unit="step")
            bar.update(1)
            if rec.step % 50 == 0 or rec.step == rec.total:
                bar.set_postfix(loss=f"{rec.loss:.4g}")

    try:
        result = run_to_end(gen, each)
    finally:
        if bar is not None:
            bar.close()
    logger.info("%s: %d steps in %.1f s", desc, steps, time.perf_counter() - start)
    return result
