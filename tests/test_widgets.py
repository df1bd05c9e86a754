"""GUI tests of the dock widgets with a real napari viewer (pytest-qt): data -> fit in a worker -> results."""

import os
import time

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from napari.utils.notifications import notification_manager  # noqa: E402

from napari_cell2location._layers import CONTEXT_KEY, HOVER_ALWAYS, feature_name, feature_table  # noqa: E402
from napari_cell2location._qt import Cell2locationDock  # noqa: E402
from napari_cell2location._qt._notify import HEADLINE_CHARS  # noqa: E402
from napari_cell2location._sample_data import synthetic_section_layers  # noqa: E402

# tiny data and few steps: the CPU is shared
N_SPOTS, N_GENES, N_TYPES = 60, 40, 4


@pytest.fixture(scope="module")
def tiny_layers():
    return synthetic_section_layers(n_spots=N_SPOTS, n_genes=N_GENES, n_cell_types=N_TYPES, seed=1)


def _fresh(layers):
    """Copies of the layer data with a fresh copy of the table (fits write into it)."""
    import copy

    out = []
    for data, kwargs, kind in layers:
        kwargs = dict(kwargs)
        if "metadata" in kwargs:
            ctx = copy.copy(kwargs["metadata"][CONTEXT_KEY])
            ctx.adata = ctx.adata.copy()
            ctx.extra = dict(ctx.extra)
            kwargs["metadata"] = {CONTEXT_KEY: ctx}
        out.append((data, kwargs, kind))
    return out


def _add(viewer, layers):
    added = []
    for data, kwargs, kind in layers:
        added.append(getattr(viewer, f"add_{kind}")(data, **kwargs))
    return added


@pytest.fixture
def setup(make_napari_viewer, tiny_layers):
    viewer = make_napari_viewer()
    _add(viewer, _fresh(tiny_layers))
    dock = Cell2locationDock(viewer)
    viewer.window.add_dock_widget(dock, name="Cell2location")
    return viewer, dock


def _wait_fit(qtbot, fit, timeout=120_000):
    qtbot.waitUntil(lambda: fit.worker is None, timeout=timeout)


def _notifications_since(n):
    return [str(r.message) for r in notification_manager.records[n:]]


def test_data_widget_picks_sample_and_bundled_signatures(setup):
    viewer, dock = setup
    spots = viewer.layers["synthetic section"]
    assert dock.data.spots.value is spots
    assert dock.data.batch.value == "batch"
    d = dock.data.describe()
    assert d == {"spots": N_SPOTS, "genes": N_GENES, "cell_types": N_TYPES, "shared_genes": N_GENES, "batches": 2}
    assert f"{N_SPOTS} spots" in dock.data.summary.value and f"genes shared: {N_GENES}" in dock.data.summary.value
    assert dock.fit.run_button.enabled
    assert dock.fit.settings().max_epochs is None  # default: fast mode, stops when converged
    assert dock.data.bin_size.native.isHidden() and not list(dock.data.bin_size.choices)  # round spots: no bins


