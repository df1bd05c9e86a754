"""Screenshot of nuclei detected on a full-resolution scan:
``xvfb-run -a -s "-screen 0 1700x1050x24" python docs/make_nuclei_screenshot.py``.

Writes the synthetic 20,480² scan (0.5 µm/px, pyramidal OME-TIFF next to a Space Ranger folder) into a
temporary folder, opens the folder with the plugin's reader (the scan shows as a multiscale layer), runs the
Cells-per-spot tab (finest scale, tiles under the spots), and saves the window zoomed onto a few spots, where
single nuclei and their detected centres are visible, as ``docs/screenshot_nuclei_fullres.png``.
"""

import tempfile
import time
from pathlib import Path

import napari
import numpy as np
from qtpy.QtWidgets import QApplication

from napari_cell2location._qt import Cell2locationDock
from napari_cell2location._qt._view import fit_window_to_screen
from napari_cell2location.datasets._fullres import write_fullres_visium

OUT = Path(__file__).parent / "screenshot_nuclei_fullres.png"
VIEW_UM = 260.0  # height of the view (µm): about three spots, nuclei (7 µm) some 20 screen px across


def wait(cond, timeout=600):
    t0 = time.time()
    while not cond():
        QApplication.processEvents()
        time.sleep(0.02)
        if time.time() - t0 > timeout:
            raise TimeoutError


def settle(seconds=1.0):
    t0 = time.time()
    while time.time() - t0 < seconds:
        QApplication.processEvents()
        time.sleep(0.02)


def main():
    with tempfile.TemporaryDirectory() as tmp:
        scan = write_fullres_visium(Path(tmp) / "run", size=20480, n_spots=100, seed=4)
        viewer = napari.Viewer(title="napari-cell2location: nuclei on the full-resolution scan")
        viewer.open(str(scan.run), plugin="napari-cell2location")
        dock = Cell2locationDock(viewer)
        viewer.window.add_dock_widget(dock, name="Cell2location", area="right")
        fit_window_to_screen(viewer)  # as the demo's window
        dock.show_tab("Cells per spot")
        cells = dock.cells
        cells.detect()
        wait(lambda: cells.worker is None)
        spots = viewer.layers["run"]
        spots.opacity = 0.3  # the count colours stay readable, the nuclei under them visible
        nuclei = cells.nuclei_layer
        nuclei.border_width = 0.18
        # a spot near the middle of the section, and the view onto it at single-nucleus zoom
        centre = np.median(spots.data, axis=0)
        spot = spots.data[np.argmin(np.linalg.norm(spots.data - centre, axis=1))]
        viewer.layers.selection.active = nuclei
        settle(0.5)
        camera = getattr(viewer, "scene", viewer).camera
        camera.center = tuple(spot)
        camera.zoom = viewer.window._qt_viewer.canvas.native.height() / (VIEW_UM / scan.um_per_px)
        settle(3.0)  # the multiscale layer loads the finest level's tiles in view
        viewer.screenshot(str(OUT), canvas_only=False)
        print(cells.pixel_note.value)
        print(cells.status.value)
        print(cells.summary.value)
        viewer.close()


if __name__ == "__main__":
    main()
