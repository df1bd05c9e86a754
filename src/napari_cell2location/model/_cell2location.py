"""The user-facing Cell2location class: set-up, training generator, posterior export, save/load.

Mirrors cell2location 0.1.5's ``cell2location.models.Cell2location`` API (``setup_anndata``,
``train``, ``export_posterior``, ``posterior_quantile``, ``sample_posterior``, ``plot_QC``,
``save``/``load``) without scvi-tools. Training is a generator, :meth:`Cell2location.iter_train`,
yielding one :class:`~napari_cell2location.model.TrainStep` per optimisation step, so a GUI can
show progress and cancel between steps; :meth:`Cell2location.train` simply consumes it. What it
shares with the reference regression is :class:`~napari_cell2location._infer.PyroEstimator`.
"""

from __future__ import annotations

import inspect
import logging
import time

import numpy as np
import pandas as pd
import torch
from scipy import sparse

from .._contract import abundance_column, abundance_key
from .._infer import (
    AnswerStopper,
    ConvergenceStopper,
    DataParallel,
    PyroEstimator,
    aligned_order,
    register_fields,
    to_numpy,
)
from .._variants import ModelVariant
from ..io import MIN_SHARED_GENES, InputError, prepare_inputs
from ._elbo import MeanFieldELBO
from ._persist import SavedCell2location
from ._priors import check_n_cells, detection_mean

logger = logging.getLogger(__name__)

SETUP_KEY = "napari_cell2location_setup"
#: learning rate of ``train(max_epochs=None)``: 25 x the original's, stable with the analytic ELBO terms
AUTO_LR = 0.05
#: most epochs ``train(max_epochs=None)`` runs before it gives up waiting for convergence
AUTO_MAX_EPOCHS = 5000
#: the original's learning rate, used with an explicit ``max_epochs``
ORIGINAL_LR = 0.002


