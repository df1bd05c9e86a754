"""Does the fast mode give the original's answer? Side by side, in one run, on synthetic truth and real tissue.

    .venv/bin/python benchmarks/converged_answer.py [--steps 30000] [--threads 1] [--datasets synthetic lymph_node]
        [--snapshots 1000 3000 10000] [--original]

For each dataset it trains the original's schedule (``train(max_epochs=30000)``: lr 0.002, from the
prior, the original's single-draw ELBO) and then the fast mode (``train()``), from the same inputs, and prints:
time, epochs and what stopped the fast mode; Pearson r and log-r of its abundances (posterior means of
w_sf) against the 30,000-step answer; total cells relative to that answer; and, on synthetic data, the
Pearson r of each against the truth and the total cells relative to the truth. It also prints the
30,000-step run's total cells at a few earlier steps (``--snapshots``): how much the original's own answer
depends on where it stops.

Our ``max_epochs=30000`` stands in for the original cell2location (the same model: r 0.998 at 3,000
steps, issue 11); with ``--original`` the reference is the original cell2location 0.1.5 itself, built
in benchmarks/.venv-original (see compare_cell2location.py; about 30 minutes per dataset on 2 cores).

Datasets:

* ``synthetic``: ``synthetic_visium(600, 1000, 15, seed=1)``, N_cells_per_location = the truth's mean
  cells per spot; also the fast mode with the true per-spot cell counts observed as nuclei counts;
* ``lymph_node``: ``../shared/data/human_lymph_node_rctd`` (1,000 Visium spots; signatures from our
  RegressionModel on the 330-cell reference, the tutorial's gene filter), N = 30, detection_alpha 20.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
LYMPH = HERE.parents[1] / "shared" / "data" / "human_lymph_node_rctd" / "derived"


def synthetic():
    from napari_cell2location.datasets import synthetic_visium

    data = synthetic_visium(n_spots=600, n_genes=1000, n_cell_types=15, image=False, seed=1)
    truth = data.truth["cell_abundance"].loc[data.adata.obs_names].to_numpy()
    return {"adata": data.adata, "signatures": data.signatures, "n_cells": float(truth.sum(1).mean()),
            "batch_key": "batch", "truth": truth}  # fmt: skip


def lymph_node():
    import anndata

    from napari_cell2location.reference import estimate_signatures

    ref = anndata.read_h5ad(LYMPH / "reference_lymph_node_330cells.h5ad")
    result = estimate_signatures(
        ref, labels_key="cell_type", batch_key="sample", cell_count_cutoff=5, cell_percentage_cutoff2=0.03,
        nonz_mean_cutoff=1.12, device="cpu", progress_bar=False,
    )  # fmt: skip
    spots = anndata.read_h5ad(LYMPH / "visium_lymph_node_1000spots.h5ad")
    return {"adata": spots, "signatures": result.signatures, "n_cells": 30.0, "batch_key": None, "truth": None}


def build(data, **kwargs):
    from napari_cell2location import Cell2location

    adata = data["adata"].copy()
    Cell2location.setup_anndata(adata, batch_key=data["batch_key"])
    return Cell2location(adata, data["signatures"], N_cells_per_location=data["n_cells"], detection_alpha=20.0,
                         **kwargs)  # fmt: skip


def means(mod) -> np.ndarray:
    return mod.posterior_means()["w_sf"]


def compare(est: np.ndarray, ref: np.ndarray) -> dict:
    return {
        "r": float(np.corrcoef(est.ravel(), ref.ravel())[0, 1]),
        "log_r": float(np.corrcoef(np.log1p(est).ravel(), np.log1p(ref).ravel())[0, 1]),
        "total": float(est.sum() / ref.sum()),
    }


def reference_ours(data, steps: int, snapshots):
    """The original's schedule with our implementation; w means at the snapshot steps too."""
    mod = build(data)
    totals, t0 = {}, time.perf_counter()
    for rec in mod.iter_train(max_epochs=steps, device="cpu", seed=0):
        if rec.step in snapshots:
            totals[rec.step] = float(means(mod).sum(1).mean())
    return means(mod), time.perf_counter() - t0, totals