def test_fit_in_worker_gives_results_layer_and_recolouring(setup, qtbot, tmp_path):
    viewer, dock = setup
    dock.fit.epochs.value = 6
    dock.fit.lr.value = 0.01
    worker = dock.fit.run()
    assert worker is not None and not dock.fit.run_button.enabled and dock.fit.cancel_button.enabled
    assert dock.fit.run() is None  # a second Run while running does nothing
    _wait_fit(qtbot, dock.fit)
    assert dock.fit.run_button.enabled and not dock.fit.cancel_button.enabled
    assert dock.fit.progress.value == 6 and len(dock.fit.losses) == 6
    assert dock.fit.status.value.startswith("done"), dock.fit.status.value

    results = viewer.layers["cell abundance"]
    types = [f"Type_{i:02d}" for i in range(N_TYPES)]
    table = feature_table(results)  # every statistic of every cell type, and the QC
    for stat in ("means", "stds", "q05", "q50", "q95"):
        for ct in types:
            assert feature_name(stat, ct) in table
    for col in ("total_counts", "total_cells", "detection_y_s", "reconstruction_r"):
        assert col in table
    # the layer's features (napari's hover text) hold the barcode, what colours it and a few QC values
    assert list(results.features.columns) == ["barcode", feature_name("q05", types[0]), *HOVER_ALWAYS[1:]]
    assert len(results.data) == N_SPOTS
    np.testing.assert_allclose(results.data, viewer.layers["synthetic section"].data)
    # the table holds cell2location's keys
    adata = dock.state.context().adata
    assert "q05_cell_abundance_w_sf" in adata.obsm and "mod" in adata.uns
    assert list(adata.obsm["q05_cell_abundance_w_sf"].columns)[0] == "q05cell_abundance_w_sf_Type_00"

    # results widget follows; colours change with the cell type
    res = dock.results
    assert res.layer.value is results
    res.show(types[0], "q05")
    c0 = results.face_color.copy()
    res.show(types[1], "q05")
    c1 = results.face_color.copy()
    assert not np.allclose(c0, c1)
    assert results.metadata["shown"] == ("q05", types[1])
    # expected colours: robust-limited magma of that feature
    from napari_cell2location._layers import robust_limits, value_colors

    v = table[feature_name("q05", types[1])].to_numpy()
    np.testing.assert_allclose(c1, value_colors(v, "magma", robust_limits(v)), atol=1e-6)
    res.show(types[1], "q95")
    assert not np.allclose(results.face_color, c1)
    res.show_composite(types[:3])
    assert results.metadata["shown"] == ("q95", tuple(types[:3]))
    assert "Type_02" in res.legend.value

    # hover: the status shows the spot's barcode, what is coloured and a few QC values, not every feature
    status = str(results.get_status(results.data[0], world=True)["coordinates"])
    for part in ("barcode: spot_", "q95 Type_00", "q95 Type_02", "total_cells", "reconstruction_r"):
        assert part in status, status
    assert "q05 Type_00" not in status and "means Type_03" not in status
    res.show(types[1], "q05")
    status = str(results.get_status(results.data[0], world=True)["coordinates"])
    assert "q05 Type_01" in status and "q95 Type_00" not in status
    tip = results._get_tooltip_text(np.asarray(results.data[0]), world=True)
    assert tip.splitlines()[0].startswith("barcode") and "q05 Type_01" in tip

    # QC widget
    qc = dock.qc
    assert qc.color_by("reconstruction_r")
    worst = qc.select_worst(10)
    assert 1 <= len(worst) <= N_SPOTS // 5 and set(worst) == results.selected_data
    qc.show_spot(int(worst[0]))
    assert "cells" in qc.spot_label.value
    assert len(qc.spot_plot.axes[0].patches) > 0
    # the model's QC figure is drawn when its tab is looked at, not at the end of the fit (the viewer waits)
    assert not qc.overview.figure.axes
    viewer.window._qt_window.show()
    dock.show_tab("Spot QC")
    qtbot.waitUntil(lambda: len(qc.overview.figure.axes) == 2, timeout=10_000)
    assert len(qc.overview.figure.axes[0].collections) > 0 and len(qc.overview.figure.axes[1].lines) > 0

    # save: .h5ad (the table) and SpatialData .zarr, read back through the reader
    out_h5ad = dock.fit.save(path=tmp_path / "fit.h5ad")
    import anndata

    back = anndata.read_h5ad(out_h5ad)
    assert "q95_cell_abundance_w_sf" in back.obsm and list(back.uns["mod"]["factor_names"]) == types
    qc_back = back.obsm["cell2location_qc"]  # the QC is saved with the results
    np.testing.assert_allclose(qc_back["reconstruction_r"].to_numpy(), table["reconstruction_r"], rtol=1e-5)
    assert dock.fit.save(path=tmp_path / "fit.txt") is None  # wrong extension: notification, nothing written
    assert not (tmp_path / "fit.txt").exists()
    out = dock.fit.save(path=tmp_path / "fit.zarr")
    assert out is not None and out.exists()
    from napari_cell2location._reader import napari_get_reader

    layers = napari_get_reader(str(out))(str(out))
    feats = layers[-1][1]["features"]
    assert feature_name("q05", types[0]) in feats
    np.testing.assert_allclose(
        feats[feature_name("q05", types[0])].to_numpy(), table[feature_name("q05", types[0])], rtol=1e-5
    )


