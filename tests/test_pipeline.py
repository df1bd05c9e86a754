"""The core after the restructuring, without Qt: the fit pipeline (iter_fit / iter_load_fit), the
per-spot N rule, check_n_cells, model variants, the signature pipeline and the shared estimator."""

from __future__ import annotations

import argparse
import importlib
import inspect
import pkgutil

import numpy as np
import pandas as pd
import pytest
import torch

from napari_cell2location import Cell2location
from napari_cell2location._contract import EXPORTED_SUMMARIES, abundance_column, abundance_key
from napari_cell2location._infer import PyroEstimator, Stage, TrainStep, consume
from napari_cell2location._variants import ModelVariant
from napari_cell2location.io import InputError
from napari_cell2location.model import FitResult, FitSettings, check_n_cells, fit, iter_fit, iter_load_fit
from napari_cell2location.reference import RegressionModel, iter_signatures

QC_COLUMNS = ["total_counts", "expected_counts", "total_cells", "detection_y_s", "reconstruction_r"]


def run(gen):
    """Every record a job generator yields, and its return value."""
    records = []
    while True:
        try:
            records.append(next(gen))
        except StopIteration as stop:
            return records, stop.value


def abundance_keys(adata) -> list[str]:
    return sorted(k for k in adata.obsm if k.endswith("_cell_abundance_w_sf"))


def per_spot_counts(w) -> np.ndarray:
    """Per-spot cell counts from the true abundances, all different from one value (so not a global N)."""
    return np.round(w.sum(1)) + 1.0


# --------------------------------------------------------------------------- iter_fit
def test_iter_fit_stages_steps_and_result(tiny):
    adata, sig, _ = tiny
    records, result = run(iter_fit(adata, sig, batch_key="sample", max_epochs=3, lr=0.01, device="cpu"))

    first, *steps, last = records
    assert isinstance(first, Stage) and first.name == "model"
    mod = first.value
    assert isinstance(mod, Cell2location)
    assert all(isinstance(r, TrainStep) for r in steps)
    assert [r.step for r in steps] == [1, 2, 3] and {r.total for r in steps} == {3}
    assert last == Stage("exporting")

    assert isinstance(result, FitResult) and result.model is mod
    np.testing.assert_allclose(mod.history_["elbo_train"]["elbo_train"], [r.loss for r in steps])
    # QC: one row per spot, in the model's order
    qc = result.qc
    assert list(qc.columns) == QC_COLUMNS
    assert len(qc) == adata.n_obs == mod.n_obs
    np.testing.assert_allclose(qc["total_counts"], np.asarray(mod.X.sum(1)).ravel())
    means = adata.obsm[abundance_key("means")]
    np.testing.assert_allclose(qc["total_cells"], means.to_numpy().sum(1), rtol=1e-5)
    assert (qc["expected_counts"] > 0).all() and (qc["detection_y_s"] > 0).all()
    r = qc["reconstruction_r"].to_numpy()
    assert np.isfinite(r).all() and (np.abs(r) <= 1).all()
    # the contract: one obsm DataFrame per summary, cell2location's column names, the data's spots
    assert abundance_keys(adata) == sorted(abundance_key(k) for k in EXPORTED_SUMMARIES)
    for k in EXPORTED_SUMMARIES:
        df = adata.obsm[abundance_key(k)]
        assert isinstance(df, pd.DataFrame)
        assert list(df.columns) == [f"{k}cell_abundance_w_sf_{t}" for t in sig.columns]
        assert list(df.columns) == [abundance_column(k, t) for t in sig.columns]
        assert list(df.index) == list(adata.obs_names)
        assert np.isfinite(df.to_numpy()).all() and (df.to_numpy() > 0).all()
    q = {k: adata.obsm[abundance_key(k)].to_numpy() for k in ("q05", "q50", "q95")}
    assert (q["q05"] < q["q50"]).all() and (q["q50"] < q["q95"]).all()
    assert [str(n) for n in adata.uns["mod"]["factor_names"]] == list(sig.columns)


