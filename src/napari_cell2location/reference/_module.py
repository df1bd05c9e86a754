"""The reference regression model as a Pyro module (``spec/MODEL.md`` §4).

Single cells C x G with labels (F cell types), batches (E) and optional technology covariates (T
categories in all). Site names are the original cell2location 0.1.5's, so exported posterior
dictionaries line up. Gamma(a, b) is shape a, rate b. The observation plate (cells) is at dim -2 and
supports subsampling (``idx``) for minibatches; every latent site is global.
"""

from __future__ import annotations

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule

from .._infer import CountsPattern, NegativeBinomialCounts, overdispersion, sample_gene_background

_ALPHA_G_PHI_HYP = {"alpha": 9.0, "beta": 3.0}
_GENE_ADD_ALPHA_HYP = {"alpha": 9.0, "beta": 3.0}
_GENE_ADD_MEAN_HYP = {"alpha": 1.0, "beta": 100.0}
_DETECTION_HYP = {"mean_alpha": 1.0, "mean_beta": 1.0}
_GENE_TECH = {"mean": 1.0, "alpha": 200.0}


class RegressionBackgroundDetectionTechPyroModel(PyroModule):
    """Negative binomial regression of single-cell counts on cell-type labels.

    mu_cg = (mu_{label(c), g} + s_{e(c), g}) * y_{e(c)} * prod_k t_{k(c), g};
    counts ~ NB(mu, alpha_g) with alpha_g = 1 / alpha_g_inverse_g^2.

    Parameters
    ----------
    n_obs : int
        C, cells.
    n_vars : int
        G, genes.
    n_factors : int
        F, cell types (labels).
    n_batch : int
        E, batches (samples); each has its own detection efficiency and additive background.
    n_extra_categoricals : list of int, optional
        Number of categories of each technology covariate; each category gets a gene-wise
        multiplicative effect ``detection_tech_gene_tg`` ~ Gamma(alpha, alpha / mean).
    alpha_g_phi_hyp_prior : dict
        ``alpha``, ``beta`` of the overdispersion hyper-prior (default 9, 3).
    gene_add_alpha_hyp_prior, gene_add_mean_hyp_prior : dict
        ``alpha``, ``beta`` of the additive background hyper-priors (default 9, 3 and 1, 100).
    detection_hyp_prior : dict
        ``mean_alpha``, ``mean_beta`` of the per-batch detection efficiency prior (default 1, 1).
    gene_tech_prior : dict
        ``mean``, ``alpha`` of the technology effect prior (default 1, 200).
    init_vals : dict, optional
        Initial values of sites (site -> array), e.g. ``per_cluster_mu_fg`` (F, G) at the cluster
        averages; read by the guide's initialisation.
    """

    def __init__(
        self,
        n_obs: int,
        n_vars: int,
        n_factors: int,
        n_batch: int,
        n_extra_categoricals=None,
        alpha_g_phi_hyp_prior=None,
        gene_add_alpha_hyp_prior=None,
        gene_add_mean_hyp_prior=None,
        detection_hyp_prior=None,
        gene_tech_prior=None,
        init_vals=None,
    ):
        super().__init__()
        self.n_obs, self.n_vars, self.n_factors, self.n_batch = int(n_obs), int(n_vars), int(n_factors), int(n_batch)
        self.n_extra_categoricals = [int(n) for n in n_extra_categoricals] if n_extra_categoricals else None
        if self.n_extra_categoricals and min(self.n_extra_categoricals) < 1:
            raise ValueError(f"n_extra_categoricals must be positive, got {self.n_extra_categoricals}")
        self.alpha_g_phi_hyp_prior = {**_ALPHA_G_PHI_HYP, **(alpha_g_phi_hyp_prior or {})}
        self.gene_add_alpha_hyp_prior = {**_GENE_ADD_ALPHA_HYP, **(gene_add_alpha_hyp_prior or {})}
        self.gene_add_mean_hyp_prior = {**_GENE_ADD_MEAN_HYP, **(gene_add_mean_hyp_prior or {})}
        self.detection_hyp_prior = {**_DETECTION_HYP, **(detection_hyp_prior or {})}
        self.gene_tech_prior = {**_GENE_TECH, **(gene_tech_prior or {})}
        self.init_vals = init_vals
        # a buffer fixes dtype and device of every constant (moves with .to(device))
        self.register_buffer("ones", torch.ones((1, 1)))
        offsets = np.cumsum([0, *(self.n_extra_categoricals or [])])[:-1]
        self.register_buffer("tech_offsets", torch.as_tensor(offsets, dtype=torch.long))
        self._pattern_key = None
        self._pattern = None

    # ------------------------------------------------------------------ helpers
    def _const(self, value) -> torch.Tensor:
        return torch.as_tensor(value, dtype=self.ones.dtype, device=self.ones.device)

    def _counts_pattern(self, x_data: torch.Tensor) -> CountsPattern:
        """Data-only likelihood terms, cached while the same count tensor is passed (full-data training)."""
        key = (x_data.data_ptr(), tuple(x_data.shape), x_data._version, x_data.device)
        if key != self._pattern_key:
            self._pattern = CountsPattern(x_data)
            self._pattern_key = key
        return self._pattern

    def create_plates(self, x_data, idx, batch_index, label_index, extra_categoricals=None):
        """The observation (cell) plate at dim -2, subsampled to ``idx``."""
        return pyro.plate("obs_plate", size=self.n_obs, dim=-2, subsample=idx)

    def list_obs_plate_vars(self):
        """Name and model inputs of the observation plate (no latent site lives in it)."""
        return {"name": "obs_plate", "input": [0, 2], "input_transform": [torch.log1p, lambda x: x], "sites": {}}

    # ------------------------------------------------------------------ model
    def forward(self, x_data, idx, batch_index, label_index, extra_categoricals=None):
        """Score counts ``x_data`` (B, G) of cells ``idx`` given their batch, label and covariate codes."""
        F, G, E = self.n_factors, self.n_vars, self.n_batch
        batch = batch_index.reshape(-1).long()  # (B,)
        label = label_index.reshape(-1).long()  # (B,)
        obs_plate = self.create_plates(x_data, idx, batch_index, label_index, extra_categoricals)
        one = self.ones

        # per-cluster mean expression mu_fg
        per_cluster_mu_fg = pyro.sample("per_cluster_mu_fg", dist.Gamma(one, one).expand([F, G]).to_event(2))  # (F, G)

        # gene-wise multiplicative effect of each technology category
        tech = None
        if self.n_extra_categoricals is not None:
            prior = self.gene_tech_prior
            a_t = self._const(prior["alpha"])
            detection_tech_gene_tg = pyro.sample(
                "detection_tech_gene_tg",
                dist.Gamma(one * a_t, one * a_t / self._const(prior["mean"]))
                .expand([sum(self.n_extra_categoricals), G])
                .to_event(2),
            )  # (T, G)
            rows = extra_categoricals.long() + self.tech_offsets  # (B, K)
            tech = detection_tech_gene_tg[rows].prod(-2)  # (B, G): product over covariates (ours)

        # detection efficiency of each batch y_e
        prior = self.detection_hyp_prior
        detection_mean_y_e = pyro.sample(
            "detection_mean_y_e",
            dist.Gamma(one * self._const(prior["mean_alpha"]), one * self._const(prior["mean_beta"]))
            .expand([E, 1])
            .to_event(2),
        )  # (E, 1)

        # additive background s_eg (free-floating RNA)
        s_g_gene_add = sample_gene_background(
            self._const, E, G, self.gene_add_alpha_hyp_prior, self.gene_add_mean_hyp_prior
        )  # (E, G)

        # gene-wise overdispersion
        hyp = self.alpha_g_phi_hyp_prior
        alpha_g_phi_hyp = pyro.sample(
            "alpha_g_phi_hyp",
            dist.Gamma(one * self._const(hyp["alpha"]), one * self._const(hyp["beta"])).to_event(2),
        )  # (1, 1)
        alpha_g_inverse = pyro.sample(
            "alpha_g_inverse", dist.Exponential(alpha_g_phi_hyp).expand([1, G]).to_event(2)
        )  # (1, G)

        # expected counts and likelihood
        mu = (per_cluster_mu_fg[label] + s_g_gene_add[batch]) * detection_mean_y_e[batch]  # (B, G)
        if tech is not None:
            mu = mu * tech
        alpha = overdispersion(alpha_g_inverse)  # (1, G)
        if x_data is None:  # no counts: the guide is being set up
            return mu
        pattern = self._counts_pattern(x_data) if x_data.shape[0] == self.n_obs else None
        with obs_plate:
            pyro.sample("data_target", NegativeBinomialCounts(mu, alpha, pattern=pattern), obs=x_data)  # (B, 1) x (G,)
        return mu

    # ------------------------------------------------------------------ posterior helpers
    @staticmethod
    def compute_expected(samples: dict, batch_index, label_index, extra_categoricals=None, tech_offsets=None):
        """Expected counts mu (n_cells, n_vars) and overdispersion alpha (1, n_vars) from a posterior summary.

        Parameters
        ----------
        samples : dict
            site -> numpy array (e.g. ``post_sample_means``).
        batch_index, label_index : numpy.ndarray
            (n_cells,) codes.
        extra_categoricals : numpy.ndarray, optional
            (n_cells, K) covariate codes.
        tech_offsets : numpy.ndarray, optional
            (K,) first row of each covariate in ``detection_tech_gene_tg``.
        """
        batch = np.asarray(batch_index).reshape(-1).astype(int)
        label = np.asarray(label_index).reshape(-1).astype(int)
        mu = (np.asarray(samples["per_cluster_mu_fg"])[label] + np.asarray(samples["s_g_gene_add"])[batch]) * (
            np.asarray(samples["detection_mean_y_e"])[batch]
        )
        if extra_categoricals is not None and "detection_tech_gene_tg" in samples:
            rows = np.asarray(extra_categoricals).astype(int) + np.asarray(tech_offsets).astype(int)
            mu = mu * np.asarray(samples["detection_tech_gene_tg"])[rows].prod(-2)
        alpha = overdispersion(samples["alpha_g_inverse"])
        return {"mu": mu, "alpha": alpha}