def test_cancel_stops_worker_and_viewer_responds(setup, qtbot):
    viewer, dock = setup
    dock.fit.epochs.value = 5000
    n0 = len(notification_manager.records)
    dock.fit.run()
    qtbot.waitUntil(lambda: len(dock.fit.losses) >= 2, timeout=60_000)
    t0 = time.perf_counter()
    dock.fit.cancel()
    _wait_fit(qtbot, dock.fit, timeout=20_000)
    assert time.perf_counter() - t0 < 15
    assert len(dock.fit.losses) < 5000
    assert dock.fit.status.value.startswith("Fit cancelled."), dock.fit.status.value
    assert dock.fit.run_button.enabled and not dock.fit.cancel_button.enabled
    assert "cell abundance" not in viewer.layers
    assert any("cancelled" in m for m in _notifications_since(n0))
    # the viewer still responds
    viewer.add_points(np.zeros((1, 2)), name="after cancel")
    viewer.layers["after cancel"].face_color = "red"
    qtbot.wait(10)
    assert "after cancel" in viewer.layers


def test_bad_reference_notifies_and_changes_nothing(setup, tmp_path):
    viewer, dock = setup
    before = dock.state.signatures
    summary = dock.data.summary.value
    bad = tmp_path / "bad.csv"
    bad.write_text("gene,TypeA\nG1,abc\nG2,def\n")
    n0 = len(notification_manager.records)
    assert dock.data.load_reference(path=bad) is False
    assert dock.state.signatures is before
    assert dock.data.summary.value == summary
    msgs = _notifications_since(n0)
    assert msgs and "bad.csv" in msgs[-1] and "non-numeric" in msgs[-1]
    # wrong extension, and a missing file
    assert dock.data.load_reference(path=tmp_path / "sig.xlsx") is False
    other = tmp_path / "sig.xlsx"
    other.write_text("x")
    assert dock.data.load_reference(path=other) is False
    assert dock.state.signatures is before


def test_good_reference_csv_and_set_signatures(setup, tmp_path):
    viewer, dock = setup
    sig = dock.state.signatures.iloc[:30, :3] * 2
    path = tmp_path / "sig.csv"
    sig.to_csv(path)
    assert dock.data.load_reference(path=path)
    assert dock.state.signatures.shape == (30, 3)
    assert dock.data.describe()["shared_genes"] == 30
    dock.data.set_signatures(sig.iloc[:, :2], source="other widget")
    assert dock.data.describe()["cell_types"] == 2 and "other widget" in dock.data.summary.value


def test_set_n_cells_per_location(setup):
    viewer, dock = setup
    dock.fit.set_n_cells_per_location(5.0)
    assert dock.fit.settings().n_cells_per_location == 5.0
    per_spot = np.linspace(3, 9, N_SPOTS)
    dock.fit.set_n_cells_per_location(per_spot)
    s = dock.fit.settings().n_cells_per_location
    assert isinstance(s, np.ndarray) and s.shape == (N_SPOTS,)
    assert dock.fit.n_cells.value == pytest.approx(6.0)
    assert "per-spot" in dock.fit.n_cells_note.value
    with pytest.raises(ValueError):
        dock.fit.set_n_cells_per_location(np.ones(N_SPOTS + 1))
    dock.fit.n_cells.value = 7.0  # the user types a number: back to a global prior
    assert dock.fit.settings().n_cells_per_location == 7.0