def test_per_spot_n_is_observed_as_nuclei_counts(make_tiny):
    """The rule once in the core: a per-spot N_cells_per_location is also observed as nuclei counts."""
    adata, sig, w = make_tiny(n_obs=30, n_vars=50, n_factors=3)
    counts = per_spot_counts(w)
    assert len(np.unique(counts)) > 1
    gen = iter_fit(adata, sig, n_cells_per_location=counts, max_epochs=2, device="cpu")
    stage = next(gen)
    gen.close()
    assert stage.name == "model"
    np.testing.assert_allclose(stage.value.module.nuclei_counts.numpy().ravel(), counts)
    np.testing.assert_allclose(stage.value.module.N_cells_per_location.numpy().ravel(), counts)
    assert FitSettings(n_cells_per_location=counts).per_spot

    gen = iter_fit(adata, sig, n_cells_per_location=5.0, max_epochs=2, device="cpu")
    stage = next(gen)
    gen.close()
    assert stage.value.module.nuclei_counts is None
    np.testing.assert_allclose(stage.value.module.N_cells_per_location.numpy(), 5.0)
    assert not FitSettings(n_cells_per_location=5.0).per_spot


def test_per_spot_n_as_a_series_is_matched_by_spot_name(make_tiny):
    """Per-spot counts given as a Series by spot name land on their own spots, whatever the order."""
    adata, sig, w = make_tiny(n_obs=30, n_vars=50, n_factors=3)
    counts = per_spot_counts(w)
    shuffled = pd.Series(counts, index=adata.obs_names).sample(frac=1.0, random_state=0)
    assert not shuffled.index.equals(adata.obs_names)
    gen = iter_fit(adata, sig, n_cells_per_location=shuffled, max_epochs=1, device="cpu")
    mod = next(gen).value
    gen.close()
    np.testing.assert_allclose(mod.module.N_cells_per_location.numpy().ravel(), counts)
    np.testing.assert_allclose(mod.module.nuclei_counts.numpy().ravel(), counts)
    with pytest.raises(InputError, match="no value for 1 spots"):
        next(iter_fit(adata, sig, n_cells_per_location=shuffled.iloc[1:], max_epochs=1, device="cpu"))


def test_iter_fit_closed_early_keeps_steps_and_exports_nothing(tiny):
    adata, sig, _ = tiny
    gen = iter_fit(adata, sig, max_epochs=50, lr=0.01, device="cpu")
    mod = next(gen).value
    steps = [next(gen) for _ in range(3)]
    assert all(isinstance(r, TrainStep) for r in steps)
    gen.close()
    assert len(mod.history_["elbo_train"]) == 3
    np.testing.assert_allclose(mod.history_["elbo_train"]["elbo_train"], [r.loss for r in steps])
    assert mod.is_trained_
    assert abundance_keys(adata) == []
    assert "mod" not in adata.uns
    assert mod.samples == {}


def test_consume_and_fit_return_the_fit_result(tiny):
    adata, sig, _ = tiny
    result = consume(iter_fit(adata, sig, max_epochs=2, device="cpu"), progress_bar=False)
    assert isinstance(result, FitResult)
    assert len(result.model.history_["elbo_train"]) == 2
    assert len(result.qc) == adata.n_obs

    def job():
        yield Stage("model", None)
        yield TrainStep(1, 1, 0.5, 0)
        return "done"

    assert consume(job(), progress_bar=False) == "done"
    again = fit(adata.copy(), sig, FitSettings(max_epochs=2, device="cpu", summaries=("q05",)), progress_bar=False)
    assert isinstance(again, FitResult) and len(again.model.history_["elbo_train"]) == 2


# --------------------------------------------------------------------------- check_n_cells
@pytest.mark.parametrize(
    ("value", "n_obs", "message"),
    [
        (np.full(5, 8.0), 6, "has 5 values but the data has 6 spots"),
        (0.0, None, "must be positive and finite"),
        (-3.0, None, "must be positive and finite"),
        (float("nan"), None, "must be positive and finite"),
        (np.array([8.0, 0.0, 8.0]), 3, "must be positive and finite"),
        (np.array([8.0, -1.0, 8.0]), 3, "must be positive and finite"),
        (np.array([8.0, np.nan, 8.0]), 3, "must be positive and finite"),
        (np.full((2, 3), 8.0), 6, r"one per spot, got an array of shape \(2, 3\)"),
    ],
    ids=["wrong-length", "zero", "negative", "nan", "zero-in-array", "negative-in-array", "nan-in-array", "2-d"],
)
def test_check_n_cells_refuses(value, n_obs, message):
    with pytest.raises(InputError, match=message):
        check_n_cells(value, n_obs)


