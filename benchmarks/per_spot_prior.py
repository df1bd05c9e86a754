"""Global N_cells_per_location vs a per-spot prior from detected nuclei: drift of total cells per spot.

On the synthetic section (nuclei drawn where the cells are), fit the main model twice with the same
data, seed and learning rate: once with one global ``N_cells_per_location`` (the original's practice,
``detection_alpha=20``) and once with ``N_cells_per_location`` = nuclei counted per spot on the
synthetic H&E by :func:`napari_cell2location.nuclei.detect_nuclei`. At checkpoints it prints the
ratio of estimated to true total cells (aggregate over spots), the Pearson r of per-spot totals
and of all abundances against the truth.

Usage: python benchmarks/per_spot_prior.py [--steps 3000] [--every 500] [--spots 300] [--lr 0.01]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def posterior_mean_w(mod) -> np.ndarray:
    """Posterior mean of w_sf from the AutoNormal guide: exp(loc + scale**2 / 2) (log-normal)."""
    loc = mod.guide.locs.w_sf.detach().cpu().numpy()
    scale = mod.guide.scales.w_sf.detach().cpu().numpy()
    return np.exp(loc + 0.5 * scale**2)


def detected_counts(data) -> np.ndarray:
    from napari_cell2location import nuclei

    sf = data.scalefactors
    px = 55.0 / (sf["spot_diameter_fullres"] * sf["tissue_hires_scalef"])
    found = nuclei.detect_nuclei(data.image, pixel_size_um=px)
    centres, radius = nuclei.spots_in_image(
        data.adata.obsm["spatial"], sf["tissue_hires_scalef"], sf["spot_diameter_fullres"]
    )
    return nuclei.count_nuclei_per_spot(found, centres, radius)


def run(
    data,
    n_cells,
    steps: int,
    every: int,
    lr: float,
    detection_alpha: float,
    seed: int = 0,
    label: str = "",
    mean_var_ratio: float = 1.0,
) -> list[dict]:
    from napari_cell2location import Cell2location

    adata = data.adata.copy()
    Cell2location.setup_anndata(adata, batch_key="batch")
    mod = Cell2location(
        adata,
        data.signatures,
        N_cells_per_location=n_cells,
        detection_alpha=detection_alpha,
        N_cells_mean_var_ratio=mean_var_ratio,
    )
    truth = data.truth["cell_abundance"].loc[adata.obs_names].to_numpy().astype(float)
    true_tot = truth.sum(1)
    rows = []
    start = time.perf_counter()
    for rec in mod.iter_train(max_epochs=steps, lr=lr, device="cpu", seed=seed):
        if rec.step % every == 0 or rec.step == steps:
            w = posterior_mean_w(mod)
            tot = w.sum(1)
            rows.append(
                {
                    "step": rec.step,
                    "total_ratio": float(tot.sum() / true_tot.sum()),
                    "r_total": float(np.corrcoef(tot, true_tot)[0, 1]),
                    "r_abundance": float(np.corrcoef(w.ravel(), truth.ravel())[0, 1]),
                    "seconds": round(time.perf_counter() - start, 1),
                }
            )
            print(f"  [{label}] {json.dumps(rows[-1])}", flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--every", type=int, default=500)
    p.add_argument("--spots", type=int, default=300)
    p.add_argument("--genes", type=int, default=500)
    p.add_argument("--types", type=int, default=10)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--detection-alpha", type=float, default=20.0)
    p.add_argument("--global-n", type=float, default=8.0)
    p.add_argument("--mean-var-ratio", type=float, default=1.0, help="N_cells_mean_var_ratio of both fits")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from napari_cell2location.datasets import synthetic_visium

    data = synthetic_visium(n_spots=args.spots, n_genes=args.genes, n_cell_types=args.types, seed=args.seed)
    counts = detected_counts(data)
    true_n = data.truth["n_cells"].to_numpy()
    print(
        f"section: {args.spots} spots x {args.genes} genes x {args.types} types; true cells/spot mean "
        f"{true_n.mean():.2f}; detected nuclei/spot mean {counts.mean():.2f}, r vs truth "
        f"{np.corrcoef(counts, true_n)[0, 1]:.4f}"
    )
    per_spot = np.maximum(counts, 1.0)
    results = {
        f"global N={args.global_n:g}": run(
            data,
            args.global_n,
            args.steps,
            args.every,
            args.lr,
            args.detection_alpha,
            label="global",
            mean_var_ratio=args.mean_var_ratio,
        ),
        "per-spot N (nuclei)": run(
            data,
            per_spot,
            args.steps,
            args.every,
            args.lr,
            args.detection_alpha,
            label="per-spot",
            mean_var_ratio=args.mean_var_ratio,
        ),
    }
    head = (
        f"{'step':>6} | {'global: total ratio':>19} {'r_total':>8} {'r_w':>6} | "
        f"{'per-spot: total ratio':>21} {'r_total':>8} {'r_w':>6}"
    )
    print(f"lr {args.lr}, detection_alpha {args.detection_alpha}, N_cells_mean_var_ratio {args.mean_var_ratio}")
    print(head)
    print("-" * len(head))
    (ga, gb) = results.values()
    for a, b in zip(ga, gb, strict=True):
        print(
            f"{a['step']:>6} | {a['total_ratio']:>19.3f} {a['r_total']:>8.3f} {a['r_abundance']:>6.3f} | "
            f"{b['total_ratio']:>21.3f} {b['r_total']:>8.3f} {b['r_abundance']:>6.3f}"
        )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
