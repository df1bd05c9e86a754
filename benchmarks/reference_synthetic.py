"""Signatures vs the truth on the synthetic reference: RegressionModel vs plain cluster averages.

Usage: python benchmarks/reference_synthetic.py [--n-genes 1000] [--n-types 15] [--epochs 300] [--lr 0.01]

Two references from ``datasets.synthetic_visium(...).reference`` (NB counts from the true signatures with a
gene-wise batch effect ``truth['reference_batch_effect']`` and per-cell library size):

* ``as generated``: cells of each type split at random between the two batches;
* ``batch-confounded``: each type's cells mostly (~85 %) from one batch, and batch 1 at 40 % sensitivity
  (binomial thinning of its counts), so averages mix batch effects into the signatures.

Reports Pearson r of log signatures vs log truth over all genes and over the marker genes, and timings.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from scipy import sparse


def log_r(est, truth, genes=None) -> float:
    genes = truth.index if genes is None else genes
    a = np.log(est.loc[genes, truth.columns].to_numpy() + 1e-3)
    b = np.log(truth.loc[genes].to_numpy())
    return round(float(np.corrcoef(a.ravel(), b.ravel())[0, 1]), 4)


def confounded(ref, thin: float = 0.4, seed: int = 1):
    rng = np.random.default_rng(seed)
    types = ref.obs["cell_type"].cat.codes.to_numpy()
    batch = ref.obs["batch"].cat.codes.to_numpy()
    main = np.where(types % 2 == 0, batch == 0, batch == 1)
    ref = ref[main | (rng.random(len(batch)) < 0.18)].copy()
    batch = ref.obs["batch"].cat.codes.to_numpy()
    X = ref.X.toarray()
    X[batch == 1] = rng.binomial(X[batch == 1].astype(np.int64), thin)
    ref.X = sparse.csr_matrix(X.astype(np.float32))
    return ref


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n-genes", type=int, default=1000)
    p.add_argument("--n-types", type=int, default=15)
    p.add_argument("--cells-per-type", type=int, default=60)
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from napari_cell2location.datasets import synthetic_visium
    from napari_cell2location.reference import RegressionModel, cluster_average_signatures

    data = synthetic_visium(
        n_spots=50,
        n_genes=args.n_genes,
        n_cell_types=args.n_types,
        n_ref_cells_per_type=args.cells_per_type,
        image=False,
        seed=0,
    )
    truth = data.signatures
    markers = sorted({g for genes in data.truth["marker_genes"].values() for g in genes})
    out = {"args": vars(args)}
    for name, ref in (("as generated", data.reference.copy()), ("batch-confounded", confounded(data.reference))):
        avg = cluster_average_signatures(ref, "cell_type")
        RegressionModel.setup_anndata(ref, labels_key="cell_type", batch_key="batch")
        mod = RegressionModel(ref)
        t = time.perf_counter()
        mod.train(max_epochs=args.epochs, lr=args.lr, progress_bar=False, seed=0, device="cpu")
        train_s = time.perf_counter() - t
        est = mod.signatures()
        out[name] = {
            "cells": ref.n_obs,
            "regression_r_log_all": log_r(est, truth),
            "regression_r_log_markers": log_r(est, truth, markers),
            "averages_r_log_all": log_r(avg, truth),
            "averages_r_log_markers": log_r(avg, truth, markers),
            "train_s": round(train_s, 1),
            "s_per_step": round(train_s / args.epochs, 4),
        }
        print(name, json.dumps(out[name]), flush=True)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
