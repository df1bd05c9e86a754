"""Ours vs the original cell2location 0.1.5 on the same synthetic data, same steps, same threads.

    .venv/bin/python benchmarks/compare_cell2location.py [--size 600 1000 15] [--steps 200] [--threads 2]
        [--repeats 3] [--answer-steps 3000]

Builds the original in its own venv (benchmarks/.venv-original: torch 2.13.0, cell2location==0.1.5,
pyro-ppl==1.9.1 — pyro 1.9.2 breaks its import) unless it exists; skips cleanly (exit 0, a
message) when it cannot be installed. Each implementation runs in its own subprocess
(benchmarks/_runner.py); runs are interleaved and repeated and the best time of each is kept,
because this machine is shared. Prints s/step, peak RSS and accuracy for both and the ratios,
then (with --answer-steps) the time to an answer: the original's accuracy and wall time after
``answer-steps`` steps at its defaults vs our fast mode (regression start, stop on convergence).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _metrics import accuracy  # noqa: E402

ORIGINAL_VENV = HERE / ".venv-original"


def ensure_original() -> Path | None:
    py = ORIGINAL_VENV / "bin" / "python"
    if py.exists() and subprocess.run([str(py), "-c", "import cell2location"], capture_output=True).returncode == 0:
        return py
    print(f"building the original cell2location in {ORIGINAL_VENV} (a few minutes) ...", flush=True)
    steps = [
        [sys.executable, "-m", "venv", str(ORIGINAL_VENV)],
        [str(py), "-m", "pip", "install", "-q", "torch==2.13.0"],
        [str(py), "-m", "pip", "install", "-q", "cell2location==0.1.5", "pyro-ppl==1.9.1"],
    ]
    for cmd in steps:
        if subprocess.run(cmd).returncode != 0:
            print("could not install the original cell2location: skipping the comparison")
            return None
    return py


def run(py, impl, data, sig, threads, steps, extra=()):
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "w.npz"
        cmd = [
            str(py),
            str(HERE / "_runner.py"),
            impl,
            str(data),
            str(sig),
            str(out),
            "--steps",
            str(steps),
            "--threads",
            str(threads),
            *extra,
        ]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"{impl} failed:\n{res.stderr[-2000:]}")
        info = json.loads(res.stdout.strip().splitlines()[-1])
        info["w_sf"] = np.load(out, allow_pickle=True)["w_sf"]
        return info


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, nargs=3, default=[600, 1000, 15], metavar=("SPOTS", "GENES", "TYPES"))
    p.add_argument("--steps", type=int, default=200, help="timed full-data steps")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--answer-steps", type=int, default=0, help="also compare time to an answer (e.g. 3000)")
    args = p.parse_args()

    orig_py = ensure_original()
    if orig_py is None:
        return 0
    from napari_cell2location.datasets import synthetic_visium

    n_spots, n_genes, n_types = args.size
    data = synthetic_visium(n_spots=n_spots, n_genes=n_genes, n_cell_types=n_types, image=False, seed=1)
    truth = data.truth["cell_abundance"].to_numpy()
    with tempfile.TemporaryDirectory() as tmp:
        adata = data.adata.copy()
        adata.uns.pop("spatial", None)
        h5ad, sig = Path(tmp) / "spatial.h5ad", Path(tmp) / "signatures.csv"
        adata.write_h5ad(h5ad)
        data.signatures.to_csv(sig)
        best = {}
        for _ in range(args.repeats):
            for impl, py in (("original", orig_py), ("ours", sys.executable)):
                info = run(py, impl, h5ad, sig, args.threads, args.steps)
                if impl not in best or info["s_per_step"] < best[impl]["s_per_step"]:
                    best[impl] = info
                best[impl]["peak_rss_mb"] = min(best[impl]["peak_rss_mb"], info["peak_rss_mb"])
        print(
            f"\n{n_spots} spots x {n_genes} genes x {n_types} types, {args.threads} threads, "
            f"{args.steps} timed steps, best of {args.repeats}"
        )
        print(f"{'':10} {'s/step':>8} {'peak RSS MB':>12} {'r':>6} {'PR-AUC':>7} {'total':>6}")
        for impl in ("original", "ours"):
            acc = accuracy(best[impl]["w_sf"], truth)
            print(
                f"{impl:10} {best[impl]['s_per_step']:8.4f} {best[impl]['peak_rss_mb']:12.0f} "
                f"{acc['pearson_r']:6.3f} {acc['pr_auc']:7.3f} {acc['total_ratio']:6.2f}"
            )
        print(
            f"ratio ours/original: s/step {best['ours']['s_per_step'] / best['original']['s_per_step']:.2f}, "
            f"peak RSS {best['ours']['peak_rss_mb'] / best['original']['peak_rss_mb']:.2f}",
            flush=True,
        )

        if args.answer_steps:
            orig = run(orig_py, "original", h5ad, sig, args.threads, args.answer_steps, ["--warmup", "1"])
            fast = run(sys.executable, "ours", h5ad, sig, args.threads, 1, ["--fast"])
            a_o, a_f = accuracy(orig["w_sf"], truth), accuracy(fast["w_sf"], truth)
            t_o = orig["s_per_step"] * args.answer_steps
            print(f"\ntime to an answer ({args.threads} threads)")
            print(
                f"original, {args.answer_steps} steps at lr 0.002: {t_o:7.1f} s  r={a_o['pearson_r']:.3f} "
                f"PR-AUC={a_o['pr_auc']:.3f} total={a_o['total_ratio']:.2f}"
            )
            print(
                f"ours, fast mode ({fast['train_s'] / fast['s_per_step']:.0f} steps): {fast['train_s']:7.1f} s  "
                f"r={a_f['pearson_r']:.3f} PR-AUC={a_f['pr_auc']:.3f} total={a_f['total_ratio']:.2f}"
            )
            print(f"ratio of wall times ours/original: {fast['train_s'] / t_o:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