def test_check_n_cells_values():
    out = check_n_cells(8, 10)
    assert type(out) is float and out == 8.0
    assert type(check_n_cells(np.float32(2.5))) is float
    arr = check_n_cells([1, 2, 3], 3)
    assert isinstance(arr, np.ndarray) and arr.dtype == np.float64
    np.testing.assert_array_equal(arr, [1.0, 2.0, 3.0])
    arr = check_n_cells(np.array([[1.5], [2.0]], dtype=np.float32), 2)  # (n, 1) column is accepted
    assert arr.shape == (2,) and arr.dtype == np.float64


# --------------------------------------------------------------------------- iter_load_fit
def test_iter_load_fit_exports_the_saved_model(tiny, make_tiny, tmp_path):
    adata, sig, _ = tiny
    fresh = adata.copy()
    Cell2location.setup_anndata(adata, batch_key="sample")
    mod = Cell2location(adata, sig)
    mod.train(max_epochs=5, lr=0.01, progress_bar=False, device="cpu", seed=0)
    mod.save(tmp_path / "model")
    mod.export_posterior(adata, use_quantiles=True, add_to_obsm=list(EXPORTED_SUMMARIES))

    records, result = run(iter_load_fit(fresh, tmp_path / "model"))
    assert [r.name for r in records] == ["model", "exporting"]
    loaded = records[0].value
    assert isinstance(loaded, Cell2location) and result.model is loaded and loaded is not mod
    assert loaded.batch_key == "sample" and loaded.n_batch == 2
    np.testing.assert_allclose(loaded.history_["elbo_train"], mod.history_["elbo_train"])
    assert abundance_keys(fresh) == abundance_keys(adata) == sorted(abundance_key(k) for k in EXPORTED_SUMMARIES)
    for k in EXPORTED_SUMMARIES:
        pd.testing.assert_frame_equal(fresh.obsm[abundance_key(k)], adata.obsm[abundance_key(k)], rtol=1e-6)
    assert list(result.qc.columns) == QC_COLUMNS and len(result.qc) == fresh.n_obs

    other, _, _ = make_tiny(n_obs=30)
    with pytest.raises(InputError, match="spots"):
        next(iter_load_fit(other, tmp_path / "model"))


# --------------------------------------------------------------------------- variants
def test_model_variant_of():
    assert ModelVariant.of(None) is ModelVariant.MAIN
    for variant in ModelVariant:
        assert ModelVariant.of(variant) is variant
        assert ModelVariant.of(variant.value) is variant
        assert ModelVariant.of(variant.module_class) is variant
        assert ModelVariant.of(variant.class_name) is variant
        assert variant.module_class.__name__ == variant.class_name
    assert ModelVariant.of("no-mg") is ModelVariant.NO_MG
    assert len({v.module_class for v in ModelVariant}) == 3
    for bad in ("bogus", "No-MG", int, 3):
        with pytest.raises(InputError, match="choose one of") as err:
            ModelVariant.of(bad)
        for variant in ModelVariant:
            assert repr(variant.value) in str(err.value)


@pytest.mark.parametrize("variant", list(ModelVariant), ids=lambda v: v.value)
def test_each_variant_trains_through_iter_fit(variant, make_tiny):
    adata, sig, _ = make_tiny(n_obs=30, n_vars=50, n_factors=3)
    records, result = run(iter_fit(adata, sig, variant=variant, max_epochs=2, device="cpu"))
    mod = result.model
    assert mod.variant is variant
    assert type(mod.module) is variant.module_class
    assert sum(isinstance(r, TrainStep) for r in records) == 2
    assert len(mod.history_["elbo_train"]) == 2 and np.isfinite(mod.history_["elbo_train"]).all().all()
    assert adata.uns["mod"]["model_name"] == variant.class_name
    assert adata.obsm[abundance_key("q05")].shape == (30, 3)


def test_no_factorisation_refuses_a_per_spot_n(make_tiny):
    adata, sig, w = make_tiny(n_obs=30, n_vars=50, n_factors=3)
    gen = iter_fit(adata, sig, variant=ModelVariant.NO_FACTORISATION, n_cells_per_location=per_spot_counts(w))
    with pytest.raises(InputError, match="no-factorisation model takes one global N_cells_per_location"):
        next(gen)


