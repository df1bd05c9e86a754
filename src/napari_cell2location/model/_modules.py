"""The three Cell2location Pyro modules (``spec/MODEL.md`` §1-2): the main model and its two
simplified variants. What they share (detection, background, likelihood, QC helpers) is
:class:`~napari_cell2location.model._location.LocationModelBase`; each variant adds its own
abundance sites (``_latent_sites``) and its defaults. Which variant a fit uses is named once, in
:class:`~napari_cell2location.model.ModelVariant`.
"""

from __future__ import annotations

import torch

from .._infer import Site
from ._location import M_G_PRIOR, LocationModelBase, base_arguments


class LocationModelLinearDependentWMultiExperimentLocationBackgroundNormLevelGeneAlphaPyroModel(LocationModelBase):
    """Cell2location's main model: abundances w_sf with a group factorisation, platform effect m_g.

    mu_sg = (m_g * sum_f w_sf g_fg + s_{e(s),g}) * y_s, counts ~ NB(mu, alpha_eg).
    See ``spec/MODEL.md`` §1 for every site and prior.

    Parameters
    ----------
    n_obs, n_vars, n_factors, n_batch : int
        Spots, genes, cell types, batches.
    cell_state_mat : numpy.ndarray
        (n_vars, n_factors) reference signatures.
    n_groups : int
        R, groups of co-located cell types.
    detection_mean : float
        Prior mean of detection efficiency (set from the data by :class:`Cell2location`).
    detection_alpha : float
        Regularisation of spot-to-spot detection efficiency (20 weak, 200 strong).
    m_g_gene_level_prior : dict
        ``mean``, ``mean_var_ratio``, ``alpha_mean`` of the platform effect prior.
    N_cells_per_location : float or array
        Expected cells per spot; scalar or (n_obs,) per-spot prior (ours).
    A_factors_per_location, B_groups_per_location : float
        Expected cell types and groups per spot.
    N_cells_mean_var_ratio : float
        Mean / variance ratio of the cells-per-spot prior.
    alpha_g_phi_hyp_prior, gene_add_alpha_hyp_prior, gene_add_mean_hyp_prior : dict
        ``alpha``, ``beta`` of the overdispersion and background hyper-priors.
    detection_hyp_prior : dict
        ``mean_alpha``: shape of the per-batch detection prior.
    w_sf_mean_var_ratio : float
        Mean / variance ratio of w_sf around its factorised mean.
    init_vals : dict, optional
        Initial values of sites (site -> array); used by the guide's initialisation.
    init_alpha : float
        Kept for API compatibility with the original.
    dropout_p : float
        Dropout probability applied to the observed counts during training.
    """

    def __init__(
        self,
        n_obs,
        n_vars,
        n_factors,
        n_batch,
        cell_state_mat,
        n_groups: int = 50,
        detection_mean=0.5,
        detection_alpha=20.0,
        m_g_gene_level_prior=None,
        N_cells_per_location=8.0,
        A_factors_per_location=7.0,
        B_groups_per_location=7.0,
        N_cells_mean_var_ratio=1.0,
        alpha_g_phi_hyp_prior=None,
        gene_add_alpha_hyp_prior=None,
        gene_add_mean_hyp_prior=None,
        detection_hyp_prior=None,
        w_sf_mean_var_ratio=5.0,
        init_vals=None,
        init_alpha=20.0,
        dropout_p=0.0,
    ):
        super().__init__(**base_arguments(locals()))
        self.n_groups = int(n_groups)
        self.m_g_gene_level_prior = {**M_G_PRIOR, **(m_g_gene_level_prior or {})}
        self.B_groups_per_location = float(B_groups_per_location)
        self.init_vals = init_vals
        self.init_alpha = float(init_alpha)
        self.dropout_p = float(dropout_p)
        self.dropout = torch.nn.Dropout(p=self.dropout_p) if self.dropout_p > 0 else None

    def list_obs_plate_vars(self):
        out = super().list_obs_plate_vars()
        out["sites"] = {
            "n_s_cells_per_location": 1,
            "b_s_groups_per_location": 1,
            "z_sr_groups_factors": self.n_groups,
            "w_sf": self.n_factors,
            "detection_y_s": 1,
        }
        return out

    def _latent_sites(self, ind, batch):
        m_g = yield from self._m_g_sites()  # (1, G)
        w_sf = yield from self._group_sites(ind, len(batch), "b_s_groups_per_location", self.B_groups_per_location)
        rest = yield from self._detection_and_background_sites(ind, batch)
        return {"w_sf": w_sf, "m_g": m_g, **rest}


