"""_layers: pure conversions of results to layer data, colours, QC; and recolouring speed for 5,000 spots."""

import subprocess
import sys
import time

import anndata
import numpy as np
import pandas as pd
import pytest

from napari_cell2location._contract import EXPORTED_SUMMARIES as STATS
from napari_cell2location._layers import (
    abundance_features,
    cell_types,
    composite_colors,
    feature_name,
    robust_limits,
    spot_features,
    value_colors,
)
from napari_cell2location.model import spot_qc


def _fitted_like(n=50, types=("A", "B", "C"), seed=0):
    rng = np.random.default_rng(seed)
    adata = anndata.AnnData(rng.poisson(2, size=(n, 8)).astype(np.float32))
    adata.obsm["spatial"] = rng.uniform(0, 1000, size=(n, 2))
    adata.obs["batch"] = pd.Categorical(["s0", "s1"] * (n // 2))
    for k in STATS:
        adata.obsm[f"{k}_cell_abundance_w_sf"] = pd.DataFrame(
            rng.gamma(1, 2, size=(n, len(types))),
            index=adata.obs_names,
            columns=[f"{k}cell_abundance_w_sf_{t}" for t in types],
        )
    adata.uns["mod"] = {"factor_names": np.array(types, dtype=object)}
    return adata


def test_layers_module_imports_no_qt_or_napari():
    code = (
        "import sys, napari_cell2location._layers, napari_cell2location._reader, napari_cell2location._sample_data;"
        "bad=[m for m in ('qtpy','napari','magicgui','PyQt6','torch') if m in sys.modules]; print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_abundance_features_every_stat_and_type():
    adata = _fitted_like()
    assert cell_types(adata) == ["A", "B", "C"]
    feats = abundance_features(adata)
    assert list(feats.columns) == [feature_name(k, t) for k in STATS for t in "ABC"]
    np.testing.assert_allclose(feats["q05 B"], adata.obsm["q05_cell_abundance_w_sf"]["q05cell_abundance_w_sf_B"])
    sf = spot_features(adata)
    assert {"barcode", "total_counts", "batch", "q95 C"} <= set(sf.columns)
    np.testing.assert_allclose(sf["total_counts"], np.asarray(adata.X.sum(1)).ravel())


def test_colours():
    v = np.r_[np.zeros(10), np.linspace(0, 1, 80), np.full(10, 100.0)]
    lo, hi = robust_limits(v, (5, 85))
    assert lo == 0 and hi < 2
    c = value_colors(v, "magma", (lo, hi))
    assert c.shape == (100, 4) and c.dtype == np.float32
    np.testing.assert_allclose(c[-1], c[-2])  # clipped at the top
    assert robust_limits(np.full(5, 3.0))[1] > 3.0
    comp = composite_colors(np.c_[v, v[::-1]])
    assert comp.shape == (100, 4)
    assert comp[-1, 0] > comp[-1, 1]  # first type (red) dominates where it is high
    with pytest.raises(ValueError):
        composite_colors(np.zeros((3, 7)))


def test_spot_qc():
    rng = np.random.default_rng(0)
    mu = rng.gamma(1, 3, size=(30, 50))
    obs = rng.poisson(mu)
    obs[0] = rng.permutation(obs[0])  # a badly explained spot
    qc = spot_qc(obs, mu, np.ones((30, 4)), np.full(30, 0.5))
    assert list(qc.columns) == ["total_counts", "expected_counts", "total_cells", "detection_y_s", "reconstruction_r"]
    np.testing.assert_allclose(qc["total_counts"], obs.sum(1))
    assert (qc["total_cells"] == 4).all()
    assert qc["reconstruction_r"].iloc[0] < qc["reconstruction_r"].iloc[1:].median() - 0.3


def test_colour_switch_5000_spots_is_fast():
    """Computing a new colouring for 5,000 spots takes a few milliseconds (the GUI test times the layer update)."""
    adata = _fitted_like(n=5000, types=[f"T{i}" for i in range(20)])
    feats = spot_features(adata)
    t0 = time.perf_counter()
    for i in range(20):
        v = feats[feature_name("q05", f"T{i}")].to_numpy()
        value_colors(v, "magma", robust_limits(v))
    per = (time.perf_counter() - t0) / 20
    assert per < 0.02, per
