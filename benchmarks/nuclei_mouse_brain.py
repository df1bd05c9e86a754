"""Nuclei detection on the real mouse brain lowres H&E (../shared/data/mouse_brain_hippocampus).

    .venv/bin/python benchmarks/nuclei_mouse_brain.py [--out docs/nuclei_mouse_brain.png]

Prints what was found and per-spot counts, and draws the H&E crop around the spots with the
detections and the spots coloured by their count. At 12 µm per pixel single nuclei are not
resolved: the counts are hematoxylin-dense clusters, a floor for N_cells_per_location.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

from napari_cell2location import nuclei

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "mouse_brain_hippocampus")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="docs/nuclei_mouse_brain.png")
    args = p.parse_args()
    import anndata
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from skimage.io import imread

    img = imread(os.path.join(DATA, "derived", "tissue_lowres_image.png"))[..., :3]
    with open(os.path.join(DATA, "giotto", "scalefactors_json.json")) as fh:
        sf = json.load(fh)
    adata = anndata.read_h5ad(os.path.join(DATA, "derived", "visium_dg_giotto.h5ad"))
    centres, radius = nuclei.spots_in_image(
        adata.obsm["spatial"], sf["tissue_lowres_scalef"], sf["spot_diameter_fullres"]
    )
    px = 55.0 / (2 * radius)
    found = nuclei.detect_nuclei(img, pixel_size_um=px)
    counts = nuclei.count_nuclei_per_spot(found, centres, radius)
    est = nuclei.estimate_n_cells_per_location(counts, adata.obs["in_tissue"].to_numpy())
    values, freq = np.unique(counts, return_counts=True)
    print(f"image {img.shape[:2]}, {px:.1f} um/px; {len(found)} detections; {len(centres)} spots")
    print("nuclei per spot:", ", ".join(f"{int(v)}: {n}" for v, n in zip(values, freq, strict=True)))
    print(est.summary())

    lo = np.floor(centres.min(0) - 4 * radius).astype(int).clip(0)
    hi = np.ceil(centres.max(0) + 4 * radius).astype(int)
    crop = img[lo[0] : hi[0], lo[1] : hi[1]]
    sel = (found["row"].between(lo[0], hi[0])) & (found["col"].between(lo[1], hi[1]))
    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    axes[0].imshow(crop)
    axes[0].scatter(found["col"][sel] - lo[1], found["row"][sel] - lo[0], s=4, c="orange", lw=0)
    axes[0].set_title(f"detections ({px:.0f} um/px: clusters, not single nuclei)")
    axes[1].imshow(crop)
    sc = axes[1].scatter(centres[:, 1] - lo[1], centres[:, 0] - lo[0], c=counts, s=18, cmap="viridis")
    fig.colorbar(sc, ax=axes[1], fraction=0.046, label="detections per spot")
    axes[1].set_title(f"per spot: N = {est.value:.2f} (a floor)")
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    fig.savefig(args.out, dpi=100)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
