"""Quality control of a fit, per spot: how well the model explains each spot's counts.

Pure numpy / pandas on what the model computes (expected counts from posterior means); used by the
fit pipeline, the command line and the Spot QC tab alike.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def spot_qc(observed, expected: np.ndarray, abundance_means: np.ndarray, detection_y_s: np.ndarray) -> pd.DataFrame:
    """Per-spot quality control of a fit.

    Parameters
    ----------
    observed : numpy.ndarray or scipy.sparse matrix
        (n_obs, n_vars) observed counts of the genes the model used.
    expected : numpy.ndarray
        (n_obs, n_vars) expected counts mu_sg (``Cell2location.compute_expected()['mu']``).
    abundance_means : numpy.ndarray
        (n_obs, n_cell_types) posterior mean abundances w_sf.
    detection_y_s : numpy.ndarray
        (n_obs,) or (n_obs, 1) detection efficiency y_s.

    Returns
    -------
    pandas.DataFrame
        Columns ``total_counts``, ``expected_counts``, ``total_cells`` (sum_f w_sf), ``detection_y_s``
        and ``reconstruction_r`` (Pearson r of log1p observed vs expected counts across genes; NaN for
        a constant spot).
    """
    obs = observed.toarray() if hasattr(observed, "toarray") else np.asarray(observed)
    obs = np.log1p(np.asarray(obs, dtype=np.float64))
    exp = np.log1p(np.asarray(expected, dtype=np.float64))
    oc = obs - obs.mean(1, keepdims=True)
    ec = exp - exp.mean(1, keepdims=True)
    denom = np.sqrt((oc**2).sum(1) * (ec**2).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(denom > 0, (oc * ec).sum(1) / denom, np.nan)
    return pd.DataFrame(
        {
            "total_counts": np.expm1(obs).sum(1),
            "expected_counts": np.asarray(expected, dtype=np.float64).sum(1),
            "total_cells": np.asarray(abundance_means, dtype=np.float64).sum(1),
            "detection_y_s": np.asarray(detection_y_s, dtype=np.float64).reshape(-1),
            "reconstruction_r": r,
        }
    )


def model_qc(mod, chunk: int = 2000) -> pd.DataFrame:
    """Per-spot QC of a trained :class:`~napari_cell2location.Cell2location`, a chunk of spots at a time.

    Parameters
    ----------
    mod : Cell2location
        A trained model (its last exported posterior means are used, else the guide's).
    chunk : int
        Spots per chunk (bounds memory: chunk x n_genes expected counts at a time).

    Returns
    -------
    pandas.DataFrame
        :func:`spot_qc` columns, one row per training spot (``mod.obs_names`` order, RangeIndex).
    """
    means = mod.posterior_means()
    w = np.asarray(means["w_sf"])
    y_s = np.asarray(means["detection_y_s"]).reshape(-1)
    parts = []
    for start in range(0, mod.n_obs, chunk):
        ind = np.arange(start, min(start + chunk, mod.n_obs))
        mu = mod.compute_expected(means, ind_x=ind)["mu"]
        parts.append(spot_qc(mod.X[ind], mu, w[ind], y_s[ind]))
    return pd.concat(parts, ignore_index=True)


def worst_explained(reconstruction_r, percent: float = 5.0) -> tuple[np.ndarray, float]:
    """Spots the model explains worst: reconstruction r at or below its ``percent``-th percentile.

    Returns the spot indices (NaN r counts as worst) and the cut-off.
    """
    r = np.asarray(reconstruction_r, dtype=float)
    cut = float(np.nanpercentile(r, percent))
    return np.flatnonzero(np.nan_to_num(r, nan=-np.inf) <= cut), cut


def spot_detail(mod, index: int, n_top: int = 12) -> dict:
    """One spot of a fit: its cell-type composition and its top genes, observed vs expected.

    Parameters
    ----------
    mod : Cell2location
        A trained model.
    index : int
        Spot (row of the training data).
    n_top : int
        Genes with the most observed + expected counts.

    Returns
    -------
    dict
        ``abundance`` (pandas.Series of mean w_sf by cell type, largest first), ``genes`` (names),
        ``observed`` and ``expected`` (their counts), ``total_cells``.
    """
    means = mod.posterior_means()
    w = np.asarray(means["w_sf"])[index]
    mu = mod.compute_expected(means, ind_x=[index])["mu"][0]
    x = mod.X[index]
    x = np.asarray(x.toarray() if hasattr(x, "toarray") else x, dtype=float).ravel()
    top = np.argsort(-(x + mu))[:n_top]
    return {
        "abundance": pd.Series(w, index=mod.factor_names_).sort_values(ascending=False),
        "genes": np.asarray(mod.var_names)[top],
        "observed": x[top],
        "expected": mu[top],
        "total_cells": float(w.sum()),
    }
