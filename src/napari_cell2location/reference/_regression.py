"""The user-facing reference RegressionModel: set-up, training generator, posterior export.

Mirrors cell2location 0.1.5's ``cell2location.models.RegressionModel`` API (``setup_anndata``,
``train``, ``export_posterior``, ``plot_history``, ``plot_QC``) without scvi-tools, in the style of
:class:`~napari_cell2location.Cell2location`: training is a generator (:meth:`RegressionModel.iter_train`)
yielding a :class:`~napari_cell2location.model.TrainStep` per optimisation step; cells are minibatched
(``batch_size`` 2500 by default); each model owns its parameters (no global Pyro param store).
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import torch

from .._contract import signature_column, signature_key
from .._infer import PyroEstimator, aligned_order, register_fields, to_numpy
from ..io import InputError
from ._module import RegressionBackgroundDetectionTechPyroModel
from ._signatures import cluster_averages
from ._validate import MIN_CELLS_PER_LABEL, check_reference, label_codes

logger = logging.getLogger(__name__)

SETUP_KEY = "napari_cell2location_reference_setup"
#: floor of the initial per-cluster means (a Gamma site cannot start at 0)
_INIT_FLOOR = 1e-3


def default_max_epochs(n_cells: int) -> int:
    """scvi-tools' heuristic used by the original: min(round(20000 / n_cells * 400), 400)."""
    return int(max(1, min(round(20000 / max(int(n_cells), 1) * 400), 400)))


