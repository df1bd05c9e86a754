"""Accuracy of estimated abundances against synthetic truth."""

from __future__ import annotations

import numpy as np


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the precision-recall curve (average precision) of binary ``labels`` ranked by ``scores``."""
    labels = np.asarray(labels, dtype=bool)
    if labels.sum() == 0:
        return float("nan")
    order = np.argsort(-np.asarray(scores, dtype=float), kind="stable")
    hits = labels[order]
    tp = np.cumsum(hits)
    precision = tp / np.arange(1, len(hits) + 1)
    return float(precision[hits].sum() / hits.sum())


def accuracy(estimate: np.ndarray, truth: np.ndarray) -> dict:
    """Pearson r over all spot x type entries, mean per-type PR-AUC of presence, total-cells ratio."""
    estimate, truth = np.asarray(estimate, float), np.asarray(truth, float)
    r = float(np.corrcoef(estimate.ravel(), truth.ravel())[0, 1])
    pr = [average_precision(truth[:, f] > 0, estimate[:, f]) for f in range(truth.shape[1])]
    return {
        "pearson_r": r,
        "pr_auc": float(np.nanmean(pr)),
        "total_ratio": float(estimate.sum() / truth.sum()),
    }
