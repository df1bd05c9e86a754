"""The user-facing Cell2location class: set-up, training generator, posterior export, save/load.

Mirrors cell2location 0.1.5's ``cell2location.models.Cell2location`` API (``setup_anndata``,
``train``, ``export_posterior``, ``posterior_quantile``, ``sample_posterior``, ``plot_QC``,
``save``/``load``) without scvi-tools. Training is a generator, :meth:`Cell2location.iter_train`,
yielding one :class:`TrainStep` per optimisation step, so a GUI can show progress and cancel
between steps; :meth:`Cell2location.train` simply consumes it.
"""

from __future__ import annotations

import inspect
import logging
import time
from datetime import date

import numpy as np
import pandas as pd
import pyro
import torch
from pyro.infer.autoguide import AutoNormal
from pyro.infer.autoguide.initialization import init_to_feasible, init_to_mean
from scipy import sparse

from ..io._validate import MIN_SHARED_GENES, InputError, prepare_inputs
from ._base import GuideOwner, temporary_uns
from ._elbo import MeanFieldELBO
from ._modules import (
    LocationModelLinearDependentWMultiExperimentLocationBackgroundNormLevelGeneAlphaPyroModel,
    LocationModelLinearDependentWMultiExperimentLocationBackgroundNormLevelNoMGPyroModel,
    LocationModelMultiExperimentLocationBackgroundNormLevelGeneAlphaPyroModel,
)
from ._posterior import parse_quantile, sorted_quantile
from ._training import Adam, TrainStep, consume, epoch_batches, svi_steps  # noqa: F401 (Adam, TrainStep re-exported)

logger = logging.getLogger(__name__)

SETUP_KEY = "napari_cell2location_setup"
_MODEL_CLASSES = {
    cls.__name__: cls
    for cls in (
        LocationModelLinearDependentWMultiExperimentLocationBackgroundNormLevelGeneAlphaPyroModel,
        LocationModelMultiExperimentLocationBackgroundNormLevelGeneAlphaPyroModel,
        LocationModelLinearDependentWMultiExperimentLocationBackgroundNormLevelNoMGPyroModel,
    )
}
_DEFAULT_SUMMARIES = ("means", "stds", "q05", "q95")


#: values in one batch of posterior draws (bounds the memory of :meth:`Cell2location.sample_posterior`)
SAMPLE_BATCH_VALUES = 2_000_000
#: learning rate of ``train(max_epochs=None)``
AUTO_LR = 0.01
#: most epochs ``train(max_epochs=None)`` runs before it gives up waiting for convergence
AUTO_MAX_EPOCHS = 5000


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


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """'auto' -> CUDA when available, else CPU; 'cpu'; 'cuda' / 'cuda:n' (checked).

    Parameters
    ----------
    device : str or torch.device
        Requested device.

    Returns
    -------
    torch.device
    """
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"unsupported device {str(device)!r}; use 'auto', 'cpu' or 'cuda[:n]'.") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(
                f"device {str(device)!r} was requested but CUDA is not available here; use 'cpu' or 'auto'."
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"device {str(device)!r}: only {torch.cuda.device_count()} CUDA device(s) present.")
    elif dev.type != "cpu":
        raise InputError(f"unsupported device {str(device)!r}; use 'auto', 'cpu' or 'cuda[:n]'.")
    return dev


def _describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def _to_numpy(t):
    return t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)


def _json_ready(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(v) for v in value]
    return value