class Cell2location(SavedCell2location, PyroEstimator):
    """Cell2location: estimate the absolute abundance of reference cell types in each spot.

    Parameters
    ----------
    adata : anndata.AnnData
        Spatial counts (n_obs spots, n_vars genes), registered with :meth:`setup_anndata`
        (if not, its defaults are used: ``adata.X``, one batch).
    cell_state_df : pandas.DataFrame
        Reference signatures, (n_genes, n_factors): expression of each gene in each cell type.
        Genes are matched to ``adata.var_names`` by name; only shared genes are used.
    model_class : ModelVariant, type or str, optional
        One of the three Pyro modules: a :class:`~napari_cell2location.model.ModelVariant`, its
        short name ('main', 'no-factorisation', 'no-mg'), the module class or its class name;
        default the main model
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
    variant : ModelVariant
        Which of the three models this is.
    pyro_elbo : bool
        Train through Pyro's ``Trace_ELBO`` instead of the fused ELBO (:mod:`._elbo`), which gives
        the same loss and gradients for the same draws at a fraction of the cost per step. False
        by default; True is kept as a reference.
    """

    pyro_elbo: bool = False
    _NAN_HINT = "normalised or non-integer counts, broken signatures"
    _DETERMINISTIC_INPUTS = ("m_g",)
    _ANSWER_SITE = "w_sf"

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
        setup = dict(adata.uns.get(SETUP_KEY, {})) if hasattr(adata, "uns") else {}
        self._build(
            adata,
            cell_state_df,
            ModelVariant.of(model_class),
            setup,
            detection_mean_per_sample,
            detection_mean_correction,
            nuclei_counts,
            nuclei_counts_weight,
            model_kwargs,
        )

    def _build(self, adata, cell_state_df, variant, setup, per_sample, correction, nuclei_counts, weight, kwargs):
        """The constructor's body, with the set-up given (from ``adata.uns`` or a saved model)."""
        model_class = variant.module_class
        kwargs = dict(kwargs)
        min_shared_genes = int(kwargs.pop("min_shared_genes", MIN_SHARED_GENES))
        # a data-parallel shard takes the whole section's genes and batches
        genes, batch_names = kwargs.pop("genes", None), kwargs.pop("batch_names", None)
        sig = inspect.signature(model_class.__init__)
        unknown = [k for k in kwargs if k not in sig.parameters]
        if unknown:
            raise InputError(f"unknown model arguments {unknown} for {model_class.__name__}")
        self.layer, self.batch_key = setup.get("layer"), setup.get("batch_key")
        prep = prepare_inputs(
            adata,
            cell_state_df,
            layer=self.layer,
            batch_key=self.batch_key,
            min_shared_genes=min_shared_genes,
            genes=genes,
            batch_names=batch_names,
        )
        self.adata = adata
        self.X = prep.X
        self.obs_names, self.var_names = prep.obs_names, prep.var_names
        self.factor_names_ = list(prep.factor_names)
        self.batch_index, self.batch_names = prep.batch_index, prep.batch_names
        self.input_report = prep.report
        self.cell_state_df = pd.DataFrame(prep.cell_state, index=prep.var_names, columns=prep.factor_names)
        self.n_obs, self.n_vars = int(prep.X.shape[0]), int(prep.X.shape[1])
        self.n_factors, self.n_batch = len(self.factor_names_), len(self.batch_names)

        n_cells = kwargs.get("N_cells_per_location", sig.parameters["N_cells_per_location"].default)
        if isinstance(n_cells, pd.Series):  # per-spot values by spot name
            kwargs["N_cells_per_location"] = n_cells = self._by_spot(n_cells, "N_cells_per_location")
        n_cells = np.asarray(check_n_cells(n_cells, self.n_obs))
        if "detection_mean" not in kwargs:
            kwargs["detection_mean"] = detection_mean(
                self.X, n_cells, self.cell_state_df, self.batch_index, self.n_batch, per_sample, float(correction)
            )
        self.variant, self.model_class, self.model_kwargs = variant, model_class, kwargs
        self.detection_mean_per_sample, self.detection_mean_correction = bool(per_sample), float(correction)
        dims = {"n_obs": self.n_obs, "n_vars": self.n_vars, "n_factors": self.n_factors, "n_batch": self.n_batch}
        try:  # the modules refuse settings they cannot take (e.g. per-spot N without the factorisation)
            self._init_inference(
                lambda: model_class(**dims, cell_state_mat=prep.cell_state, **kwargs), kwargs.get("init_vals")
            )
        except ValueError as err:
            raise InputError(str(err)) from None
        if nuclei_counts is not None:
            if isinstance(nuclei_counts, pd.Series):
                nuclei_counts = self._by_spot(nuclei_counts, "nuclei_counts")
            try:
                self.module.set_nuclei_counts(nuclei_counts, weight)
            except ValueError as err:
                raise InputError(str(err)) from None
        logger.info(
            "Cell2location: %d spots x %d genes, %d cell types, %d batch(es), model %s",
            self.n_obs,
            self.n_vars,
            self.n_factors,
            self.n_batch,
            model_class.__name__,
        )

    def _by_spot(self, values: pd.Series, name: str) -> np.ndarray:
        """Per-spot values given by spot name, in the model's spot order (every spot must be there)."""
        missing = self.obs_names.difference(values.index.astype(str))
        if len(missing):
            raise InputError(f"{name} has no value for {len(missing)} spots, e.g. {missing[0]!r}")
        return values.set_axis(values.index.astype(str)).reindex(self.obs_names).to_numpy(dtype=np.float64)

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
        register_fields(
            adata,
            SETUP_KEY,
            layer,
            batch_key=batch_key,
            labels_key=labels_key,
            categorical_covariate_keys=categorical_covariate_keys or [],
            continuous_covariate_keys=continuous_covariate_keys or [],
        )

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

    def _prototype_args(self, device):
        return None, None, torch.as_tensor(self.batch_index, device=device)

    def _set_nnls_init(self, device):
        """Start abundances (and cells per spot) from a non-negative regression (see ``_init``)."""
        from ._init import nnls_abundance

        t = time.perf_counter()
        w = nnls_abundance(
            self.X,
            self.cell_state_df.to_numpy(),
            to_numpy(self.module.detection_mean).ravel(),
            batch_index=self.batch_index,
            device=device,
        )
        self._init_values["w_sf"] = w
        if "n_s_cells_per_location" in self.module.list_obs_plate_vars()["sites"]:
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
        early_stopping: bool | AnswerStopper | ConvergenceStopper | None = None,
        parallel: DataParallel | None = None,
        checkpoint_dir=None,
        checkpoint_every: int | None = None,
        resume: bool = False,
    ):
        """Train, yielding a :class:`~napari_cell2location.model.TrainStep` after every optimisation step.

        Closing the generator (e.g. a GUI's cancel) stops training between steps; the
        parameters and ``history_`` keep what was done so far.

        Two ways to train, both from the original's starting point (every w_sf at its prior mean):

        * ``max_epochs=<int>`` (default 30000): the original's schedule, exactly that many epochs at
          lr 0.002 with the original's single-draw ELBO estimate.
        * ``max_epochs=None`` (fast, ours): the same path at :data:`AUTO_LR` (25x the learning rate),
          made stable by an ELBO estimate whose prior and entropy terms are exact expectations (the
          same objective, far less noise), stopped when the answer has converged: an
          :class:`~napari_cell2location.model.AnswerStopper` on the posterior means of w_sf, at most
          :data:`AUTO_MAX_EPOCHS` epochs. What stopped it is in ``history_['stop_reason']``.

        Parameters
        ----------
        max_epochs : int or None
            Passes through the data (one step per epoch when ``batch_size`` is None); ``None``
            trains until the answer has converged.
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
            Starting point of the abundances, used when the guide is first set up: 'prior' (default:
            every w_sf at its prior mean, as the original) or 'nnls' (a non-negative regression of the
            counts on the signatures: close in seconds, but training then settles elsewhere than the
            original does).
        early_stopping : bool, AnswerStopper or ConvergenceStopper, optional
            Stop when the answer has converged (True: an ``AnswerStopper`` with its defaults; or the
            stopper given, e.g. ``AnswerStopper(tolerance=0.005)`` to train further); default True
            with ``max_epochs=None``, else False.
        parallel : DataParallel, optional
            This process's place in a data-parallel fit: the model holds its shard of the spots and
            ``batch_size`` is the total (usually reached through ``iter_fit``, which makes the shards).
        checkpoint_dir, checkpoint_every, resume : optional
            Write a checkpoint into the folder ``checkpoint_dir`` every ``checkpoint_every`` epochs
            (default about every 100 steps) and, with ``resume``, continue from the one there to
            ``max_epochs`` in all, as an uninterrupted fit would
            (:class:`~napari_cell2location._infer._checkpoint.Checkpointer` says what is kept and checked).

        Yields
        ------
        TrainStep
        """
        auto = max_epochs is None
        init = init or "prior"
        if init not in ("prior", "nnls"):
            raise InputError(f"init must be 'prior' or 'nnls', got {init!r}")
        if early_stopping is None:
            early_stopping = auto
        if not isinstance(early_stopping, AnswerStopper | ConvergenceStopper):
            early_stopping = AnswerStopper() if early_stopping else None
        analytic = auto  # the original's schedule keeps the original's estimator, draw for draw
        world = parallel.world_size if parallel is not None else 1
        if world > 1 and self.pyro_elbo:
            raise InputError("a data-parallel fit needs the fused ELBO (pyro_elbo=False)")
        yield from self._svi(
            max_epochs=AUTO_MAX_EPOCHS if auto else max_epochs,
            batch_size=batch_size,
            train_size=train_size,
            lr=lr if lr is not None else (AUTO_LR if auto else ORIGINAL_LR),
            num_particles=num_particles,
            device=device,
            seed=seed,
            scale_elbo=scale_elbo,
            stopper=early_stopping,
            make_loss=None
            if self.pyro_elbo
            else lambda: MeanFieldELBO(
                self.module, self.guide, num_particles, analytic=analytic, global_weight=1 / world
            ),
            before_setup=self._set_nnls_init if init == "nnls" else None,
            parallel=parallel,
            checkpoint_dir=checkpoint_dir,
            checkpoint_every=checkpoint_every,
            resume=resume,
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
        """Train the model (see :meth:`iter_train` for the parameters); returns the model.

        Parameters
        ----------
        progress_bar : bool
            Show a tqdm progress bar on stderr.
        **kwargs
            ``device`` ('auto' | 'cpu' | 'cuda[:n]'), ``seed``, ``init`` ('prior' | 'nnls'),
            ``early_stopping`` and ``checkpoint_dir`` / ``checkpoint_every`` / ``resume`` (see
            :meth:`iter_train`).
        """
        args = {"max_epochs": max_epochs, "batch_size": batch_size, "train_size": train_size, "lr": lr}
        args.update(num_particles=num_particles, scale_elbo=scale_elbo)
        return self._train_to_end(args, kwargs, progress_bar)

    # ------------------------------------------------------------------ posterior
    def _deterministic_draws(self, draws: dict) -> tuple[dict, dict]:
        det = self.module.deterministic_sites(draws)
        return {"u_sf_mRNA_factors": det["u_sf_mRNA_factors"]}, {
            "detection_hyp_prior_alpha": det["detection_hyp_prior_alpha"]
        }

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
        order = aligned_order(adata.obs_names, self.obs_names, "spots")
        names = self._export_summaries(add_to_obsm, "add_to_obsm", use_quantiles, sample_kwargs)
        for k in add_to_obsm:
            values = self.samples[f"post_sample_{k}"]["w_sf"]
            adata.obsm[abundance_key(k)] = pd.DataFrame(
                values if order is None else values[order],
                index=adata.obs_names,
                columns=[abundance_column(k, f) for f in self.factor_names_],
            )
        adata.uns[export_slot] = self._export_uns(names)
        return adata

    # ------------------------------------------------------------------ QC
    def compute_expected(self, samples: dict | None = None, ind_x=None, hide_ambient=False, hide_cell_type=False):
        """Expected counts of each kept gene in each spot (see the module's ``compute_expected``)."""
        samples = samples if samples is not None else self.posterior_means()
        return self.module.compute_expected(samples, self.batch_index, ind_x, hide_ambient, hide_cell_type)

    def compute_expected_per_cell_type(self, samples: dict | None = None, ind_x=None):
        """Observed counts split by cell type (see the module's ``compute_expected_per_cell_type``)."""
        samples = samples if samples is not None else self.posterior_means()
        return self.module.compute_expected_per_cell_type(samples, self.batch_index, ind_x, x_data=self.X)
