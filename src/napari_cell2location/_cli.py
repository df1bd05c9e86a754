"""Command line: ``napari-cell2location fit | demo | reference``.

``fit`` runs the fit pipeline (:func:`napari_cell2location.model.iter_fit`) on a file; ``demo
--headless`` runs it on the built-in synthetic section and writes results and a PNG map;
``reference`` runs the signature pipeline (:func:`napari_cell2location.reference.iter_signatures`).
Bad input (a broken file, an unwritable output, ...) exits with status 2 and a one-line reason, no
traceback; outputs are written under a temporary name and renamed at the end, so a failed run leaves
existing results as they were. This module imports neither Qt nor napari: ``demo`` without
``--headless`` loads the GUI on demand.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from ._contract import abundance_key
from ._variants import ModelVariant

logger = logging.getLogger("napari_cell2location")


class CLIError(Exception):
    """A user-facing failure: printed as one line, exit status 2."""


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _add_fit_options(p: argparse.ArgumentParser, epochs: int | None, lr: float | None) -> None:
    p.add_argument(
        "--n-cells-per-location",
        type=_positive_float,
        default=8.0,
        help="expected cells per spot (count nuclei on the histology; default 8)",
    )
    p.add_argument(
        "--detection-alpha",
        type=_positive_float,
        default=20.0,
        help="regularisation of per-spot sensitivity: 20 (weak, default) or 200 (strong)",
    )
    p.add_argument(
        "--max-epochs",
        type=_positive_int,
        default=epochs,
        help="training epochs: exactly that many at lr 0.002, the original's schedule; default: the fast "
        "mode, the same path at a 25x learning rate, stopped when the abundances have converged",
    )
    p.add_argument(
        "--tolerance",
        type=_positive_float,
        default=None,
        help="fast mode: stop when the abundances change less than this per unit of learning rate x steps "
        "(default 0.02; lower trains longer)",
    )
    p.add_argument(
        "--batch-size", type=_positive_int, default=None, help="spots per minibatch (default: all spots at once)"
    )
    p.add_argument(
        "--lr",
        type=_positive_float,
        default=lr,
        help="learning rate (default 0.05 without --max-epochs, 0.002 with it)",
    )
    p.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda or cuda:N")
    p.add_argument(
        "--model", choices=[v.value for v in ModelVariant], default=ModelVariant.MAIN.value, help="model variant"
    )
    p.add_argument(
        "--num-samples", type=_positive_int, default=1000, help="posterior samples for the summaries (default 1000)"
    )
    p.add_argument(
        "--use-quantiles",
        action="store_true",
        help="summaries straight from the guide (exact quantiles, no sampling; low memory)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument(
        "--checkpoint-dir",
        default=None,
        help="write a training checkpoint into this folder (parameters, optimiser, history, random state)",
    )
    p.add_argument(
        "--checkpoint-every",
        type=_positive_int,
        default=None,
        help="epochs between checkpoints (default: about every 100 optimisation steps)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the checkpoint in --checkpoint-dir (to --max-epochs in all), to the same result "
        "as an uninterrupted fit; a fresh fit when there is none",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar or log")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="napari-cell2location",
        description="Map reference cell types onto spatial transcriptomics spots with Cell2location.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    fit = sub.add_parser("fit", help="fit Cell2location to a spatial dataset and write abundances")
    fit.add_argument("spatial", help="spatial counts: .h5ad, SpatialData .zarr or a Space Ranger outs/ folder")
    fit.add_argument(
        "--signatures",
        required=True,
        help="reference signatures: CSV (genes x cell types) or .h5ad with varm['means_per_cluster_mu_fg']",
    )
    fit.add_argument("--out", required=True, help="output .h5ad or .zarr")
    fit.add_argument("--batch-key", default=None, help="column of obs with the sample/section of each spot")
    fit.add_argument("--layer", default=None, help="layer with raw counts (default X)")
    fit.add_argument("--table-key", default=None, help="SpatialData table to use (default 'table')")
    fit.add_argument(
        "--bin-size",
        type=_positive_int,
        default=None,
        help="Visium HD (outs/ folder, or a SpatialData of its bins): bin size in µm to fit (2, 8 or 16; default 8)",
    )
    fit.add_argument("--save-model", default=None, help="also save the trained model to this folder")
    _add_fit_options(fit, epochs=None, lr=None)

    demo = sub.add_parser("demo", help="run the whole pipeline on the built-in synthetic Visium section")
    demo.add_argument("--headless", action="store_true", help="no GUI: fit, then write results and a PNG map")
    demo.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
    demo.add_argument("--n-spots", type=_positive_int, default=600, help="spots in the synthetic section")
    demo.add_argument("--n-genes", type=_positive_int, default=1000, help="genes in the synthetic section")
    demo.add_argument("--n-cell-types", type=_positive_int, default=15, help="cell types")
    _add_fit_options(demo, epochs=None, lr=None)
    _add_reference_parser(sub)
    return parser


def _fit(adata, signatures, args, batch_key, parallel=None):
    """The fit pipeline with the command line's settings (one process of a data-parallel fit when
    ``parallel`` is active); returns its FitResult."""
    from .model import FitSettings, fit

    settings = FitSettings(
        variant=ModelVariant(args.model),
        n_cells_per_location=args.n_cells_per_location,
        detection_alpha=args.detection_alpha,
        batch_key=batch_key,
        layer=getattr(args, "layer", None),
        max_epochs=args.max_epochs,
        tolerance=args.tolerance,
        batch_size=args.batch_size,
        lr=args.lr,
        device=args.device,
        seed=args.seed,
        use_quantiles=args.use_quantiles,
        num_samples=args.num_samples,
        export_batch_size=None,
        checkpoint_dir=args.checkpoint_dir,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
    )
    quiet = args.quiet or (parallel is not None and not parallel.is_main)
    return fit(adata, signatures, settings, progress_bar=not quiet, parallel=parallel)


def cmd_fit(args) -> int:
    from .model import DataParallel

    parallel = DataParallel.from_env(args.device)  # under torchrun: this process's rank; else one process
    try:
        return _cmd_fit(args, parallel)
    finally:
        parallel.close()


def _cmd_fit(args, parallel) -> int:
    from .io import check_writable, read_signatures, read_spatial, write_results

    if not parallel.is_main:  # rank 0 reports and writes
        logging.getLogger("napari_cell2location").setLevel(logging.WARNING)

    out = Path(args.out)
    if out.suffix.lower() not in (".h5ad", ".zarr"):
        raise CLIError(f"--out must end in .h5ad or .zarr, got {args.out!r}")
    check_writable(out, "--out")  # now, not after a long fit
    if args.save_model:
        if parallel.active:
            raise CLIError(
                "--save-model needs a single process: each process of a data-parallel fit holds only its own "
                "spots' parameters (the results file has all of them)"
            )
        check_writable(Path(args.save_model) / "attr.json", "--save-model folder")
    adata, sdata = read_spatial(args.spatial, table_key=args.table_key, bin_size=args.bin_size)
    signatures = read_signatures(args.signatures)
    mod = _fit(adata, signatures, args, args.batch_key, parallel).model
    if not parallel.is_main:
        return 0
    write_results(adata, out, sdata=sdata)
    if args.save_model:
        mod.save(args.save_model, overwrite=True)
    processes = f", {parallel.world_size} processes" if parallel.active else ""
    print(
        f"wrote {out} ({adata.n_obs} spots x {mod.n_factors} cell types{processes}; obsm: "
        f"{', '.join(k for k in adata.obsm if k.endswith('_cell_abundance_w_sf'))})"
    )
    return 0


def abundance_figure(adata, image, scalefactor: float, factor_names, truth=None, n_panels: int = 6):
    """Figure of q05 abundance of the most abundant cell types over the histology (and the truth)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    from .plotting import plot_spatial_abundance

    q05 = adata.obsm[abundance_key("q05")]
    order = np.argsort(-q05.to_numpy().mean(0))[:n_panels]
    rows = 2 if truth is not None else 1
    fig, axes = plt.subplots(rows, len(order), figsize=(3.2 * len(order), 2.6 * rows), squeeze=False)
    xy = np.asarray(adata.obsm["spatial"], dtype=float) * scalefactor
    for j, f in enumerate(order):
        name = factor_names[f]
        plot_spatial_abundance(
            xy, q05.iloc[:, f].to_numpy(), image=image, ax=axes[0, j], spot_size=6, title=f"{name}: q05 estimate"
        )
        if truth is not None:
            plot_spatial_abundance(
                xy, truth[name].to_numpy(), image=image, ax=axes[1, j], spot_size=6, title=f"{name}: truth"
            )
    fig.tight_layout()
    return fig


