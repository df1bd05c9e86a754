"""Regenerate the README screenshots: ``xvfb-run -a -s "-screen 0 1700x1050x24" python docs/make_screenshots.py``.

Opens the GUI demo (the synthetic section) at the size the demo gives its window on this screen, fits it
in the Fit tab's worker, then saves the whole window with the Results tab (composite of three cell types),
the Fit tab and the Spot QC tab.
"""

import sys
import time
from pathlib import Path

import napari
from qtpy.QtWidgets import QApplication

from napari_cell2location._layers import feature_table
from napari_cell2location._qt._demo import open_demo
from napari_cell2location._qt._view import frame_tissue

OUT = Path(__file__).parent
EPOCHS = int(sys.argv[1]) if len(sys.argv) > 1 else 0  # 0: the fast mode (stops when converged)


def wait(cond, timeout=3600):
    t0 = time.time()
    while not cond():
        QApplication.processEvents()
        time.sleep(0.02)
        if time.time() - t0 > timeout:
            raise TimeoutError


def main():
    viewer = napari.Viewer(title="napari-cell2location demo")
    dock = open_demo(viewer, fit_settings={"epochs": EPOCHS})
    dock.fit.run()
    wait(lambda: dock.fit.worker is None)
    results = viewer.layers["cell abundance"]
    viewer.layers["synthetic section"].visible = False
    table = feature_table(results)
    q05 = table[[c for c in table if c.startswith("q05 ")]]
    top = [c[4:] for c in q05.mean().sort_values(ascending=False).index[:3]]
    dock.results.show_composite(top, "q05")
    frame_tissue(viewer)
    time.sleep(0.5)
    QApplication.processEvents()
    viewer.screenshot(str(OUT / "screenshot.png"), canvas_only=False)
    dock.results.show(top[0], "q05")
    dock.show_tab("Fit")
    QApplication.processEvents()
    viewer.screenshot(str(OUT / "screenshot_fit.png"), canvas_only=False)
    dock.show_tab("Spot QC")
    dock.qc.color_by("reconstruction_r")
    dock.qc.show_spot(int(dock.qc.select_worst(5)[0]))
    QApplication.processEvents()
    time.sleep(0.5)
    QApplication.processEvents()
    viewer.screenshot(str(OUT / "screenshot_qc.png"), canvas_only=False)
    print(dock.fit.status.value)
    viewer.close()


if __name__ == "__main__":
    main()
