"""The estimator both user-facing models are: a Pyro module, its AutoNormal guide and what is done with them.

:class:`PyroEstimator` holds everything :class:`~napari_cell2location.Cell2location` and
:class:`~napari_cell2location.reference.RegressionModel` have in common, so a fix to training,
posterior summaries, export or persistence lands in one place (the split of scvi-tools' base model
class and its Pyro train / sample mixins, and of pyro's contrib estimators: the model is a module,
the guide an AutoNormal, the estimator owns both and validates its arguments).

A subclass builds its module in ``__init__`` through :meth:`PyroEstimator._init_inference` and
provides the model arguments of a step (:meth:`_batch_args`, :meth:`_full_args`,
:meth:`_prototype_args`), how it is saved (:meth:`_save_attrs`, :meth:`_save_files`) and rebuilt
(:meth:`_from_saved`), and what its public methods add to the shared ones.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd
import pyro
import torch
from pyro import poutine
from pyro.infer.autoguide import AutoNormal
from pyro.infer.autoguide.initialization import init_to_feasible, init_to_mean
from scipy import sparse

from ..io import InputError, atomic_output, read_h5ad, reading
from ._checkpoint_parallel import open_checkpointer
from ._device import describe_device, resolve_device
from ._posterior import DEFAULT_SUMMARIES, PosteriorMixin, check_summaries
from ._training import check_training_args, consume, epoch_batches, svi_steps

logger = logging.getLogger(__name__)

_DEFAULT_INIT = init_to_mean(fallback=init_to_feasible)
#: largest posterior standard deviation of a site in the guide's log space (a factor e^10 either side at
#: 95 %): a site the data do not constrain (e.g. the overdispersion of a gene with almost no counts)
#: otherwise widens without end under noisy gradients, and its extreme draws destabilise the
#: hyperparameters it shares with every other site; sites the data constrain stay far below it
MAX_GUIDE_SCALE = 5.0
_RAW_SCALE_MAX = math.log(math.expm1(MAX_GUIDE_SCALE))  # softplus(raw) = MAX_GUIDE_SCALE


def aligned_order(given, trained: pd.Index, what: str) -> np.ndarray | None:
    """Positions in ``trained`` of the names ``given`` (None when they are the same, in order).

    Raises :class:`InputError` when ``given`` does not hold exactly the ``trained`` names.
    """
    given = pd.Index(pd.Index(given).astype(str))
    if given.equals(trained):
        return None
    if len(given) == len(trained) and set(given) == set(trained):
        return trained.get_indexer(given)
    raise InputError(
        f"adata does not hold the {what} the model was trained on ({len(given)} {what} given, "
        f"{len(trained)} trained); export into the training AnnData."
    )


def register_fields(adata, setup_key: str, layer: str | None = None, **obs_fields) -> None:
    """What ``setup_anndata`` does for both models: check that ``layer`` and every named ``obs`` column
    (a key or a list of keys) exist, then write the choices made into ``adata.uns[setup_key]``.

    The data are not modified; a missing layer or column raises :class:`InputError` listing those present.
    """
    if layer is not None and layer not in adata.layers:
        raise InputError(f"layer {layer!r} is not in adata.layers; layers present: {list(adata.layers.keys())}")
    fields = {k: list(v) if isinstance(v, list | tuple) else v for k, v in obs_fields.items()}
    for name, value in fields.items():
        for key in value if isinstance(value, list) else [value]:
            if key is not None and key not in adata.obs.columns:
                raise InputError(
                    f"{name} {key!r} is not a column of adata.obs; columns present: {list(adata.obs.columns)}"
                )
    setup = {"layer": layer, **fields}
    adata.uns[setup_key] = {k: v for k, v in setup.items() if v is not None and v != []}


class PyroEstimator(PosteriorMixin):
    """Base of the models: guide, training, export, QC plot, save and load; posterior summaries come
    from :class:`~napari_cell2location._infer._posterior.PosteriorMixin`.

    Attributes a subclass sets before :meth:`_init_inference`: ``X`` (n_obs, n_vars) counts,
    ``n_obs``, ``n_vars``, ``n_factors``, ``n_batch``, ``obs_names``, ``var_names``,
    ``factor_names_``, ``batch_names``.

    Attributes
    ----------
    module : pyro.nn.PyroModule
        The model.
    guide : pyro.infer.autoguide.AutoNormal
        Its mean-field posterior; parameters owned by this object (never Pyro's global store).
    history_ : dict
        ``{'elbo_train': DataFrame}``: the loss of each epoch.
    samples : dict
        Posterior summaries after ``export_posterior`` (``post_sample_means`` ...).
    is_trained_ : bool
        Whether any training epoch ran (or trained parameters were loaded).
    """

    #: file of the guide parameters inside a saved model's folder
    PARAMS_FILE = "model_params.pt"
    #: what the progress bar and the log call training
    _PROGRESS = "training"
    #: likely causes named when the loss becomes NaN
    _NAN_HINT = "normalised or non-integer counts"
    #: axes of the model's own panels in :meth:`plot_QC`
    _QC_EXTRA_PANELS = 0
    #: the site whose posterior means are "the answer" an :class:`AnswerStopper` watches
    _ANSWER_SITE: str = ""

    # ------------------------------------------------------------------ set-up
    def _init_inference(self, make_module, init_values: dict | None = None) -> None:
        """Build the module (``make_module()``) and its guide with module-local parameters.

        ``init_values`` (site -> array) are starting points of the guide's locs, read when the guide
        is set up (the first training call), so they may still be added to until then.
        """
        with pyro.settings.context(module_local_params=True):
            self.module = make_module()
            self.guide = AutoNormal(
                self.module, init_loc_fn=self._init_loc, init_scale=0.1, create_plates=self.module.create_plates
            )
        self.device = torch.device("cpu")
        self._init_values: dict = dict(init_values or {})
        self._history: list[float] = []
        self.is_trained_ = False
        self.stop_reason_ = ""
        self.samples: dict = {}
        self._summary = None

    def _init_loc(self, site):
        if site["name"] in self._init_values:
            value = np.asarray(self._init_values[site["name"]])
            return torch.as_tensor(value, dtype=torch.float32, device=self.device)
        return _DEFAULT_INIT(site)

    def _ensure_guide(self, device: torch.device) -> None:
        """Move model and guide to ``device`` and set the guide up (no optimisation step)."""
        self.module.to(device)
        self.device = device
        with pyro.settings.context(module_local_params=True):
            if self.guide.prototype_trace is None:
                # one call of the guide sets it up; without counts the model has no likelihood
                with torch.no_grad(), poutine.block():
                    self.guide(*self._prototype_args(device))
            self.guide.to(device)
        self._summary = None

    @torch.no_grad()
    def _bound_guide_scales(self) -> None:
        """Keep every site's guide scale at most :data:`MAX_GUIDE_SCALE` (after each optimiser step)."""
        for raw in self.guide.scales.parameters():
            raw.clamp_(max=_RAW_SCALE_MAX)

    def _batch_args(self, ind: np.ndarray, device) -> tuple:
        """Model arguments of the observations ``ind`` (sorted)."""
        raise NotImplementedError

    def _full_args(self, device) -> tuple:
        """Model arguments of a step on all observations."""
        raise NotImplementedError

    def _prototype_args(self, device) -> tuple:
        """Model arguments that set the guide up: no counts (``x_data`` None)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ training
    def _svi(
        self,
        *,
        max_epochs: int,
        batch_size: int | None,
        train_size: float,
        lr: float,
        num_particles: int,
        device,
        seed: int | None,
        scale_elbo: float = 1.0,
        stopper=None,
        make_loss=None,
        before_setup=None,
        parallel=None,
        checkpoint_dir=None,
        checkpoint_every: int | None = None,
        resume: bool = False,
    ):
        """``iter_train``'s body: check the arguments, set the guide up, yield a TrainStep per step.

        ``before_setup(device)`` runs before a guide that is not set up yet is (e.g. to compute
        starting values); ``make_loss()``, called once the guide is set up, returns the step's loss
        function (default Pyro's ``Trace_ELBO``). A ``stopper`` with ``bind`` (:class:`AnswerStopper`)
        is bound to this run's answer (:meth:`_answer`). What ended the run is kept in ``stop_reason_``.

        With ``checkpoint_dir`` a :class:`~napari_cell2location._infer._checkpoint.Checkpointer` writes
        the run's state there every ``checkpoint_every`` epochs; with ``resume`` the run continues from
        the checkpoint there (to ``max_epochs`` in all), as the uninterrupted run would have.

        With an active ``parallel`` (:class:`~napari_cell2location._infer._distributed.DataParallel`)
        this process trains its shard: ``batch_size`` is the total over the processes, the global
        parameters start from rank 0's and their gradients are summed over the processes each step.
        """
        check_training_args(max_epochs, batch_size, train_size, lr, num_particles)
        dev = resolve_device(device)
        n_steps = None
        if parallel is not None and parallel.active:
            dev = parallel.device(dev)
            n_steps = parallel.epoch_steps(self.n_obs, batch_size)
            if n_steps is None:
                batch_size = None  # every process trains on its whole shard
        else:
            parallel = None
        if seed is not None:
            pyro.set_rng_seed(int(seed))
        ckpt = open_checkpointer(checkpoint_dir, checkpoint_every, resume, parallel)
        if before_setup is not None and self.guide.prototype_trace is None and getattr(ckpt, "saved", None) is None:
            before_setup(dev)
        self._ensure_guide(dev)
        self._bound_guide_scales()  # also parameters set or loaded from elsewhere
        reduce = None
        if parallel is not None:
            shared = self._global_parameters()
            parallel.broadcast_(shared)
            reduce = lambda loss: parallel.reduce_gradients(shared, loss)  # noqa: E731
            logger.info("process %d of %d: %d spots", parallel.rank, parallel.world_size, self.n_obs)
        logger.info("%s on %s", self._PROGRESS, describe_device(dev))
        batches, steps_per_epoch = epoch_batches(
            self.n_obs, batch_size, lambda ind: self._batch_args(ind, dev), lambda: self._full_args(dev), seed, n_steps
        )
        if hasattr(stopper, "bind"):
            stopper.bind(self._answer, lr, steps_per_epoch, total=None if parallel is None else parallel.sum)
        loss_fn = None if make_loss is None else make_loss()
        optim_state = None
        if ckpt is not None:  # resumed: the checkpoint's parameters, history, stopper and random state
            settings = {"lr": float(lr), "batch_size": batch_size, "num_particles": int(num_particles)}
            settings.update(scale_elbo=scale_elbo, loss_fn=loss_fn, max_epochs=int(max_epochs))
            settings.update(batches=batches, steps=steps_per_epoch, stopper=stopper)
            max_epochs, optim_state = ckpt.start(self, **settings)
            self._summary = None
            if not max_epochs:  # it had stopped, or already ran max_epochs: stop_reason_ is the checkpoint's
                return
        n_before = len(self._history)
        self.stop_reason_ = "interrupted"
        try:
            self.stop_reason_ = yield from svi_steps(
                self.module,
                self.guide,
                batches,
                int(max_epochs),
                steps_per_epoch,
                float(lr),
                self._history,
                num_particles=int(num_particles),
                scale_elbo=scale_elbo,
                stopper=stopper,
                nan_hint=self._NAN_HINT,
                loss_fn=loss_fn,
                after_step=self._bound_guide_scales,
                reduce=reduce,
                optim_state=optim_state,
                on_epoch_end=None if ckpt is None else ckpt.epoch_end,
            )
        finally:  # also when closed early (a GUI's cancel): record whether any epoch ran
            self.is_trained_ = self.is_trained_ or len(self._history) > n_before
            self._summary = None

    def _local_sites(self) -> set[str]:
        """Latent sites in the observation plate (one value per observation), as the module declares them."""
        return set(self.module.list_obs_plate_vars()["sites"])

    def _global_parameters(self) -> list[torch.Tensor]:
        """The guide's parameters of the global sites (those a data-parallel fit replicates)."""
        local = self._local_sites()
        return [
            p
            for name, p in self.guide.named_parameters()
            if name.split(".", 1)[-1].removesuffix("_unconstrained") not in local
        ]

    @torch.no_grad()
    def _answer(self) -> torch.Tensor:
        """Posterior means of :attr:`_ANSWER_SITE`, exactly (exp(loc + scale^2 / 2) of a log-normal)."""
        loc = getattr(self.guide.locs, self._ANSWER_SITE)
        scale = getattr(self.guide.scales, self._ANSWER_SITE)
        return torch.exp(loc + 0.5 * scale.square())

    def _train_to_end(self, train_args: dict, kwargs: dict, progress_bar: bool):
        """``train()``'s body: refuse keywords ``iter_train`` does not take beyond ``train_args``, then
        run it to the end (a tqdm bar when ``progress_bar``); returns self."""
        allowed = set(inspect.signature(self.iter_train).parameters) - set(train_args)
        unknown = set(kwargs) - allowed
        if unknown:
            raise TypeError(f"train() got unexpected arguments {sorted(unknown)}; accepted: {sorted(allowed)}")
        consume(self.iter_train(**train_args, **kwargs), progress_bar, self._PROGRESS)
        return self

    @property
    def history_(self) -> dict:
        """``{'elbo_train': DataFrame, 'stop_reason': str}``: the training loss (negative ELBO) of each
        epoch, and what ended the last training run."""
        return {
            "elbo_train": pd.DataFrame({"elbo_train": np.asarray(self._history, dtype=float)}),
            "stop_reason": self.stop_reason_,
        }

    def plot_history(self, iter_start: int = 0, iter_end: int = -1, ax=None):
        """Plot the training loss; returns the matplotlib Axes."""
        from ..plotting import plot_history

        return plot_history(self.history_, iter_start=iter_start, iter_end=iter_end, ax=ax)

    # ------------------------------------------------------------------ export
    def _export_summaries(self, add_to, where: str, use_quantiles: bool, sample_kwargs: dict | None, required=()):
        """Compute the summaries an export writes into ``self.samples``; returns their names.

        With ``use_quantiles`` the summaries asked for (and ``required``) come from the guide;
        otherwise from samples, always with the original's :data:`DEFAULT_SUMMARIES`.
        """
        add_to = check_summaries(add_to, where)
        sample_kwargs = dict(sample_kwargs or {})
        if use_quantiles:
            names = list(dict.fromkeys([*required, *add_to]))
            self.samples = self._summaries_from_guide(names, batch_size=sample_kwargs.get("batch_size"))
        else:
            names = list(dict.fromkeys([*DEFAULT_SUMMARIES, *add_to]))
            self.samples = self.sample_posterior(summaries=names, **sample_kwargs)
        return names

    def _export_uns(self, names, **extra) -> dict:
        """``adata.uns[export_slot]``: model name, date, names, ``extra`` and the ``post_sample_{k}`` dicts."""
        out = {
            "model_name": self.module.__class__.__name__,
            "date": str(date.today()),
            "factor_names": np.asarray(self.factor_names_, dtype=object),
            "var_names": np.asarray(self.var_names, dtype=object),
            "obs_names": np.asarray(self.obs_names, dtype=object),
            "batch_names": np.asarray(self.batch_names, dtype=object),
            **extra,
        }
        for k in names:
            out[f"post_sample_{k}"] = {s: np.asarray(v) for s, v in self.samples[f"post_sample_{k}"].items()}
        return out

    # ------------------------------------------------------------------ QC
    def compute_expected(self, samples: dict | None = None, ind_x=None) -> dict:
        """Expected counts ``mu`` (n_obs, n_vars) of the observations ``ind_x`` (default all)."""
        raise NotImplementedError

    def _qc_panels(self, axes, samples: dict) -> None:
        """Draw the model's own QC panels (:attr:`_QC_EXTRA_PANELS` axes) between the reconstruction
        and the loss; none by default."""

    def plot_QC(self, summary_name: str = "means", use_n_obs: int = 1000, fig=None):
        """QC figure: observed vs expected counts (2D histogram), the model's own panels, the loss.

        Parameters
        ----------
        summary_name : str
            Posterior summary the expected counts are computed from ('means', 'q05', ...).
        use_n_obs : int
            Observations drawn at random (seed 0) for the histogram.
        fig : matplotlib.figure.Figure, optional
            Figure to draw on (its axes are added); default a new figure.

        Returns
        -------
        matplotlib.figure.Figure
        """
        from ..plotting import plot_history, plot_reconstruction

        key = f"post_sample_{summary_name}"
        samples = self.samples.get(key) or self._summaries_from_guide([summary_name])[key]
        rng = np.random.default_rng(0)
        ind = np.sort(rng.choice(self.n_obs, size=min(use_n_obs, self.n_obs), replace=False))
        mu = self.compute_expected(samples, ind_x=ind)["mu"]
        x = self.X[ind]
        x = x.toarray() if sparse.issparse(x) else np.asarray(x)
        n_panels = 2 + self._QC_EXTRA_PANELS
        if fig is None:
            from matplotlib.figure import Figure

            fig = Figure(figsize=(4.7 * n_panels, 4))
        axes = fig.subplots(1, n_panels)
        plot_reconstruction(x, mu, ax=axes[0])
        self._qc_panels(axes[1:-1], samples)
        plot_history(self.history_, ax=axes[-1])
        if fig.get_layout_engine() is None:  # a figure with its own layout (e.g. constrained) keeps it
            fig.tight_layout()
        return fig

    # ------------------------------------------------------------------ persistence
    def _save_attrs(self) -> dict:
        """What :meth:`_from_saved` needs to rebuild the model (JSON-ready)."""
        raise NotImplementedError

    def _save_files(self, path: Path) -> None:
        """Files of the model besides the guide and ``attr.json`` (none by default)."""

    @classmethod
    def _from_saved(cls, path: Path, attrs: dict, adata):
        """An untrained model rebuilt from a saved folder for ``adata`` (checked to match)."""
        raise NotImplementedError

    def save(self, dir_path, overwrite: bool = False, save_anndata: bool = False) -> Path:
        """Save parameters, settings and history to ``dir_path`` (re-load with :meth:`load`).

        Parameters
        ----------
        dir_path : str or path
            Folder to write.
        overwrite : bool
            Replace an existing folder's model files.
        save_anndata : bool
            Also write the training AnnData as ``adata.h5ad``.

        Returns
        -------
        pathlib.Path
            The folder.
        """
        path = Path(dir_path)
        if (path / "attr.json").exists() and not overwrite:
            raise FileExistsError(f"{path} already holds a saved model; pass overwrite=True to replace it")
        if self.guide.prototype_trace is None:
            raise RuntimeError("nothing to save: the model has not been trained")
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu() for k, v in self.guide.state_dict().items()}
        with atomic_output(path / self.PARAMS_FILE) as tmp:  # each file replaced only once complete
            torch.save({"guide": state}, tmp)
        self._save_files(path)
        if save_anndata:
            with atomic_output(path / "adata.h5ad") as tmp:
                self.adata.write_h5ad(tmp)
        with atomic_output(path / "attr.json") as tmp:  # last: a folder with attr.json holds a whole model
            tmp.write_text(
                json.dumps({**self._save_attrs(), "history": list(self._history), "stop_reason": self.stop_reason_})
            )
        logger.info("saved %s to %s", type(self).__name__, path)
        return path

    @classmethod
    def load(cls, dir_path, adata=None, device: str = "cpu"):
        """Load a model saved with :meth:`save`; no training step is run.

        Parameters
        ----------
        dir_path : str or path
            Folder written by :meth:`save`.
        adata : anndata.AnnData, optional
            The data it was trained on (same observations and genes); default ``adata.h5ad`` in the
            folder.
        device : str
            Where to put the parameters.
        """
        path = Path(dir_path)
        if not (path / "attr.json").exists():
            raise FileNotFoundError(f"{path} does not hold a saved {cls.__name__} (no attr.json)")
        with reading(path / "attr.json", f"saved {cls.__name__} description (JSON)"):
            attrs = json.loads((path / "attr.json").read_text())
            attrs["history"]  # noqa: B018 - a description without history is not one of ours
        if adata is None:
            if not (path / "adata.h5ad").exists():
                raise InputError(f"pass adata: {path} has no saved AnnData")
            adata = read_h5ad(path / "adata.h5ad", "saved training AnnData")
        obj = cls._from_saved(path, attrs, adata)
        obj._ensure_guide(resolve_device(device))
        with reading(path / obj.PARAMS_FILE, f"saved {cls.__name__} parameter file"):
            state = torch.load(path / obj.PARAMS_FILE, map_location=obj.device, weights_only=True)
            obj.guide.load_state_dict(state["guide"])
        obj._history = [float(v) for v in attrs["history"]]
        obj.stop_reason_ = attrs.get("stop_reason", "")
        obj.is_trained_ = True
        return obj

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.module.__class__.__name__}, n_obs={self.n_obs}, n_vars={self.n_vars}, "
            f"n_factors={self.n_factors}, n_batch={self.n_batch}, trained={self.is_trained_})"
        )
