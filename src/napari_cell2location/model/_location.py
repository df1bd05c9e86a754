"""What the three Cell2location Pyro modules share (``spec/MODEL.md`` §1-2).

Site names, shapes, priors and defaults are the original cell2location 0.1.5's, so exported
posterior dictionaries line up. Gamma(a, b) is shape a, rate b. S spots (``n_obs``), G genes
(``n_vars``), F cell types (``n_factors``), R groups (``n_groups``), E batches (``n_batch``).
The observation plate is at dim -2 and supports subsampling (``idx``) for minibatches.

Each model's latent sites are written once, as a generator (``_latent_sites``) that yields a
:class:`~napari_cell2location._infer.Site` (name, Gamma parameters, shape, plate) and is sent back the
value: ``forward`` runs it through Pyro (``sample_sites``), so Pyro's guides, traces and ``Trace_ELBO``
see the usual model, and training runs it through the fused ELBO (``_elbo.py``), which gives the same
loss and gradients without Pyro's per-step bookkeeping. The variants themselves are in ``_modules.py``.
"""

from __future__ import annotations

import inspect

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule

from .._infer import (
    CountsPattern,
    NegativeBinomialCounts,
    Site,
    gene_background_sites,
    nb_log_likelihood,
    overdispersion,
    sample_sites,
)

#: default prior of the platform effect m_g (models with m_g)
M_G_PRIOR = {"alpha_mean": 3.0, "mean": 1.0, "mean_var_ratio": 1.0}
_ALPHA_G_PHI_HYP = {"alpha": 9.0, "beta": 3.0}
_GENE_ADD_ALPHA_HYP = {"alpha": 9.0, "beta": 3.0}
_GENE_ADD_MEAN_HYP = {"alpha": 1.0, "beta": 100.0}
_DETECTION_HYP = {"mean_alpha": 10.0}


def _as_column(value, n: int, name: str) -> torch.Tensor:
    """A scalar or length-n value as an (n, 1) float32 tensor."""
    arr = np.asarray(value, dtype=np.float32)
    if arr.ndim == 0:
        arr = np.full(n, float(arr), dtype=np.float32)
    arr = arr.reshape(-1)
    if arr.shape[0] != n:
        raise ValueError(f"{name} must be a scalar or have {n} values, got {arr.shape[0]}")
    if not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        raise ValueError(f"{name} must be positive and finite, got values in [{arr.min()}, {arr.max()}]")
    return torch.from_numpy(arr.reshape(n, 1).copy())


