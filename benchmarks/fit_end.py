"""How long the viewer is blocked when a fit ends: plots on hidden tabs drawn at once vs when they are shown.

A fit started from the Fit tab ends on the viewer's thread: the results layer is added, the loss is redrawn
and the other tabs are told (Spot QC builds the model's QC figure). This script runs the GUI demo's fit
(``--epochs`` epochs) under a real Qt event loop and, from the moment the worker returns until ``--window``
seconds later, records every gap of the event loop (a 10 ms timer): the longest gap is the stall a user
feels, the sum of the gaps over 20 ms the time the viewer could not respond.

Two modes alternate, each in a fresh viewer, ``--repeats`` times:

* ``eager`` (the baseline, as before): every canvas builds and draws its plot at once, in sight or not;
* ``deferred`` (now): a canvas out of sight builds and draws its plot when it is shown
  (:meth:`napari_cell2location._qt._mpl.MplCanvas.plot`).

Measured here (2 shared CPU cores, Xvfb 1920x1080, 2026-12-04; 600 spots, 20 epochs; medians of 3)::

    mode        longest gap (s)  blocked (s)
    eager                  0.39         0.73
    deferred               0.29         0.49      blocked time, deferred / eager: 0.67

What is left (profiled): adding the results layer and its first paint (~0.25 s) and the loss plot in sight.
On a machine busy with other work the same end took about 2 s (the walk of issue 15).

Usage: xvfb-run -a -s "-screen 0 1920x1080x24" python benchmarks/fit_end.py [--epochs 20] [--repeats 3]
       [--window 2.5]
"""

from __future__ import annotations

import argparse
import statistics
import time


def _eager(canvas_cls):
    """Patch ``MplCanvas`` back to drawing everything at once (the baseline); returns the undo."""
    saved = canvas_cls.plot, canvas_cls.draw

    def plot(self, fn):
        fn()
        self.canvas.draw_idle()

    def draw(self):
        self.canvas.draw_idle()

    canvas_cls.plot, canvas_cls.draw = plot, draw

    def undo():
        canvas_cls.plot, canvas_cls.draw = saved

    return undo


def run_once(epochs: int, window: float) -> tuple[float, float]:
    """One demo fit in a fresh viewer; returns (longest gap, blocked seconds) after the worker returned."""
    import napari
    from qtpy.QtCore import QEventLoop, QTimer

    from napari_cell2location._qt._demo import open_demo

    viewer = napari.Viewer(show=True)
    dock = open_demo(viewer, fit_settings={"epochs": epochs})
    loop = QEventLoop()
    gaps: list[float] = []
    state = {"last": time.perf_counter(), "recording": False}

    def tick():
        now = time.perf_counter()
        if state["recording"]:
            gaps.append(now - state["last"])
        state["last"] = now

    timer = QTimer()
    timer.timeout.connect(tick)
    timer.start(10)
    fit = dock.fit
    on_returned = fit._on_returned

    def returned(result):
        tick()
        state["recording"] = True
        on_returned(result)
        QTimer.singleShot(int(window * 1000), loop.quit)

    fit._on_returned = returned
    QTimer.singleShot(500, fit.run)
    loop.exec()
    timer.stop()
    viewer.close()
    if not gaps:
        raise RuntimeError(f"the fit did not end: {fit.status.value}")
    return max(gaps), sum(g for g in gaps if g > 0.02)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--window", type=float, default=2.5)
    args = parser.parse_args(argv)

    from napari_cell2location._qt._mpl import MplCanvas

    rows = {"eager": [], "deferred": []}
    for _ in range(args.repeats):
        for mode in rows:
            undo = _eager(MplCanvas) if mode == "eager" else (lambda: None)
            try:
                rows[mode].append(run_once(args.epochs, args.window))
            finally:
                undo()
    print(f"{'mode':<10} {'longest gap (s)':>16} {'blocked (s)':>12}   (medians of {args.repeats})")
    for mode, runs in rows.items():
        longest = statistics.median(r[0] for r in runs)
        blocked = statistics.median(r[1] for r in runs)
        print(f"{mode:<10} {longest:>16.2f} {blocked:>12.2f}   runs: {[tuple(round(v, 2) for v in r) for r in runs]}")
    eager = statistics.median(r[1] for r in rows["eager"])
    deferred = statistics.median(r[1] for r in rows["deferred"])
    print(f"blocked time, deferred / eager: {deferred / eager:.2f}")


if __name__ == "__main__":
    main()