def test_cli_model_choices_are_the_variants():
    from napari_cell2location._cli import build_parser

    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for command in ("fit", "demo"):
        (model,) = [a for a in sub.choices[command]._actions if "--model" in a.option_strings]
        assert list(model.choices) == [v.value for v in ModelVariant] == ["main", "no-factorisation", "no-mg"]
        assert model.default == ModelVariant.MAIN.value


# --------------------------------------------------------------------------- iter_signatures
def test_iter_signatures_average(small_reference, tmp_path):
    from napari_cell2location.io import read_signatures

    ref = small_reference
    gen = iter_signatures(ref, labels_key="ct", method="average", filter=False)
    records, result = run(gen)
    assert records == []
    assert result.model is None
    sig = result.signatures
    types = sorted(ref.obs["ct"].unique())
    assert list(sig.columns) == types and list(sig.index) == list(ref.var_names)
    X = ref.X.toarray()
    for t in types:
        np.testing.assert_allclose(sig[t], X[(ref.obs["ct"] == t).to_numpy()].mean(0), rtol=1e-6)
    assert list(result.adata.varm["means_per_cluster_mu_fg"].columns) == [f"means_per_cluster_mu_fg_{t}" for t in types]
    path = tmp_path / "ref.h5ad"
    result.adata.write_h5ad(path)
    back = read_signatures(path)
    pd.testing.assert_frame_equal(back, sig.astype(np.float64), check_names=False)


def test_iter_signatures_regression(small_reference):
    ref = small_reference
    records, result = run(
        iter_signatures(
            ref, labels_key="ct", batch_key="batch", method="regression", max_epochs=3, filter=False, device="cpu"
        )
    )
    first, *steps, last = records
    assert first.name == "model" and isinstance(first.value, RegressionModel)
    assert len(steps) >= 3 and all(isinstance(r, TrainStep) for r in steps)
    assert last == Stage("exporting")
    assert result.model is first.value
    assert len(result.model.history_["elbo_train"]) == 3
    sig = result.signatures
    assert sig.shape == (ref.n_vars, 3)
    assert list(sig.index) == list(ref.var_names)
    assert list(sig.columns) == sorted(ref.obs["ct"].unique())
    assert np.isfinite(sig.to_numpy()).all() and (sig.to_numpy() > 0).all()
    assert "means_per_cluster_mu_fg" in result.adata.varm
    assert list(ref.varm) == []  # the reference itself is not modified


def test_iter_signatures_filter_keeping_no_gene(small_reference):
    gen = iter_signatures(
        small_reference, labels_key="ct", cell_count_cutoff=1e9, cell_percentage_cutoff2=1.0, nonz_mean_cutoff=1e9
    )
    with pytest.raises(InputError, match="the gene filter keeps no gene"):
        next(gen)
    with pytest.raises(InputError, match="method must be one of"):
        next(iter_signatures(small_reference, labels_key="ct", method="median"))


# --------------------------------------------------------------------------- the shared engine
def _sources(package: str) -> dict[str, str]:
    pkg = importlib.import_module(package)
    names = [package] + [f"{package}.{m.name}" for m in pkgutil.iter_modules(pkg.__path__)]
    return {name: inspect.getsource(importlib.import_module(name)) for name in names}


def test_both_models_are_pyro_estimators_without_pyro_private_names():
    assert issubclass(Cell2location, PyroEstimator) and issubclass(RegressionModel, PyroEstimator)
    for method in ("iter_train", "posterior_quantile", "sample_posterior", "save", "plot_QC"):
        assert hasattr(Cell2location, method) and hasattr(RegressionModel, method)
    for shared in ("sample_posterior", "posterior_quantile", "save", "load", "plot_QC", "_ensure_guide", "_svi"):
        # written once, in the base
        assert shared not in vars(Cell2location) and shared not in vars(RegressionModel), shared
    sources = {}
    for package in ("napari_cell2location._infer", "napari_cell2location.model", "napari_cell2location.reference"):
        sources.update(_sources(package))
    assert "napari_cell2location._infer._estimator" in sources
    assert "napari_cell2location.model._cell2location" in sources
    assert "napari_cell2location.reference._regression" in sources
    for name, source in sources.items():
        for private in ("_setup_prototype", "_get_loc_and_scale"):
            assert private not in source, f"{name} uses Pyro's private {private}"


