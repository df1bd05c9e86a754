"""Under Xvfb: the GUI demo command opens the dock ready to Run, and a full-window screenshot after a demo fit."""

import os

import pytest

pytest.importorskip("pytestqt")
pytestmark = pytest.mark.skipif(
    os.environ.get("QT_QPA_PLATFORM") == "offscreen", reason="needs OpenGL: run under xvfb-run"
)


def test_demo_command_opens_viewer_ready_to_run(make_napari_viewer, monkeypatch, capsys):
    import napari

    from napari_cell2location import _cli
    from napari_cell2location._qt import Cell2locationDock

    viewers = []

    def fake_viewer(**kwargs):
        viewers.append(make_napari_viewer())
        return viewers[-1]

    monkeypatch.setattr(napari, "Viewer", fake_viewer)
    monkeypatch.setattr(napari, "run", lambda *a, **k: None)
    rc = _cli.main(["demo", "--n-spots", "60", "--n-genes", "40", "--n-cell-types", "4", "--max-epochs", "123"])
    assert rc == 0 and "press Run" in capsys.readouterr().out
    (viewer,) = viewers
    assert [type(layer).__name__ for layer in viewer.layers] == ["Image", "Points"]
    dock = viewer.window.dock_widgets["Cell2location"]
    assert isinstance(dock, Cell2locationDock)
    assert dock.fit.run_button.enabled and dock.fit.epochs.value == 123 and dock.fit.lr.value == 0.0  # lr 0: auto
    assert dock.tabs.tabText(dock.tabs.currentIndex()) == "Fit"


def test_screenshot_after_demo_fit(make_napari_viewer, qtbot, tmp_path):
    from skimage.io import imread

    from napari_cell2location._qt._demo import open_demo

    viewer = make_napari_viewer(show=True)
    dock = open_demo(viewer, n_spots=120, n_genes=60, n_cell_types=5, seed=2, fit_settings={"epochs": 40})
    dock.fit.run()
    qtbot.waitUntil(lambda: dock.fit.worker is None, timeout=180_000)
    assert "cell abundance" in viewer.layers
    dock.results.show("Type_01", "q05")
    viewer.layers["synthetic section"].visible = False
    qtbot.wait(200)
    path = tmp_path / "demo_window.png"
    viewer.screenshot(str(path), canvas_only=False)
    img = imread(path)
    assert img.ndim == 3 and img.shape[0] > 300 and img.shape[1] > 500
    assert img[..., :3].std() > 20  # not a blank window
    print(f"screenshot: {path}")
