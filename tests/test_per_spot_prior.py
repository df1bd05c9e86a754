"""A per-spot N_cells_per_location prior from nuclei counts, against one global N.

Issue 4 expected the per-spot prior to pin the absolute scale of the abundances. Measured here and in
``benchmarks/per_spot_prior.py`` (150 spots, lr 0.01, detection_alpha 20): it does make the per-spot
totals follow the counts (r 0.96 vs 0.92 for a global N), but the aggregate scale drifts exactly as with
a global N (0.84x / 0.86x the truth at 750 steps, 0.39x / 0.39x at 2,500). The drift is a global
trade-off (the x_fr loadings and the detection y_s scale together) that a prior on n_s does not reach;
the scale test is a strict xfail that records this and will flag when the model pins the scale.
Observing the counts themselves (``Cell2location(..., nuclei_counts=counts)``, variance T / 100
around each spot's total T) does pin it: that is the last test.
"""

from __future__ import annotations

import numpy as np
import pytest

from napari_cell2location import Cell2location, nuclei
from napari_cell2location.datasets import synthetic_visium

pytestmark = pytest.mark.slow  # two 750-step fits: about 1 min on a quiet core

STEPS = 750  # the global-N fit has drifted by > 10 % here (0.86x)
LR = 0.01


def _mean_w(mod) -> np.ndarray:
    """Posterior mean of w_sf from the AutoNormal guide (log-normal: exp(loc + scale² / 2))."""
    loc = mod.guide.locs.w_sf.detach().cpu().numpy()
    scale = mod.guide.scales.w_sf.detach().cpu().numpy()
    return np.exp(loc + 0.5 * scale**2)


@pytest.fixture(scope="module")
def section():
    data = synthetic_visium(n_spots=150, n_genes=200, n_cell_types=6, seed=1)
    sf = data.scalefactors
    px = 55.0 / (sf["spot_diameter_fullres"] * sf["tissue_hires_scalef"])
    found = nuclei.detect_nuclei(data.image, pixel_size_um=px)
    centres, radius = nuclei.spots_in_image(
        data.adata.obsm["spatial"], sf["tissue_hires_scalef"], sf["spot_diameter_fullres"]
    )
    counts = nuclei.count_nuclei_per_spot(found, centres, radius)
    est = nuclei.estimate_n_cells_per_location(counts, data.adata.obs["in_tissue"])
    return data, counts, est


def _fit(data, n_cells, steps=STEPS, detection_alpha=20.0, **kwargs):
    adata = data.adata.copy()
    Cell2location.setup_anndata(adata, batch_key="batch")
    mod = Cell2location(adata, data.signatures, N_cells_per_location=n_cells, detection_alpha=detection_alpha, **kwargs)
    mod.train(max_epochs=steps, lr=LR, progress_bar=False, device="cpu", seed=0)
    return _mean_w(mod).sum(1)


@pytest.fixture(scope="module")
def fits(section):
    data, counts, est = section
    return {
        "global": _fit(data, est.value),
        "per_spot": _fit(data, est.per_spot),
        "counts": _fit(data, est.per_spot, nuclei_counts=counts),
    }


def test_prior_moves_totals_toward_the_counts(section, fits):
    """The per-spot prior changes the posterior total abundance toward the nuclei counts."""
    data, counts, est = section
    glob, per = fits["global"], fits["per_spot"]
    assert not np.allclose(glob, per)
    # per-spot totals follow the counts more closely (shape of the log errors, scale removed)
    r_per, r_glob = np.corrcoef(per, counts)[0, 1], np.corrcoef(glob, counts)[0, 1]
    assert r_per > r_glob + 0.02, (r_per, r_glob)
    log_err = {k: np.log(v / np.maximum(counts, 1)) for k, v in fits.items() if k != "counts"}
    assert log_err["per_spot"].std() < 0.8 * log_err["global"].std()


@pytest.mark.xfail(
    strict=True,
    reason="measured: the per-spot n_s prior does not stop the global scale drift (0.84x vs 0.86x at 750 steps)",
)
def test_per_spot_prior_keeps_the_scale_where_global_n_drifts(section, fits):
    """Aggregate total within ±10 % of the truth and r >= 0.95 per spot, where the global-N fit has drifted."""
    data, counts, est = section
    truth = data.truth["n_cells"].loc[data.adata.obs_names].to_numpy().astype(float)
    glob, per = fits["global"], fits["per_spot"]
    ratio_per, ratio_glob = per.sum() / truth.sum(), glob.sum() / truth.sum()
    r_per = np.corrcoef(per, truth)[0, 1]
    assert abs(ratio_per - 1) <= 0.10, ratio_per
    assert r_per >= 0.95, r_per
    # the global-N fit at the same step: off in scale by more than 10 %, and spatially looser
    assert abs(ratio_glob - 1) > 0.10, ratio_glob
    assert np.corrcoef(glob, truth)[0, 1] < r_per


def test_observed_nuclei_counts_keep_the_scale_where_global_n_drifts(section, fits):
    """The issue's target, met by observing the detected counts (``nuclei_counts``, weight 100).

    Aggregate total within ±10 % of the truth and per-spot r >= 0.95 at the step where the global-N
    fit has drifted by more than 10 %.
    """
    data, counts, est = section
    truth = data.truth["n_cells"].loc[data.adata.obs_names].to_numpy().astype(float)
    with_counts, glob = fits["counts"], fits["global"]
    ratio, ratio_glob = with_counts.sum() / truth.sum(), glob.sum() / truth.sum()
    assert abs(ratio - 1) <= 0.10, ratio
    assert np.corrcoef(with_counts, truth)[0, 1] >= 0.95
    assert abs(ratio_glob - 1) > 0.10, ratio_glob