def test_fit_error_becomes_notification(setup, qtbot):
    viewer, dock = setup
    n0 = len(notification_manager.records)
    # signatures sharing no gene with the spots: the core refuses, the widget notifies
    dock.data.set_signatures(pd.DataFrame(np.ones((30, 2)), index=[f"X{i}" for i in range(30)], columns=["a", "b"]))
    dock.fit.epochs.value = 2
    dock.fit.run()
    _wait_fit(qtbot, dock.fit)
    assert dock.fit.status.value.startswith("The fit failed."), dock.fit.status.value
    assert any("fit failed" in m for m in _notifications_since(n0))
    assert "cell abundance" not in viewer.layers


def test_dropdowns_refresh_and_user_layer(setup):
    viewer, dock = setup
    import anndata

    rng = np.random.default_rng(0)
    adata = anndata.AnnData(rng.poisson(2, size=(10, 25)).astype(np.float32))
    adata.var_names = [f"g{i}" for i in range(25)]
    layer = viewer.add_points(rng.uniform(0, 100, (10, 2)), name="my spots", metadata={"adata": adata})
    assert layer in [c[1] for c in dock.data._spot_choices()]
    dock.data.spots.value = layer
    assert dock.data.describe()["spots"] == 10
    viewer.layers.remove(layer)
    assert layer not in [c[1] for c in dock.data._spot_choices()]
    # a user-made layer with abundance features appears in the results widget
    feats = pd.DataFrame({"q05 A": np.arange(5.0), "q05 B": np.arange(5.0)[::-1]})
    user = viewer.add_points(np.zeros((5, 2)), features=feats, name="user results")
    assert dock.results.layer.value is user or user in [c[1] for c in dock.results._layer_choices()]
    dock.results.layer.value = user
    dock.results.show("B", "q05")
    assert user.face_color[0, 0] != user.face_color[-1, 0] or not np.allclose(user.face_color[0], user.face_color[-1])


@pytest.mark.skipif(os.environ.get("QT_QPA_PLATFORM") == "offscreen", reason="images need OpenGL (use xvfb-run)")
def test_dock_from_manifest(make_napari_viewer):
    viewer = make_napari_viewer()
    widget, dock = viewer.window.add_plugin_dock_widget("napari-cell2location", "Cell2location")
    assert isinstance(dock, Cell2locationDock)
    viewer.open_sample("napari-cell2location", "synthetic_visium")
    assert dock.data.spots.value is not None and dock.data.describe()["cell_types"] == 15


def test_switching_cell_type_is_instant_for_5000_spots(make_napari_viewer, qtbot):
    """Switching the coloured cell type on 5,000 spots (layer update + repaint) stays well under 0.1 s."""
    from qtpy.QtWidgets import QApplication

    from napari_cell2location._qt import ResultsWidget

    rng = np.random.default_rng(0)
    n, types = 5000, [f"T{i:02d}" for i in range(20)]
    feats = pd.DataFrame({feature_name(s, t): rng.gamma(1, 2, n) for s in ("means", "q05", "q95") for t in types})
    viewer = make_napari_viewer()
    layer = viewer.add_points(rng.uniform(0, 5000, (n, 2)), features=feats, size=40, name="big")
    res = ResultsWidget(viewer)
    viewer.window.add_dock_widget(res)
    assert res.layer.value is layer
    res.show(types[0], "q05")
    QApplication.processEvents()
    times = []
    for i in range(1, 15):
        t0 = time.perf_counter()
        res.cell_type.value = types[i]  # as the user does: through the dropdown
        QApplication.processEvents()
        times.append(time.perf_counter() - t0)
    assert layer.metadata["shown"] == ("q05", types[14])
    print(f"switch 5000 spots: median {np.median(times) * 1000:.1f} ms, max {max(times) * 1000:.1f} ms")
    assert np.median(times) < 0.1, times


