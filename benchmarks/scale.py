"""How training cost grows with the number of spots, in minibatch mode.

    .venv/bin/python benchmarks/scale.py [--spots 10000 50000 200000] [--genes 2000] [--types 15]
        [--batch-size 2500] [--epochs 1] [--threads 2] [--full] [--device cpu|cuda]

With ``--full`` it trains on all spots at once (``--epochs`` full-data steps) instead, and with
``--device cuda`` it also prints the peak GPU memory; the issue's GPU figure is
``--full --device cuda --spots 60000 --genes 18000 --epochs 20``.

Each size runs in its own subprocess (so peak RSS is that size's alone): it generates sparse
counts from the model's own assumptions (each type present in 30% of spots, NB noise; about 60%
zeros at 2,000 genes, the density is printed), keeps them sparse (CSR) on the host, trains
``--epochs`` epochs and exports posterior quantiles in spot batches. It prints s/epoch, s/step
(after the first, which carries one-off set-up), export time, the RSS holding the data before
the fit, the peak RSS during the fit (train + export, sampled every 20 ms), their difference
(what fitting adds to the data), and the memory of the variational parameters with their
gradients and Adam moments (4 x 4 bytes each): the fit's overhead should track that, not the
size of the count matrix.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import threading
import time

import numpy as np


def make_counts(n_spots: int, n_genes: int, n_types: int, seed: int = 0):
    """Sparse (CSR) NB counts, generated in chunks of spots so memory stays small."""
    import pandas as pd
    from scipy import sparse

    rng = np.random.default_rng(seed)
    sig = rng.gamma(0.3, 1.0, size=(n_genes, n_types)) * 0.6  # counts per cell, sparse-ish signatures
    blocks = []
    chunk = 20000
    for start in range(0, n_spots, chunk):
        n = min(chunk, n_spots - start)
        present = rng.random((n, n_types)) < 0.3
        w = rng.gamma(2.0, 1.5, size=(n, n_types)) * present
        mu = (w @ sig.T) * 0.3
        alpha = 10.0
        counts = rng.poisson(rng.gamma(alpha, mu / alpha)).astype(np.float32)
        blocks.append(sparse.csr_matrix(counts))
    X = sparse.vstack(blocks, format="csr")
    genes = [f"g{i}" for i in range(n_genes)]
    return X, pd.DataFrame(sig, index=genes, columns=[f"T{f}" for f in range(n_types)]), genes


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakRSS:
    """Peak resident memory (MB) while the ``with`` block runs, sampled by a thread every 20 ms."""

    def __enter__(self):
        self.peak = _rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _rss_mb())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mb())


def one_size(args) -> dict:
    import anndata
    import torch

    from napari_cell2location import Cell2location

    torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    X, sig, genes = make_counts(args.one, args.genes, args.types)
    adata = anndata.AnnData(X)
    adata.var_names = genes
    adata.obs_names = [f"s{i}" for i in range(adata.n_obs)]
    density = X.nnz / (X.shape[0] * X.shape[1])
    gc.collect()
    rss_data = _rss_mb()
    with PeakRSS() as fit_rss:
        mod = Cell2location(adata, sig, N_cells_per_location=3.0)
        mod.pyro_elbo = args.pyro_elbo
        t = time.perf_counter()
        steps = 0
        batch_size = None if args.full else args.batch_size
        for _ in mod.iter_train(max_epochs=args.epochs, batch_size=batch_size, device=args.device, seed=0):
            steps += 1
            if steps == 1:
                if cuda:
                    torch.cuda.synchronize()
                t_first = time.perf_counter()  # after the one-off set-up of the first step
        if cuda:
            torch.cuda.synchronize()
        train_s = time.perf_counter() - t
        later_s = time.perf_counter() - t_first
        t = time.perf_counter()
        mod.export_posterior(
            adata, use_quantiles=True, add_to_obsm=["means", "q05", "q50", "q95"], sample_kwargs={"batch_size": 20000}
        )
        export_s = time.perf_counter() - t
    n_params = sum(p.numel() for p in mod.guide.parameters())
    return {
        "spots": args.one,
        "density": density,
        "s_per_epoch": train_s / args.epochs,
        "s_per_step": later_s / (steps - 1) if steps > 1 else train_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_after_data_mb": rss_data,
        "fit_peak_rss_mb": fit_rss.peak,
        "params_mb": n_params * 4 * 4 / 2**20,
        "gpu_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "export_s": export_s,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spots", type=int, nargs="+", default=[10000, 50000, 200000])
    p.add_argument("--genes", type=int, default=2000)
    p.add_argument("--types", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=2500)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--full", action="store_true", help="full-data training (one step per epoch)")
    p.add_argument("--device", default="cpu", help="'cpu' or 'cuda[:n]'")
    p.add_argument("--pyro-elbo", action="store_true", help="train through Pyro's Trace_ELBO (the reference path)")
    p.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one is not None:
        print(json.dumps(one_size(args)))
        return
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            print(f"device {args.device!r} asked for but CUDA is not available here: nothing to measure")
            return
    mode = "full-data training" if args.full else f"minibatch training, batch {args.batch_size}"
    elbo = "Pyro Trace_ELBO" if args.pyro_elbo else "fused ELBO"
    print(f"{mode}, {args.genes} genes, {args.types} types, {args.threads} threads, device {args.device}, {elbo}")
    print(
        f"{'spots':>8} {'nnz %':>6} {'s/epoch':>9} {'s/step':>7} {'export s':>9} {'data MB':>8} "
        f"{'fit peak MB':>11} {'fit - data':>10} {'params MB':>9} {'process peak MB':>15} {'GPU peak MB':>11}"
    )
    for n in args.spots:
        cmd = [
            sys.executable,
            __file__,
            "--one",
            str(n),
            "--genes",
            str(args.genes),
            "--types",
            str(args.types),
            "--batch-size",
            str(args.batch_size),
            "--epochs",
            str(args.epochs),
            "--threads",
            str(args.threads),
            "--device",
            args.device,
            *(["--full"] if args.full else []),
            *(["--pyro-elbo"] if args.pyro_elbo else []),
        ]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            print(f"{n:>8} failed: {res.stderr[-400:]}")
            continue
        r = json.loads(res.stdout.strip().splitlines()[-1])
        print(
            f"{n:>8} {100 * r['density']:6.1f} {r['s_per_epoch']:9.1f} {r['s_per_step']:7.3f} {r['export_s']:9.1f} "
            f"{r['rss_after_data_mb']:8.0f} {r['fit_peak_rss_mb']:11.0f} "
            f"{r['fit_peak_rss_mb'] - r['rss_after_data_mb']:10.0f} {r['params_mb']:9.0f} {r['peak_rss_mb']:15.0f} "
            f"{r['gpu_peak_mb'] or float('nan'):11.0f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
