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

CHUNK = 5000  # spots generated at a time


def make_counts(n_spots: int, n_genes: int, n_types: int, seed: int = 0, umis: float | None = None, part=None):
    """Sparse (CSR) NB counts, generated in chunks of spots so memory stays small.

    ``umis``: scale the expression so a spot holds about that many UMIs (Visium HD bins: ~100);
    ``part`` (a slice of spots): only those spots, as the whole matrix would have them (each chunk
    has its own random stream), so a process of a data-parallel run makes its shard alone.
    """
    import pandas as pd
    from scipy import sparse

    rng = np.random.default_rng(seed)
    sig = rng.gamma(0.3, 1.0, size=(n_genes, n_types)) * 0.6  # counts per cell, sparse-ish signatures
    scale = 0.3
    if umis is not None:  # E[total] = scale * E[sum_f w_f] * mean signature total
        scale = umis / (0.3 * 2.0 * 1.5 * float(sig.sum(0).sum()))
    part = part or slice(0, n_spots)
    blocks = []
    for start in range(part.start - part.start % CHUNK, part.stop, CHUNK):
        n = min(CHUNK, n_spots - start)
        crng = np.random.default_rng([seed, start])
        present = crng.random((n, n_types)) < 0.3
        w = crng.gamma(2.0, 1.5, size=(n, n_types)) * present
        mu = (w @ sig.T) * scale
        alpha = 10.0
        counts = crng.poisson(crng.gamma(alpha, mu / alpha)).astype(np.float32)
        lo, hi = max(part.start - start, 0), min(part.stop - start, n)
        blocks.append(sparse.csr_matrix(counts[lo:hi]))
        del counts, mu
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
    """One size in this process (or, under torchrun, this process's shard of it): the figures as a dict."""
    import anndata
    import torch

    from napari_cell2location.model import DataParallel, FitSettings, build_model
    from napari_cell2location.model._parallel import shard_model

    torch.set_num_threads(args.threads)
    parallel = DataParallel.from_env(args.device)
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    part = parallel.shard(args.one)
    X, sig, genes = make_counts(args.one, args.genes, args.types, umis=args.umis, part=part)
    adata = anndata.AnnData(X)
    adata.var_names = genes
    adata.obs_names = [f"s{i}" for i in range(part.start, part.stop)]
    density = X.nnz / (X.shape[0] * X.shape[1])
    umis = float(X.sum()) / X.shape[0]
    gc.collect()
    rss_data = _rss_mb()
    with PeakRSS() as fit_rss:
        settings = FitSettings(n_cells_per_location=3.0)
        if parallel.active:
            mod = shard_model(adata, sig, settings, parallel)
        else:
            mod = build_model(adata, sig, settings)
        mod.pyro_elbo = args.pyro_elbo
        t = time.perf_counter()
        steps = 0
        batch_size = None if args.full else args.batch_size
        for _ in mod.iter_train(
            max_epochs=args.epochs, batch_size=batch_size, device=args.device, seed=0, parallel=parallel
        ):
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
    figures = {
        "spots": args.one,
        "processes": parallel.world_size,
        "density": density,
        "umis": umis,
        "s_per_epoch": train_s / args.epochs,
        "s_per_step": later_s / (steps - 1) if steps > 1 else train_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_after_data_mb": rss_data,
        "fit_peak_rss_mb": fit_rss.peak,
        "params_mb": n_params * 4 * 4 / 2**20,
        "gpu_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "export_s": export_s,
    }
    ranks = parallel.gather(figures)
    parallel.close()
    if ranks is None:
        return None
    # the run's figures: the slowest process's times, the largest process's memory
    out = dict(ranks[0])
    for key in ("s_per_epoch", "s_per_step", "export_s", "peak_rss_mb", "rss_after_data_mb", "fit_peak_rss_mb"):
        out[key] = max(r[key] for r in ranks)
    out["params_mb"] = ranks[0]["params_mb"]
    return out


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
    p.add_argument("--umis", type=float, default=None, help="UMIs per spot (default: as the expression gives)")
    p.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="also run each size data-parallel over this many processes (torchrun, gloo) beside one process",
    )
    p.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one is not None:
        figures = one_size(args)
        if figures is not None:  # rank 0 (or the only process)
            print(json.dumps(figures))
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
        f"{'spots':>8} {'procs':>5} {'nnz %':>6} {'UMIs':>6} {'s/epoch':>9} {'s/step':>7} {'export s':>9} "
        f"{'data MB':>8} {'fit peak MB':>11} {'fit - data':>10} {'params MB':>9} {'process peak MB':>15} "
        f"{'GPU peak MB':>11}"
    )
    for n in args.spots:
        for procs in sorted({1, args.nproc}):
            threads = max(1, args.threads // procs)  # the same cores in all
            cmd = [
                *([sys.executable] if procs == 1 else _torchrun(procs)),
                __file__,
                *("--one", str(n), "--genes", str(args.genes), "--types", str(args.types)),
                *("--batch-size", str(args.batch_size), "--epochs", str(args.epochs), "--threads", str(threads)),
                *("--device", args.device),
                *(["--umis", str(args.umis)] if args.umis else []),
                *(["--full"] if args.full else []),
                *(["--pyro-elbo"] if args.pyro_elbo else []),
            ]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                print(f"{n:>8} {procs:>5} failed: {res.stderr[-600:]}")
                continue
            r = json.loads(res.stdout.strip().splitlines()[-1])
            print(
                f"{n:>8} {procs:>5} {100 * r['density']:6.1f} {r['umis']:6.0f} {r['s_per_epoch']:9.1f} "
                f"{r['s_per_step']:7.3f} {r['export_s']:9.1f} {r['rss_after_data_mb']:8.0f} "
                f"{r['fit_peak_rss_mb']:11.0f} {r['fit_peak_rss_mb'] - r['rss_after_data_mb']:10.0f} "
                f"{r['params_mb']:9.0f} {r['peak_rss_mb']:15.0f} {r['gpu_peak_mb'] or float('nan'):11.0f}",
                flush=True,
            )


def _torchrun(procs: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs)]


if __name__ == "__main__":
    main()