def test_load_saved_model_shows_results_and_qc(setup, qtbot, tmp_path):
    """A fit saved headless (CLI --save-model, the demo's model/) is loaded for the same spots and
    shown as a fresh fit would be; a wrong folder or other spots give a notification, nothing else."""
    from napari_cell2location import Cell2location

    viewer, dock = setup
    ctx = dock.state.context()
    assert dock.fit.load_button.enabled
    ad = ctx.adata.copy()
    Cell2location.setup_anndata(ad, batch_key="batch")
    mod = Cell2location(ad, dock.state.signatures)
    mod.train(max_epochs=5, lr=0.01, progress_bar=False, device="cpu", seed=0)
    mod.save(tmp_path / "model")
    mod.export_posterior(ad, use_quantiles=True, add_to_obsm=["q05"])

    n = len(notification_manager.records)
    assert dock.fit.load(path=tmp_path) is None  # no attr.json there
    assert any("not a saved model folder" in m.lower() for m in _notifications_since(n))
    assert "cell abundance" not in viewer.layers

    assert dock.fit.load(path=tmp_path / "model") is not None
    _wait_fit(qtbot, dock.fit)
    assert dock.fit.status.value.startswith("loaded"), dock.fit.status.value
    results = viewer.layers["cell abundance"]
    got = feature_table(results)[feature_name("q05", "Type_01")].to_numpy()
    np.testing.assert_allclose(got, ad.obsm["q05_cell_abundance_w_sf"].iloc[:, 1].to_numpy(), rtol=1e-5)
    assert "reconstruction_r" in feature_table(results) and dock.fit.save_button.enabled
    assert dock.qc.color_by("reconstruction_r")  # Spot QC works on a loaded model

    other = _fresh(synthetic_section_layers(n_spots=N_SPOTS + 5, n_genes=N_GENES, n_cell_types=N_TYPES, seed=2))
    added = _add(viewer, other)
    from napari.layers import Points

    dock.data.spots.value = next(layer for layer in added if isinstance(layer, Points))
    n = len(notification_manager.records)
    dock.fit.load(path=tmp_path / "model")
    _wait_fit(qtbot, dock.fit)
    assert any("spots differ" in m for m in _notifications_since(n)), _notifications_since(n)
    assert dock.fit.status.value.startswith("Loading the model failed."), dock.fit.status.value


