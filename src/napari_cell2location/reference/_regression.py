"""The user-facing reference RegressionModel: set-up, training generator, posterior export.

Mirrors cell2location 0.1.5's ``cell2location.models.RegressionModel`` API (``setup_anndata``,
``train``, ``export_posterior``, ``plot_history``, ``plot_QC``) without scvi-tools, in the style of
:class:`~napari_cell2location.Cell2location`: training is a generator (:meth:`RegressionModel.iter_train`)
yielding a :class:`~napari_cell2location.model.TrainStep` per optimisation step; cells are minibatched
(``batch_size`` 2500 by default); each model owns its parameters (no global Pyro param store).
"""

from __future__ import annotations

import logging
from datetime import date

import numpy as np
import pandas as pd
import pyro
import torch
from pyro.infer.autoguide import AutoNormal
from pyro.infer.autoguide.initialization import init_to_feasible, init_to_mean

from ..io._validate import InputError
from ..model._base import GuideOwner, temporary_uns
from ..model._cell2location import _describe, _to_numpy, resolve_device
from ..model._posterior import parse_quantile
from ..model._training import epoch_batches, svi_steps
from ._module import RegressionBackgroundDetectionTechPyroModel
from ._signatures import cluster_averages
from ._validate import MIN_CELLS_PER_LABEL, check_reference, label_codes

logger = logging.getLogger(__name__)

SETUP_KEY = "napari_cell2location_reference_setup"
_DEFAULT_SUMMARIES = ("means", "stds", "q05", "q95")
#: floor of the initial per-cluster means (a Gamma site cannot start at 0)
_INIT_FLOOR = 1e-3


def default_max_epochs(n_cells: int) -> int:
    """scvi-tools' heuristic used by the original: min(round(20000 / n_cells * 400), 400)."""
    return int(max(1, min(round(20000 / max(int(n_cells), 1) * 400), 400)))


