"""What the data and the user's numbers say about the spatial model's priors, checked before it is built."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..io import InputError


def check_n_cells(value, n_obs: int | None = None):
    """An N_cells_per_location value checked: a positive float, or (n_obs,) positive per-spot values.

    Returns the float, or a float64 array of the per-spot values; raises :class:`InputError`. A pandas
    Series is taken in its order: align it to the spots first (``Cell2location`` does, by spot name).
    """
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim == 2 and arr.shape[1] == 1:  # a column of per-spot values
        arr = arr[:, 0]
    if arr.ndim > 1:
        raise InputError(f"N_cells_per_location must be one value or one per spot, got an array of shape {arr.shape}")
    if arr.ndim == 1 and n_obs is not None and arr.shape[0] != n_obs:
        raise InputError(f"N_cells_per_location has {arr.shape[0]} values but the data has {n_obs} spots")
    if not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        raise InputError("N_cells_per_location must be positive and finite")
    return float(arr) if arr.ndim == 0 else arr


def counts_per_cell(X, n_cells) -> np.ndarray:
    """Each spot's total counts over its N_cells_per_location (one value, or one per spot)."""
    n_cells = np.asarray(n_cells, dtype=np.float64)
    totals = np.asarray(X.sum(axis=1)).ravel()
    return totals / n_cells if n_cells.ndim == 1 else totals / float(n_cells)


def detection_from(mean_per_cell, cell_state_df: pd.DataFrame, correction: float = 1.0):
    """detection_mean from the mean counts per cell (a value, or one per batch): over the mean over cell types
    of the signatures' sums, x ``correction``; a degenerate value raises :class:`InputError`."""
    value = mean_per_cell / float(cell_state_df.sum(axis=0).mean()) * correction
    if not np.all(np.isfinite(value)) or np.any(np.asarray(value) <= 0):
        raise InputError(f"the data give a degenerate detection_mean ({value}); check the counts and signatures")
    return value


def detection_mean(
    X, n_cells, cell_state_df: pd.DataFrame, batch_index, n_batch: int, per_sample: bool, correction: float
):
    """Prior mean of detection efficiency from the data, with the N actually in force (ours).

    (mean over spots of total counts / N_cells_per_location) / (mean over cell types of the signatures'
    sums) x ``correction``, per batch with ``per_sample`` (``spec/MODEL.md`` §1).
    """
    per_cell = counts_per_cell(X, n_cells)
    if per_sample:
        return detection_from(
            np.array([per_cell[batch_index == e].mean() for e in range(n_batch)]), cell_state_df, correction
        )
    return detection_from(float(per_cell.mean()), cell_state_df, correction)