def cmd_demo(args) -> int:
    if not args.headless:
        import napari

        from ._qt._demo import open_demo

        viewer = napari.Viewer(title="napari-cell2location demo")
        open_demo(
            viewer,
            n_spots=args.n_spots,
            n_genes=args.n_genes,
            n_cell_types=args.n_cell_types,
            seed=args.seed,
            fit_settings={
                "epochs": args.max_epochs,
                "lr": args.lr,
                "n_cells": args.n_cells_per_location,
                "detection_alpha": args.detection_alpha,
                "batch_size": args.batch_size or 0,
                "device": args.device if args.device in ("auto", "cpu") else None,
            },
        )
        print("napari-cell2location demo: press Run in the Cell2location dock (Fit tab); close the window to quit.")
        napari.run()
        return 0
    import numpy as np

    from .datasets import synthetic_visium
    from .io import atomic_output, check_writable, write_results

    out = Path(args.out)
    check_writable(out / "results.zarr", "--out folder")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data = synthetic_visium(n_spots=args.n_spots, n_genes=args.n_genes, n_cell_types=args.n_cell_types, seed=args.seed)
    sdata = data.to_spatialdata()
    adata = sdata.tables["table"]
    logger.info(
        "synthetic section: %d spots x %d genes, %d cell types", adata.n_obs, adata.n_vars, data.signatures.shape[1]
    )
    mod = _fit(adata, data.signatures, args, "batch").model
    truth = data.truth["cell_abundance"].loc[adata.obs_names]
    est = adata.obsm[abundance_key("means")].to_numpy()
    r = float(np.corrcoef(est.ravel(), truth.to_numpy().ravel())[0, 1])
    ratio = float(est.sum(1).mean() / truth.to_numpy().sum(1).mean())
    write_results(adata, out / "results.zarr", sdata=sdata)
    mod.save(out / "model", overwrite=True)
    fig = abundance_figure(adata, data.image, data.scalefactors["tissue_hires_scalef"], mod.factor_names_, truth)
    with atomic_output(out / "abundance_map.png") as tmp:
        fig.savefig(tmp, dpi=110)
    qc = mod.plot_QC()
    with atomic_output(out / "qc.png") as tmp:
        qc.savefig(tmp, dpi=100)
    elapsed = time.perf_counter() - t0
    print(
        f"demo finished in {elapsed:.0f} s: Pearson r(estimated, true abundance) = {r:.3f}, "
        f"total cells estimated / true = {ratio:.2f}"
    )
    print(f"wrote {out / 'results.zarr'}, {out / 'abundance_map.png'}, {out / 'qc.png'}, {out / 'model'}")
    return 0