def reference_original(data, steps: int):
    """The original cell2location 0.1.5 on the same inputs, in its own venv (compare_cell2location.py)."""
    import json
    import subprocess

    from compare_cell2location import ensure_original

    py = ensure_original()
    if py is None:
        raise SystemExit("the original cell2location could not be installed")
    with tempfile.TemporaryDirectory() as tmp:
        # the original needs the same genes in the same order, and keeps all-zero genes (ours drops them)
        sig = data["signatures"]
        adata = data["adata"][:, data["adata"].var_names.isin(sig.index)].copy()
        adata = adata[:, np.asarray(adata.X.sum(0)).ravel() > 0].copy()
        sig = sig.loc[adata.var_names]
        adata.uns.pop("spatial", None)
        if data["batch_key"] is None:
            adata.obs["batch"] = "all"
        adata.write_h5ad(Path(tmp) / "d.h5ad")
        sig.to_csv(Path(tmp) / "s.csv")
        cmd = [str(py), str(HERE / "_runner.py"), "original", str(Path(tmp) / "d.h5ad"), str(Path(tmp) / "s.csv"),
               str(Path(tmp) / "o.npz"), "--steps", str(steps - 1), "--warmup", "1", "--threads", "1",
               "--n-cells", str(data["n_cells"])]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(out.stderr[-2000:])
        info = json.loads(out.stdout.strip().splitlines()[-1])
        return np.load(Path(tmp) / "o.npz", allow_pickle=True)["w_sf"], info["train_s"], {}


def fast(data, **kwargs):
    mod = build(data, **kwargs)
    t0 = time.perf_counter()
    mod.train(max_epochs=None, progress_bar=False, device="cpu", seed=0)
    return means(mod), time.perf_counter() - t0, len(mod.history_["elbo_train"]), mod.history_["stop_reason"]


def report(name, data, args) -> None:
    truth = data["truth"]
    if args.original:
        ref, ref_s, totals = reference_original(data, args.steps)
        ref_name = "the original cell2location 0.1.5"
    else:
        ref, ref_s, totals = reference_ours(data, args.steps, set(args.snapshots))
        ref_name = "ours with max_epochs (the original's schedule)"
    print(f"\n== {name}: {data['adata'].n_obs} spots, N_cells_per_location {data['n_cells']:.2f}")
    print(f"reference: {args.steps:,} steps at lr 0.002 by {ref_name}: {ref_s:.0f} s, "
          f"{ref.sum(1).mean():.2f} cells per spot")  # fmt: skip
    if totals:
        drift = ", ".join(f"{k:,} steps {v:.2f}" for k, v in sorted(totals.items()))
        print(f"  its mean cells per spot on the way (the answer drifts): {drift}, {args.steps:,} steps "
              f"{ref.sum(1).mean():.2f}")  # fmt: skip
    rows = [("fast mode", {})]
    if truth is not None:
        rows.append(("fast mode + nuclei counts", {"nuclei_counts": truth.sum(1)}))
    header = f"{'':28} {'epochs':>6} {'time s':>7} {'time/ref':>8} {'r':>6} {'log-r':>6} {'total':>6}"
    print(header + ("  vs truth: r  total" if truth is not None else ""))
    lines = [(f"{args.steps:,}-step reference", ref, ref_s, args.steps)]
    for label, extra in rows:
        w, secs, epochs, reason = fast(data, **extra)
        lines.append((label, w, secs, epochs))
        print(f"  {label} stopped: {reason}")
    for label, w, secs, epochs in lines:
        c = compare(w, ref)
        line = (f"{label:28} {epochs:>6} {secs:7.1f} {secs / ref_s:8.3f} {c['r']:6.3f} {c['log_r']:6.3f} "
                f"{c['total']:6.2f}")  # fmt: skip
        if truth is not None:
            t = compare(w, truth)
            line += f"  {t['r']:10.3f} {t['total']:6.2f}"
        print(line, flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30000, help="steps of the reference (the original's default)")
    p.add_argument("--snapshots", type=int, nargs="*", default=[1000, 3000, 10000], help="reference steps to report")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--datasets", nargs="+", default=["synthetic", "lymph_node"], choices=["synthetic", "lymph_node"])
    p.add_argument("--original", action="store_true", help="the reference is the original cell2location itself")
    args = p.parse_args()

    import logging

    import torch

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    sys.path.insert(0, str(HERE))
    for name in args.datasets:
        report(name, {"synthetic": synthetic, "lymph_node": lymph_node}[name](), args)


if __name__ == "__main__":
    main()