class RegressionModel(GuideOwner):
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

    def __init__(self, adata, min_cells_per_label: int = MIN_CELLS_PER_LABEL, **model_kwargs):
        setup = dict(adata.uns.get(SETUP_KEY, {})) if hasattr(adata, "uns") else {}
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
        with pyro.settings.context(module_local_params=True):
            self.module = RegressionBackgroundDetectionTechPyroModel(
                n_obs=self.n_obs,
                n_vars=self.n_vars,
                n_factors=self.n_factors,
                n_batch=self.n_batch,
                **model_kwargs,
            )
            self.guide = self._make_guide()
        self.device = torch.device("cpu")
        self._history: list[float] = []
        self.is_trained_ = False
        self.samples: dict = {}
        self._summary = None
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
        if layer is not None and layer not in adata.layers:
            raise InputError(f"layer {layer!r} is not in adata.layers; layers present: {list(adata.layers.keys())}")
        if labels_key is None:
            raise InputError(
                "labels_key is required: name the obs column with cell types; "
                f"columns present: {list(adata.obs.columns)}"
            )
        for name, key in [("labels_key", labels_key), ("batch_key", batch_key)] + [
            ("categorical_covariate_keys", k) for k in (categorical_covariate_keys or [])
        ]:
            if key is not None and key not in adata.obs.columns:
                raise InputError(
                    f"{name} {key!r} is not a column of adata.obs; columns present: {list(adata.obs.columns)}"
                )
        setup = {
            "layer": layer,
            "batch_key": batch_key,
            "labels_key": labels_key,
            "categorical_covariate_keys": list(categorical_covariate_keys or []),
        }
        adata.uns[SETUP_KEY] = {k: v for k, v in setup.items() if v is not None and v != []}

    def _make_guide(self):
        init_vals = getattr(self.module, "init_vals", None) or {}
        base = init_to_mean(fallback=init_to_feasible)

        def init_loc_fn(site):
            if site["name"] in init_vals:
                return torch.as_tensor(np.asarray(init_vals[site["name"]]), dtype=torch.float32).to(
                    self.module.ones.device
                )
            return base(site)

        return AutoNormal(self.module, init_loc_fn=init_loc_fn, init_scale=0.1, create_plates=self.module.create_plates)

    # ------------------------------------------------------------------ data on the device
    def _args(self, ind: np.ndarray | None, device):
        x = self.X if ind is None else self.X[ind]
        ind = np.arange(self.n_obs) if ind is None else ind
        x = torch.as_tensor(np.ascontiguousarray(x.toarray(), dtype=np.float32), device=device)
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

    def _ensure_guide(self, device):
        """Move model and guide to ``device`` and set the guide up (no optimisation step)."""
        self.module.to(device)
        with pyro.settings.context(module_local_params=True):
            if self.guide.prototype_trace is None:
                ind = np.arange(min(self.n_obs, 2))
                x, idx, batch, label, extra = self._args(ind, device)
                self.guide._setup_prototype(None, idx, batch, label, extra)
            self.guide.to(device)
        self.device = device
        self._summary = None

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

        Yields
        ------
        TrainStep
        """
        if train_size != 1:
            raise InputError("train_size must be 1: the reference model trains on every cell")
        max_epochs = default_max_epochs(self.n_obs) if max_epochs is None else int(max_epochs)
        if max_epochs < 1:
            raise InputError(f"max_epochs must be at least 1, got {max_epochs}")
        if batch_size is not None and int(batch_size) < 1:
            raise InputError(f"batch_size must be a positive integer or None, got {batch_size}")
        if not float(lr) > 0:
            raise InputError(f"lr must be positive, got {lr}")
        dev = resolve_device(device)
        if seed is not None:
            pyro.set_rng_seed(int(seed))
        self._ensure_guide(dev)
        logger.info("training the reference model on %s", _describe(dev))
        batches, steps_per_epoch = epoch_batches(
            self.n_obs, batch_size, lambda ind: self._args(ind, dev), lambda: self._args(None, dev), seed
        )
        yield from self._guarded_training(
            svi_steps(
                self.module,
                self.guide,
                batches,
                max_epochs,
                steps_per_epoch,
                float(lr),
                self._history,
                num_particles=num_particles,
            )
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
        """Train the model (see :meth:`iter_train` for the parameters).

        Parameters
        ----------
        progress_bar : bool
            Show a tqdm progress bar on stderr.
        **kwargs
            ``device`` ('auto' | 'cpu' | 'cuda[:n]') and ``seed``.
        """
        return self._train_to_end(
            lambda: self.iter_train(max_epochs, batch_size, train_size, lr, num_particles, **kwargs),
            kwargs,
            {"device", "seed"},
            progress_bar,
            "training reference",
        )

    # ------------------------------------------------------------------ posterior
    def posterior_quantile(self, q: float = 0.5, use_median: bool = False, exclude_vars: list | None = None) -> dict:
        """Quantile ``q`` of every latent site, exactly from the guide (no sampling).

        Parameters
        ----------
        q : float
            Quantile in (0, 1).
        use_median : bool
            Same as ``q=0.5``.
        exclude_vars : list of str, optional
            Sites to leave out.

        Returns
        -------
        dict
            site -> numpy array.
        """
        q = 0.5 if use_median else float(q)
        if not 0 < q < 1:
            raise ValueError(f"q must be in (0, 1), got {q}")
        summary = self._guide_summary()
        return {s: _to_numpy(summary.quantile(s, q)) for s in summary.sites if s not in (exclude_vars or [])}

    def _summaries_from_guide(self, names) -> dict:
        """Means and stds (quadrature) and quantiles (exact) of every site, without sampling."""
        return self._guide_summary().summaries(names)

    @torch.no_grad()
    def sample_posterior(self, num_samples: int = 1000, summaries=_DEFAULT_SUMMARIES, max_values: int = 20_000_000):
        """Draw posterior samples of every site and summarise them, in gene chunks (bounded memory).

        Parameters
        ----------
        num_samples : int
            Draws per site.
        summaries : sequence of str
            'means', 'stds', quantiles such as 'q05'.
        max_values : int
            Largest number of draws held at once (num_samples x chunk size).

        Returns
        -------
        dict
            ``post_sample_{summary}`` -> {site: numpy array}.
        """
        from ..model._posterior import sorted_quantile

        summary = self._guide_summary()
        for k in summaries:
            if k not in ("means", "stds") and parse_quantile(k) is None:
                raise ValueError(f"unknown posterior summary {k!r}: use 'means', 'stds' or quantiles such as 'q05'")
        quantiles = {k: parse_quantile(k) for k in summaries if k not in ("means", "stds")}
        num_samples = int(num_samples)
        out = {f"post_sample_{k}": {} for k in summaries}
        for site in summary.sites:
            loc, scale = summary.loc_scale(site)
            flat_loc, flat_scale = loc.reshape(-1), scale.reshape(-1)
            chunk = max(1, int(max_values // num_samples))
            parts = {k: [] for k in summaries}
            for i in range(0, flat_loc.numel(), chunk):
                lo, sc = flat_loc[i : i + chunk], flat_scale[i : i + chunk]
                eps = torch.randn((num_samples, lo.numel()), dtype=lo.dtype, device=lo.device)
                draws = summary.sites[site](lo + sc * eps)
                if "means" in parts:
                    parts["means"].append(draws.mean(0))
                if "stds" in parts:
                    parts["stds"].append(draws.std(0))
                if quantiles:  # one sort serves every quantile
                    ordered = torch.sort(draws, dim=0).values
                    for k, q in quantiles.items():
                        parts[k].append(sorted_quantile(ordered, q))
            for k in summaries:
                out[f"post_sample_{k}"][site] = _to_numpy(torch.cat(parts[k])).reshape(tuple(loc.shape))
        return out

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
        samples = samples if samples is not None else self._summaries_from_guide(["means"])["post_sample_means"]
        y_e = np.asarray(samples["detection_mean_y_e"]).reshape(-1)
        per_cell = y_e[self.batch_index]  # (C,)
        if self.extra_categoricals is not None and "detection_tech_gene_tg" in samples:
            tech = np.asarray(samples["detection_tech_gene_tg"])
            rows = self.extra_categoricals + _to_numpy(self.module.tech_offsets)
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
        var = pd.Index(adata.var_names.astype(str))
        if var.equals(self.var_names):
            order = None
        elif len(var) == len(self.var_names) and set(var) == set(self.var_names):
            order = self.var_names.get_indexer(var)
        else:
            raise InputError(
                f"adata does not hold the genes the model was trained on ({adata.n_vars} given, {self.n_vars} "
                "trained); export into the training AnnData."
            )
        add_to_varm = list(add_to_varm)
        for k in add_to_varm:
            if k not in ("means", "stds") and parse_quantile(k) is None:
                raise InputError(f"unknown summary {k!r} in add_to_varm; use 'means', 'stds', 'q05', 'q50', ...")
        if use_quantiles:
            names = list(dict.fromkeys(["means", *add_to_varm]))
            self.samples = self._summaries_from_guide(names)
        else:
            names = list(dict.fromkeys([*_DEFAULT_SUMMARIES, *add_to_varm]))
            self.samples = self.sample_posterior(
                num_samples=int((sample_kwargs or {}).get("num_samples", 1000)), summaries=names
            )
        scaling = self.detection_scaling(self.samples["post_sample_means"]) if scale_average_detection else None
        self.scaling_ = scaling
        for k in add_to_varm:
            values = self.samples[f"post_sample_{k}"]["per_cluster_mu_fg"].T  # (G, F)
            if scaling is not None:
                values = values * scaling[:, None]
            if order is not None:
                values = values[order]
            adata.varm[f"{k}_per_cluster_mu_fg"] = pd.DataFrame(
                values, index=adata.var_names, columns=[f"{k}_per_cluster_mu_fg_{f}" for f in self.factor_names_]
            )
        adata.uns[export_slot] = self._export2adata(names, scale_average_detection)
        return adata

    def _export2adata(self, names, scaled: bool) -> dict:
        out = {
            "model_name": self.module.__class__.__name__,
            "date": str(date.today()),
            "factor_names": np.asarray(self.factor_names_, dtype=object),
            "var_names": np.asarray(self.var_names, dtype=object),
            "obs_names": np.asarray(self.obs_names, dtype=object),
            "batch_names": np.asarray(self.batch_names, dtype=object),
            "labels_key": self.labels_key,
            "scale_average_detection": bool(scaled),
        }
        if self.batch_key is not None:
            out["batch_key"] = self.batch_key
        for k in names:
            out[f"post_sample_{k}"] = {s: np.asarray(v) for s, v in self.samples[f"post_sample_{k}"].items()}
        return out

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
        samples = samples if samples is not None else self._summaries_from_guide(["means"])["post_sample_means"]
        ind_x = np.arange(self.n_obs) if ind_x is None else np.asarray(ind_x)
        extra = None if self.extra_categoricals is None else self.extra_categoricals[ind_x]
        return self.module.compute_expected(
            samples,
            self.batch_index[ind_x],
            self.label_index[ind_x],
            extra,
            _to_numpy(self.module.tech_offsets),
        )

    def plot_QC(self, summary_name: str = "means", use_n_obs: int = 1000, fig=None):
        """QC figure: reconstruction (observed vs expected counts), signatures vs cluster averages, loss.

        Returns the matplotlib Figure.
        """
        from matplotlib.colors import LogNorm

        from ..plotting import plot_history, plot_reconstruction

        key = f"post_sample_{summary_name}"
        samples = self.samples.get(key) or self._summaries_from_guide([summary_name])[key]
        rng = np.random.default_rng(0)
        ind = np.sort(rng.choice(self.n_obs, size=min(use_n_obs, self.n_obs), replace=False))
        mu = self.compute_expected(samples, ind_x=ind)["mu"]
        if fig is None:
            from matplotlib.figure import Figure

            fig = Figure(figsize=(14, 4))
        ax1, ax2, ax3 = fig.subplots(1, 3)
        plot_reconstruction(self.X[ind].toarray(), mu, ax=ax1)
        est = self.signatures().to_numpy().ravel()
        avg = self.cluster_averages_.to_numpy().ravel()
        ax2.hist2d(np.log10(avg + 1e-3), np.log10(est + 1e-3), bins=50, norm=LogNorm(), cmap="magma")
        ax2.set_xlabel("cluster average count (log10)")
        ax2.set_ylabel("estimated signature (log10)")
        ax2.set_title("signatures vs cluster averages")
        plot_history(self.history_, ax=ax3)
        fig.tight_layout()
        return fig

    # ------------------------------------------------------------------ persistence
    def save(self, dir_path, overwrite: bool = False):
        """Save guide parameters, settings and history to ``dir_path`` (re-load with :meth:`load`)."""
        attrs = {
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
        self._write_saved(dir_path, overwrite, attrs)

    @classmethod
    def load(cls, dir_path, adata, device: str = "cpu"):
        """Load a model saved with :meth:`save` for the same reference ``adata``; no training step is run."""
        path, attrs = cls._read_saved(dir_path)
        if list(pd.Index(adata.var_names.astype(str))) != attrs["var_names"]:
            raise InputError("adata's genes differ from those the model was trained on")
        with temporary_uns(adata, SETUP_KEY, None):
            cls.setup_anndata(adata, **attrs["setup"])
            obj = cls(adata, **attrs["model_kwargs"])
        if obj.factor_names_ != attrs["factor_names"]:
            raise InputError("adata's labels differ from those the model was trained on")
        obj._restore_guide(path, attrs, resolve_device(device))
        return obj

    def __repr__(self) -> str:
        return (
            f"RegressionModel(n_obs={self.n_obs}, n_vars={self.n_vars}, n_factors={self.n_factors}, "
            f"n_batch={self.n_batch}, trained={self.is_trained_})"
        )
