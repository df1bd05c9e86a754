"""Real data end to end, headless: lymph node reference -> signatures -> Cell2location on 1,000 Visium spots.

Usage: python benchmarks/reference_lymph_node.py [--ref-epochs N] [--spatial-epochs N] [--threads T] [--out DIR]

Data: ``../shared/data/human_lymph_node_rctd/derived`` (330 cells x 10,237 genes, 11 types; 1,000 spots x
2,000 genes; 558 genes shared; see SOURCE.md there). Steps:

1. ``filter_genes`` with the tutorial's cut-offs (5, 0.03, 1.12);
2. ``RegressionModel`` (batch_key='sample', 22 samples), signatures exported to
   ``varm['means_per_cluster_mu_fg']``; compared with plain cluster averages;
3. ``Cell2location`` on the spots (N_cells_per_location=30, the guidance for human lymph node; detection_alpha 20
   by default);
4. regions: k-means (k=6) of the spots on their own expression (log-normalised counts, 15 PCs), independent of the
   model; the mean q05 abundance of each cell type per region, top three types per region printed.

Prints timings and the table; writes signatures CSV, per-region table CSV and a JSON summary to --out.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "human_lymph_node_rctd" / "derived"


def kmeans(x: np.ndarray, k: int, seed: int = 0, n_iter: int = 100) -> np.ndarray:
    """Plain k-means (k-means++ start) on rows of x; returns labels."""
    rng = np.random.default_rng(seed)
    centres = [x[rng.integers(len(x))]]
    for _ in range(1, k):
        d2 = np.min(((x[:, None, :] - np.asarray(centres)[None]) ** 2).sum(-1), axis=1)
        centres.append(x[rng.choice(len(x), p=d2 / d2.sum())])
    centres = np.asarray(centres)
    labels = np.zeros(len(x), dtype=int)
    for _ in range(n_iter):
        labels_new = ((x[:, None, :] - centres[None]) ** 2).sum(-1).argmin(1)
        if np.array_equal(labels_new, labels) and _:
            break
        labels = labels_new
        centres = np.asarray([x[labels == j].mean(0) if np.any(labels == j) else centres[j] for j in range(k)])
    return labels


def expression_regions(adata, k: int = 6, n_pcs: int = 15) -> np.ndarray:
    x = adata.X.toarray().astype(np.float64)
    x = np.log1p(x / x.sum(1, keepdims=True) * 1e4)
    x = x - x.mean(0)
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    return kmeans(u[:, :n_pcs] * s[:n_pcs], k)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ref-epochs", type=int, default=None, help="reference epochs (default: the model's heuristic)")
    p.add_argument("--ref-lr", type=float, default=0.002)
    p.add_argument("--spatial-epochs", type=int, default=2000)
    p.add_argument("--spatial-lr", type=float, default=0.01)
    p.add_argument("--detection-alpha", type=float, default=20.0)
    p.add_argument("--use-quantiles", action="store_true", help="reference export from the guide (no sampling)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="benchmarks/out/reference_lymph_node")
    args = p.parse_args()

    import anndata
    import torch

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    from napari_cell2location import Cell2location
    from napari_cell2location.reference import (
        RegressionModel,
        cluster_average_signatures,
        filter_genes,
        signatures_from_adata,
    )

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"args": vars(args)}
    ref = anndata.read_h5ad(DATA / "reference_lymph_node_330cells.h5ad")
    spots = anndata.read_h5ad(DATA / "visium_lymph_node_1000spots.h5ad")

    t = time.perf_counter()
    genes = filter_genes(ref, cell_count_cutoff=5, cell_percentage_cutoff2=0.03, nonz_mean_cutoff=1.12)
    ref = ref[:, genes].copy()
    summary["reference_genes_kept"] = len(genes)
    summary["genes_shared_with_spots"] = int(len(genes.intersection(spots.var_names)))

    RegressionModel.setup_anndata(ref, labels_key="cell_type", batch_key="sample")
    mod = RegressionModel(ref)
    t = time.perf_counter()
    mod.train(max_epochs=args.ref_epochs, lr=args.ref_lr, progress_bar=False, seed=0, device="cpu")
    summary["reference_train_s"] = round(time.perf_counter() - t, 1)
    summary["reference_epochs"] = len(mod.history_["elbo_train"])
    t = time.perf_counter()
    mod.export_posterior(ref, sample_kwargs={"num_samples": 1000}, use_quantiles=args.use_quantiles)
    summary["reference_export_s"] = round(time.perf_counter() - t, 1)
    sig = signatures_from_adata(ref)
    sig.to_csv(out / "signatures.csv")
    avg = cluster_average_signatures(ref, "cell_type")
    la, lb = np.log10(sig.to_numpy() + 1e-3), np.log10(avg.loc[sig.index, sig.columns].to_numpy() + 1e-3)
    summary["r_log_signatures_vs_cluster_averages"] = round(float(np.corrcoef(la.ravel(), lb.ravel())[0, 1]), 4)

    Cell2location.setup_anndata(spots)
    c2l = Cell2location(spots, sig, N_cells_per_location=30, detection_alpha=args.detection_alpha)
    summary["spatial_genes_used"] = c2l.n_vars
    t = time.perf_counter()
    c2l.train(max_epochs=args.spatial_epochs, lr=args.spatial_lr, progress_bar=False, seed=0, device="cpu")
    summary["spatial_train_s"] = round(time.perf_counter() - t, 1)
    c2l.export_posterior(spots, add_to_obsm=["means", "q05"], use_quantiles=True)
    q05 = spots.obsm["q05_cell_abundance_w_sf"]
    q05.columns = c2l.factor_names_
    summary["mean_total_cells_per_spot"] = round(float(spots.obsm["means_cell_abundance_w_sf"].sum(1).mean()), 2)

    regions = expression_regions(spots)
    table = q05.groupby(regions).mean()
    table.index = [f"region_{j} ({int((regions == j).sum())} spots)" for j in table.index]
    table.to_csv(out / "q05_abundance_per_region.csv")
    top = {}
    for name, row in table.iterrows():
        best = row.sort_values(ascending=False)[:3]
        top[name] = ", ".join(f"{k} {v:.1f}" for k, v in best.items())
    summary["top_cell_types_per_region (mean q05 cells per spot)"] = top
    # proportions make the regional contrast clearer than absolute numbers
    prop = q05.div(q05.sum(1), axis=0).groupby(regions).mean()
    enrich = prop / prop.mean(0)
    summary["most_enriched_types_per_region (proportion / mean proportion)"] = {
        name: ", ".join(f"{k} {v:.2f}x" for k, v in enrich.loc[j].sort_values(ascending=False)[:3].items())
        for j, name in zip(prop.index, table.index, strict=True)
    }
    with open(out / "summary.json", "w") as fh:
        json.dump(summary, fh, indent=1)
    print(json.dumps(summary, indent=1))
    print(table.round(2).to_string())


if __name__ == "__main__":
    main()
