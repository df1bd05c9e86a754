"""Nuclei detection on full-resolution scans: seconds per megapixel and peak memory against image and tile size.

Synthetic Visium runs (:func:`napari_cell2location.datasets._fullres.write_fullres_visium`) are written at
several scan sizes with the same section in the middle (0.5 µm/px, pyramidal tiled OME-TIFF next to a Space
Ranger ``outs/`` folder). Each detection runs in a fresh process that opens the scan as the reader does
(:func:`napari_cell2location.io.fullres_image_for`, lazily) and detects on its finest level
(:func:`napari_cell2location.nuclei._fullres.detect_in_spots`), either under the spots (only the tiles that meet
a spot) or on the whole image; it reports its own peak resident memory (and the memory it held before
detecting: imports, the counts table, the open scan; the peak is restarted from there through Linux's
``/proc/self/clear_refs``), seconds per megapixel read, the tiles read and the per-spot counts against the truth.

Peak memory is bounded by the tile, not the image: the same detection on a 4x larger scan holds the same
memory, a 4x larger tile about 4x more above the baseline.

Measured here (2 shared CPU cores, 2026-12; 600-spot section, 17,171 nuclei, 7 m 18 s in all)::

           image    GB         area  tile tiles read      s  s/Mpx RSS before  peak RSS   added r(counts)
     10240x10240  0.29  under spots  1024     32/100   19.0  0.566     220 MB    283 MB   63 MB       1.0
     20480x20480  1.17  under spots  1024     32/400   19.3  0.575     220 MB    287 MB   67 MB     0.999
     40960x40960  4.69  under spots  1024    32/1600   22.3  0.665     221 MB    285 MB   64 MB       1.0
     20480x20480  1.17  under spots  2048     12/100   29.6  0.587     220 MB    462 MB  242 MB       1.0
     10240x10240  0.29  whole image  1024    100/100   54.3  0.518     220 MB    285 MB   65 MB       1.0
     20480x20480  1.17  whole image  1024    400/400  209.8    0.5     220 MB    290 MB   70 MB       1.0

Usage: python benchmarks/nuclei.py [--sizes 10240 20480 40960] [--whole 10240 20480] [--chunk 1024]
       [--big-chunk 2048] [--n-spots 600] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time


def _status_mb(key: str) -> float | None:
    """A memory figure of this process from ``/proc/self/status`` (Linux), MB."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Restart this process's peak resident memory from its current one (Linux: ``clear_refs`` 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _peak_mb() -> float:
    peak = _status_mb("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def detect(run: str, chunk: int, whole: bool) -> dict:
    """One detection in this process (the child): open the scan lazily, detect, report."""
    import numpy as np
    import pandas as pd

    from napari_cell2location.io import fullres_image_for, read_spaceranger
    from napari_cell2location.nuclei._fullres import detect_in_spots

    adata = read_spaceranger(os.path.join(run, "outs"))
    scan = fullres_image_for(os.path.join(run, "outs"), adata=adata)
    radius = next(iter(adata.uns["spatial"].values()))["scalefactors"]["spot_diameter_fullres"] / 2
    truth = pd.read_csv(os.path.join(run, "truth_n_cells.csv"), index_col=0)["n_cells"].loc[adata.obs_names]
    np.asarray(scan[-1][:64, :64])  # the open scan's first read (its file handle, zarr metadata)
    # the peak is measured from here: what detection adds to what the process already holds
    _reset_peak()
    before = _status_mb("VmRSS") or _peak_mb()
    start = time.perf_counter()
    found = detect_in_spots(
        scan, spots=adata.obsm["spatial"][:, ::-1], spot_radius=radius, chunk_size=chunk, whole_image=whole
    )
    seconds = time.perf_counter() - start
    h, w = scan.shape[:2]
    # megapixels of the tiles read (their cores: each is read with a halo of ~90 px, work counted in the time)
    mpx_read = found.n_tiles * min(chunk, h) * min(chunk, w) / 1e6
    return {
        "image": f"{w}x{h}",
        "image_gb": round(scan.nbytes / 2**30, 2),
        "area": "whole image" if whole else "under spots",
        "chunk": chunk,
        "tiles": f"{found.n_tiles}/{found.n_tiles_total}",
        "nuclei": len(found.table),
        "seconds": round(seconds, 1),
        "s_per_mpx": round(seconds / mpx_read, 3),
        "rss_before_mb": round(before, 0),
        "peak_rss_mb": round(_peak_mb(), 0),
        "r_counts": round(float(np.corrcoef(found.counts, truth.to_numpy())[0, 1]), 3),
        "count_ratio": round(float(found.counts.mean() / truth.mean()), 3),
    }


def write_scan(folder: str, size: int, n_spots: int) -> dict:
    from napari_cell2location.datasets._fullres import write_fullres_visium

    scan = write_fullres_visium(folder, size=size, n_spots=n_spots, seed=0)
    scan.n_cells.rename("n_cells").to_csv(os.path.join(folder, "truth_n_cells.csv"))
    mb = os.path.getsize(scan.image_path) / 2**20
    return {"size": size, "seconds": round(scan.seconds, 1), "mb": round(mb, 1), "levels": len(scan.level_shapes)}


def _child(run: str, chunk: int, whole: bool) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--_detect", run, str(chunk), "whole" if whole else "spots"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10240, 20480, 40960], help="scan sizes (px a side)")
    p.add_argument("--whole", type=int, nargs="*", default=[10240, 20480], help="sizes also detected whole")
    p.add_argument("--chunk", type=int, default=1024, help="detection tile (px)")
    p.add_argument("--big-chunk", type=int, default=2048, help="a larger tile, under the spots of the second size")
    p.add_argument("--n-spots", type=int, default=600, help="spots of the synthetic section")
    p.add_argument("--keep", default=None, help="write the scans into this folder and keep them")
    p.add_argument("--_detect", nargs=3, metavar=("RUN", "CHUNK", "AREA"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._detect:
        run, chunk, area = args._detect
        print(json.dumps(detect(run, int(chunk), area == "whole")))
        return
    root = args.keep or tempfile.mkdtemp(prefix="nuclei_fullres_bench_")
    try:
        runs = {}
        for size in args.sizes:
            runs[size] = os.path.join(root, f"run_{size}")
            info = write_scan(runs[size], size, args.n_spots)
            print(
                f"scan {size} x {size} px ({size * size / 1e6:,.0f} Mpx, {size * size * 3 / 2**30:.2f} GB of pixels, "
                f"{info['levels']} levels): {info['mb']} MB on disk, drawn tile by tile in {info['seconds']} s",
                flush=True,
            )
        jobs = [(size, args.chunk, False) for size in args.sizes]
        if args.big_chunk and len(args.sizes):
            jobs.append((args.sizes[min(1, len(args.sizes) - 1)], args.big_chunk, False))
        jobs += [(size, args.chunk, True) for size in args.whole if size in runs]
        header = (
            f"{'image':>12} {'GB':>5} {'area':>12} {'tile':>5} {'tiles read':>10} {'nuclei':>7} {'s':>6} "
            f"{'s/Mpx':>6} {'RSS before':>10} {'peak RSS':>9} {'added':>7} {'r(counts)':>9} {'count/truth':>11}"
        )
        print(header, flush=True)
        for size, chunk, whole in jobs:
            r = _child(runs[size], chunk, whole)
            print(
                f"{r['image']:>12} {r['image_gb']:>5} {r['area']:>12} {r['chunk']:>5} {r['tiles']:>10} "
                f"{r['nuclei']:>7} {r['seconds']:>6} {r['s_per_mpx']:>6} {r['rss_before_mb']:>7.0f} MB "
                f"{r['peak_rss_mb']:>6.0f} MB {r['peak_rss_mb'] - r['rss_before_mb']:>4.0f} MB "
                f"{r['r_counts']:>9} {r['count_ratio']:>11}",
                flush=True,
            )
            print(json.dumps(r), file=sys.stderr)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