class RegressionModel(PyroEstimator):
    """Estimate reference cell-type signatures with a negative binomial regression (``spec/MODEL.md`` §4).

    Each cell's counts are modelled as NB with mean
    ``(mu_{label,g} + s_{batch,g}) * y_batch * technology effects``; the per-cluster means
    ``mu_fg``, rescaled to the reference's average detection efficiency, are the signatures.

    Parameters
    ----------
    adata : anndata.AnnData
        Labelled single-cell reference, (n_cells, n_genes), raw integer counts, registered with
        :meth:`setup_anndata` (``labels_key`` required).
    min_cells_per_label : int
        Labels with fewer cells are warned about.
    **model_kwargs
        Passed to :class:`RegressionBackgroundDetectionTechPyroModel` (priors, ``init_vals``).

    Attributes
    ----------
    module : RegressionBackgroundDetectionTechPyroModel
        The model.
    guide : pyro.infer.autoguide.AutoNormal
        Its variational posterior (parameters owned by this object).
    factor_names_ : list of str
        Cell types, in the order of the signatures' columns.
    history_ : dict
        ``{'elbo_train': DataFrame}`` loss per epoch.
    samples : dict
        Posterior summaries after :meth:`export_posterior`.
    """

    PARAMS_FILE = "model.pt"  # name kept from earlier saves
    _PROGRESS = "training reference"
    _QC_EXTRA_PANELS = 1

    def __init__(self, adata, min_cells_per_label: int = MIN_CELLS_PER_LABEL, **model_kwargs):
        setup = dict(adata.uns.get(SETUP_KEY, {})) if hasattr(adata, "uns") else {}
        self._build(adata, setup, min_cells_per_label, model_kwargs)

    def _build(self, adata, setup: dict, min_cells_per_label: int, model_kwargs: dict):
        """The constructor's body, with the set-up given (from ``adata.uns`` or a saved model)."""
        model_kwargs = dict(model_kwargs)
        if not setup.get("labels_key"):
            raise InputError(
                "the reference is not set up: call RegressionModel.setup_anndata(adata, labels_key=..., "
                f"batch_key=...) first; obs columns present: {list(adata.obs.columns)}."
            )
        self.layer = setup.get("layer")
        self.labels_key = setup["labels_key"]
        self.batch_key = setup.get("batch_key")
        self.categorical_covariate_keys = list(setup.get("categorical_covariate_keys", []))
        ref = check_reference(
            adata, self.labels_key, batch_key=self.batch_key, layer=self.layer, min_cells=min_cells_per_label
        )
        self.adata = adata
        self.X = ref.X
        self.obs_names, self.var_names = ref.obs_names, ref.var_names
        self.label_index, self.factor_names_ = ref.label_index, list(ref.factor_names)
        self.batch_index, self.batch_names = ref.batch_index, list(ref.batch_names)
        self.label_counts = ref.label_counts
        self.small_labels = ref.small_labels
        self.input_report = ref.report
        self.n_obs, self.n_vars = int(self.X.shape[0]), int(self.X.shape[1])
        self.n_factors, self.n_batch = len(self.factor_names_), len(self.batch_names)

        self.extra_categoricals = None
        self.extra_categorical_names: dict = {}
        if self.categorical_covariate_keys:
            cols = []
            for key in self.categorical_covariate_keys:
                codes, names = label_codes(adata, key)
                cols.append(codes)
                self.extra_categorical_names[key] = names
            self.extra_categoricals = np.stack(cols, axis=1).astype(np.int64)  # (n_cells, K)
            model_kwargs.setdefault("n_extra_categoricals", [len(v) for v in self.extra_categorical_names.values()])

        self.cluster_averages_ = pd.DataFrame(
            cluster_averages(self.X, self.label_index, self.n_factors).T,
            index=self.var_names,
            columns=self.factor_names_,
        )
        if model_kwargs.get("init_vals") is None:
            init = np.maximum(self.cluster_averages_.to_numpy().T, _INIT_FLOOR).astype(np.float32)
            model_kwargs["init_vals"] = {"per_cluster_mu_fg": init}
        self.model_kwargs = {k: v for k, v in model_kwargs.items() if k != "init_vals"}
        dims = {"n_obs": self.n_obs, "n_vars": self.n_vars, "n_factors": self.n_factors, "n_batch": self.n_batch}
        self._init_inference(
            lambda: RegressionBackgroundDetectionTechPyroModel(**dims, **model_kwargs), model_kwargs["init_vals"]
        )
        logger.info(
            "RegressionModel: %d cells x %d genes, %d cell types, %d batch(es), covariates %s",
            self.n_obs,
            self.n_vars,
            self.n_factors,
            self.n_batch,
            self.categorical_covariate_keys or "none",
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
    ):
        """Register which fields of the reference the model reads.

        Only ``adata.uns['napari_cell2location_reference_setup']`` is written.

        Parameters
        ----------
        adata : anndata.AnnData
            Labelled single-cell reference.
        layer : str, optional
            Key in ``adata.layers`` with raw counts (default ``adata.X``).
        batch_key : str, optional
            Column of ``adata.obs`` with the batch (sample) of each cell: one detection efficiency
            and one additive background per batch.
        labels_key : str
            Column of ``adata.obs`` with the cell type of each cell (required).
        categorical_covariate_keys : list of str, optional
            Columns of ``adata.obs`` with technical covariates (e.g. 3' vs 5' chemistry): each
            category gets a gene-wise multiplicative effect.
        continuous_covariate_keys : list of str, optional
            Not supported by the reference model (the original ignores them too); must be empty.
        """
        if continuous_covariate_keys:
            raise InputError("continuous_covariate_keys are not supported by the reference RegressionModel")
        if labels_key is None:
            raise InputError(
                "labels_key is required: name the obs column with cell types; "
                f"columns present: {list(adata.obs.columns)}"
            )
        register_fields(
            adata,
            SETUP_KEY,
            layer,
            labels_key=labels_key,
            batch_key=batch_key,
            categorical_covariate_keys=categorical_covariate_keys or [],
        )

    # ------------------------------------------------------------------ data on the device
    def _args(self, ind: np.ndarray | None, device, counts: bool = True):
        x = None
        if counts:
            x = self.X if ind is None else self.X[ind]
            x = torch.as_tensor(np.ascontiguousarray(x.toarray(), dtype=np.float32), device=device)
        ind = np.arange(self.n_obs) if ind is None else ind
        extra = None
        if self.extra_categoricals is not None:
            extra = torch.as_tensor(self.extra_categoricals[ind], device=device)
        return (
            x,
            torch.as_tensor(ind, device=device),
            torch.as_tensor(self.batch_index[ind], device=device),
            torch.as_tensor(self.label_index[ind], device=device),
            extra,
        )

    def _batch_args(self, ind, device):
        return self._args(ind, device)

    def _full_args(self, device):
        return self._args(None, device)

    def _prototype_args(self, device):
        return self._args(np.arange(min(self.n_obs, 2)), device, counts=False)  # every site is global

    # ------------------------------------------------------------------ training
    def iter_train(
        self,
        max_epochs: int | None = None,
        batch_size: int | None = 2500,
        train_size: float = 1,
        lr: float = 0.002,
        num_particles: int = 1,
        device: str = "auto",
        seed: int | None = None,
        checkpoint_dir=None,
        checkpoint_every: int | None = None,
        resume: bool = False,
    ):
        """Train, yielding a :class:`~napari_cell2location.model.TrainStep` after every optimisation step.

        Closing the generator (e.g. a GUI's cancel) stops training between steps; the parameters
        and ``history_`` keep what was done so far.

        Parameters
        ----------
        max_epochs : int, optional
            Passes through the cells (default: min(round(20000 / n_cells * 400), 400)).
        batch_size : int, optional
            Cells per minibatch (default 2500); ``None`` trains on all cells at once.
        train_size : float
            Must be 1 (every cell is used for training).
        lr : float
            Adam learning rate.
        num_particles : int
            Particles of the ELBO estimate.
        device : str
            'auto' (CUDA when present), 'cpu', or 'cuda[:n]'.
        seed : int, optional
            Seed of torch's and Pyro's random number generators and of the minibatch order.
        checkpoint_dir, checkpoint_every, resume : optional
            Write a checkpoint into the folder ``checkpoint_dir`` every ``checkpoint_every`` epochs
            (default about every 100 steps) and, with ``resume``, continue from the one there to
            ``max_epochs`` in all, as an uninterrupted fit would
            (:class:`~napari_cell2location._infer._checkpoint.Checkpointer` says what is kept and checked).

        Yields
        ------
        TrainStep
        """
        yield from self._svi(
            max_epochs=default_max_epochs(self.n_obs) if max_epochs is None else max_epochs,
            batch_size=batch_size,
            train_size=train_size,
            lr=lr,
            num_particles=num_particles,
            device=device,
            seed=seed,
            checkpoint_dir=checkpoint_dir,
            checkpoint_every=checkpoint_every,
            resume=resume,
        )

    def train(
        self,
        max_epochs: int | None = None,
        batch_size: int | None = 2500,
        train_size: float = 1,
        lr: float = 0.002,
        num_particles: int = 1,
        progress_bar: bool = True,
        **kwargs,
    ):
        """Train the model (see :meth:`iter_train` for the parameters); returns the model.

        Parameters
        ----------
        progress_bar : bool
            Show a tqdm progress bar on stderr.
        **kwargs
            ``device`` ('auto' | 'cpu' | 'cuda[:n]'), ``seed`` and ``checkpoint_dir`` /
            ``checkpoint_every`` / ``resume`` (see :meth:`iter_train`).
        """
        args = {"max_epochs": max_epochs, "batch_size": batch_size, "train_size": train_size, "lr": lr}
        return self._train_to_end({**args, "num_particles": num_particles}, kwargs, progress_bar)

    # ------------------------------------------------------------------ posterior
    def detection_scaling(self, samples: dict | None = None) -> np.ndarray:
        """Average detection of the reference's cells, per gene: mean over cells of y_e(c) * tech effects.

        Multiplying ``per_cluster_mu_fg`` by it gives expected counts per cell of each type at the
        reference's average sensitivity, which is invariant to the scale that the model cannot
        identify between ``per_cluster_mu_fg`` and ``detection_mean_y_e`` (ours).

        Returns
        -------
        numpy.ndarray
            (n_genes,) factor.
        """
        samples = samples if samples is not None else self.posterior_means()
        y_e = np.asarray(samples["detection_mean_y_e"]).reshape(-1)
        per_cell = y_e[self.batch_index]  # (C,)
        if self.extra_categoricals is not None and "detection_tech_gene_tg" in samples:
            tech = np.asarray(samples["detection_tech_gene_tg"])
            rows = self.extra_categoricals + to_numpy(self.module.tech_offsets)
            # mean over cells of y * prod_k t_k: group cells by their covariate combination
            combos, inverse = np.unique(rows, axis=0, return_inverse=True)
            inverse = inverse.reshape(-1)
            weight = np.bincount(inverse, weights=per_cell, minlength=len(combos)) / self.n_obs
            return (weight[:, None] * tech[combos].prod(axis=1)).sum(0)
        return np.full(self.n_vars, per_cell.mean())

    def export_posterior(
        self,
        adata,
        sample_kwargs: dict | None = None,
        export_slot: str = "mod",
        add_to_varm: list = ("means", "stds", "q05", "q95"),
        scale_average_detection: bool = True,
        use_quantiles: bool = False,
    ):
        """Summarise the posterior and write the signatures into ``adata.varm`` (cell2location's keys).

        Writes ``adata.varm['{k}_per_cluster_mu_fg']`` (DataFrames, (n_genes, n_cell_types), columns
        ``'{k}_per_cluster_mu_fg_{cell_type}'``) for each k in ``add_to_varm`` and
        ``adata.uns[export_slot]`` (model name, date, factor/var/obs names, ``post_sample_{k}`` dicts).
        Read the signatures back with :func:`signatures_from_adata` or :meth:`signatures`.

        Parameters
        ----------
        adata : anndata.AnnData
            The reference the model was trained on (same genes).
        sample_kwargs : dict, optional
            ``num_samples`` for the sampling path (default 1000).
        export_slot : str
            Key of ``adata.uns`` to write.
        add_to_varm : sequence of str
            Summaries to write: 'means', 'stds', 'q05', 'q50', 'q95', ...
        scale_average_detection : bool
            Multiply the summaries by :meth:`detection_scaling`, so signatures are counts per cell at
            the reference's average detection efficiency.
        use_quantiles : bool
            Compute summaries from the guide directly (exact quantiles, quadrature means and stds)
            instead of from samples.

        Returns
        -------
        anndata.AnnData
            ``adata``, with the outputs added.
        """
        order = aligned_order(adata.var_names, self.var_names, "genes")
        sample_kwargs = {"num_samples": int((sample_kwargs or {}).get("num_samples", 1000))}
        names = self._export_summaries(add_to_varm, "add_to_varm", use_quantiles, sample_kwargs, required=["means"])
        scaling = self.detection_scaling(self.samples["post_sample_means"]) if scale_average_detection else None
        self.scaling_ = scaling
        for k in add_to_varm:
            values = self.samples[f"post_sample_{k}"]["per_cluster_mu_fg"].T  # (G, F)
            if scaling is not None:
                values = values * scaling[:, None]
            adata.varm[signature_key(k)] = pd.DataFrame(
                values if order is None else values[order],
                index=adata.var_names,
                columns=[signature_column(k, f) for f in self.factor_names_],
            )
        extra = {"labels_key": self.labels_key, "scale_average_detection": bool(scale_average_detection)}
        if self.batch_key is not None:
            extra["batch_key"] = self.batch_key
        adata.uns[export_slot] = self._export_uns(names, **extra)
        return adata

    def signatures(self, summary: str = "means", scale_average_detection: bool = True) -> pd.DataFrame:
        """Signatures (genes x cell types) straight from the guide, ready for :class:`Cell2location`.

        Parameters
        ----------
        summary : str
            'means' (quadrature), or a quantile such as 'q05' (exact).
        scale_average_detection : bool
            Rescale to the reference's average detection efficiency (see :meth:`detection_scaling`).

        Returns
        -------
        pandas.DataFrame
            (n_genes, n_cell_types) float64.
        """
        names = list(dict.fromkeys(["means", summary]))
        post = self._summaries_from_guide(names)
        values = post[f"post_sample_{summary}"]["per_cluster_mu_fg"].T.astype(np.float64)
        if scale_average_detection:
            values = values * self.detection_scaling(post["post_sample_means"])[:, None]
        return pd.DataFrame(values, index=self.var_names.copy(), columns=list(self.factor_names_))

    # ------------------------------------------------------------------ QC
    def compute_expected(self, samples: dict | None = None, ind_x=None) -> dict:
        """Expected counts of each gene in each cell (``mu``, (n_cells, n_genes)) and ``alpha``."""
        samples = samples if samples is not None else self.posterior_means()
        ind_x = np.arange(self.n_obs) if ind_x is None else np.asarray(ind_x)
        extra = None if self.extra_categoricals is None else self.extra_categoricals[ind_x]
        return self.module.compute_expected(
            samples,
            self.batch_index[ind_x],
            self.label_index[ind_x],
            extra,
            to_numpy(self.module.tech_offsets),
        )

    def _qc_panels(self, axes, samples: dict) -> None:
        """Signatures against the cluster averages they started from."""
        from matplotlib.colors import LogNorm

        (ax,) = axes
        est = self.signatures().to_numpy().ravel()
        avg = self.cluster_averages_.to_numpy().ravel()
        ax.hist2d(np.log10(avg + 1e-3), np.log10(est + 1e-3), bins=50, norm=LogNorm(), cmap="magma")
        ax.set_xlabel("cluster average count (log10)")
        ax.set_ylabel("estimated signature (log10)")
        ax.set_title("signatures vs cluster averages")

    # ------------------------------------------------------------------ persistence
    def _save_attrs(self) -> dict:
        return {
            "setup": {
                "layer": self.layer,
                "labels_key": self.labels_key,
                "batch_key": self.batch_key,
                "categorical_covariate_keys": self.categorical_covariate_keys,
            },
            "model_kwargs": self.model_kwargs,
            "factor_names": self.factor_names_,
            "var_names": list(self.var_names),
        }

    @classmethod
    def _from_saved(cls, path, attrs: dict, adata):
        if list(pd.Index(adata.var_names.astype(str))) != attrs["var_names"]:
            raise InputError("adata's genes differ from those the model was trained on")
        setup = {k: v for k, v in attrs["setup"].items() if v is not None and v != []}
        obj = cls.__new__(cls)
        obj._build(adata, setup, MIN_CELLS_PER_LABEL, attrs["model_kwargs"])
        if obj.factor_names_ != attrs["factor_names"]:
            raise InputError("adata's labels differ from those the model was trained on")
        return obj