class Cell2location(GuideOwner):
    """Cell2location: estimate the absolute abundance of reference cell types in each spot.

    Parameters
    ----------
    adata : anndata.AnnData
        Spatial counts (n_obs spots, n_vars genes), registered with :meth:`setup_anndata`
        (if not, its defaults are used: ``adata.X``, one batch).
    cell_state_df : pandas.DataFrame
        Reference signatures, (n_genes, n_factors): expression of each gene in each cell type.
        Genes are matched to ``adata.var_names`` by name; only shared genes are used.
    model_class : type, optional
        One of the three Pyro modules; default the main model
        (:class:`LocationModelLinearDependentWMultiExperimentLocationBackgroundNormLevelGeneAlphaPyroModel`).
    detection_mean_per_sample : bool
        Compute the detection-efficiency prior mean per batch instead of globally.
    detection_mean_correction : float
        Multiplier of the data-derived detection mean.
    nuclei_counts : array-like, optional
        (n_obs,) nuclei counted in each spot (ours; see ``napari_cell2location.nuclei``), scaled to
        the cells that contribute RNA: observed around each spot's total cells, which pins the
        absolute scale of the abundances. Combine with a per-spot ``N_cells_per_location``.
    nuclei_counts_weight : float
        Precision of ``nuclei_counts``: their variance around a spot's total T is T / weight
        (1 = Poisson; the default 100 trusts the counts closely).
    **model_kwargs
        Passed to the module, e.g. ``N_cells_per_location`` (a scalar or a per-spot array) and
        ``detection_alpha``.

    Attributes
    ----------
    module : pyro.nn.PyroModule
        The model.
    guide : pyro.infer.autoguide.AutoNormal
        Its variational posterior (parameters owned by this object, not Pyro's global store).
    history_ : dict
        ``{'elbo_train': DataFrame}`` loss per epoch.
    samples : dict
        Posterior summaries after :meth:`export_posterior` (``post_sample_means`` ...).
    pyro_elbo : bool
        Train through Pyro's ``Trace_ELBO`` instead of the fused ELBO (:mod:`._elbo`), which gives
        the same loss and gradients for the same draws at a fraction of the cost per step. False
        by default; True is kept as a reference.
    """

    pyro_elbo: bool = False

    def __init__(
        self,
        adata,
        cell_state_df: pd.DataFrame,
        model_class=None,
        detection_mean_per_sample: bool = False,
        detection_mean_correction: float = 1.0,
        nuclei_counts=None,
        nuclei_counts_weight: float = 100.0,
        **model_kwargs,
    ):
        if model_class is None:
            model_class = LocationModelLinearDependentWMultiExperimentLocationBackgroundNormLevelGeneAlphaPyroModel
        elif isinstance(model_class, str):
            if model_class not in _MODEL_CLASSES:
                raise InputError(f"unknown model_class {model_class!r}; choose one of {list(_MODEL_CLASSES)}")
            model_class = _MODEL_CLASSES[model_class]
        min_shared_genes = int(model_kwargs.pop("min_shared_genes", MIN_SHARED_GENES))
        sig = inspect.signature(model_class.__init__)
        unknown = [k for k in model_kwargs if k not in sig.parameters]
        if unknown:
            raise InputError(f"unknown model arguments {unknown} for {model_class.__name__}")
        setup = dict(adata.uns.get(SETUP_KEY, {})) if hasattr(adata, "uns") else {}
        self.layer = setup.get("layer")
        self.batch_key = setup.get("batch_key")
        prep = prepare_inputs(
            adata, cell_state_df, layer=self.layer, batch_key=self.batch_key, min_shared_genes=min_shared_genes
        )
        self.adata = adata
        self.X = prep.X
        self.obs_names = prep.obs_names
        self.var_names = prep.var_names
        self.factor_names_ = list(prep.factor_names)
        self.batch_index = prep.batch_index
        self.batch_names = prep.batch_names
        self.input_report = prep.report
        self.cell_state_df = pd.DataFrame(prep.cell_state, index=prep.var_names, columns=prep.factor_names)
        self.n_obs, self.n_vars = int(prep.X.shape[0]), int(prep.X.shape[1])
        self.n_factors, self.n_batch = len(self.factor_names_), len(self.batch_names)

        default_n = sig.parameters["N_cells_per_location"].default
        n_cells = model_kwargs.get("N_cells_per_location", default_n)
        n_cells = np.asarray(n_cells, dtype=np.float64)
        if n_cells.ndim == 1 and n_cells.shape[0] != self.n_obs:
            raise InputError(f"N_cells_per_location has {n_cells.shape[0]} values but the data has {self.n_obs} spots")
        if not np.all(np.isfinite(n_cells)) or np.any(n_cells <= 0):
            raise InputError("N_cells_per_location must be positive and finite")
        if "detection_mean" not in model_kwargs:
            model_kwargs["detection_mean"] = self._detection_mean(
                n_cells, detection_mean_per_sample, float(detection_mean_correction)
            )
        self.model_class = model_class
        self.model_kwargs = dict(model_kwargs)
        self.detection_mean_per_sample = bool(detection_mean_per_sample)
        self.detection_mean_correction = float(detection_mean_correction)
        # modules built under module_local_params own their parameters (no global param store)
        with pyro.settings.context(module_local_params=True):
            self.module = model_class(
                n_obs=self.n_obs,
                n_vars=self.n_vars,
                n_factors=self.n_factors,
                n_batch=self.n_batch,
                cell_state_mat=prep.cell_state,
                **model_kwargs,
            )
            self.guide = self._make_guide()
        if nuclei_counts is not None:
            if isinstance(nuclei_counts, pd.Series):
                nuclei_counts = nuclei_counts.reindex(self.obs_names).to_numpy()
            try:
                self.module.set_nuclei_counts(nuclei_counts, nuclei_counts_weight)
            except ValueError as err:
                raise InputError(str(err)) from None
        self.device = torch.device("cpu")
        self._history: list[float] = []
        self._init_values: dict = dict(getattr(self.module, "init_vals", None) or {})
        self.is_trained_ = False
        self.samples: dict = {}
        self._summary = None
        logger.info(
            "Cell2location: %d spots x %d genes, %d cell types, %d batch(es), model %s",
            self.n_obs,
            self.n_vars,
            self.n_factors,
            self.n_batch,
            model_class.__name__,
        )

    # ------------------------------------------------------------------ set-up
    @classmethod
    def setup_anndata(
        cls,
        adata,
        layer: str | None = None,
        batch_key: str | None = None,
        labels_key: str | None = None,
        categorical_covariate_keys: list | None = None,
        continuous_covariate_keys: list | None = None,
        **kwargs,
    ):
        """Register which fields of ``adata`` the model reads.

        Only ``adata.uns['napari_cell2location_setup']`` is written; the data are not modified.

        Parameters
        ----------
        adata : anndata.AnnData
            Spatial counts.
        layer : str, optional
            Key in ``adata.layers`` with raw counts (default ``adata.X``).
        batch_key : str, optional
            Column of ``adata.obs`` with the batch (sample / section) of each spot.
        labels_key : str, optional
            Column of ``adata.obs`` with labels (accepted for API compatibility; unused by the model).
        categorical_covariate_keys, continuous_covariate_keys : list of str, optional
            Columns of ``adata.obs`` (accepted for API compatibility; unused by the spatial model).
        """
        if kwargs:
            raise TypeError(f"setup_anndata() got unexpected arguments {sorted(kwargs)}")
        if layer is not None and layer not in adata.layers:
            raise InputError(f"layer {layer!r} is not in adata.layers; layers present: {list(adata.layers.keys())}")
        keys = [batch_key, labels_key, *(categorical_covariate_keys or []), *(continuous_covariate_keys or [])]
        for key in keys:
            if key is not None and key not in adata.obs.columns:
                raise InputError(f"{key!r} is not a column of adata.obs; columns present: {list(adata.obs.columns)}")
        setup = {
            "layer": layer,
            "batch_key": batch_key,
            "labels_key": labels_key,
            "categorical_covariate_keys": list(categorical_covariate_keys or []),
            "continuous_covariate_keys": list(continuous_covariate_keys or []),
        }
        adata.uns[SETUP_KEY] = {k: v for k, v in setup.items() if v is not None and v != []}

    def _detection_mean(self, n_cells: np.ndarray, per_sample: bool, correction: float):
        """Prior mean of detection efficiency from the data, with the N actually in force (ours)."""
        totals = np.asarray(self.X.sum(axis=1)).ravel()
        per_cell = totals / n_cells if n_cells.ndim == 1 else totals / float(n_cells)
        sig_total = float(self.cell_state_df.sum(axis=0).mean())
        if per_sample:
            means = np.array([per_cell[self.batch_index == e].mean() for e in range(self.n_batch)])
            value = means / sig_total * correction
        else:
            value = float(per_cell.mean() / sig_total * correction)
        if not np.all(np.isfinite(value)) or np.any(np.asarray(value) <= 0):
            raise InputError(f"the data give a degenerate detection_mean ({value}); check the counts and signatures")
        return value

    def _make_guide(self):
        base = init_to_mean(fallback=init_to_feasible)

        def init_loc_fn(site):
            values = self._init_values  # read when the guide is set up (first training call)
            if site["name"] in values:
                return torch.as_tensor(np.asarray(values[site["name"]]), dtype=torch.float32).to(
                    self.module.cell_state.device
                )
            return base(site)

        return AutoNormal(self.module, init_loc_fn=init_loc_fn, init_scale=0.1, create_plates=self.module.create_plates)

    # ------------------------------------------------------------------ data on the device
    def _full_args(self, device):
        x = self.X.toarray() if sparse.issparse(self.X) else self.X
        x = torch.as_tensor(np.ascontiguousarray(x, dtype=np.float32), device=device)
        batch = torch.as_tensor(self.batch_index, device=device)
        return x, None, batch  # idx None: the plate is not subsampled (no index ops on parameters)

    def _batch_args(self, ind: np.ndarray, device):
        x = self.X[ind]
        x = x.toarray() if sparse.issparse(x) else x
        x = torch.as_tensor(np.ascontiguousarray(x, dtype=np.float32), device=device)
        return x, torch.as_tensor(ind, device=device), torch.as_tensor(self.batch_index[ind], device=device)

    def _ensure_guide(self, device):
        """Move model and guide to ``device`` and set the guide up (no optimisation step)."""
        self.module.to(device)
        with pyro.settings.context(module_local_params=True):
            if self.guide.prototype_trace is None:
                batch = torch.as_tensor(self.batch_index, device=device)
                self.module.skip_likelihood = True
                try:
                    self.guide._setup_prototype(None, None, batch)
                finally:
                    self.module.skip_likelihood = False
            self.guide.to(device)
        self.device = device
        self._summary = None

    def _set_nnls_init(self, device):
        """Start abundances (and cells per spot) from a non-negative regression (see ``_init``)."""
        from ._init import nnls_abundance

        t = time.perf_counter()
        w = nnls_abundance(
            self.X,
            self.cell_state_df.to_numpy(),
            _to_numpy(self.module.detection_mean).ravel(),
            batch_index=self.batch_index,
            device=device,
        )
        self._init_values["w_sf"] = w
        sites = self.module.list_obs_plate_vars()["sites"]
        if "n_s_cells_per_location" in sites:
            self._init_values["n_s_cells_per_location"] = w.sum(1, keepdims=True)
        logger.info("abundances initialised by non-negative regression in %.2f s", time.perf_counter() - t)

    # ------------------------------------------------------------------ training
    def iter_train(
        self,
        max_epochs: int | None = 30000,
        batch_size: int | None = None,
        train_size: float = 1,
        lr: float | None = None,
        num_particles: int = 1,
        scale_elbo: float = 1.0,
        device: str = "auto",
        seed: int | None = None,
        init: str | None = None,
        early_stopping: bool | None = None,
    ):
        """Train, yielding a :class:`TrainStep` after every optimisation step.

        Closing the generator (e.g. a GUI's cancel) stops training between steps; the
        parameters and ``history_`` keep what was done so far.

        Two ways to train:

        * ``max_epochs=<int>`` (default 30000, the original's behaviour): exactly that many
          epochs at ``lr``, starting from the prior means, unless ``init`` / ``early_stopping``
          say otherwise.
        * ``max_epochs=None`` (fast, ours): abundances start from a non-negative regression of
          the counts on the signatures (``init='nnls'``), ``lr`` defaults to
          :data:`AUTO_LR`, and training stops when the loss has converged (see
          :class:`ConvergenceStopper`), at most :data:`AUTO_MAX_EPOCHS` epochs.

        Parameters
        ----------
        max_epochs : int or None
            Passes through the data (one step per epoch when ``batch_size`` is None); ``None``
            trains until converged.
        batch_size : int, optional
            Spots per minibatch; ``None`` trains on all data at once.
        train_size : float
            Must be 1: abundances are estimated at every spot.
        lr : float, optional
            Adam learning rate (``None``: 0.002, or :data:`AUTO_LR` with ``max_epochs=None``).
        num_particles : int
            Particles of the ELBO estimate.
        scale_elbo : float
            Multiplier of the loss.
        device : str
            'auto' (CUDA when present), 'cpu', or 'cuda[:n]'.
        seed : int, optional
            Seed of torch's and Pyro's random number generators.
        init : {'prior', 'nnls'}, optional
            Starting point of the abundances, used when the guide is first set up; default
            'nnls' with ``max_epochs=None``, else 'prior' (every w_sf at its prior mean, as the original).
        early_stopping : bool or ConvergenceStopper, optional
            Stop when the loss has converged (a :class:`ConvergenceStopper` with its defaults, or
            the one given); default True with ``max_epochs=None``, else False.

        Yields
        ------
        TrainStep
        """
        auto = max_epochs is None
        if train_size != 1:
            raise InputError("train_size must be 1: cell2location estimates abundance at every spot")
        if not auto and int(max_epochs) < 1:
            raise InputError(f"max_epochs must be at least 1 or None, got {max_epochs}")
        if batch_size is not None and int(batch_size) < 1:
            raise InputError(f"batch_size must be a positive integer or None, got {batch_size}")
        init = init or ("nnls" if auto else "prior")
        if init not in ("prior", "nnls"):
            raise InputError(f"init must be 'prior' or 'nnls', got {init!r}")
        lr = float(lr if lr is not None else (AUTO_LR if auto else 0.002))
        max_epochs = AUTO_MAX_EPOCHS if auto else int(max_epochs)
        if early_stopping is None:
            early_stopping = auto
        dev = resolve_device(device)
        if seed is not None:
            pyro.set_rng_seed(int(seed))
        if init == "nnls" and self.guide.prototype_trace is None:
            self._set_nnls_init(dev)
        self._ensure_guide(dev)
        logger.info("training on %s", _describe(dev))
        if isinstance(early_stopping, ConvergenceStopper):
            stopper = early_stopping
        else:
            stopper = ConvergenceStopper() if early_stopping else None
        batches, steps_per_epoch = epoch_batches(
            self.n_obs, batch_size, lambda ind: self._batch_args(ind, dev), lambda: self._full_args(dev), seed
        )
        yield from self._guarded_training(
            svi_steps(
                self.module,
                self.guide,
                batches,
                max_epochs,
                steps_per_epoch,
                lr,
                self._history,
                num_particles=num_particles,
                scale_elbo=scale_elbo,
                stopper=stopper,
                nan_hint="normalised or non-integer counts, broken signatures",
                loss_fn=None if self.pyro_elbo else MeanFieldELBO(self.module, self.guide, num_particles),
            )
        )

    def train(
        self,
        max_epochs: int | None = 30000,
        batch_size: int | None = None,
        train_size: float = 1,
        lr: float | None = None,
        num_particles: int = 1,
        scale_elbo: float = 1.0,
        progress_bar: bool = True,
        **kwargs,
    ):
        """Train the model (see :meth:`iter_train` for the parameters).

        Parameters
        ----------
        progress_bar : bool
            Show a tqdm progress bar on stderr.
        **kwargs
            ``device`` ('auto' | 'cpu' | 'cuda[:n]'), ``seed``, ``init`` ('prior' | 'nnls') and
            ``early_stopping`` (see :meth:`iter_train`).
        """
        return self._train_to_end(
            lambda: self.iter_train(max_epochs, batch_size, train_size, lr, num_particles, scale_elbo, **kwargs),
            kwargs,
            {"device", "seed", "init", "early_stopping"},
            progress_bar,
            "training",
        )

    # ------------------------------------------------------------------ posterior
    def _spot_batches(self, batch_size: int | None):
        size = self.n_obs if batch_size is None else max(1, int(batch_size))
        for i in range(0, self.n_obs, size):
            yield torch.arange(i, min(i + size, self.n_obs), device=self.device)

    def posterior_quantile(
        self, q: float = 0.5, batch_size: int | None = None, use_median: bool = False, exclude_vars: list | None = None
    ) -> dict:
        """Quantile ``q`` of every latent site, exactly from the guide (no sampling).

        Parameters
        ----------
        q : float
            Quantile in (0, 1).
        batch_size : int, optional
            Spots per batch for obs-plate sites (bounded memory).
        use_median : bool
            Same as ``q=0.5`` (API compatibility).
        exclude_vars : list of str, optional
            Sites to leave out.

        Returns
        -------
        dict
            site -> numpy array of the site's shape.
        """
        if use_median:
            q = 0.5
        if not 0 < float(q) < 1:
            raise ValueError(f"q must be in (0, 1), got {q}")
        summary = self._guide_summary()
        out = {}
        for name in summary.sites:
            if exclude_vars and name in exclude_vars:
                continue
            if name in summary.obs_sites:
                parts = [_to_numpy(summary.quantile(name, q, ind)) for ind in self._spot_batches(batch_size)]
                out[name] = np.concatenate(parts, axis=0)
            else:
                out[name] = _to_numpy(summary.quantile(name, q))
        return out

    def _summaries_from_guide(self, names, batch_size=None) -> dict:
        """Means, stds (quadrature) and quantiles (exact) of the latent sites, without sampling."""
        out = self._guide_summary().summaries(names, obs_batches=list(self._spot_batches(batch_size)))
        if "means" in names:  # mean of a product of independent factors = product of means
            means = {k: torch.as_tensor(v, device=self.device)[None] for k, v in out["post_sample_means"].items()}
            det = self.module.deterministic_sites(means)
            out["post_sample_means"]["u_sf_mRNA_factors"] = _to_numpy(det["u_sf_mRNA_factors"][0])
        return out

    @torch.no_grad()
    def sample_posterior(
        self,
        num_samples: int = 1000,
        batch_size: int | None = None,
        return_sites: list | None = None,
        return_samples: bool = False,
        summaries=_DEFAULT_SUMMARIES,
    ) -> dict:
        """Draw posterior samples and summarise them, spot batch by spot batch.

        Parameters
        ----------
        num_samples : int
            Draws per site.
        batch_size : int, optional
            Spots per batch (default: as many as keep one batch of draws of the widest site
            under :data:`SAMPLE_BATCH_VALUES`).
        return_sites : list of str, optional
            Sites to return (default all latent and deterministic sites).
        return_samples : bool
            Also return the raw draws under ``'posterior_samples'`` (memory: num_samples x site size).
        summaries : sequence of str
            Summaries to compute: 'means', 'stds', quantiles such as 'q05'.

        Returns
        -------
        dict
            ``post_sample_{summary}`` -> {site: numpy array}, and ``posterior_samples`` if asked.
        """
        summary = self._guide_summary()
        num_samples = int(num_samples)
        widths = [self.module.list_obs_plate_vars()["sites"].get(s, 1) for s in summary.obs_sites]
        widest = max([*widths, self.n_factors])
        if batch_size is None:
            batch_size = max(1, min(self.n_obs, int(SAMPLE_BATCH_VALUES // (num_samples * widest))))
        names = list(summary.sites) + ["u_sf_mRNA_factors", "detection_hyp_prior_alpha"]
        wanted = set(return_sites) if return_sites else set(names)
        globals_ = {s: summary.sample(s, num_samples) for s in summary.sites if s not in summary.obs_sites}
        collected = {k: {} for k in summaries}
        raw: dict = {}

        quantiles = {k: parse_quantile(k) for k in summaries if parse_quantile(k) is not None}

        def add(site, draws):
            arr = _to_numpy(draws)  # (num_samples, ...); on the CPU a view, not a copy
            if return_samples:
                raw.setdefault(site, []).append(arr.copy())
            for k in summaries:
                if k == "means":
                    collected[k].setdefault(site, []).append(arr.mean(0))
                elif k == "stds":
                    collected[k].setdefault(site, []).append(arr.std(0, ddof=1))
            if quantiles:
                arr.sort(axis=0)  # in place: these draws are not used again
                for k, q in quantiles.items():
                    collected[k].setdefault(site, []).append(sorted_quantile(arr, q))

        for ind in self._spot_batches(batch_size):
            local = {s: summary.sample(s, num_samples, ind) for s in summary.obs_sites}
            det = self.module.deterministic_sites({**globals_, **local})
            for site, draws in {**local, "u_sf_mRNA_factors": det["u_sf_mRNA_factors"]}.items():
                if site in wanted:
                    add(site, draws)
        det_globals = {"detection_hyp_prior_alpha": det["detection_hyp_prior_alpha"]}
        for site, draws in {**globals_, **det_globals}.items():
            if site in wanted:
                add(site, draws)
        out = {
            f"post_sample_{k}": {s: np.concatenate(v, axis=0) if len(v) > 1 else v[0] for s, v in d.items()}
            for k, d in collected.items()
        }
        if return_samples:
            out["posterior_samples"] = {s: np.concatenate(v, axis=1) if len(v) > 1 else v[0] for s, v in raw.items()}
        return out

    def export_posterior(
        self,
        adata,
        sample_kwargs: dict | None = None,
        export_slot: str = "mod",
        add_to_obsm: list = ("means", "stds", "q05", "q95"),
        use_quantiles: bool = False,
    ):
        """Summarise the posterior and write cell abundances into ``adata`` (cell2location's keys).

        Writes ``adata.obsm['{k}_cell_abundance_w_sf']`` (DataFrames, columns
        ``'{k}cell_abundance_w_sf_{cell_type}'``) for each k in ``add_to_obsm`` and
        ``adata.uns[export_slot]`` (model name, date, factor/var/obs names, ``post_sample_{k}``
        dicts of site -> array).

        Parameters
        ----------
        adata : anndata.AnnData
            Data with the same spots as the training data.
        sample_kwargs : dict, optional
            Arguments of :meth:`sample_posterior` (``num_samples``, ``batch_size``); with
            ``use_quantiles=True`` only ``batch_size`` is used.
        export_slot : str
            Key of ``adata.uns`` to write.
        add_to_obsm : sequence of str
            Summaries to write: 'means', 'stds', 'q05', 'q50', 'q95', ...
        use_quantiles : bool
            Compute summaries from the guide directly (exact quantiles, quadrature means and
            stds; fast, bounded memory) instead of from samples.

        Returns
        -------
        anndata.AnnData
            ``adata``, with the outputs added.
        """
        sample_kwargs = dict(sample_kwargs or {})
        obs = pd.Index(adata.obs_names.astype(str))
        if not obs.equals(self.obs_names):
            if len(obs) == len(self.obs_names) and set(obs) == set(self.obs_names):
                order = self.obs_names.get_indexer(obs)
            else:
                raise InputError(
                    "adata does not hold the spots the model was trained on "
                    f"({adata.n_obs} spots given, {self.n_obs} trained); export into the training AnnData."
                )
        else:
            order = None
        add_to_obsm = list(add_to_obsm)
        for k in add_to_obsm:
            if k not in ("means", "stds") and parse_quantile(k) is None:
                raise InputError(f"unknown summary {k!r} in add_to_obsm; use 'means', 'stds', 'q05', 'q50', ...")
        if use_quantiles:
            names = list(dict.fromkeys(add_to_obsm))
            self.samples = self._summaries_from_guide(names, batch_size=sample_kwargs.get("batch_size"))
        else:
            names = list(dict.fromkeys([*_DEFAULT_SUMMARIES, *add_to_obsm]))
            self.samples = self.sample_posterior(summaries=names, **sample_kwargs)
        for k in add_to_obsm:
            values = self.samples[f"post_sample_{k}"]["w_sf"]
            if order is not None:
                values = values[order]
            adata.obsm[f"{k}_cell_abundance_w_sf"] = pd.DataFrame(
                values,
                index=adata.obs_names,
                columns=[f"{k}cell_abundance_w_sf_{f}" for f in self.factor_names_],
            )
        adata.uns[export_slot] = self._export2adata(names)
        return adata

    def _export2adata(self, names) -> dict:
        out = {
            "model_name": self.module.__class__.__name__,
            "date": str(date.today()),
            "factor_names": np.asarray(self.factor_names_, dtype=object),
            "var_names": np.asarray(self.var_names, dtype=object),
            "obs_names": np.asarray(self.obs_names, dtype=object),
            "batch_names": np.asarray(self.batch_names, dtype=object),
        }
        for k in names:
            out[f"post_sample_{k}"] = {s: np.asarray(v) for s, v in self.samples[f"post_sample_{k}"].items()}
        return out

    def compute_expected(self, samples: dict | None = None, ind_x=None, hide_ambient=False, hide_cell_type=False):
        """Expected counts of each kept gene in each spot (see the module's ``compute_expected``)."""
        samples = samples if samples is not None else self._means_for_qc()
        return self.module.compute_expected(samples, self.batch_index, ind_x, hide_ambient, hide_cell_type)

    def compute_expected_per_cell_type(self, samples: dict | None = None, ind_x=None):
        """Observed counts split by cell type (see the module's ``compute_expected_per_cell_type``)."""
        samples = samples if samples is not None else self._means_for_qc()
        return self.module.compute_expected_per_cell_type(samples, self.batch_index, ind_x, x_data=self.X)

    def _means_for_qc(self) -> dict:
        if "post_sample_means" in self.samples:
            return self.samples["post_sample_means"]
        return self._summaries_from_guide(["means"])["post_sample_means"]

    # ------------------------------------------------------------------ plots
    def plot_QC(self, summary_name: str = "means", use_n_obs: int = 1000, fig=None):
        """Reconstruction QC: observed vs expected counts (2D histogram) and loss history.

        Returns the matplotlib Figure.
        """
        from ..plotting import plot_history, plot_reconstruction

        key = f"post_sample_{summary_name}"
        samples = self.samples.get(key) or self._means_for_qc()
        rng = np.random.default_rng(0)
        ind = np.sort(rng.choice(self.n_obs, size=min(use_n_obs, self.n_obs), replace=False))
        mu = self.compute_expected(samples, ind_x=ind)["mu"]
        x = self.X[ind]
        x = x.toarray() if sparse.issparse(x) else np.asarray(x)
        if fig is None:
            import matplotlib.pyplot as plt

            fig = plt.figure(figsize=(10, 4))
        ax1, ax2 = fig.subplots(1, 2)
        plot_reconstruction(x, mu, ax=ax1)
        plot_history(self.history_, ax=ax2)
        fig.tight_layout()
        return fig

    # ------------------------------------------------------------------ persistence
    def save(self, dir_path, overwrite: bool = False, save_anndata: bool = False):
        """Save parameters, settings and history to ``dir_path`` (re-load with :meth:`load`).

        Parameters
        ----------
        dir_path : str or path
            Folder to write.
        overwrite : bool
            Replace an existing folder's model files.
        save_anndata : bool
            Also write the training AnnData as ``adata.h5ad``.
        """
        attrs = {
            "model_class": self.model_class.__name__,
            "model_kwargs": _json_ready(
                {**self.model_kwargs, "detection_mean": _to_numpy(self.module.detection_mean).ravel()}
            ),
            "detection_mean_per_sample": self.detection_mean_per_sample,
            "detection_mean_correction": self.detection_mean_correction,
            "nuclei_counts_weight": self.module.nuclei_counts_weight,
            "nuclei_counts": _json_ready(
                None if self.module.nuclei_counts is None else _to_numpy(self.module.nuclei_counts).ravel()
            ),
            "layer": self.layer,
            "batch_key": self.batch_key,
            "obs_names": list(self.obs_names),
            "factor_names": self.factor_names_,
        }
        path = self._write_saved(dir_path, overwrite, attrs)
        self.cell_state_df.to_csv(path / "cell_state_df.csv")
        if save_anndata:
            self.adata.write_h5ad(path / "adata.h5ad")
        logger.info("saved model to %s", path)

    @classmethod
    def load(cls, dir_path, adata=None, device: str = "cpu"):
        """Load a model saved with :meth:`save`; no training step is run.

        Parameters
        ----------
        dir_path : str or path
            Folder written by :meth:`save`.
        adata : anndata.AnnData, optional
            The spatial data (same spots and genes); default ``adata.h5ad`` in the folder.
        device : str
            Where to put the parameters.

        Returns
        -------
        Cell2location
        """
        path, attrs = cls._read_saved(dir_path)
        if adata is None:
            if not (path / "adata.h5ad").exists():
                raise InputError(f"pass adata: {path} has no saved AnnData")
            import anndata

            adata = anndata.read_h5ad(path / "adata.h5ad")
        saved_obs = pd.Index(attrs["obs_names"])
        if not pd.Index(adata.obs_names.astype(str)).equals(saved_obs):
            raise InputError("adata's spots differ from those the model was trained on")
        cell_state_df = pd.read_csv(path / "cell_state_df.csv", index_col=0)
        cell_state_df.index = cell_state_df.index.astype(str)
        kwargs = dict(attrs["model_kwargs"])
        if isinstance(kwargs.get("N_cells_per_location"), list):
            kwargs["N_cells_per_location"] = np.asarray(kwargs["N_cells_per_location"])
        if isinstance(kwargs.get("detection_mean"), list):
            kwargs["detection_mean"] = np.asarray(kwargs["detection_mean"])
        setup = {k: attrs[k] for k in ("layer", "batch_key") if attrs.get(k) is not None}
        with temporary_uns(adata, SETUP_KEY, setup):
            obj = cls(
                adata,
                cell_state_df,
                model_class=_MODEL_CLASSES[attrs["model_class"]],
                detection_mean_per_sample=attrs["detection_mean_per_sample"],
                detection_mean_correction=attrs["detection_mean_correction"],
                nuclei_counts=attrs.get("nuclei_counts"),
                nuclei_counts_weight=attrs.get("nuclei_counts_weight", 100.0),
                **kwargs,
            )
        if list(obj.var_names) != list(cell_state_df.index):
            raise InputError("adata's genes do not match the saved model's genes")
        obj._restore_guide(path, attrs, resolve_device(device))
        return obj

    def __repr__(self) -> str:
        return (
            f"Cell2location({self.module.__class__.__name__}, n_obs={self.n_obs}, n_vars={self.n_vars}, "
            f"n_factors={self.n_factors}, n_batch={self.n_batch}, trained={self.is_trained_})"
        )