def _add_reference_parser(sub) -> None:
    ref = sub.add_parser(
        "reference", help="estimate cell-type signatures from a labelled single-cell reference (.h5ad)"
    )
    ref.add_argument("reference", help="labelled single-cell reference: .h5ad with raw counts")
    ref.add_argument("--labels-key", required=True, help="column of obs with the cell type of each cell")
    ref.add_argument("--batch-key", default=None, help="column of obs with the batch (sample) of each cell")
    ref.add_argument("--out", required=True, help="output signatures table: .csv or .tsv (genes x cell types)")
    ref.add_argument("--out-h5ad", default=None, help="also write the reference with varm['means_per_cluster_mu_fg']")
    ref.add_argument("--layer", default=None, help="layer with raw counts (default X)")
    ref.add_argument(
        "--method",
        choices=("regression", "average"),
        default="regression",
        help="regression: the NB RegressionModel (default); average: per-type mean counts (fast)",
    )
    ref.add_argument(
        "--categorical-covariate-keys", nargs="+", default=None, help="obs columns of technical covariates"
    )
    ref.add_argument("--no-filter", action="store_true", help="keep every gene (skip filter_genes)")
    ref.add_argument("--cell-count-cutoff", type=float, default=15, help="filter_genes cut-off (default 15)")
    ref.add_argument("--cell-percentage-cutoff2", type=float, default=0.05, help="filter_genes cut-off (default 0.05)")
    ref.add_argument("--nonz-mean-cutoff", type=float, default=1.12, help="filter_genes cut-off (default 1.12)")
    ref.add_argument(
        "--max-epochs", type=_positive_int, default=None, help="epochs (default min(20000 / n_cells * 400, 400))"
    )
    ref.add_argument("--batch-size", type=_positive_int, default=2500, help="cells per minibatch (default 2500)")
    ref.add_argument("--lr", type=_positive_float, default=0.002, help="learning rate (default 0.002)")
    ref.add_argument("--num-samples", type=_positive_int, default=1000, help="posterior samples (default 1000)")
    ref.add_argument("--use-quantiles", action="store_true", help="summaries straight from the guide (no sampling)")
    ref.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda or cuda:N")
    ref.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    ref.add_argument("--quiet", action="store_true", help="no progress bar or log")


