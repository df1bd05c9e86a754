"""Under Xvfb: the GUI demo command opens the dock ready to Run, its first view frames the tissue, and a
full-window screenshot after a demo fit."""

import os

import numpy as np
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


def _tissue_box(rgb):
    """Bounding box (rows, cols) of the tissue in a canvas screenshot, and the fraction of the canvas it
    covers: tissue is neither the canvas's black background nor the slide's white glass."""
    rgb = rgb[..., :3].astype(int)
    tissue = (rgb.max(-1) > 60) & (rgb.min(-1) < 200)
    rows, cols = np.nonzero(tissue)
    return (rows.min(), rows.max(), cols.min(), cols.max()), tissue.mean()


def test_demo_frames_the_tissue_at_the_default_window_size(make_napari_viewer, qtbot):
    """The demo's first view, and the view after a fit: the window takes most of the screen, the canvas keeps
    most of the window's width, and both sections lie whole inside the canvas and fill most of it."""
    from qtpy.QtWidgets import QApplication

    from napari_cell2location._qt._demo import open_demo

    viewer = make_napari_viewer(show=True)
    dock = open_demo(viewer, n_spots=120, n_genes=60, n_cell_types=5, seed=2, fit_settings={"epochs": 30})
    screen = QApplication.primaryScreen().availableGeometry()
    _, _, width, height = viewer.window.geometry()
    assert width >= 0.85 * screen.width() and height >= 0.85 * screen.height(), (width, height, screen)
    canvas = viewer.window._qt_viewer.canvas.native
    assert canvas.width() >= 0.35 * width, (canvas.width(), width)
    for moment in ("first view", "after a fit"):
        qtbot.wait(100)
        shot = viewer.screenshot(canvas_only=True)
        h, w = shot.shape[:2]
        (r0, r1, c0, c1), covered = _tissue_box(shot)
        assert r0 > 0 and c0 > 0 and r1 < h - 1 and c1 < w - 1, (moment, (r0, r1, c0, c1), (h, w))  # whole
        # the sections span most of the canvas in the direction that limits them (two sections side by side
        # are wide: they fill its width, not its height), and tissue covers a good part of it
        assert max((r1 - r0) / h, (c1 - c0) / w) > 0.75 and covered > 0.15, (moment, (r0, r1, c0, c1), covered)
        if moment == "first view":
            dock.fit.run()
            qtbot.waitUntil(lambda: dock.fit.worker is None, timeout=180_000)
            assert "cell abundance" in viewer.layers
