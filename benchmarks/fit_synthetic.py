"""Seconds per step and accuracy after a fixed number of steps, at two sizes of synthetic data.

    .venv/bin/python benchmarks/fit_synthetic.py [--steps 1000 300] [--threads 2] [--original]

For each size (600 spots x 1,000 genes x 15 types; 2,500 x 2,000 x 30) it fits our model for a
fixed number of full-data steps and prints s/step, Pearson r of abundances (posterior means)
against the truth, mean per-type PR-AUC of presence, and estimated/true total cells. With
``--original`` (needs benchmarks/.venv-original, see compare_cell2location.py) it also times the
original cell2location on the same data in the same run and prints the ratio of step times.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _metrics import accuracy  # noqa: E402

SIZES = [(600, 1000, 15), (2500, 2000, 30)]
ORIGINAL_PY = HERE / ".venv-original" / "bin" / "python"


def fit_ours(data, steps: int, lr: float, threads: int) -> dict:
    import torch

    from napari_cell2location import Cell2location

    torch.set_num_threads(threads)
    adata = data.adata.copy()
    Cell2location.setup_anndata(adata, batch_key="batch")
    mod = Cell2location(adata, data.signatures, N_cells_per_location=8.0, detection_alpha=20.0)
    mod.train(max_epochs=5, lr=lr, progress_bar=False, device="cpu", seed=0)  # warm-up
    t = time.perf_counter()
    mod.train(max_epochs=steps, lr=lr, progress_bar=False, device="cpu")
    per_step = (time.perf_counter() - t) / steps
    mod.export_posterior(adata, use_quantiles=True, add_to_obsm=["means"])
    est = adata.obsm["means_cell_abundance_w_sf"].to_numpy()
    truth = data.truth["cell_abundance"].loc[adata.obs_names].to_numpy()
    return {"s_per_step": per_step, **accuracy(est, truth)}


def time_original(data, threads: int, steps: int = 50) -> float | None:
    if not ORIGINAL_PY.exists():
        return None
    with tempfile.TemporaryDirectory() as tmp:
        adata = data.adata.copy()
        adata.uns.pop("spatial", None)
        adata.write_h5ad(os.path.join(tmp, "d.h5ad"))
        data.signatures.to_csv(os.path.join(tmp, "s.csv"))
        cmd = [
            str(ORIGINAL_PY),
            str(HERE / "_runner.py"),
            "original",
            os.path.join(tmp, "d.h5ad"),
            os.path.join(tmp, "s.csv"),
            os.path.join(tmp, "o.npz"),
            "--steps",
            str(steps),
            "--threads",
            str(threads),
        ]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            print("original failed:", out.stderr[-500:], file=sys.stderr)
            return None
        return json.loads(out.stdout.strip().splitlines()[-1])["s_per_step"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, nargs=2, default=[1000, 300], help="steps at the small and large size")
    p.add_argument("--lr", type=float, default=0.002)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--original", action="store_true", help="also time the original (same data, same run)")
    args = p.parse_args()

    from napari_cell2location.datasets import synthetic_visium

    header = [
        "size".rjust(22),
        "steps".rjust(6),
        "s/step".rjust(8),
        "r".rjust(6),
        "PR-AUC".rjust(7),
        "total".rjust(6),
        "orig s/step".rjust(11),
        "ratio".rjust(6),
    ]
    print(" ".join(header))
    for (n_spots, n_genes, n_types), steps in zip(SIZES, args.steps, strict=True):
        data = synthetic_visium(n_spots=n_spots, n_genes=n_genes, n_cell_types=n_types, image=False, seed=1)
        res = fit_ours(data, steps, args.lr, args.threads)
        orig = time_original(data, args.threads) if args.original else None
        ratio = f"{res['s_per_step'] / orig:6.2f}" if orig else "   n/a"
        orig_s = f"{orig:11.4f}" if orig else "        n/a"
        print(
            f"{n_spots:>6} x {n_genes:>5} x {n_types:>3} {steps:>6} {res['s_per_step']:8.4f} "
            f"{res['pearson_r']:6.3f} {res['pr_auc']:7.3f} {res['total_ratio']:6.2f} {orig_s} {ratio}",
            flush=True,
        )


if __name__ == "__main__":
    main()
