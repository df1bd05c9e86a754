"""Nuclei detection speed and memory on a large synthetic H&E (default 10,000 x 10,000 px).

The image is drawn block by block into a zarr store (never whole in memory): eosin-stained tissue
with texture and pixel noise, and hematoxylin nuclei (6-9 µm ellipses, drawn at ``--pixel-size``) on a
jittered lattice with random gaps; the number drawn is the truth. Detection then runs in a fresh
process on ``dask.array.from_zarr`` (as a SpatialData image would be read), so its peak resident
memory is its own. Prints seconds per megapixel, peak memory (RSS of the detecting process, its
growth over the imports, and tracemalloc's peak of numpy/Python allocations) and recall.

Usage: python benchmarks/nuclei.py [--size 10000] [--chunk 1024 2048] [--pixel-size 1.0] [--keep]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

BLOCK = 1000
H_VEC = np.array([0.65, 0.70, 0.29], dtype=np.float32)
E_VEC = np.array([0.07, 0.99, 0.11], dtype=np.float32)


def draw_block(seed: int, shape: tuple[int, int], pixel_size_um: float) -> tuple[np.ndarray, int]:
    """One RGB uint8 block of synthetic H&E and the number of nuclei drawn in it."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    h, w = shape
    spacing = 11.0 / pixel_size_um  # nuclei centres about 11 µm apart
    k = int(math.ceil(4.5 / pixel_size_um)) + 1  # drawing half-window (px)
    margin = k + int(math.ceil(0.15 * spacing)) + 1  # whole nuclei stay inside the block
    gy = np.arange(margin, h - margin, spacing)
    gx = np.arange(margin, w - margin, spacing)
    cy, cx = (g.ravel() for g in np.meshgrid(gy, gx, indexing="ij"))
    jitter = 0.15 * spacing
    cy = cy + rng.uniform(-jitter, jitter, cy.size)
    cx = cx + rng.uniform(-jitter, jitter, cx.size)
    keep = rng.random(cy.size) < 0.7
    cy, cx = cy[keep], cx[keep]
    n = cy.size
    a = rng.uniform(3.0, 4.5, n) / pixel_size_um  # semi-axes (px)
    b = a * rng.uniform(0.7, 1.0, n)
    th = rng.uniform(0, np.pi, n)
    dark = rng.uniform(0.5, 0.9, n).astype(np.float32)
    hema = np.full(shape, 0.08, dtype=np.float32)
    off = np.arange(-k, k + 1)
    for i in range(n):
        r0, c0 = int(round(cy[i])), int(round(cx[i]))
        rr, cc = r0 + off[:, None], c0 + off[None, :]
        dr, dc = rr - cy[i], cc - cx[i]
        cos, sin = math.cos(th[i]), math.sin(th[i])
        q = np.sqrt(((dc * cos + dr * sin) / a[i]) ** 2 + ((dr * cos - dc * sin) / b[i]) ** 2)
        val = np.clip(0.5 + (1.0 - q) * b[i], 0.0, 1.0).astype(np.float32) * dark[i]
        sl = (slice(r0 - k, r0 + k + 1), slice(c0 - k, c0 + k + 1))
        np.maximum(hema[sl], val, out=hema[sl])
    eosin = 0.5 + 0.08 * ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), 8.0) * 8.0
    od = hema[..., None] * H_VEC + eosin[..., None] * E_VEC + 0.03
    rgb = 255.0 * np.exp(-od) + 2.5 * rng.standard_normal((*shape, 3)).astype(np.float32)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8), int(n)


def generate(path: str, size: int, pixel_size_um: float) -> dict:
    import zarr

    start = time.perf_counter()
    z = zarr.create_array(path, shape=(size, size, 3), chunks=(BLOCK, BLOCK, 3), dtype="uint8")
    total = 0
    for i, r in enumerate(range(0, size, BLOCK)):
        for j, c in enumerate(range(0, size, BLOCK)):
            shape = (min(BLOCK, size - r), min(BLOCK, size - c))
            block, n = draw_block(i * 10007 + j, shape, pixel_size_um)
            z[r : r + shape[0], c : c + shape[1]] = block
            total += n
    return {"n_true": total, "generate_s": round(time.perf_counter() - start, 1)}


def detect(path: str, chunk: int, pixel_size_um: float) -> dict:
    import tracemalloc

    import dask.array as da

    from napari_cell2location.nuclei import detect_nuclei

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    image = da.from_zarr(path)
    tracemalloc.start()
    start = time.perf_counter()
    found = detect_nuclei(image, pixel_size_um=pixel_size_um, chunk_size=chunk)
    seconds = time.perf_counter() - start
    _, traced = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    mpx = image.shape[0] * image.shape[1] / 1e6
    return {
        "chunk": chunk,
        "n_found": len(found),
        "seconds": round(seconds, 1),
        "s_per_mpx": round(seconds / mpx, 4),
        "peak_rss_mb": round(peak, 1),
        "rss_growth_mb": round(peak - base, 1),
        "tracemalloc_peak_mb": round(traced / 2**20, 1),
        "image_mb": round(image.nbytes / 2**20, 1),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=10000)
    p.add_argument("--chunk", type=int, nargs="+", default=[1024, 2048])
    p.add_argument("--pixel-size", type=float, default=1.0, help="µm per pixel of the synthetic image")
    p.add_argument("--keep", action="store_true", help="keep the zarr store")
    p.add_argument("--_detect", nargs=2, metavar=("PATH", "CHUNK"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._detect:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        print(json.dumps(detect(args._detect[0], int(args._detect[1]), args.pixel_size)))
        return
    tmp = tempfile.mkdtemp(prefix="nuclei_bench_")
    path = os.path.join(tmp, "he.zarr")
    try:
        gen = generate(path, args.size, args.pixel_size)
        print(
            f"{args.size}x{args.size} synthetic H&E ({args.size**2 / 1e6:.0f} Mpx, {gen['n_true']} nuclei) "
            f"drawn in {gen['generate_s']} s"
        )
        for chunk in args.chunk:
            out = subprocess.run(
                [sys.executable, __file__, "--pixel-size", str(args.pixel_size), "--_detect", path, str(chunk)],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            res = json.loads(out.stdout.strip().splitlines()[-1])
            res["recall"] = round(res["n_found"] / gen["n_true"], 4)
            print(
                f"chunk {chunk}: {res['seconds']} s = {res['s_per_mpx']} s/Mpx; peak RSS {res['peak_rss_mb']} MB "
                f"(+{res['rss_growth_mb']} MB over imports; tracemalloc peak {res['tracemalloc_peak_mb']} MB; "
                f"image {res['image_mb']} MB); found {res['n_found']} / {gen['n_true']}"
            )
            print(json.dumps(res))
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
