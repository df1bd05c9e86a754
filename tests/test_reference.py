"""Reference signatures: gene filter, cluster averages, the NB RegressionModel, export, CLI, evidence."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import anndata
import numpy as np
import pandas as pd
import pyro
import pytest
import torch
from scipy import sparse

from napari_cell2location._infer._likelihood import NegativeBinomialCounts
from napari_cell2location.datasets import synthetic_visium
from napari_cell2location.io import InputError, read_signatures
from napari_cell2location.model import TrainStep
from napari_cell2location.reference import (
    RegressionBackgroundDetectionTechPyroModel,
    RegressionModel,
    check_reference,
    cluster_average_signatures,
    filter_genes,
    gene_filter_stats,
    plot_filter_genes,
    signatures_from_adata,
)

LYMPH = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "human_lymph_node_rctd", "derived")


def small_reference(n_cells=90, n_genes=40, n_types=3, seed=0):
    rng = np.random.default_rng(seed)
    sig = rng.gamma(0.8, 2.0, size=(n_types, n_genes))
    labels = rng.integers(0, n_types, n_cells)
    X = rng.poisson(sig[labels]).astype(np.float32)
    ad = anndata.AnnData(sparse.csr_matrix(X))
    ad.obs_names = [f"cell_{i}" for i in range(n_cells)]
    ad.var_names = [f"g{i}" for i in range(n_genes)]
    ad.obs["ct"] = pd.Categorical([f"T{t}" for t in labels])
    ad.obs["batch"] = pd.Categorical([f"b{i % 2}" for i in range(n_cells)])
    return ad


def log_r(est: pd.DataFrame, truth: pd.DataFrame, genes=None) -> float:
    genes = truth.index if genes is None else genes
    a = np.log(est.loc[genes, truth.columns].to_numpy() + 1e-3)
    b = np.log(truth.loc[genes].to_numpy())
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


@pytest.fixture(scope="module")
def synth():
    return synthetic_visium(n_spots=60, n_genes=200, n_cell_types=5, n_ref_cells_per_type=60, image=False, seed=3)


# --------------------------------------------------------------------------- filter_genes
def test_filter_genes_rule_and_no_side_effects():
    rng = np.random.default_rng(0)
    n = 200
    X = np.zeros((n, 6), dtype=np.float32)
    X[:12, 0] = 1  # 12 cells (6 %) at 1 count: kept by the percentage rule (> 10 cells)
    X[:8, 1] = 1  # 8 cells (4 %): dropped
    X[:20, 2] = 3  # 20 cells > 15 and non-zero mean 3 > 1.12: kept
    X[:9, 3] = 5  # 9 cells < 15 though high mean: dropped
    X[:, 5] = rng.poisson(2.0, n)  # broadly expressed: kept
    ad = anndata.AnnData(sparse.csr_matrix(X))
    ad.var_names = [f"g{i}" for i in range(6)]
    before = ad.var.copy()
    kept = filter_genes(ad, cell_count_cutoff=15, cell_percentage_cutoff2=0.05, nonz_mean_cutoff=1.12)
    assert list(kept) == ["g0", "g2", "g5"]
    pd.testing.assert_frame_equal(ad.var, before)  # adata untouched
    dense = gene_filter_stats(anndata.AnnData(X))
    np.testing.assert_array_equal(dense["n_cells"].to_numpy(), [12, 8, 20, 9, 0, (X[:, 5] > 0).sum()])
    assert dense["nonz_mean"].iloc[4] == 0.0


def test_filter_genes_plot_draws_without_showing(monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    monkeypatch.setattr(plt, "show", lambda *a, **k: pytest.fail("filter_genes must not call plt.show()"))
    ad = small_reference()
    fig, ax = plt.subplots()
    kept = filter_genes(ad, cell_count_cutoff=5, cell_percentage_cutoff2=0.03, plot=True, ax=ax)
    assert len(ax.lines) == 3 and "kept" in ax.get_title() and str(len(kept)) in ax.get_title()
    ax2 = plot_filter_genes(gene_filter_stats(ad), n_obs=ad.n_obs)  # no ax: a new figure, not shown
    assert ax2.figure is not fig
    plt.close(fig)
    plt.close(ax2.figure)


# --------------------------------------------------------------------------- averages and validation
def test_cluster_average_signatures_match_groupby():
    ad = small_reference()
    ad.obs["ct"] = ad.obs["ct"].cat.add_categories(["unused"])
    sig = cluster_average_signatures(ad, "ct")
    expected = pd.DataFrame(ad.X.toarray(), columns=ad.var_names).groupby(ad.obs["ct"].to_numpy()).mean().T
    assert list(sig.columns) == ["T0", "T1", "T2"]  # unused category dropped
    np.testing.assert_allclose(sig.to_numpy(), expected[sig.columns].to_numpy(), rtol=1e-6)
    assert list(sig.index) == list(ad.var_names)


def test_validation_messages(caplog):
    ad = small_reference()
    with pytest.raises(InputError, match=r"'cell_types' is not a column.*\['ct', 'batch'\]"):
        cluster_average_signatures(ad, "cell_types")
    with pytest.raises(InputError, match="labels_key is required"):
        RegressionModel.setup_anndata(ad, batch_key="batch")
    with pytest.raises(InputError, match="not set up"):
        RegressionModel(small_reference())
    bad = ad.copy()
    bad.X = bad.X.toarray() * 0.5
    with pytest.raises(InputError, match="non-integer"):
        check_reference(bad, "ct")
    bad = ad.copy()
    bad.obs["ct"] = bad.obs["ct"].astype(object)
    bad.obs.iloc[3, 0] = None
    with pytest.raises(InputError, match="1 missing labels"):
        check_reference(bad, "ct")
    bad = ad.copy()
    bad.X = sparse.csr_matrix(bad.shape, dtype=np.float32)
    with pytest.raises(InputError, match="no counts"):
        check_reference(bad, "ct")
    # rare labels and empty genes: warnings with the numbers
    rare = ad.copy()
    rare.obs["ct"] = rare.obs["ct"].astype(str)
    rare.obs.iloc[:4, 0] = "Rare"
    X = rare.X.toarray()
    X[:, :2] = 0
    rare.X = sparse.csr_matrix(X)
    with caplog.at_level(logging.INFO, logger="napari_cell2location"):
        out = check_reference(rare, "ct")
    assert out.small_labels["Rare"] == 4
    texts = ("'Rare': 4", "2 of 40 genes")
    level = {text: r.levelno for r in caplog.records for text in texts if text in r.getMessage()}
    # rare labels make noisy signatures (a warning); empty genes are dropped by the gene filter (info)
    assert level == {"'Rare': 4": logging.WARNING, "2 of 40 genes": logging.INFO}


# --------------------------------------------------------------------------- the model
def test_module_likelihood_and_sites():
    rng = np.random.default_rng(0)
    x = torch.tensor(rng.poisson(2.0, (10, 7)), dtype=torch.float32)
    idx, batch, label = torch.arange(10), torch.tensor([0, 1] * 5), torch.tensor([0, 1, 2, 0, 1] * 2)
    extra = torch.tensor(rng.integers(0, 2, (10, 1)))
    with pyro.settings.context(module_local_params=True):
        mod = RegressionBackgroundDetectionTechPyroModel(
            n_obs=10, n_vars=7, n_factors=3, n_batch=2, n_extra_categoricals=[2]
        )
        # moderate overdispersion: with a prior draw of alpha ~ 1e6 float32 lgamma differences lose all precision
        pyro.set_rng_seed(0)
        conditioned = pyro.poutine.condition(mod, data={"alpha_g_inverse": torch.full((1, 7), 0.4)})
        tr = pyro.poutine.trace(conditioned).get_trace(x, idx, batch, label, extra)
    shapes = {k: tuple(v["value"].shape) for k, v in tr.nodes.items() if v["type"] == "sample"}
    assert shapes["per_cluster_mu_fg"] == (3, 7) and shapes["detection_mean_y_e"] == (2, 1)
    assert shapes["s_g_gene_add"] == (2, 7) and shapes["alpha_g_inverse"] == (1, 7)
    assert shapes["detection_tech_gene_tg"] == (2, 7)
    n = tr.nodes
    mu = (n["per_cluster_mu_fg"]["value"][label] + n["s_g_gene_add"]["value"][batch]) * n["detection_mean_y_e"][
        "value"
    ][batch]
    mu = mu * n["detection_tech_gene_tg"]["value"][extra[:, 0]]
    alpha = n["alpha_g_inverse"]["value"].pow(-2)
    ref = torch.distributions.NegativeBinomial(total_count=alpha, logits=torch.log(mu) - torch.log(alpha))
    torch.testing.assert_close(
        n["data_target"]["fn"].log_prob(x).squeeze(-1), ref.log_prob(x).sum(-1), rtol=1e-4, atol=1e-3
    )
    assert isinstance(n["data_target"]["fn"], NegativeBinomialCounts)


def test_training_generator_minibatches_and_cancel():
    ad = small_reference(n_cells=100)
    RegressionModel.setup_anndata(ad, labels_key="ct", batch_key="batch")
    mod = RegressionModel(ad)
    gen = mod.iter_train(max_epochs=4, batch_size=40, lr=0.01, seed=0, device="cpu")
    recs = [next(gen) for _ in range(5)]
    assert all(isinstance(r, TrainStep) for r in recs)
    assert recs[0].total == 12 and [r.epoch for r in recs] == [0, 0, 0, 1, 1]  # 3 minibatches per epoch
    gen.close()  # cancel mid-epoch: the partial epoch is recorded
    assert len(mod.history_["elbo_train"]) == 2 and mod.is_trained_
    assert len(list(pyro.get_param_store().keys())) == 0  # parameters owned by the model


def test_two_models_own_their_parameters():
    a, b = small_reference(seed=1), small_reference(seed=2)
    for ad in (a, b):
        RegressionModel.setup_anndata(ad, labels_key="ct")
    ma, mb = RegressionModel(a), RegressionModel(b)
    ma.train(max_epochs=5, lr=0.01, progress_bar=False, seed=0, device="cpu")
    before = {k: v.detach().clone() for k, v in ma.guide.state_dict().items()}
    mb.train(max_epochs=5, lr=0.01, progress_bar=False, seed=0, device="cpu")
    after = ma.guide.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_export_contract_and_round_trips(tmp_path):
    ad = small_reference()
    RegressionModel.setup_anndata(ad, labels_key="ct", batch_key="batch")
    mod = RegressionModel(ad)
    mod.train(max_epochs=30, lr=0.01, progress_bar=False, seed=0, device="cpu")
    mod.export_posterior(ad, sample_kwargs={"num_samples": 200}, add_to_varm=["means", "stds", "q05", "q95"])
    for k in ("means", "stds", "q05", "q95"):
        df = ad.varm[f"{k}_per_cluster_mu_fg"]
        assert list(df.columns) == [f"{k}_per_cluster_mu_fg_T{i}" for i in range(3)]
        assert list(df.index) == list(ad.var_names)
    assert (ad.varm["q05_per_cluster_mu_fg"].to_numpy() <= ad.varm["q95_per_cluster_mu_fg"].to_numpy()).all()
    assert list(ad.uns["mod"]["factor_names"]) == ["T0", "T1", "T2"]
    sig = signatures_from_adata(ad)
    assert list(sig.columns) == ["T0", "T1", "T2"] and sig.shape == (40, 3)
    # sampling and guide summaries agree; the in-memory helper matches the export
    exact = mod.signatures()
    np.testing.assert_allclose(sig.to_numpy(), exact.to_numpy(), rtol=0.1)
    path = tmp_path / "ref.h5ad"
    ad.write_h5ad(path)
    pd.testing.assert_frame_equal(read_signatures(path), sig, check_exact=False, rtol=1e-6)
    # a saved model reloads without training and gives the same signatures
    mod.save(tmp_path / "model")
    again = RegressionModel.load(tmp_path / "model", ad)
    pd.testing.assert_frame_equal(again.signatures(), exact)
    fig = mod.plot_QC()
    assert len(fig.axes) >= 3


def test_technology_covariates():
    ad = small_reference()
    ad.obs["tech"] = pd.Categorical(np.where(np.arange(ad.n_obs) % 3 == 0, "3p", "5p"))
    RegressionModel.setup_anndata(ad, labels_key="ct", batch_key="batch", categorical_covariate_keys=["tech", "batch"])
    mod = RegressionModel(ad)
    assert mod.module.n_extra_categoricals == [2, 2]
    mod.train(max_epochs=10, lr=0.01, progress_bar=False, seed=0, device="cpu")
    mod.export_posterior(ad, use_quantiles=True, add_to_varm=["means"])
    assert ad.uns["mod"]["post_sample_means"]["detection_tech_gene_tg"].shape == (4, 40)
    scale = mod.detection_scaling()
    assert scale.shape == (40,) and np.all(scale > 0)
    # the per-gene scale is the mean over cells of y_e(c) * t_tech(c),g * t_batch(c),g
    post = mod._summaries_from_guide(["means"])["post_sample_means"]
    tech = post["detection_tech_gene_tg"]
    codes = [ad.obs[k].cat.codes.to_numpy() for k in ("tech", "batch")]
    per_cell = post["detection_mean_y_e"].ravel()[mod.batch_index][:, None] * tech[codes[0]] * tech[2 + codes[1]]
    np.testing.assert_allclose(scale, per_cell.mean(0), rtol=1e-5)
    with pytest.raises(InputError, match="continuous_covariate_keys"):
        RegressionModel.setup_anndata(ad, labels_key="ct", continuous_covariate_keys=["x"])


def test_signatures_feed_cell2location(synth):
    from napari_cell2location import Cell2location

    ref = synth.reference.copy()
    RegressionModel.setup_anndata(ref, labels_key="cell_type", batch_key="batch")
    mod = RegressionModel(ref)
    mod.train(max_epochs=20, lr=0.01, progress_bar=False, seed=0, device="cpu")
    mod.export_posterior(ref, use_quantiles=True, add_to_varm=["means", "q05"])
    spatial = synth.adata.copy()
    Cell2location.setup_anndata(spatial, batch_key="batch")
    c2l = Cell2location(spatial, signatures_from_adata(ref), N_cells_per_location=8)
    c2l.train(max_epochs=5, lr=0.01, progress_bar=False, seed=0, device="cpu")
    c2l.export_posterior(spatial, use_quantiles=True, add_to_obsm=["q05"])
    assert spatial.obsm["q05_cell_abundance_w_sf"].shape == (60, 5)


# --------------------------------------------------------------------------- evidence
def test_signatures_recover_truth_on_synthetic_reference(synth):
    """Evidence: correlation of estimated and true signatures (log scale; all genes and marker genes)."""
    ref = synth.reference.copy()
    truth = synth.signatures
    markers = sorted({g for genes in synth.truth["marker_genes"].values() for g in genes})
    RegressionModel.setup_anndata(ref, labels_key="cell_type", batch_key="batch")
    mod = RegressionModel(ref)
    mod.train(max_epochs=150, lr=0.01, progress_bar=False, seed=0, device="cpu")
    est = mod.signatures()
    avg = cluster_average_signatures(ref, "cell_type")
    r_reg, r_reg_m = log_r(est, truth), log_r(est, truth, markers)
    r_avg, r_avg_m = log_r(avg, truth), log_r(avg, truth, markers)
    print(
        f"\nsynthetic reference: log r regression {r_reg:.3f} (markers {r_reg_m:.3f}); "
        f"cluster averages {r_avg:.3f} (markers {r_avg_m:.3f})"
    )
    assert r_reg > 0.95 and r_reg_m > 0.95
    assert r_reg >= r_avg - 0.005


def batch_confounded_reference(synth, thin: float = 0.4, seed: int = 1):
    """The synthetic reference with batch effects that averages cannot undo.

    On top of the generator's gene-wise batch effect (``truth['reference_batch_effect']``): each type's
    cells come mostly (~85 %) from one batch, and batch 1 has lower sensitivity (binomial thinning of
    its counts to ``thin``; a thinned NB is NB with the mean scaled).
    """
    rng = np.random.default_rng(seed)
    ref = synth.reference
    types = ref.obs["cell_type"].cat.codes.to_numpy()
    batch = ref.obs["batch"].cat.codes.to_numpy()
    main = np.where(types % 2 == 0, batch == 0, batch == 1)
    ref = ref[main | (rng.random(len(batch)) < 0.18)].copy()
    batch = ref.obs["batch"].cat.codes.to_numpy()
    X = ref.X.toarray()
    X[batch == 1] = rng.binomial(X[batch == 1].astype(np.int64), thin)
    ref.X = sparse.csr_matrix(X.astype(np.float32))
    return ref


def test_regression_beats_cluster_averages_with_batch_effects(synth):
    """Evidence: with batch effects, the regression is at least as close to the truth as cluster averages."""
    effect = synth.truth["reference_batch_effect"]
    assert np.log(effect.to_numpy()).std() > 0.1  # the generator's own gene-wise batch effect is there
    ref = batch_confounded_reference(synth)
    truth = synth.signatures
    markers = sorted({g for genes in synth.truth["marker_genes"].values() for g in genes})
    avg = cluster_average_signatures(ref, "cell_type")
    RegressionModel.setup_anndata(ref, labels_key="cell_type", batch_key="batch")
    mod = RegressionModel(ref)
    mod.train(max_epochs=150, lr=0.01, progress_bar=False, seed=0, device="cpu")
    est = mod.signatures()
    r_reg, r_avg = log_r(est, truth), log_r(avg, truth)
    r_reg_m, r_avg_m = log_r(est, truth, markers), log_r(avg, truth, markers)
    print(
        f"\nbatch-confounded reference: log r regression {r_reg:.3f} (markers {r_reg_m:.3f}); "
        f"cluster averages {r_avg:.3f} (markers {r_avg_m:.3f})"
    )
    y_e = mod.posterior_quantile(0.5)["detection_mean_y_e"].ravel()
    assert 0.25 < y_e[1] / y_e[0] < 0.6  # the thinned batch's lower sensitivity is found (0.4)
    assert r_reg >= r_avg and r_reg_m >= r_avg_m
    assert r_reg - r_avg > 0.02


# --------------------------------------------------------------------------- CLI
def test_cli_reference(tmp_path, capsys):
    from napari_cell2location._cli import main

    ad = small_reference()
    path = tmp_path / "ref.h5ad"
    ad.write_h5ad(path)
    out = tmp_path / "sig.csv"
    rc = main(["reference", str(path), "--labels-key", "ct", "--out", str(out), "--method", "average", "--quiet"])
    assert rc == 0
    pd.testing.assert_frame_equal(read_signatures(out), cluster_average_signatures(ad, "ct"), check_names=False)
    out2, h5 = tmp_path / "sig2.tsv", tmp_path / "ref_out.h5ad"
    argv = ["reference", str(path), "--labels-key", "ct", "--batch-key", "batch", "--out", str(out2)]
    argv += ["--max-epochs", "10", "--lr", "0.01", "--use-quantiles", "--no-filter", "--out-h5ad", str(h5), "--quiet"]
    assert main(argv) == 0
    sig = read_signatures(out2)
    assert sig.shape == (40, 3)
    pd.testing.assert_frame_equal(read_signatures(h5), sig, check_exact=False, rtol=1e-5)
    rc = main(["reference", str(path), "--labels-key", "nope", "--out", str(out), "--method", "average", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "'nope' is not a column" in err and "'ct'" in err


def test_reference_package_imports_no_gui():
    code = (
        "import sys, napari_cell2location.reference as r\n"
        "bad = [m for m in ('napari', 'qtpy', 'magicgui') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------- real data
@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(LYMPH), reason="shared lymph node data not present")
def test_lymph_node_reference_to_spatial_end_to_end():
    """Real data: 330-cell lymph node reference -> signatures -> Cell2location on the 1,000 real spots."""
    from napari_cell2location import Cell2location

    ref = anndata.read_h5ad(os.path.join(LYMPH, "reference_lymph_node_330cells.h5ad"))
    spots = anndata.read_h5ad(os.path.join(LYMPH, "visium_lymph_node_1000spots.h5ad"))
    ref = ref[:, ref.var_names.isin(spots.var_names)].copy()  # keep it quick: the genes the fit can use
    genes = filter_genes(ref, cell_count_cutoff=5, cell_percentage_cutoff2=0.03, nonz_mean_cutoff=1.12)
    ref = ref[:, genes].copy()
    RegressionModel.setup_anndata(ref, labels_key="cell_type", batch_key="sample")
    mod = RegressionModel(ref)
    mod.train(max_epochs=60, lr=0.01, progress_bar=False, seed=0, device="cpu")
    mod.export_posterior(ref, use_quantiles=True)
    sig = signatures_from_adata(ref)
    assert sig.shape == (len(genes), 11) and np.isfinite(sig.to_numpy()).all()
    Cell2location.setup_anndata(spots)
    c2l = Cell2location(spots, sig, N_cells_per_location=30, detection_alpha=20)
    c2l.train(max_epochs=100, lr=0.01, progress_bar=False, seed=0, device="cpu")
    c2l.export_posterior(spots, use_quantiles=True, add_to_obsm=["means", "q05"])
    q05 = spots.obsm["q05_cell_abundance_w_sf"]
    assert q05.shape == (1000, 11) and np.isfinite(q05.to_numpy()).all()


def test_train_names_unexpected_arguments_and_returns_the_model(tiny):
    """Both models' train() refuse unknown keywords with the accepted list, before any step."""
    from napari_cell2location import Cell2location

    ad = small_reference()
    RegressionModel.setup_anndata(ad, labels_key="ct")
    reg = RegressionModel(ad)
    accepted = r"\['checkpoint_dir', 'checkpoint_every', 'device', 'resume', 'seed'\]"
    with pytest.raises(TypeError, match=r"\['bogus'\]; accepted: " + accepted):
        reg.train(max_epochs=1, bogus=1)
    assert not reg.is_trained_
    assert reg.train(max_epochs=1, batch_size=None, progress_bar=False, device="cpu") is reg
    adata, sig, _ = tiny
    mod = Cell2location(adata, sig)
    with pytest.raises(TypeError, match=r"accepted: \['checkpoint_dir', 'checkpoint_every', 'device', 'early_st"):
        mod.train(max_epochs=1, lr_schedule=1)
    assert mod.train(max_epochs=1, progress_bar=False, device="cpu") is mod and mod.is_trained_