class LocationModelBase(PyroModule):
    """Shared parts: detection efficiency, additive background, overdispersion, likelihood.

    Parameters
    ----------
    n_obs, n_vars, n_factors, n_batch : int
        S, G, F, E.
    cell_state_mat : numpy.ndarray
        (n_vars, n_factors) reference signatures g_fg (transposed inside).
    detection_mean : float or array
        Prior mean of the per-batch detection efficiency y_e (scalar or (n_batch,)).
    detection_alpha : float or array
        Shape of y_s | y_e (scalar or (n_batch,)); larger = less spot-to-spot variation.
    N_cells_per_location : float or array
        Prior mean of cells per spot: scalar, or (n_obs,) per-spot prior (ours).
    """

    def __init__(
        self,
        n_obs,
        n_vars,
        n_factors,
        n_batch,
        cell_state_mat,
        detection_mean=0.5,
        detection_alpha=20.0,
        N_cells_per_location=8.0,
        A_factors_per_location=7.0,
        N_cells_mean_var_ratio=1.0,
        alpha_g_phi_hyp_prior=None,
        gene_add_alpha_hyp_prior=None,
        gene_add_mean_hyp_prior=None,
        detection_hyp_prior=None,
        w_sf_mean_var_ratio=5.0,
    ):
        super().__init__()
        self.n_obs, self.n_vars, self.n_factors, self.n_batch = int(n_obs), int(n_vars), int(n_factors), int(n_batch)
        cell_state_mat = np.asarray(cell_state_mat, dtype=np.float32)
        if cell_state_mat.shape != (self.n_vars, self.n_factors):
            raise ValueError(
                f"cell_state_mat must be (n_vars, n_factors) = {(n_vars, n_factors)}, got {cell_state_mat.shape}"
            )
        self.alpha_g_phi_hyp_prior = dict(alpha_g_phi_hyp_prior or _ALPHA_G_PHI_HYP)
        self.gene_add_alpha_hyp_prior = dict(gene_add_alpha_hyp_prior or _GENE_ADD_ALPHA_HYP)
        self.gene_add_mean_hyp_prior = dict(gene_add_mean_hyp_prior or _GENE_ADD_MEAN_HYP)
        self.detection_hyp_prior = dict(detection_hyp_prior or _DETECTION_HYP)
        self.w_sf_mean_var_ratio = float(w_sf_mean_var_ratio)
        self.N_cells_mean_var_ratio = float(N_cells_mean_var_ratio)
        self.A_factors_per_location = float(A_factors_per_location)

        self.register_buffer("cell_state", torch.from_numpy(cell_state_mat.T.copy()))  # (F, G)
        self.register_buffer(
            "N_cells_per_location", _as_column(N_cells_per_location, self.n_obs, "N_cells_per_location")
        )
        self.register_buffer("detection_mean", _as_column(detection_mean, self.n_batch, "detection_mean"))
        self.register_buffer("detection_alpha", _as_column(detection_alpha, self.n_batch, "detection_alpha"))
        self._pattern_key = None
        self._pattern = None
        self.register_buffer("nuclei_counts", None)
        self.nuclei_counts_weight = 1.0
        self.dropout = None

    def set_nuclei_counts(self, counts, weight: float = 100.0) -> None:
        """Observe per-spot nuclei counts around each spot's total cells (ours).

        Adds ``weight * log Poisson(nuclei_counts_s | sum_f w_sf)`` to the model, i.e. counts whose
        variance around the spot's total T_s is T_s / weight. Counted nuclei then pin the absolute
        scale of the abundances, which the RNA alone leaves free to drift (measured on synthetic
        truth: with weight 100 the total stays at 0.99x for 1,500 steps where a global N drifts to
        0.74x; with weight 1, plain Poisson, it still drifts to 0.77x).

        Parameters
        ----------
        counts : array-like or None
            (n_obs,) non-negative counts (e.g. nuclei in each spot, scaled to the cells that
            contribute RNA); ``None`` removes the term.
        weight : float
            Precision of the counts relative to Poisson noise.
        """
        if not float(weight) > 0:
            raise ValueError(f"nuclei_counts_weight must be positive, got {weight}")
        self.nuclei_counts_weight = float(weight)
        if counts is None:
            self.nuclei_counts = None
            return
        arr = np.asarray(counts, dtype=np.float32).reshape(-1)
        if arr.shape[0] != self.n_obs:
            raise ValueError(f"nuclei_counts must have {self.n_obs} values (one per spot), got {arr.shape[0]}")
        if not np.all(np.isfinite(arr)) or np.any(arr < 0):
            raise ValueError("nuclei_counts must be finite and non-negative")
        self.nuclei_counts = torch.from_numpy(arr.reshape(-1, 1).copy()).to(self.cell_state.device)

    # ------------------------------------------------------------------ helpers
    def _const(self, value) -> torch.Tensor:
        return torch.as_tensor(value, dtype=self.cell_state.dtype, device=self.cell_state.device)

    def _counts_pattern(self, x_data: torch.Tensor, batch: torch.Tensor, entries: bool = True) -> CountsPattern:
        """Data-only likelihood terms, cached while the same count tensor is passed (full-data training).

        With all spots at once the lgamma terms are grouped by distinct (batch, gene, count);
        ``entries=False`` (the fused likelihood) leaves out the per-entry arrays there.
        """
        key = (x_data.data_ptr(), tuple(x_data.shape), x_data._version, x_data.device, batch.data_ptr())
        if key != self._pattern_key or (entries and not self._pattern.entries):
            self._pattern = CountsPattern(x_data, batch, grouped=x_data.shape[0] == self.n_obs, entries=entries)
            self._pattern_key = key
        return self._pattern

    def create_plates(self, x_data, idx, batch_index):
        """The observation plate (dim -2), subsampled to ``idx``."""
        return pyro.plate("obs_plate", size=self.n_obs, dim=-2, subsample=idx, device=self.cell_state.device)

    def list_obs_plate_vars(self):
        """Name, model inputs and per-site non-plate dimension of the observation-plate sites."""
        return {"name": "obs_plate", "input": [0, 2], "input_transform": [torch.log1p, lambda x: x], "sites": {}}

    @staticmethod
    def _batch(batch_index: torch.Tensor) -> torch.Tensor:
        return batch_index.reshape(-1).long()

    @staticmethod
    def _rows(t: torch.Tensor, ind) -> torch.Tensor:
        """Rows ``ind`` of a per-observation tensor (all rows when ``ind`` is None)."""
        return t if ind is None else t[ind]

    @staticmethod
    def _per_obs(t: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        """Per-batch rows (E, ...) spread to observations; broadcast (no indexing) when E = 1."""
        return t if t.shape[0] == 1 else t[batch]

    def _detection_and_background_sites(self, ind, batch):
        """Sites of detection efficiency y_s, background s_eg and overdispersion; returns them."""
        E, G, B = self.n_batch, self.n_vars, len(batch)
        det_alpha = self._const(self.detection_hyp_prior["mean_alpha"])
        detection_mean_y_e = yield Site(
            "detection_mean_y_e",
            det_alpha * torch.ones_like(self.detection_mean),
            det_alpha / self.detection_mean,
            (E, 1),
        )  # (E, 1)
        a_s = self._per_obs(self.detection_alpha, batch)  # (B, 1) or (1, 1)
        detection_y_s = yield Site(
            "detection_y_s", a_s, a_s / self._per_obs(detection_mean_y_e, batch), (B, 1), local=True
        )  # (B, 1)
        s_g_gene_add = yield from gene_background_sites(
            self._const, E, G, self.gene_add_alpha_hyp_prior, self.gene_add_mean_hyp_prior
        )  # (E, G)
        hyp = self.alpha_g_phi_hyp_prior
        alpha_g_phi_hyp = yield Site("alpha_g_phi_hyp", self._const(hyp["alpha"]), self._const(hyp["beta"]), (1, 1))
        alpha_g_inverse = yield Site("alpha_g_inverse", None, alpha_g_phi_hyp, (E, G), exponential=True)  # (E, G)
        return {"detection_y_s": detection_y_s, "s_g_gene_add": s_g_gene_add, "alpha_g_inverse": alpha_g_inverse}

    def _m_g_sites(self):
        """Sites of the platform effect m_g (1, G) and its hyper-priors (models with m_g); returns m_g."""
        prior = self.m_g_gene_level_prior
        r_m, mu_m = self._const(prior["mean_var_ratio"]), self._const(prior["mean"])
        m_g_mean = yield Site("m_g_mean", mu_m * r_m, r_m, (1, 1))
        m_g_alpha_e_inv = yield Site(
            "m_g_alpha_e_inv", None, self._const(prior["alpha_mean"]), (1, 1), exponential=True
        )
        m_g_alpha_e = m_g_alpha_e_inv.pow(-2)
        return (yield Site("m_g", m_g_alpha_e, m_g_alpha_e / m_g_mean, (1, self.n_vars)))

    def _group_sites(self, ind, n_local, groups_name, groups_per_location):
        """Sites of the group factorisation (models with groups): cells and groups per spot, z_sr, k_r,
        x_fr, then w_sf; returns w_sf."""
        R, F = self.n_groups, self.n_factors
        r_n = self._const(self.N_cells_mean_var_ratio)
        n_s = yield Site(
            "n_s_cells_per_location", self._rows(self.N_cells_per_location, ind) * r_n, r_n, (n_local, 1), local=True
        )  # (B, 1)
        b_s = yield Site(
            groups_name, self._const(groups_per_location), self._const(1.0), (n_local, 1), local=True
        )  # (B, 1)
        z_sr = yield Site("z_sr_groups_factors", b_s / R, b_s / n_s, (n_local, R), local=True)  # (B, R)
        k_r = yield Site(
            "k_r_factors_per_groups",
            self._const(self.A_factors_per_location / groups_per_location),
            self._const(1.0),
            (R, 1),
        )  # (R, 1)
        x_fr = yield Site("x_fr_group2fact", k_r / F, k_r, (R, F))  # (R, F)
        r_w = self._const(self.w_sf_mean_var_ratio)
        return (yield Site("w_sf", (z_sr @ x_fr) * r_w, r_w, (n_local, F), local=True))  # (B, F)

    def _latent_sites(self, ind, batch):
        """Generator of the model's latent :class:`Site` in sampling order, sent each value back.

        ``ind``: the observations in this step (None: all, unsubsampled); ``batch``: their batch
        codes. Returns the values the likelihood needs (``w_sf``, ``m_g`` or None, ``detection_y_s``,
        ``s_g_gene_add``, ``alpha_g_inverse``). This is the model's one definition: ``forward``
        runs it through Pyro (:func:`sample_sites`), the fused ELBO (``_elbo.py``) directly.
        """
        raise NotImplementedError

    def _mean_and_alpha(self, v: dict, batch):
        """mu_sg = (m_g * sum_f w_sf g_fg + s_eg) * y_s and alpha_eg = 1 / alpha_g_inverse^2."""
        expected = v["w_sf"] @ self.cell_state  # (B, G)
        if v.get("m_g") is not None:
            expected = expected * v["m_g"]
        obs2batch = None
        if self.n_batch == 1:
            mu = (expected + v["s_g_gene_add"]) * v["detection_y_s"]  # (B, G)
        else:
            obs2batch = torch.nn.functional.one_hot(batch, self.n_batch).to(expected.dtype)  # (B, E)
            mu = (expected + obs2batch @ v["s_g_gene_add"]) * v["detection_y_s"]  # (B, G)
        return mu, overdispersion(v["alpha_g_inverse"]), obs2batch

    def _counts_distribution(self, v: dict, x_data, batch) -> NegativeBinomialCounts:
        mu, alpha, obs2batch = self._mean_and_alpha(v, batch)
        pattern = self._counts_pattern(x_data, batch)
        return NegativeBinomialCounts(mu, alpha, batch_index=batch, pattern=pattern, obs2batch=obs2batch)

    def _nuclei_distribution(self, w_sf):
        return dist.Poisson(w_sf.sum(-1, keepdim=True), validate_args=False)  # (B, 1)

    def _likelihood(self, obs_plate, x_data, batch, v: dict):
        """Observe the counts D ~ NB(mu, alpha) (and the nuclei counts, when set); returns mu.

        Without counts (``x_data`` None: the guide is being set up) there is no likelihood and
        None is returned, so the guide's prototype trace keeps no (spots, genes) tensor.
        """
        if x_data is None:
            return None
        if self.nuclei_counts is not None:
            with obs_plate as ind, pyro.poutine.scale(scale=self.nuclei_counts_weight):
                pyro.sample("nuclei_counts", self._nuclei_distribution(v["w_sf"]), obs=self.nuclei_counts[ind])
        counts = self._counts_distribution(v, x_data, batch)
        with obs_plate:
            pyro.sample("data_target", counts, obs=x_data)  # (B, 1) x (G,)
        return counts.mu

    def log_likelihood(self, v: dict, x_data, ind, batch) -> torch.Tensor:
        """Total log-likelihood of the observations ``ind`` (None: all) given latent values ``v``.

        The same terms as the ``data_target`` (and ``nuclei_counts``) sites of ``forward``,
        unscaled by the plate.
        """
        if self.dropout is not None and self.training:
            x_data = self.dropout(x_data)
        total = nb_log_likelihood(
            v["w_sf"],
            v.get("m_g"),
            v["s_g_gene_add"],
            v["detection_y_s"],
            overdispersion(v["alpha_g_inverse"]),
            self.cell_state,
            x_data,
            batch,
            self._counts_pattern(x_data, batch, entries=False),
        )  # mu never formed whole: chunks of rows, recomputed in backward
        if self.nuclei_counts is not None:
            counts = self._rows(self.nuclei_counts, ind)
            total = total + self.nuclei_counts_weight * self._nuclei_distribution(v["w_sf"]).log_prob(counts).sum()
        return total

    def _run(self, x_data, idx, batch_index):
        """``forward``'s body: the latent sites and the likelihood through Pyro; returns (values, mu)."""
        batch = self._batch(batch_index)  # (B,)
        obs_plate = self.create_plates(x_data, idx, batch_index)
        if self.dropout is not None and x_data is not None and self.training:
            x_data = self.dropout(x_data)
        with obs_plate as ind:
            pass  # the plate fixes its subsample when made: ind is the same inside every later `with`
        v = sample_sites(self._latent_sites(ind, batch), obs_plate)
        pyro.deterministic("detection_hyp_prior_alpha", self.detection_alpha)  # (E, 1)
        mu = self._likelihood(obs_plate, x_data, batch, v)
        with obs_plate:
            m_g = v.get("m_g")
            total_per_type = self.cell_state.sum(-1) if m_g is None else (m_g * self.cell_state).sum(-1)
            pyro.deterministic("u_sf_mRNA_factors", v["w_sf"] * total_per_type)  # (B, F)
        return v, mu

    def forward(self, x_data, idx, batch_index):
        return self._run(x_data, idx, batch_index)[1]

    # ------------------------------------------------------------------ posterior helpers
    def _expected_terms(self, samples: dict, batch: np.ndarray):
        """Abundance term (S, G) per spot without background, background (S, G), detection (S, 1)."""
        w = np.asarray(samples["w_sf"])
        g = self.cell_state.detach().cpu().numpy()  # (F, G)
        m_g = np.asarray(samples["m_g"]) if "m_g" in samples else 1.0
        s_add = np.asarray(samples["s_g_gene_add"])[batch]
        y_s = np.asarray(samples["detection_y_s"])
        return w, g, m_g, s_add, y_s

    def compute_expected(self, samples, batch_index, ind_x=None, hide_ambient=False, hide_cell_type=False):
        """Expected counts mu and overdispersion alpha of each gene in each spot.

        Parameters
        ----------
        samples : dict
            Posterior summary (e.g. ``post_sample_means``): site -> array.
        batch_index : numpy.ndarray
            (n_obs,) batch code of each spot.
        ind_x : numpy.ndarray, optional
            Spots to compute (default all).
        hide_ambient : bool
            Leave out the additive background s_eg.
        hide_cell_type : bool
            Leave out the cell type term (background only).

        Returns
        -------
        dict
            ``mu`` (n_spots, n_vars) and ``alpha`` (n_spots, n_vars).
        """
        batch = np.asarray(batch_index).reshape(-1).astype(int)
        ind_x = np.arange(len(batch)) if ind_x is None else np.asarray(ind_x)
        w, g, m_g, s_add, y_s = self._expected_terms(samples, batch)
        mu = np.zeros((len(ind_x), g.shape[1]))
        if not hide_cell_type:
            mu = mu + (w[ind_x] @ g) * m_g
        if not hide_ambient:
            mu = mu + s_add[ind_x]
        mu = mu * y_s[ind_x]
        alpha = overdispersion(np.asarray(samples["alpha_g_inverse"])[batch[ind_x]])
        return {"mu": mu, "alpha": alpha, "ind_x": ind_x}

    def compute_expected_per_cell_type(self, samples, batch_index, ind_x=None, x_data=None):
        """Observed counts split between cell types by their share of the expected counts.

        For each cell type f: X * (w_sf g_fg m_g) / (sum_f' w_sf' g_f'g m_g + s_eg).

        Parameters
        ----------
        samples : dict
            Posterior summary: site -> array.
        batch_index : numpy.ndarray
            (n_obs,) batch code of each spot.
        ind_x : numpy.ndarray, optional
            Spots to compute (default all).
        x_data : numpy.ndarray or scipy.sparse matrix
            (n_obs, n_vars) observed counts.

        Returns
        -------
        dict
            ``mu``: list of n_factors sparse (n_spots, n_vars) matrices in factor order; ``ind_x``.
        """
        from scipy import sparse

        batch = np.asarray(batch_index).reshape(-1).astype(int)
        ind_x = np.arange(len(batch)) if ind_x is None else np.asarray(ind_x)
        w, g, m_g, s_add, _ = self._expected_terms(samples, batch)
        X = x_data[ind_x]
        X = X.toarray() if sparse.issparse(X) else np.asarray(X)
        total = (w[ind_x] @ g) * m_g + s_add[ind_x]  # (n, G)
        out = []
        for f in range(g.shape[0]):
            part = np.outer(w[ind_x, f], g[f]) * m_g
            out.append(sparse.csr_matrix(X * part / total))
        return {"mu": out, "ind_x": ind_x}

    def deterministic_sites(self, samples: dict) -> dict:
        """Deterministic sites computed from (batched) samples of the latent sites.

        Parameters
        ----------
        samples : dict
            site -> tensor with a leading sample dimension.
        """
        gm = self.cell_state  # (F, G)
        if "m_g" in samples:
            total_per_type = samples["m_g"] @ gm.T  # (n, 1, G) @ (G, F) -> (n, 1, F)
        else:
            total_per_type = gm.sum(-1)  # (F,)
        out = {"u_sf_mRNA_factors": samples["w_sf"] * total_per_type}
        n = samples["w_sf"].shape[0]
        out["detection_hyp_prior_alpha"] = self.detection_alpha.expand(n, *self.detection_alpha.shape)
        return out


def base_arguments(arguments: dict) -> dict:
    """The arguments of :class:`LocationModelBase` picked from a variant's ``locals()`` (its own
    ``__init__`` names every argument with the original's defaults; the base takes the shared ones)."""
    names = list(inspect.signature(LocationModelBase.__init__).parameters)[1:]
    return {name: arguments[name] for name in names}