def cmd_reference(args) -> int:
    out = Path(args.out)
    seps = {".csv": ",", ".tsv": "\t"}
    if out.suffix.lower() not in seps:
        raise CLIError(f"--out must end in .csv or .tsv, got {args.out!r}")
    if args.out_h5ad and Path(args.out_h5ad).suffix.lower() != ".h5ad":
        raise CLIError(f"--out-h5ad must end in .h5ad, got {args.out_h5ad!r}")
    path = Path(args.reference)
    if not path.is_file() or path.suffix.lower() != ".h5ad":
        raise CLIError(f"the reference must be an existing .h5ad file, got {args.reference!r}")
    from .io import atomic_output, check_writable, read_h5ad
    from .reference import SignatureSettings, estimate_signatures

    check_writable(out, "--out")
    if args.out_h5ad:
        check_writable(Path(args.out_h5ad), "--out-h5ad")

    t0 = time.perf_counter()
    settings = SignatureSettings(
        labels_key=args.labels_key,
        batch_key=args.batch_key,
        layer=args.layer,
        categorical_covariate_keys=tuple(args.categorical_covariate_keys or ()),
        filter=not args.no_filter,
        cell_count_cutoff=args.cell_count_cutoff,
        cell_percentage_cutoff2=args.cell_percentage_cutoff2,
        nonz_mean_cutoff=args.nonz_mean_cutoff,
        method=args.method,
        max_epochs=args.max_epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        device=args.device,
        seed=args.seed,
        use_quantiles=args.use_quantiles,
        num_samples=args.num_samples,
    )
    reference = read_h5ad(path, "labelled single-cell reference .h5ad")
    result = estimate_signatures(reference, settings, progress_bar=not args.quiet)
    signatures = result.signatures
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(out) as tmp:
        signatures.to_csv(tmp, sep=seps[out.suffix.lower()])
    if args.out_h5ad:
        with atomic_output(args.out_h5ad) as tmp:
            result.adata.write_h5ad(tmp)
    print(
        f"wrote {out} ({signatures.shape[0]} genes x {signatures.shape[1]} cell types, method {args.method}) "
        f"in {time.perf_counter() - t0:.0f} s"
    )
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s: %(message)s")
    handlers = {"fit": cmd_fit, "demo": cmd_demo, "reference": cmd_reference}
    try:
        return handlers[args.command](args)
    except (CLIError, ValueError, OSError, FloatingPointError) as err:  # bad input or disk: one line, exit 2
        print(f"napari-cell2location {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("napari-cell2location: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