def _check_guide(mod, n_obs: int, n_vars: int):
    params = list(mod.guide.parameters())
    assert params and all(p.requires_grad for p in params)
    nodes = mod.guide.prototype_trace.nodes
    assert any(site["type"] == "sample" for site in nodes.values())
    for name, site in nodes.items():
        value = site.get("value")
        if torch.is_tensor(value):
            assert value.numel() != n_obs * n_vars, f"prototype site {name} holds counts-sized {tuple(value.shape)}"


def test_guides_set_up_through_the_public_call(tiny, small_reference):
    adata, sig, _ = tiny
    gen = iter_fit(adata, sig, max_epochs=2, device="cpu")
    mod = next(gen).value
    assert mod.guide.prototype_trace is None  # set up by the first training call, not by the constructor
    assert isinstance(next(gen), TrainStep)
    after_one = {k: v.detach().clone() for k, v in mod.guide.state_dict().items()}
    records, result = run(gen)
    _check_guide(result.model, adata.n_obs, adata.n_vars)
    moved = [k for k, v in result.model.guide.state_dict().items() if not torch.equal(v, after_one[k])]
    assert len(moved) == len(after_one)  # every parameter is trained

    ref = small_reference
    records, result = run(iter_signatures(ref, labels_key="ct", max_epochs=2, filter=False, device="cpu"))
    _check_guide(result.model, ref.n_obs, ref.n_vars)
    assert "data_target" not in result.model.guide.prototype_trace.nodes


def test_fast_mode_tolerance_goes_through_the_pipeline_and_the_cli(make_tiny, tmp_path):
    """A looser tolerance stops the fast mode sooner; the CLI's --tolerance is the same setting."""
    import json

    from napari_cell2location._cli import main

    adata, sig, _ = make_tiny(n_obs=30, n_vars=50, n_factors=3)
    loose = fit(adata.copy(), sig, tolerance=0.5, device="cpu", progress_bar=False).model
    assert "change < 0.5 per unit" in loose.history_["stop_reason"]
    assert len(loose.history_["elbo_train"]) == 300  # the earliest stop: min_epochs, 2 windows under it
    spatial, sig_path = tmp_path / "s.h5ad", tmp_path / "sig.csv"
    adata.write_h5ad(spatial)
    sig.to_csv(sig_path)
    argv = ["fit", str(spatial), "--signatures", str(sig_path), "--out", str(tmp_path / "o.h5ad"), "--quiet"]
    assert main([*argv, "--tolerance", "0.5", "--device", "cpu", "--save-model", str(tmp_path / "m")]) == 0
    attrs = json.loads((tmp_path / "m" / "attr.json").read_text())
    assert "change < 0.5 per unit" in attrs["stop_reason"] and len(attrs["history"]) == 300


def test_cpu_threads_sets_and_restores():
    import torch

    from napari_cell2location._infer import cpu_threads

    before = torch.get_num_threads()
    with cpu_threads(before + 1):
        assert torch.get_num_threads() == before + 1
    assert torch.get_num_threads() == before
    with cpu_threads(None):
        assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), cpu_threads(1):
        assert torch.get_num_threads() == 1
        raise RuntimeError("restored on error too")
    assert torch.get_num_threads() == before


def test_jobs_from_the_viewer_leave_a_core_for_it():
    """A job started from the dock trains with one thread fewer than torch's number (at least 1), and the
    number is restored when the job ends; what the job yields and returns passes through."""
    import torch

    from napari_cell2location._qt._worker import beside_viewer, training_threads

    def job(n):
        for _ in range(n):
            yield torch.get_num_threads()
        return "done"

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        assert training_threads() == 2
        run = beside_viewer(job)(2)
        seen = []
        with pytest.raises(StopIteration) as stop:
            while True:
                seen.append(next(run))
        assert seen == [2, 2] and stop.value.value == "done"
        assert torch.get_num_threads() == 3
        torch.set_num_threads(1)
        assert training_threads() == 1
    finally:
        torch.set_num_threads(before)
