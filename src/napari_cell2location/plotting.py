"""Plots (matplotlib only): each ``plot_*(..., ax=None)`` draws on ``ax`` (or a new one) and returns it."""

from __future__ import annotations

import numpy as np


def _axes(ax):
    if ax is None:
        import matplotlib.pyplot as plt

        _, ax = plt.subplots(figsize=(5, 4))
    return ax


def running_median(values, window: int) -> np.ndarray:
    """Centred running median of ``values`` over ``window`` points (shorter at the ends)."""
    import pandas as pd

    series = pd.Series(np.asarray(values, dtype=float))
    return series.rolling(int(window), center=True, min_periods=1).median().to_numpy()


def plot_history(history, iter_start: int = 0, iter_end: int = -1, ax=None):
    """Training loss (negative ELBO) per epoch, with its running median.

    Each epoch's loss is a one-sample estimate; late in a fit its spread can exceed its trend (sites the
    data barely constrain, such as the overdispersion of near-Poisson genes, have wide posteriors). The
    trend is drawn as a running median over 4 % of the epochs on top of the faint per-epoch values, and the
    y axis is fitted to the trend and the bulk of the values rather than to single outlying draws.

    Parameters
    ----------
    history : dict or pandas.DataFrame or sequence of float
        ``Cell2location.history_`` (``{'elbo_train': DataFrame}``), a DataFrame, or the values.
    iter_start, iter_end : int
        Epoch range to show (``-1`` = to the end).
    ax : matplotlib.axes.Axes, optional
        Where to draw.

    Returns
    -------
    matplotlib.axes.Axes
        ``ax.lines[0]`` is the per-epoch loss; ``ax.lines[1]`` its running median (from 20 epochs).
    """
    ax = _axes(ax)
    if isinstance(history, dict):
        history = history["elbo_train"]
    values = np.asarray(history, dtype=float).reshape(-1)
    end = len(values) if iter_end == -1 else iter_end
    epochs = np.arange(len(values))[iter_start:end]
    values = values[iter_start:end]
    finite = values[np.isfinite(values)]
    if len(finite) < 20:
        ax.plot(epochs, values, lw=1, color="C0")
    else:
        window = max(5, len(values) // 25)
        trend = running_median(values, window)
        ax.plot(epochs, values, lw=0.6, color="C0", alpha=0.3, label="per epoch")
        ax.plot(epochs, trend, lw=1.6, color="C0", label=f"median of {window}")
        low = min(np.nanmin(trend), np.quantile(finite, 0.02))
        high = max(np.nanmax(trend), np.quantile(finite, 0.98))
        pad = 0.05 * (high - low) if high > low else abs(high) * 0.05 + 1e-12
        ax.set_ylim(low - pad, high + pad)
    if len(finite) and np.all(finite > 0) and finite.max() / max(finite.min(), 1e-12) > 20:
        ax.set_yscale("log")
        if len(finite) >= 20:
            ax.set_ylim(max(low - pad, finite.min()), high + pad)
    ax.set_xlabel("epoch")
    ax.set_ylabel("-ELBO loss")
    ax.set_title("training history")
    return ax


def plot_reconstruction(observed, expected, ax=None, bins: int = 50):
    """2D histogram of observed vs expected counts (log10(1 + x) axes, log colour scale).

    Parameters
    ----------
    observed, expected : numpy.ndarray
        (n_obs, n_vars) observed and expected counts.
    ax : matplotlib.axes.Axes, optional
        Where to draw.
    bins : int
        Bins per axis.

    Returns
    -------
    matplotlib.axes.Axes
    """
    from matplotlib.colors import LogNorm

    ax = _axes(ax)
    obs = np.log10(1 + np.asarray(observed, dtype=float).ravel())
    exp = np.log10(1 + np.asarray(expected, dtype=float).ravel())
    ax.hist2d(exp, obs, bins=bins, norm=LogNorm(), cmap="magma")
    lim = max(obs.max(initial=0), exp.max(initial=0))
    ax.plot([0, lim], [0, lim], color="cyan", lw=0.8, ls="--")
    ax.set_xlabel("expected count, log10(1 + x)")
    ax.set_ylabel("observed count, log10(1 + x)")
    ax.set_title("reconstruction accuracy")
    return ax


def plot_spatial_abundance(coords, values, image=None, ax=None, title=None, spot_size=20.0, cmap="magma"):
    """Spots coloured by a value over an optional histology image.

    Parameters
    ----------
    coords : numpy.ndarray
        (n_obs, 2) spot centres as (x, y) in the image's pixel frame.
    values : numpy.ndarray
        (n_obs,) values to colour by.
    image : numpy.ndarray, optional
        (H, W, 3) or (H, W) image drawn underneath.
    ax : matplotlib.axes.Axes, optional
        Where to draw.
    title : str, optional
        Axes title.
    spot_size : float
        Marker size (points^2).
    cmap : str
        Colormap.

    Returns
    -------
    matplotlib.axes.Axes
    """
    ax = _axes(ax)
    if image is not None:
        ax.imshow(image)
    coords = np.asarray(coords, dtype=float)
    values = np.asarray(values, dtype=float)
    vmax = np.percentile(values, 99) if values.size else 1.0
    sc = ax.scatter(
        coords[:, 0], coords[:, 1], c=values, s=spot_size, cmap=cmap, vmin=0, vmax=vmax or 1.0, edgecolors="none"
    )
    ax.figure.colorbar(sc, ax=ax, fraction=0.046, pad=0.02)
    if image is None:
        ax.invert_yaxis()
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title)
    return ax
