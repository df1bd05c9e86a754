"""GUI tests of the Reference widget (real napari viewer): open, filter plot, worker fit, cancel, hand over."""

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from napari.utils.notifications import notification_manager  # noqa: E402

from napari_cell2location._qt._reference_widget import NO_BATCH, ReferenceWidget  # noqa: E402


def _reference(n_cells=80, n_genes=30, n_types=3, seed=0):
    import anndata
    from scipy import sparse

    rng = np.random.default_rng(seed)
    sig = rng.gamma(0.8, 2.0, size=(n_types, n_genes))
    labels = rng.integers(0, n_types, n_cells)
    ad = anndata.AnnData(sparse.csr_matrix(rng.poisson(sig[labels]).astype(np.float32)))
    ad.obs_names = [f"c{i}" for i in range(n_cells)]
    ad.var_names = [f"g{i}" for i in range(n_genes)]
    ad.obs["cell_type"] = pd.Categorical([f"T{t}" for t in labels])
    ad.obs["sample"] = pd.Categorical([f"s{i % 2}" for i in range(n_cells)])
    ad.obs["n_genes"] = np.arange(n_cells)
    return ad


@pytest.fixture
def ref_path(tmp_path):
    path = tmp_path / "ref.h5ad"
    _reference().write_h5ad(path)
    return path


@pytest.fixture
def widget(make_napari_viewer):
    viewer = make_napari_viewer()
    w = ReferenceWidget(viewer)
    viewer.window.add_dock_widget(w, name="Reference")
    return viewer, w


def _wait(qtbot, w, timeout=60_000):
    qtbot.waitUntil(lambda: w.worker is None, timeout=timeout)


def test_open_reference_guesses_columns_and_draws_filter(widget, ref_path):
    _viewer, w = widget
    assert not w.run_button.enabled
    assert w.open_reference(path=ref_path)
    assert w.labels_key.value == "cell_type" and w.batch_key.value == "sample"
    assert "n_genes" not in w.labels_key.choices  # numeric columns are not offered as labels
    assert NO_BATCH in w.batch_key.choices
    assert "80 cells x 30 genes" in w.info.value and "3 cell types" in w.label_note.value
    ax = w.plot.axes[0]
    assert len(ax.lines) == 3 and len(ax.collections) + len(ax.images) + len(ax.patches) > 0
    n_before = len(w.kept_genes())
    w.cell_percentage_cutoff2.value = 0.9  # stricter: fewer genes, and the note follows
    assert len(w.kept_genes()) < n_before
    assert f"{len(w.kept_genes())} of 30 genes kept" in w.filter_note.value
    assert w.run_button.enabled
    n = len(notification_manager.records)
    assert not w.open_reference(path=ref_path.with_suffix(".csv"))
    assert "h5ad" in str(notification_manager.records[n].message)


def test_average_then_save_and_hand_over(widget, ref_path, qtbot, tmp_path):
    viewer, w = widget
    from napari_cell2location._qt import DataWidget
    from napari_cell2location.reference import cluster_average_signatures

    data = DataWidget(viewer)  # shares the viewer's state with the Reference widget
    got = []
    data.state.data_changed.connect(lambda: got.append(data.state.signatures))
    w.open_reference(path=ref_path)
    w.filter.value = False
    w.method.value = "cluster averages (fast)"
    assert not w.epochs.enabled
    assert w.run() is not None
    _wait(qtbot, w)
    assert w.status.value.startswith("done"), w.status.value
    expected = cluster_average_signatures(w.adata, "cell_type")
    pd.testing.assert_frame_equal(w.signatures, expected)
    assert len(got) == 1 and got[0] is w.signatures
    assert data.state.signatures is w.signatures and "cluster averages" in data.state.signatures_source
    out = w.save(path=tmp_path / "sig.csv")
    back = pd.read_csv(out, index_col=0)
    np.testing.assert_allclose(back.to_numpy(), expected.to_numpy())
    assert w.save(path=tmp_path / "sig.xlsx") is None


def test_regression_in_worker_with_progress(widget, ref_path, qtbot):
    _viewer, w = widget
    w.open_reference(path=ref_path)
    w.filter.value = False
    w.epochs.value = 8
    w.lr.value = 0.01
    w.device.value = "cpu"
    worker = w.run()
    assert worker is not None and w.run() is None and w.cancel_button.enabled and not w.run_button.enabled
    _wait(qtbot, w)
    assert w.status.value.startswith("done"), w.status.value
    assert w.progress.value == 8 and len(w.losses) == 8
    assert w.model is not None and w.model.n_batch == 2
    assert w.signatures.shape == (30, 3) and np.isfinite(w.signatures.to_numpy()).all()
    assert "means_per_cluster_mu_fg" in w.model.adata.varm
    assert w.save_button.enabled and w.send_button.enabled
    # no Data widget in this viewer: the signatures wait in the viewer's state for the Data and Fit tabs
    assert w.send_to_fit(quiet=True) and w.state.signatures is w.signatures


def test_cancel_stops_between_steps(widget, ref_path, qtbot):
    _viewer, w = widget
    w.open_reference(path=ref_path)
    w.filter.value = False
    w.epochs.value = 100000
    w.lr.value = 0.01
    w.device.value = "cpu"
    w.run()
    qtbot.waitUntil(lambda: len(w.losses) >= 2, timeout=60_000)
    w.cancel()
    _wait(qtbot, w)
    assert w.status.value.startswith("Reference training cancelled."), w.status.value
    assert w.signatures is None and not w.save_button.enabled and w.run_button.enabled


def test_bad_reference_is_refused_before_work(widget, qtbot):
    _viewer, w = widget
    ad = _reference()
    ad.X = ad.X.toarray() / 2.0
    w.set_reference(ad, source="normalised")
    n = len(notification_manager.records)
    assert w.run() is None
    assert "non-integer" in str(notification_manager.records[n].message)