class LocationModelMultiExperimentLocationBackgroundNormLevelGeneAlphaPyroModel(LocationModelBase):
    """Simplified model without the group factorisation: w_sf ~ Gamma(a / F, a / n) with global a, n.

    Parameters are those of the main model less the factorisation's; detection_alpha defaults to 200.
    See ``spec/MODEL.md`` §2.
    """

    def __init__(
        self,
        n_obs,
        n_vars,
        n_factors,
        n_batch,
        cell_state_mat,
        n_groups: int = 50,
        detection_mean=0.5,
        detection_alpha=200.0,
        m_g_gene_level_prior=None,
        N_cells_per_location=8.0,
        A_factors_per_location=7.0,
        N_cells_mean_var_ratio=1.0,
        alpha_g_phi_hyp_prior=None,
        gene_add_alpha_hyp_prior=None,
        gene_add_mean_hyp_prior=None,
        detection_hyp_prior=None,
        w_sf_mean_var_ratio=5.0,
    ):
        super().__init__(**base_arguments(locals()))
        self.n_groups = int(n_groups)
        self.m_g_gene_level_prior = {**M_G_PRIOR, **(m_g_gene_level_prior or {})}
        if not torch.allclose(self.N_cells_per_location, self.N_cells_per_location[:1]):
            raise ValueError("the no-factorisation model takes one global N_cells_per_location, not per-spot values")

    def list_obs_plate_vars(self):
        out = super().list_obs_plate_vars()
        out["sites"] = {"w_sf": self.n_factors, "detection_y_s": 1}
        return out

    def _latent_sites(self, ind, batch):
        F, B = self.n_factors, len(batch)
        m_g = yield from self._m_g_sites()  # (1, G)
        N = self.N_cells_per_location[0, 0]
        r_n = self._const(self.N_cells_mean_var_ratio)
        n_cells = yield Site("n_cells_per_location", N * r_n, r_n, (1, 1))  # (1, 1)
        a_factors = yield Site(
            "a_factors_per_location", self._const(self.A_factors_per_location), self._const(1.0), (1, 1)
        )  # (1, 1)
        w_sf = yield Site("w_sf", a_factors / F, a_factors / n_cells, (B, F), local=True)  # (B, F)
        rest = yield from self._detection_and_background_sites(ind, batch)
        return {"w_sf": w_sf, "m_g": m_g, **rest}


class LocationModelLinearDependentWMultiExperimentLocationBackgroundNormLevelNoMGPyroModel(LocationModelBase):
    """Simplified model without the platform effect m_g: mu_sg = (sum_f w_sf g_fg + s_eg) * y_s.

    The groups-per-spot site is named ``y_s_groups_per_location`` (Gamma(Y, 1)); detection_alpha
    defaults to 200. See ``spec/MODEL.md`` §2.
    """

    def __init__(
        self,
        n_obs,
        n_vars,
        n_factors,
        n_batch,
        cell_state_mat,
        n_groups: int = 50,
        detection_mean=0.5,
        detection_alpha=200.0,
        N_cells_per_location=8.0,
        A_factors_per_location=7.0,
        Y_groups_per_location=7.0,
        N_cells_mean_var_ratio=1.0,
        alpha_g_phi_hyp_prior=None,
        gene_add_alpha_hyp_prior=None,
        gene_add_mean_hyp_prior=None,
        detection_hyp_prior=None,
        w_sf_mean_var_ratio=5.0,
    ):
        super().__init__(**base_arguments(locals()))
        self.n_groups = int(n_groups)
        self.Y_groups_per_location = float(Y_groups_per_location)

    def list_obs_plate_vars(self):
        out = super().list_obs_plate_vars()
        out["sites"] = {
            "n_s_cells_per_location": 1,
            "y_s_groups_per_location": 1,
            "z_sr_groups_factors": self.n_groups,
            "w_sf": self.n_factors,
            "detection_y_s": 1,
        }
        return out

    def _latent_sites(self, ind, batch):
        w_sf = yield from self._group_sites(ind, len(batch), "y_s_groups_per_location", self.Y_groups_per_location)
        rest = yield from self._detection_and_background_sites(ind, batch)
        return {"w_sf": w_sf, "m_g": None, **rest}


#: short readable aliases
Cell2locationModule = LocationModelLinearDependentWMultiExperimentLocationBackgroundNormLevelGeneAlphaPyroModel
NoFactorisationModule = LocationModelMultiExperimentLocationBackgroundNormLevelGeneAlphaPyroModel
NoMGModule = LocationModelLinearDependentWMultiExperimentLocationBackgroundNormLevelNoMGPyroModel