def test_broken_files_become_notifications(setup, qtbot, tmp_path):
    """A garbage signatures file, a reference .h5ad cut short and a saved model with a broken attr.json:
    each gives one notification naming the file; nothing changes and the widgets stay usable."""
    viewer, dock = setup
    start = len(notification_manager.records)
    before = dock.state.signatures
    garbage = tmp_path / "sig.csv"
    garbage.write_bytes(bytes(range(256)) * 8)
    n = len(notification_manager.records)
    assert dock.data.load_reference(path=garbage) is False
    assert dock.state.signatures is before
    msgs = _notifications_since(n)
    assert len(msgs) == 1 and "sig.csv" in msgs[0] and "/" not in msgs[0]
    headline = msgs[0].split("\n")[0]  # what napari's toast shows before it is expanded
    assert len(headline) <= HEADLINE_CHARS and "sig.csv" in dock.data.summary.value + msgs[0]

    ref = tmp_path / "ref.h5ad"
    dock.state.context().adata.write_h5ad(ref)
    data = ref.read_bytes()
    ref.write_bytes(data[: len(data) // 2])
    n = len(notification_manager.records)
    assert dock.reference.open_reference(path=ref) is False
    assert any("ref.h5ad' is truncated" in m for m in _notifications_since(n))

    model = tmp_path / "model"
    model.mkdir()
    (model / "attr.json").write_text("{not json")
    n = len(notification_manager.records)
    assert dock.fit.load(path=model) is not None
    _wait_fit(qtbot, dock.fit)
    assert "failed" in dock.fit.status.value, dock.fit.status.value
    assert any("attr.json' is not a readable saved Cell2location description" in m for m in _notifications_since(n))
    assert "cell abundance" not in viewer.layers and dock.fit.run_button.enabled
    for message in _notifications_since(start):  # each headline is read whole in napari's toast
        assert len(message.split("\n")[0]) <= HEADLINE_CHARS, message


def test_save_model_then_load_it(setup, qtbot, tmp_path):
    """Save model writes a folder Load model reads back; an occupied folder is refused, nothing clobbered."""
    viewer, dock = setup
    assert not dock.fit.save_model_button.enabled
    dock.fit.epochs.value = 4
    dock.fit.run()
    _wait_fit(qtbot, dock.fit)
    assert dock.fit.save_model_button.enabled
    out = dock.fit.save_model(path=tmp_path / "model")
    assert out is not None and (out / "attr.json").is_file()
    before = (out / "attr.json").read_bytes()
    n = len(notification_manager.records)
    assert dock.fit.save_model(path=tmp_path / "model") is None
    assert any("already saved there" in m for m in _notifications_since(n))
    assert (out / "attr.json").read_bytes() == before
    dock.fit.load(path=out)
    _wait_fit(qtbot, dock.fit)
    assert dock.fit.status.value.startswith("loaded"), dock.fit.status.value


def test_saved_results_keep_their_qc(make_napari_viewer, tmp_path):
    """Results saved after a fit and opened in a new session: Spot QC colours and selects from the saved
    QC, and says that single-spot plots need the model."""
    from napari_cell2location.datasets import synthetic_visium
    from napari_cell2location.io import write_results
    from napari_cell2location.model import fit

    data = synthetic_visium(n_spots=60, n_genes=50, n_cell_types=4, n_batches=1, image=False, seed=5)
    adata = data.adata.copy()
    result = fit(adata, data.signatures, progress_bar=False, max_epochs=5, device="cpu")
    path = write_results(adata, tmp_path / "fitted.h5ad")

    viewer = make_napari_viewer()
    viewer.open(str(path), plugin="napari-cell2location")
    dock = Cell2locationDock(viewer)
    assert dock.state.result is None
    assert "QC saved with these results" in dock.qc.info.value, dock.qc.info.value
    assert dock.qc.color_by("reconstruction_r")
    worst = dock.qc.select_worst(10)
    expected = np.sort(np.argsort(result.qc["reconstruction_r"].to_numpy())[: len(worst)])
    assert len(worst) >= 1 and set(worst) <= set(range(60)) and set(expected) == set(worst)
    dock.qc.show_spot(int(worst[0]))
    assert "Load the model" in dock.qc.spot_label.value


def test_a_plot_queued_for_a_closed_widget_is_dropped(qtbot, capsys):
    """A redraw that arrives after its widget was deleted (a viewer closed right after a plot was asked
    for) is dropped, not printed as a traceback from Qt's event loop; other errors still surface."""
    from qtpy import sip

    from napari_cell2location._qt._mpl import MplCanvas

    plot = MplCanvas(placeholder="the loss appears here during a fit")
    canvas = plot.canvas
    plot.axes[0].plot([0, 1], [1, 0])
    canvas.draw()  # a live canvas draws
    sip.delete(canvas)
    canvas.draw()  # what matplotlib's queued redraw calls: no error
    assert "has been deleted" not in capsys.readouterr().err


def test_a_plot_out_of_sight_is_drawn_when_shown(qtbot):
    """A canvas on a hidden tab neither draws nor builds its plot until it is shown (a fit's end updates
    plots on several tabs; the viewer would wait for each), then does both once."""
    from napari_cell2location._qt._mpl import MplCanvas

    plot = MplCanvas(placeholder="nothing yet")
    calls = []

    def draw_line():
        calls.append(1)
        plot.axes[0].plot([0, 1], [1, 0])

    draws = []
    plot.canvas.mpl_connect("draw_event", lambda _e: draws.append(1))
    plot.plot(draw_line)
    plot.draw()
    qtbot.wait(100)
    assert calls == [] and draws == [] and not plot.figure.axes  # hidden: nothing built, nothing drawn

    plot.native.show()
    qtbot.waitUntil(lambda: len(draws) >= 1, timeout=5_000)
    assert calls == [1] and len(plot.figure.axes[0].lines) == 1
    plot.plot(draw_line)  # in sight: built and drawn now
    assert calls == [1, 1]
    plot.show_placeholder("again")  # a placeholder drops a plot still waiting
    plot.native.hide()
    plot.plot(draw_line)
    plot.show_placeholder("replaced")
    plot.native.show()
    qtbot.wait(100)
    assert calls == [1, 1] and not plot.figure.axes
    plot.native.close()
